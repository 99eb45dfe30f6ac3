"""``storydiff video``: transition videos between consecutive frames of a story (Stable Video Diffusion)."""

from __future__ import annotations

import argparse
import warnings

from .common import DTYPES, check_output_dir, fail, positive_int, resolve_device, resolve_dtype, video_size


def register(subparsers, parents: list) -> None:
    parser = subparsers.add_parser(
        "video",
        parents=parents,
        help="animate a story: transition videos (Stable Video Diffusion) or consistent shots (Wan I2V)",
        description="Animate a story generated as images (a `storydiff generate` folder). With Stable Video "
        "Diffusion (--model tiny-svd or an SVD model; --svd is the same flag): transition videos between "
        "consecutive frames, each frame conditioned on its own CLIP embedding, predicted by a Semantic "
        "Motion Predictor (--predictor) or linearly interpolated. With a Wan 2.x image-to-video model "
        "(--model tiny-wan-i2v or a Wan I2V folder): each frame becomes a shot starting on it, the shots "
        "kept consistent by consistent attention (identity banks, as in generate); --transitions makes "
        "first-last-frame clips from each frame to the next instead, each attending to its neighbours "
        "(window mode; Wan 2.1 FLF2V or Wan 2.2 I2V models).",
    )
    parser.add_argument("--story-dir", required=True, help="story folder (frames/ + metadata.json, or PNGs)")
    parser.add_argument("--out", required=True, help="output folder for the clips and the story video")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the story video and clips already in --out (default: refuse)",
    )
    models = parser.add_mutually_exclusive_group(required=True)
    models.add_argument(
        "--model",
        help="the video model: a Stable Video Diffusion or Wan 2.x image-to-video path or hub id, or "
        "offline random weights: tiny-svd, tiny-wan-i2v, tiny-wan-flf2v, tiny-wan2.2-i2v (default: none; "
        "give --model or --svd)",
    )
    models.add_argument(
        "--svd",
        help="a Stable Video Diffusion model, as before --model took Wan models too (default: none)",
    )
    parser.add_argument(
        "--transitions",
        action="store_true",
        help="Wan: a first-last-frame clip from each frame to the next, instead of a shot per frame",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="Wan: consistent attention's sampling rate across shots (default: the library's)",
    )
    parser.add_argument(
        "--predictor",
        default=None,
        help="SemanticMotionPredictor folder (save_pretrained) (default: none; the intermediate frames' "
        "embeddings are linearly interpolated)",
    )
    parser.add_argument(
        "--frames",
        type=positive_int,
        default=None,
        help="frames per clip: SVD at least 3 (default: predictor's + 2, else SVD's); Wan 4k+1 (default: the "
        "model's, 81)",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=25, help="denoising steps (default: %(default)s)"
    )
    parser.add_argument(
        "--size",
        type=video_size,
        default=None,
        help="WxH (default: SVD 1024x576, tiny-svd 64x64; Wan: the story frames' size)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the first clip; clip i uses seed + i (default: %(default)s)",
    )
    parser.add_argument(
        "--fps",
        type=positive_int,
        default=None,
        help="frames per second of the files, and SVD's fps condition (default: 7 for SVD, 16 for Wan)",
    )
    parser.add_argument(
        "--motion-bucket-id",
        type=int,
        default=None,
        help="SVD's amount-of-motion condition (default: 127)",
    )
    parser.add_argument(
        "--noise-aug-strength",
        type=float,
        default=None,
        help="noise SVD adds to the conditioning image (default: 0.02)",
    )
    parser.add_argument(
        "--decode-chunk-size",
        type=positive_int,
        default=None,
        help="frames per VAE decode; fewer use less memory (default: all frames of a clip at once)",
    )
    parser.add_argument(
        "--device", default=None, help="device to run on (default: cuda if available, else cpu)"
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="dtype of the video model (default: float16 on CUDA, float32 on the CPU)",
    )
    parser.set_defaults(run=run)


def _check_video_folder(out: str, overwrite: bool) -> None:
    """A folder holding a story video is not replaced without --overwrite."""
    from pathlib import Path

    folder = Path(out)
    if overwrite or not folder.is_dir():
        return
    names = ("video.json", "story.gif", "story.mp4")
    found = [name for name in names if (folder / name).exists()] + [
        p.name for p in sorted(folder.glob("transition_*.*"))[:1]
    ]
    if found:
        raise ValueError(
            f"--out {out} already holds a story video ({', '.join(found)}); choose a new folder, or "
            "replace it with --overwrite"
        )


def _is_svd(model: str) -> bool:
    """Whether ``model`` names Stable Video Diffusion (tiny-svd, or a folder whose pipeline is SVD's)."""
    import json
    from pathlib import Path

    from ..families.reserved import TINY_SVD
    from ..families.svd import SVDPipeline

    index = Path(model).expanduser() / "model_index.json"
    if model == TINY_SVD or "stable-video-diffusion" in model.lower():
        return True
    return index.is_file() and json.loads(index.read_text()).get("_class_name") == SVDPipeline.__name__


