"""``storydiff eval``: character consistency and prompt fidelity of a finished story folder.

The folder and the options are checked before any encoder loads, so a typo answers at once; encoders load
before anything is written, so a missing checkpoint leaves the folder as it was.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import check_output_dir, fail, positive_int

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_DINO = "facebook/dinov2-base"


def encoder_options(parser: argparse.ArgumentParser) -> None:
    """--clip, --dino, --no-dino, --batch-size: the encoders of `eval` and `eval-suite`."""
    parser.add_argument(
        "--clip",
        default=DEFAULT_CLIP,
        metavar="PATH",
        help="CLIP folder or hub id (CLIPModel, tokenizer, image processor), or 'tiny' (random, offline) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--dino",
        default=DEFAULT_DINO,
        metavar="PATH",
        help="DINOv2 folder or hub id, or 'tiny' (random, offline) (default: %(default)s)",
    )
    parser.add_argument("--no-dino", action="store_true", help="CLIP only: skip the DINO identity score")
    parser.add_argument(
        "--batch-size", type=positive_int, default=16, help="frames per encoder call (default: %(default)s)"
    )


def register(subparsers, parents: list) -> None:
    parser = subparsers.add_parser(
        "eval",
        parents=parents,
        help="score a story folder: character consistency (CLIP-I, DINO) and prompt fidelity (CLIP-T)",
        description="Score a finished `storydiff generate` folder. Per character: the mean, std and min "
        "cosine similarity over every pair of its frames, in CLIP and DINOv2 image space. Per frame: CLIP-T, "
        "the cosine similarity of the frame with its story text (without the style's wording), and beside "
        "it with the styled prompt. Writes report.json, frames.csv, characters.csv and report.png into "
        "DIR/eval (or --out). Optional identity metrics: --face (dlib face descriptors, on the frames where "
        "a face is found) and --dreamsim (1 - DreamSim distance); --mask-dir measures identity on masked "
        "subjects. A video story (shots/shot_000/frame_0000.png, ...) is scored per shot: identity across "
        "shots and CLIP-T on --shot-samples frames of each, and each shot's temporal stability (consecutive "
        "frames). `--clip tiny --dino tiny`: random offline encoders that test the plumbing only; their "
        "numbers mean nothing.",
    )
    parser.add_argument("dir", metavar="DIR", help="story folder written by `storydiff generate`")
    encoder_options(parser)
    parser.add_argument(
        "--face",
        action="store_true",
        help="add face identity: cosine of dlib's 128-d face descriptors (HOG detector, 5-point landmarks) "
        "over each character's frames with a detected face; needs pip install dlib-bin "
        "face-recognition-models",
    )
    parser.add_argument(
        "--dreamsim",
        default=None,
        metavar="PATH",
        help="add DreamSim identity (1 - DreamSim distance) with the weights in folder PATH (never "
        "downloaded); needs pip install dreamsim",
    )
    parser.add_argument(
        "--mask-dir",
        default=None,
        metavar="DIR",
        help="measure identity on masked subjects: DIR/mask_007.png masks frame 7 (white keeps, black "
        "becomes gray; DIR/mask_007_Bob.png for Bob alone); frames without a mask are measured whole; "
        "CLIP-T always sees whole frames (default: the story folder's masks/ when its run kept subject "
        "masks, else none)",
    )
    parser.add_argument(
        "--no-masks",
        action="store_true",
        help="measure whole frames even when the story folder keeps subject masks",
    )
    parser.add_argument(
        "--shot-samples",
        type=positive_int,
        default=3,  # evaluation.report.DEFAULT_SHOT_SAMPLES (not imported: the parser loads no torch)
        metavar="K",
        help="video stories: frames sampled per shot, evenly spaced with the first and last, for identity "
        "across shots and CLIP-T; temporal stability uses every frame (default: %(default)s)",
    )
    parser.add_argument("--out", default=None, metavar="DIR", help="output folder (default: DIR/eval)")
    parser.add_argument(
        "--device", default=None, help="device the encoders run on (default: cuda if available, else cpu)"
    )
    parser.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="evaluate the frames a running, failed or interrupted run has written so far",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluation import evaluate_story, load_clip, load_dino, read_story_frames, summary_lines
    from ..evaluation.dreamsim import load_dreamsim
    from ..evaluation.face import load_face
    from ..evaluation.masks import MaskDir
    from ..evaluation.report import check_video_options
    from ..support.progress import default_progress
    from .common import resolve_device

    try:
        device = resolve_device(args.device)
        if args.out is not None:
            check_output_dir(args.out)
        frames = read_story_frames(args.dir, allow_incomplete=args.allow_incomplete)  # before any loading
        mask_dir = args.mask_dir
        kept = Path(args.dir) / "masks"  # a story run with subject masks keeps them here
        if mask_dir is None and not args.no_masks and kept.is_dir():
            mask_dir = kept
            print(
                f"identity on masked subjects: the run's subject masks in {kept} (--no-masks: whole frames)"
            )
        check_video_options(frames, face=args.face, mask=mask_dir is not None)
        mask_fn = None
        if mask_dir is not None:
            mask_fn = MaskDir(mask_dir)
            mask_fn.check(frames.indices)
        clip = load_clip(args.clip, device)
        dino = None if args.no_dino else load_dino(args.dino, device)
        face = load_face() if args.face else None
        dreamsim = None if args.dreamsim is None else load_dreamsim(args.dreamsim, device)
        result = evaluate_story(
            args.dir,
            clip,
            dino,
            out_dir=args.out,
            allow_incomplete=args.allow_incomplete,
            batch_size=args.batch_size,
            progress=default_progress(),
            dreamsim=dreamsim,
            face=face,
            mask_fn=mask_fn,
            shot_samples=args.shot_samples,
        )
    except (OSError, ValueError) as exc:  # ModelLoadError is a ValueError
        return fail(str(exc))
    print("\n".join(summary_lines(result.report)))
    print("written:\n  " + "\n  ".join(str(path) for path in result.paths.values()))
    return 0
