"""``storydiff`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = ("float16", "bfloat16", "float32")


def _bench(args: argparse.Namespace) -> int:
    import torch

    from .benchmark import op_suite, unet_suite
    from .benchmark.environment import environment
    from .benchmark.providers import PROVIDERS, default_providers
    from .benchmark.results import UNET_PANELS, format_table, plot_rows, save_rows

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda given but no CUDA device is available", file=sys.stderr)
        return 2
    size = args.size if args.size != "auto" else ("full" if device.type == "cuda" else "cpu")
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    providers = args.providers.split(",") if args.providers else default_providers(device, size)
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        print(f"error: unknown provider(s) {unknown}; choose from {list(PROVIDERS)}", file=sys.stderr)
        return 2
    env = environment(device)
    out = Path(args.out)
    written = []
    if args.suite in ("op", "all"):
        cases = {"cpu": op_suite.cpu_cases, "full": op_suite.gpu_cases, "headline": op_suite.headline_cases}[
            size
        ]()
        print(f"op suite: {len(cases)} cases x {len(providers)} providers on {env['device']} ({dtype})")
        rows = op_suite.run_op_suite(cases, providers, device=device, dtype=dtype, env=env)
        print(format_table(rows))
        written += [*save_rows(rows, out, f"op-{size}", env["device"])]
        if not args.no_plot:
            written.append(plot_rows(rows, written[-2].with_suffix(".png")))
    if args.suite in ("unet", "all"):
        model = "tiny" if size == "cpu" else "full"
        cases = unet_suite.cpu_cases() if model == "tiny" else unet_suite.gpu_cases()
        print(f"unet suite: {model} SDXL UNet, {len(cases)} cases on {env['device']} ({dtype})")
        rows = unet_suite.run_unet_suite(
            cases, list(unet_suite.PROVIDERS), size=model, device=device, dtype=dtype, env=env
        )
        print(unet_suite.format_unet_table(rows))
        written += [*save_rows(rows, out, f"unet-{model}", env["device"])]
        if not args.no_plot:
            title = f"SDXL UNet ({model}) step, 4 identity frames, {env['device']}"
            written.append(plot_rows(rows, written[-2].with_suffix(".png"), title, UNET_PANELS))
    if args.suite == "motion":
        from .motion.compiled import benchmark_compiled
        from .motion.model import SemanticMotionPredictor

        # paper-like predictor on a GPU (CLIP ViT-H/14 width 1024, 8 layers); a small one on a CPU
        gpu_size = {"embed_dim": 1024, "hidden_dim": 1024, "num_layers": 8}
        cpu_size = {"embed_dim": 64, "hidden_dim": 64, "num_layers": 2, "num_heads": 4}
        size = gpu_size if device.type == "cuda" else cpu_size
        model = SemanticMotionPredictor(num_frames=14, **size)
        rows = [{**row, **env} for row in benchmark_compiled(model, (1, 8), device)]
        for row in rows:
            eager, compiled, speedup = row["eager_ms"], row["compiled_ms"], row["speedup"]
            print(
                f"motion predictor batch {row['batch_size']}: eager {eager:.2f} ms, "
                f"compiled {compiled:.2f} ms ({speedup:.2f}x, outputs match: {row['match']})"
            )
        written += [*save_rows(rows, out, "motion-compiled", env["device"])]
    print("written:\n  " + "\n  ".join(str(p) for p in written))
    return 0


def _profile_vram(args: argparse.Namespace) -> int:
    import torch

    from .benchmark.environment import environment
    from .benchmark.memory import MemorySampler
    from .benchmark.results import save_rows, write_json_file
    from .benchmark.vram import MODES, profile_story_lengths, save_plots, timeline_rows
    from .loading import load_pipeline

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    probe = MemorySampler(device)
    with probe:
        pass
    gpu = probe.source == "nvml"
    if not gpu:
        reason = probe.note or "no GPU"
        print(f"NVML unavailable for this run ({reason}); profiling host memory with tiny-sdxl at tiny sizes")
    model = args.model or ("random-sdxl" if gpu else "tiny-sdxl")
    lengths = [int(n) for n in (args.lengths or ("4,8,16,32" if gpu else "4,8,16")).split(",")]
    modes = args.modes.split(",") if args.modes else list(MODES)
    steps = args.steps or (20 if gpu else 2)
    side = args.size or (1024 if gpu else 128)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        pipe = load_pipeline(model, device=device, dtype=dtype, progress_bar=False)
        rows, timelines = profile_story_lengths(
            pipe,
            lengths=lengths,
            modes=modes,
            steps=steps,
            height=side,
            width=side,
            id_frames=args.id_frames,
            read_batch=args.read_batch,
            device=device,
        )
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    env = environment(device)
    rows = [{**row, "model": model, "resolution": side, **env} for row in rows]
    for row in rows:
        peak = row["peak_bytes"] / 2**30 if row["peak_bytes"] else float("nan")
        source, seconds = row["source"], row["seconds"]
        print(
            f"{row['mode']:<16} {row['frames']:>4} frames  peak {peak:7.2f} GiB ({source})  {seconds} s  "
            f"{row['status']}"
        )
    json_path, csv_path = save_rows(rows, Path(args.out), f"vram-{model}", env["device"])
    timeline = write_json_file(
        json_path.with_name(json_path.stem + "_timeline.json"), timeline_rows(timelines)
    )
    plots = save_plots(rows, timelines, json_path.with_suffix(""))
    print("written:\n  " + "\n  ".join(str(p) for p in (json_path, csv_path, timeline, *plots)))
    return 0


def _parse_level_rates(items: list[str]) -> dict[int, float]:
    rates = {}
    for item in items:
        level, _, rate = item.partition("=")
        try:
            rates[int(level)] = float(rate)
        except ValueError:
            raise SystemExit(f"error: --level-rate expects LEVEL=RATE such as 32=0.5, got {item!r}") from None
    return rates


def _resume_args(args: argparse.Namespace) -> None:
    """Fill every run setting from the metadata of the run being resumed (its story text included)."""
    from .output import read_metadata

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


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .config import ConsistencyConfig
    from .pipeline import StoryDiffusionPipeline
    from .story import load_story, parse_story

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
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, size in result.bank_bytes.items():
        print(f"identity bank of {name!r}: {size / 2**20:.1f} MiB")
    print(f"{len(result.images)} frames and {len(result.pages)} page(s) written to {result.out_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="storydiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser(
        "bench",
        help="benchmark consistent attention against the official variants and dense SDPA",
        description="Op suite: one layer call per provider, each first checked against the fp32 reference. "
        "UNet suite: one SDXL UNet step of 4 identity frames with official-A, official-B and our processors, "
        "and the identity bank each keeps. Default: real sizes on a GPU, a small configuration (about a "
        "minute) on a CPU.",
    )
    bench.add_argument(
        "--suite",
        choices=("op", "unet", "all", "motion"),
        default="all",
        help="all = op + unet; motion: compiled vs eager Semantic Motion Predictor at batch 1 and 8",
    )
    bench.add_argument(
        "--size",
        choices=("auto", "cpu", "full", "headline"),
        default="auto",
        help="auto: full on a GPU, cpu otherwise; headline: the op cases the README quotes",
    )
    bench.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    bench.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp16 on GPU, fp32 on CPU")
    bench.add_argument("--providers", default=None, help="op suite providers, comma-separated (default: all)")
    bench.add_argument("--out", default="benchmarks/results", help="results folder (JSON, CSV, PNG)")
    bench.add_argument("--no-plot", action="store_true")
    bench.set_defaults(run=_bench)

    vram = sub.add_parser(
        "profile-vram",
        help="memory over time and peak memory vs story length, official banks vs ours",
        description="Generates one-character stories of growing length per mode (official_a, official_b, "
        "ours, ours_offload, window, window_unchunked) while sampling device memory with NVML and torch's "
        "counters. Default on a GPU: "
        "random-sdxl (the real SDXL UNet, random weights) at 1024². Without NVML: host memory, tiny-sdxl.",
    )
    vram.add_argument("--model", default=None, help="default: random-sdxl on a GPU, tiny-sdxl otherwise")
    vram.add_argument("--lengths", default=None, help="story lengths, comma-separated (default 4,8,16,32)")
    vram.add_argument("--modes", default=None, help="comma-separated subset of the modes (default: all)")
    vram.add_argument("--steps", type=int, default=None, help="denoising steps (default 20 on GPU)")
    vram.add_argument("--size", type=int, default=None, help="image side in pixels (default 1024 on GPU)")
    vram.add_argument("--id-frames", type=int, default=4)
    vram.add_argument("--read-batch", type=int, default=4, help="our read batch (the official code reads 1)")
    vram.add_argument("--device", default=None)
    vram.add_argument("--dtype", choices=DTYPES, default=None)
    vram.add_argument("--out", default="benchmarks/results")
    vram.set_defaults(run=_profile_vram)

    gen = sub.add_parser(
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
    gen.set_defaults(run=_generate)

    # These two parse their own options (`storydiff video --help`, `storydiff train-motion --help`).
    video = sub.add_parser(
        "video",
        add_help=False,
        help="transition videos between consecutive frames of a story (Stable Video Diffusion)",
    )
    video.add_argument("args", nargs=argparse.REMAINDER)
    video.set_defaults(run=_video)
    train = sub.add_parser(
        "train-motion", add_help=False, help="train the Semantic Motion Predictor on videos or frame folders"
    )
    train.add_argument("args", nargs=argparse.REMAINDER)
    train.set_defaults(run=_train_motion)
    return parser


def _video(args: argparse.Namespace) -> int:
    from .motion.video import video_cli

    return video_cli(args.args)


def _train_motion(args: argparse.Namespace) -> int:
    from .motion.train import train_motion_cli

    return train_motion_cli(args.args)


_SELF_PARSING = {"video": _video, "train-motion": _train_motion}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _SELF_PARSING:  # argparse's REMAINDER cannot pass on a leading --help
        return _SELF_PARSING[argv[0]](argparse.Namespace(args=argv[1:]))
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