def run(args: argparse.Namespace) -> int:
    if args.svd is None and not _is_svd(args.model):
        return run_wan(args)
    args.model = args.model or args.svd
    if args.transitions or args.rate is not None:
        flag = "--transitions" if args.transitions else "--rate"
        return fail(
            f"{flag} applies to Wan image-to-video models; Stable Video Diffusion always makes transitions"
        )
    # SVD's defaults (None until here: given to a Wan model, these flags are refused, not ignored)
    defaults = {"fps": 7, "motion_bucket_id": 127, "noise_aug_strength": 0.02}
    for name, default in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return run_svd(args)


def run_wan(args: argparse.Namespace) -> int:
    """Shots (or transitions) of a Wan I2V model from the story's frames: one story run, consistent."""
    from ..consistency.config import ConsistencyConfig
    from ..models.loading import load_pipeline
    from ..motion.keyframe_video import keyframe_story, transition_story
    from ..pipeline import StoryDiffusionPipeline
    from ..runs.settings import RunSettings
    from ..support.progress import default_progress

    svd_only = {
        "--predictor": args.predictor,
        "--decode-chunk-size": args.decode_chunk_size,
        "--motion-bucket-id": args.motion_bucket_id,
        "--noise-aug-strength": args.noise_aug_strength,
    }
    given = [flag for flag, value in svd_only.items() if value is not None]
    if given:
        return fail(f"{given[0]} applies to Stable Video Diffusion, not Wan models")
    try:
        device = resolve_device(args.device)
        check_output_dir(args.out)
        story, keyframes = (transition_story if args.transitions else keyframe_story)(args.story_dir)
        width, height = args.size or keyframes[0][0].size
        settings = RunSettings(
            # transitions show several characters each: neighbouring clips, not identity banks
            mode="window" if args.transitions else "bank",
            num_inference_steps=args.steps,
            seed=args.seed,
            height=height,
            width=width,
            shot_frames=args.frames,
            fps=args.fps,
            style="none",  # the keyframes have their style already; the story's prompts describe them
        )
        config = ConsistencyConfig(rate=args.rate)  # None: the model's (Wan: 0.1)
        pipe = load_pipeline(args.model, device=device, dtype=resolve_dtype(args.dtype))
        story_pipe = StoryDiffusionPipeline(pipe, config, model_name=args.model)
        if not story_pipe.family.needs_keyframes:
            return fail(
                f"--model {args.model} makes video from text: use `storydiff generate --model {args.model}`"
            )
        keyframes = [
            (first.resize((width, height)), last and last.resize((width, height)))
            for first, last in keyframes
        ]
        result = story_pipe(
            story,
            settings,
            out_dir=args.out,
            overwrite=args.overwrite,
            keyframes=keyframes,
            progress=default_progress(),
        )
    except (OSError, ValueError) as exc:  # ModelLoadError and InvalidSetting are ValueErrors
        return fail(str(exc))
    what = "transition clips" if args.transitions else "shots"
    print(f"{len(result.images)} {what}, the story video and storyboard written to {result.out_dir}")
    return 0


def run_svd(args: argparse.Namespace) -> int:
    from ..families.reserved import TINY_SVD
    from ..models.loading import ModelLoadError, load_svd_pipeline
    from ..motion.model import load_predictor
    from ..motion.story_video import read_story_frames, story_transitions
    from ..pages.video_io import MP4_PACKAGES
    from ..support.progress import default_progress

    try:
        device = resolve_device(args.device)
        check_output_dir(args.out)
        read_story_frames(args.story_dir)  # fail on a bad story before loading any model
        _check_video_folder(args.out, args.overwrite)
        if args.frames is not None and args.frames < 3:
            raise ValueError(
                f"--frames must be >= 3 (the start frame, at least one in between, the end frame), got "
                f"{args.frames}"
            )
        # The predictor first: it loads in a moment, and a bad path should not wait for the video model.
        predictor = load_predictor(args.predictor, device) if args.predictor else None
        svd_pipe = load_svd_pipeline(args.model, device, resolve_dtype(args.dtype))
        width, height = args.size or ((64, 64) if args.model == TINY_SVD else (1024, 576))
        with warnings.catch_warnings():
            # The note printed below says it once; the per-file warning would repeat it.
            warnings.filterwarnings("ignore", message="MP4 not written", category=RuntimeWarning)
            result = story_transitions(
                args.story_dir,
                args.out,
                svd_pipe,
                predictor,
                seed=args.seed,
                fps=args.fps,
                num_frames=args.frames,
                num_inference_steps=args.steps,
                height=height,
                width=width,
                motion_bucket_id=args.motion_bucket_id,
                noise_aug_strength=args.noise_aug_strength,
                decode_chunk_size=args.decode_chunk_size,
                # a bar labelled "clip i/N" on a terminal; one plain line per clip in a log
                progress=default_progress(),
            )
    except (FileNotFoundError, ValueError, ModelLoadError) as exc:
        return fail(str(exc))
    written = [p for t in result.transitions for p in (t.gif_path, t.mp4_path) if p]
    written += [p for p in (result.gif_path, result.mp4_path) if p]
    clips = len(result.transitions)
    print(f"{clips} transition{'' if clips == 1 else 's'} from {len(result.frame_paths)} frames; written:")
    print("  " + "\n  ".join(str(p) for p in written))
    if result.mp4_path is None:
        print(f"note: no MP4 encoder; pip install {' '.join(MP4_PACKAGES)} to also write MP4 files")
    return 0
