"""``storydiff train-motion``: train the Semantic Motion Predictor.

storydiff train-motion --data videos/ --out runs/smp --encoder PATH_TO_CLIP --frames 14 --steps 20000
storydiff train-motion --data videos/ --out runs/smp --resume        # same flags, continues the run
storydiff train-motion --data demo/ --out runs/tiny --encoder tiny --hidden 64 --layers 2 --heads 4
"""

from __future__ import annotations

import argparse

from ..motion.defaults import DEFAULT_MODEL
from .common import fail


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
        help="CLIP vision encoder; 'tiny' builds a random one offline (default: tiny)",
    )
    p.add_argument(
        "--tokens", action="store_true", help="use the encoder's token sequence instead of pooled embeds"
    )
    p.add_argument("--frames", type=int, default=14, help="intermediate frames L per clip (default: 14)")
    p.add_argument("--stride", type=int, default=1, help="frame step inside a clip (default: 1)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default: 1000)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the clips (replaces --steps)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 5%% of the steps)")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=DEFAULT_MODEL["hidden_dim"], help="transformer width")
    p.add_argument("--layers", type=int, default=DEFAULT_MODEL["num_layers"])
    p.add_argument("--heads", type=int, default=DEFAULT_MODEL["num_heads"])
    p.add_argument("--dropout", type=float, default=DEFAULT_MODEL["dropout"])
    p.add_argument("--holdout", type=float, default=0.15, help="fraction of videos held out (default: 0.15)")
    p.add_argument("--cache-dir", default=None, help="embedding cache (default: OUT/embedding_cache)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="bf16 autocast is CUDA-only (default: auto = bf16 on CUDA)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..loading import ModelLoadError
    from ..motion.train import train_motion

    try:
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
            progress=not args.no_progress,
        )
    except (FileNotFoundError, NotADirectoryError, FileExistsError, ValueError, ModelLoadError) as exc:
        return fail(str(exc))
    ev = result.eval
    print(f"model: {result.model_dir}")
    print(
        f"held-out cosine similarity ({ev['clips']} clips, {ev['videos']} videos): predictor "
        f"{ev['cosine_predictor']:.4f} vs linear interpolation {ev['cosine_interpolation']:.4f} "
        f"(gain {ev['cosine_gain']:+.4f})"
    )
    print(f"eval: {result.out_dir / 'eval.json'}  loss curve: {result.out_dir / 'loss.png'}")
    return 0
