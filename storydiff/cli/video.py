"""``storydiff video``: transition videos between consecutive frames of a story (Stable Video Diffusion)."""

from __future__ import annotations

import argparse
import warnings

from .common import DTYPES, check_output_dir, fail, positive_int, resolve_device, resolve_dtype, video_size


def register(subparsers, parents: list) -> None:
    parser = subparsers.add_parser(
        "video",
        parents=parents,
        help="transition videos between consecutive frames of a story (Stable Video Diffusion)",
        description="Transition videos between consecutive frames of a story (a `storydiff generate` folder "
        "or a folder of PNGs) with Stable Video Diffusion, each frame conditioned on its own CLIP embedding: "
        "predicted by a Semantic Motion Predictor (--predictor) or linearly interpolated.",
    )
    parser.add_argument("--story-dir", required=True, help="story folder (frames/ + metadata.json, or PNGs)")
    parser.add_argument("--out", required=True, help="output folder for the clips and the story video")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the story video and clips already in --out (default: refuse)",
    )
    parser.add_argument(
        "--svd",
        required=True,
        help="Stable Video Diffusion path or hub id, or tiny-svd (random weights, offline)",
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
        help="frames per clip, at least 3: start, intermediates, end (default: predictor's + 2, else SVD's)",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=25, help="denoising steps (default: %(default)s)"
    )
    parser.add_argument(
        "--size", type=video_size, default=None, help="WxH (default: 64x64 for tiny-svd, else 1024x576)"
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
        default=7,
        help="frames per second of the files, and SVD's fps condition (default: %(default)s)",
    )
    parser.add_argument(
        "--motion-bucket-id",
        type=int,
        default=127,
        help="SVD's amount-of-motion condition (default: %(default)s)",
    )
    parser.add_argument(
        "--noise-aug-strength",
        type=float,
        default=0.02,
        help="noise SVD adds to the conditioning image (default: %(default)s)",
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


def run(args: argparse.Namespace) -> int:
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
        svd_pipe = load_svd_pipeline(args.svd, device, resolve_dtype(args.dtype))
        width, height = args.size or ((64, 64) if args.svd == TINY_SVD else (1024, 576))
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
