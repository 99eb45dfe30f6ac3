"""``storydiff train-motion``: train the Semantic Motion Predictor.

storydiff train-motion --data videos/ --out runs/smp --encoder PATH_TO_CLIP --frames 14 --steps 20000
storydiff train-motion --data videos/ --out runs/smp --resume        # same flags, continues the run
storydiff train-motion --data demo/ --out runs/tiny --encoder tiny --hidden 64 --layers 2 --heads 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..motion.defaults import DEFAULT_MODEL
from .common import check_output_dir, fail

if TYPE_CHECKING:  # the CLI package imports no torch until a command runs
    from ..motion.train import TrainPlan


def register(subparsers, parents: list) -> None:
    p = subparsers.add_parser(
        "train-motion",
        parents=parents,
        help="train the Semantic Motion Predictor on videos or frame folders",
        description="Train the Semantic Motion Predictor on a folder of videos (GIFs, frame folders, "
        "or video files with imageio installed).",
    )
    p.add_argument("--data", required=True, metavar="DIR", help="folder of videos")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (checkpoints, model, eval)")
    p.add_argument(
        "--encoder",
        default="tiny",
        metavar="tiny|PATH_OR_ID",
        help="CLIP vision encoder; 'tiny' builds a random one offline (default: %(default)s)",
    )
    p.add_argument(
        "--tokens",
        action="store_true",
        help="use the encoder's token sequence instead of pooled embeds (default: pooled)",
    )
    p.add_argument(
        "--frames", type=int, default=14, help="intermediate frames L per clip (default: %(default)s)"
    )
    p.add_argument("--stride", type=int, default=1, help="frame step inside a clip (default: %(default)s)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default: %(default)s)")
    p.add_argument(
        "--epochs", type=int, default=None, help="passes over the clips; replaces --steps (default: unset)"
    )
    p.add_argument("--batch-size", type=int, default=32, help="clips per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default: %(default)s)")
    p.add_argument(
        "--weight-decay", type=float, default=0.01, help="AdamW weight decay (default: %(default)s)"
    )
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 5%% of the steps)")
    p.add_argument(
        "--checkpoint-every", type=int, default=500, help="steps between checkpoints (default: %(default)s)"
    )
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument(
        "--seed", type=int, default=0, help="model init, batch order and split (default: %(default)s)"
    )
    p.add_argument(
        "--hidden",
        type=int,
        default=DEFAULT_MODEL["hidden_dim"],
        help="transformer width (default: %(default)s)",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=DEFAULT_MODEL["num_layers"],
        help="transformer layers (default: %(default)s)",
    )
    p.add_argument(
        "--heads", type=int, default=DEFAULT_MODEL["num_heads"], help="attention heads (default: %(default)s)"
    )
    p.add_argument(
        "--dropout",
        type=float,
        default=DEFAULT_MODEL["dropout"],
        help="dropout in the transformer layers (default: %(default)s)",
    )
    p.add_argument(
        "--holdout", type=float, default=0.15, help="fraction of videos held out (default: %(default)s)"
    )
    p.add_argument("--cache-dir", default=None, help="embedding cache (default: OUT/embedding_cache)")
    p.add_argument("--device", default=None, help="device to train on (default: cuda if available, else cpu)")
    p.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="bf16 autocast is CUDA-only (default: %(default)s = bf16 on CUDA)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress at all (default: a bar when stderr is a terminal, else a line per checkpoint)",
    )
    p.set_defaults(run=run)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _about(seconds: float) -> str:
    if seconds < 1:
        return "less than a second"
    if seconds < 90:
        return f"about {seconds:.0f} s"
    if seconds < 90 * 60:
        return f"about {seconds / 60:.1f} min"
    return f"about {seconds / 3600:.1f} h"


def describe_plan(plan: TrainPlan) -> str:
    """The two lines printed before training: the data (videos, frames, clips, embedding size) and the run
    (steps, batch, epochs, measured seconds per step and the time it adds up to)."""
    data = (
        f"data: {_count(plan.train_videos, 'training video')} ({_count(plan.train_frames, 'frame')}, "
        f"{_count(plan.train_clips, 'clip')}), {_count(plan.heldout_videos, 'held-out video')} "
        f"({_count(plan.heldout_frames, 'frame')}, {_count(plan.heldout_clips, 'clip')}); "
        f"embeddings {plan.tokens} x {plan.embed_dim} (tokens x dims) per frame"
    )
    left = plan.steps - plan.start_step
    steps = f"{plan.steps} steps" if not plan.start_step else f"{left} of {plan.steps} steps (resuming)"
    run = f"run: {steps} of {plan.batch_size} clips (~{plan.epochs:.3g} epochs)"
    if not left:
        return f"{data}\n{run}: nothing left to train"
    if plan.seconds_per_step is None:
        return f"{data}\n{run}; a short run, not timed"
    return (
        f"{data}\n{run}; ~{plan.seconds_per_step:.3g} s per step (median of {plan.timed_steps} timed "
        f"steps) -> {_about(plan.estimated_seconds)}, plus checkpoints and the final evaluation"
    )


class _Report:
    """What the user sees: the plan before the first step, then a bar on a terminal or, in a log, one
    plain line per checkpoint (a bar there turns into carriage returns, a line per step into noise)."""

    def __init__(self, checkpoint_every: int, lines: bool) -> None:
        self.checkpoint_every, self.lines = checkpoint_every, lines
        self.steps, self.began = 0, time.perf_counter()

    def plan(self, plan: TrainPlan) -> None:
        print(describe_plan(plan), flush=True)
        self.steps, self.began = plan.steps, time.perf_counter()

    def step(self, step: int, loss: float) -> None:
        if self.lines and (step % self.checkpoint_every == 0 or step == self.steps):
            elapsed = time.perf_counter() - self.began
            print(
                f"train-motion: step {step}/{self.steps} done (loss {loss:.4g}), {elapsed:.1f} s",
                file=sys.stderr,
            )


def _check_model_flags(args: argparse.Namespace) -> None:
    """The predictor's size and --resume, checked before any video is read or embedded (ValueError naming
    the flag); --resume with nothing to resume warns."""
    import warnings

    from ..motion.checkpoints import latest_checkpoint

    for flag, value in (("--hidden", args.hidden), ("--layers", args.layers), ("--heads", args.heads)):
        if value < 1:
            raise ValueError(f"{flag} must be a whole number >= 1, got {value}")
    if args.hidden % args.heads:
        raise ValueError(f"--hidden {args.hidden} must be divisible by --heads {args.heads}")
    if not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout:g}")
    if args.resume and (not Path(args.out).is_dir() or latest_checkpoint(args.out) is None):
        warnings.warn(f"--resume: no checkpoint in {args.out}; training starts from step 1", stacklevel=2)


def run(args: argparse.Namespace) -> int:
    from ..models.loading import ModelLoadError
    from ..motion.train import train_motion

    bar = not args.no_progress and sys.stderr.isatty()
    report = _Report(args.checkpoint_every, lines=not args.no_progress and not bar)
    try:
        check_output_dir(args.out)
        _check_model_flags(args)
        result = train_motion(
            args.data,
            args.out,
            encoder=args.encoder,
            tokens=args.tokens,
            num_frames=args.frames,
            stride=args.stride,
            steps=args.steps,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            warmup_steps=args.warmup,
            mixed_precision={"auto": None, "bf16": True, "fp32": False}[args.precision],
            seed=args.seed,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            holdout=args.holdout,
            cache_dir=args.cache_dir,
            device=args.device,
            model_config={
                "hidden_dim": args.hidden,
                "num_layers": args.layers,
                "num_heads": args.heads,
                "dropout": args.dropout,
            },
            progress=bar,
            callback=report.step,
            on_plan=report.plan,
        )
    except (FileNotFoundError, NotADirectoryError, FileExistsError, ValueError, ModelLoadError) as exc:
        return fail(str(exc))
    ev = result.eval
    print(f"model: {result.model_dir}")
    print(
        f"held-out cosine similarity ({_count(ev['clips'], 'clip')}, {_count(ev['videos'], 'video')}): "
        f"predictor {ev['cosine_predictor']:.4f} vs linear interpolation {ev['cosine_interpolation']:.4f} "
        f"(gain {ev['cosine_gain']:+.4f})"
    )
    print(f"eval: {result.out_dir / 'eval.json'}  loss curve: {result.out_dir / 'loss.png'}")
    return 0
