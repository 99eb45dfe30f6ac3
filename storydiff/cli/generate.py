"""``storydiff generate``: a story file in; frames, comic pages and metadata out."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import DTYPES, fail


def register(subparsers) -> None:
    gen = subparsers.add_parser(
        "generate",
        help="generate a consistent story: frames, comic pages and metadata",
        description="Story file: character lines `[Name] description`, a `---` line, then one frame per "
        "line with [Name] tags ([NC]: no character) and an optional `#caption`. Models: a diffusers path "
        "or hub id, or tiny-sdxl / tiny-sd15 (random weights, offline, for smoke tests).",
    )
    gen.add_argument(
        "--model",
        help="diffusers model path or hub id; offline random weights: tiny-sdxl, tiny-sd15, random-sdxl",
    )
    gen.add_argument("--story", help="story file")
    gen.add_argument("--characters", default=None, help="character file (instead of a block in --story)")
    gen.add_argument("--out", help="output folder")
    gen.add_argument(
        "--mode",
        choices=("bank", "window"),
        default="bank",
        help="bank: identity frames write a bank the others read (official); window: long stories, "
        "neighbours within --window, chunked denoising with checkpoints",
    )
    gen.add_argument("--chunk-size", type=int, default=8, help="window mode: frames per UNet call")
    gen.add_argument("--tile", type=int, default=None, help="window mode: the paper's tiled form, tile size")
    gen.add_argument(
        "--checkpoint-every", type=int, default=None, help="window mode: checkpoint every N steps"
    )
    gen.add_argument("--resume", default=None, metavar="DIR", help="continue an interrupted window-mode run")
    gen.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    gen.add_argument("--style", default="comic book", help="style template (storydiff/styles.py), or 'none'")
    gen.add_argument("--negative", default="", help="extra negative prompt")
    gen.add_argument("--steps", type=int, default=30)
    gen.add_argument("--guidance", type=float, default=5.0, help="<= 1 turns classifier-free guidance off")
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--rate", type=float, default=0.5, help="share of tokens each frame offers (0..1)")
    gen.add_argument(
        "--level-rate",
        action="append",
        default=[],
        metavar="LEVEL=RATE",
        help="per-level rate, LEVEL in 8, 16, 32, 64 (official sa32 = 32, sa64 = 16)",
    )
    gen.add_argument(
        "--window", type=int, default=None, help="neighbours within W frames (window mode default 2)"
    )
    gen.add_argument("--warmup-steps", type=int, default=1)
    gen.add_argument("--no-skip", action="store_true", help="disable the random layer-skip schedule")
    gen.add_argument("--id-frames", type=int, default=2, help="identity frames per character")
    gen.add_argument("--read-batch", type=int, default=4, help="frames per UNet batch after the identities")
    gen.add_argument("--layout", choices=("grid", "classic"), default="grid")
    gen.add_argument("--save-banks", action="store_true", help="write each character's bank (safetensors)")
    gen.add_argument(
        "--load-bank", action="append", default=[], metavar="[NAME=]PATH", help="reuse a character from a run"
    )
    gen.add_argument("--device", default=None, help="default: cuda if available")
    gen.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp16 on CUDA, fp32 on CPU")
    gen.set_defaults(run=run)


def _parse_level_rates(items: list[str]) -> dict[int, float]:
    rates = {}
    for item in items:
        level, _, rate = item.partition("=")
        try:
            rates[int(level)] = float(rate)
        except ValueError:
            raise ValueError(f"--level-rate expects LEVEL=RATE such as 32=0.5, got {item!r}") from None
    return rates


def _resume_args(args: argparse.Namespace) -> None:
    """Fill every run setting from the metadata of the run being resumed (its story text included)."""
    from ..output import read_metadata

    meta = read_metadata(args.resume)
    settings, consistency = meta["settings"], meta["consistency"]
    args.model, args.out, args.story_text = meta["model"], args.resume, meta["story_text"]
    args.mode, args.seed, args.style, args.negative = (
        meta["mode"],
        meta["seed"],
        meta["style"],
        meta["negative_prompt"],
    )
    args.steps, args.guidance = settings["num_inference_steps"], settings["guidance_scale"]
    args.height, args.width, args.layout = settings["height"], settings["width"], settings["layout"]
    args.id_frames, args.read_batch = settings["id_frames"], settings["read_batch_size"]
    args.chunk_size, args.checkpoint_every = settings["chunk_size"], settings["checkpoint_every"]
    args.consistency = consistency


def run(args: argparse.Namespace) -> int:
    import torch

    from ..config import ConsistencyConfig
    from ..pipeline import StoryDiffusionPipeline
    from ..story import load_story, parse_story

    try:
        if args.resume:
            _resume_args(args)
            story = parse_story(args.story_text)
            consistency = dict(args.consistency)
            consistency["level_rates"] = {int(k): v for k, v in consistency["level_rates"].items()}
            config = ConsistencyConfig(**consistency)
        else:
            missing = [f"--{name}" for name in ("model", "story", "out") if getattr(args, name) is None]
            if missing:
                raise ValueError(f"{', '.join(missing)} required (or --resume DIR)")
            story = load_story(args.story, Path(args.characters).read_text() if args.characters else None)
            window = args.window if args.window is not None else (2 if args.mode == "window" else None)
            config = ConsistencyConfig(
                rate=args.rate,
                level_rates=_parse_level_rates(args.level_rate),
                warmup_steps=args.warmup_steps,
                skip_prob_early=0.0 if args.no_skip else 0.3,
                skip_prob_late=0.0 if args.no_skip else 0.1,
                window=window,
                tile=args.tile,
                seed=args.seed,
            )
    except (OSError, ValueError, KeyError) as exc:
        return fail(str(exc))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        pipeline = StoryDiffusionPipeline.from_pretrained(args.model, config, device=device, dtype=dtype)
        for item in args.load_bank:
            name, _, path = item.rpartition("=")
            print(f"loaded bank of {pipeline.load_bank(path, name or None)!r} from {path}")
        pipeline.pipe.set_progress_bar_config(leave=False)
        result = pipeline(
            story,
            out_dir=args.out,
            overwrite=args.overwrite,
            mode=args.mode,
            style=args.style,
            negative_prompt=args.negative,
            id_frames=args.id_frames,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            height=args.height,
            width=args.width,
            seed=args.seed,
            read_batch_size=args.read_batch,
            chunk_size=args.chunk_size,
            checkpoint_every=args.checkpoint_every,
            resume=bool(args.resume),
            layout=args.layout,
            save_banks=args.save_banks,
        )
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as exc:
        return fail(str(exc))
    for name, size in result.bank_bytes.items():
        print(f"identity bank of {name!r}: {size / 2**20:.1f} MiB")
    print(f"{len(result.images)} frames and {len(result.pages)} page(s) written to {result.out_dir}")
    return 0
