"""``storydiff bench``: the op, UNet, DiT and motion-predictor benchmark suites."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from .common import DTYPES, check_environment, check_output_dir, fail, resolve_device


def register(subparsers, parents: list) -> None:
    bench = subparsers.add_parser(
        "bench",
        parents=parents,
        help="benchmark consistent attention against the official variants and dense SDPA",
        description="Op suite: one layer call per provider, each first checked against the fp32 reference. "
        "UNet suite: one SDXL UNet step of 4 identity frames with official-A, official-B and our processors, "
        "and the identity bank each keeps. DiT suite: one FLUX.1-dev / SD3.5-large transformer step of 4 "
        "frames, stock vs ours. Default: real sizes on a GPU, a small configuration (about a minute) on a "
        "CPU.",
    )
    bench.add_argument(
        "--suite",
        choices=("op", "unet", "dit", "all", "motion", "dist"),
        default="all",
        help="all = op + unet; dit: FLUX.1-dev / SD3.5-large transformer step (see --model); motion: "
        "compiled vs eager Semantic Motion Predictor at batch 1 and 8; dist: a story over 1, 2, ... "
        "processes (--ranks): frames per minute, peak memory per rank, halo traffic (default: all)",
    )
    bench.add_argument(
        "--ranks",
        default=None,
        help="dist suite: world sizes, comma-separated (default: 1,2 on a CPU; 1 per visible GPU up to 4)",
    )
    bench.add_argument(
        "--size",
        choices=("auto", "cpu", "full", "headline", "dit", "int8", "cpu-int8"),
        default="auto",
        help="auto: full on a GPU, cpu otherwise; headline: the op cases the README quotes; dit: the op "
        "suite's FLUX / SD3.5 joint-attention cases only; int8: the 8-bit path (precision='int8') vs our "
        "16-bit op, SDPA's flash backend and SageAttention on the same key length, at the headline SDXL "
        "(hd64, hd128), FLUX and Wan shapes, with accuracy columns; cpu-int8: those rows at CPU sizes "
        "(default: auto)",
    )
    bench.add_argument(
        "--model",
        choices=("flux", "sd3", "wan", "wan14b", "all"),
        default=None,
        help="dit suite: FLUX.1-dev, SD3.5-large, Wan 2.1 1.3B or 14B (a 3-shot 480p story, two CFG passes), "
        "or all = FLUX.1-dev and SD3.5-large (default: all)",
    )
    bench.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    bench.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="default: fp32 on CPU; on GPU bf16 for the DiT suite and --size dit (DiTs run in bf16), "
        "else fp16",
    )
    bench.add_argument(
        "--providers", default=None, help="op suite providers, comma-separated (default: all that apply)"
    )
    bench.add_argument(
        "--out",
        default="benchmarks/results",
        help="results folder: JSON, CSV, PNG (default: benchmarks/results)",
    )
    bench.add_argument("--no-plot", action="store_true", help="write the data without plots")
    bench.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..benchmark import dit_suite, op_suite, unet_suite
    from ..benchmark.environment import environment
    from ..benchmark.providers import OPTIONAL, PROVIDERS, default_providers, unavailable
    from ..benchmark.results import DIT_PANELS, UNET_PANELS, format_table, plot_rows, save_rows

    try:
        check_environment()
        device = resolve_device(args.device)
        check_output_dir(args.out)
    except ValueError as exc:
        return fail(str(exc))
    size = args.size if args.size != "auto" else ("full" if device.type == "cuda" else "cpu")
    dit = args.suite == "dit" or size == "dit"
    gpu_dtype = "bfloat16" if dit else "float16"
    dtype = getattr(torch, args.dtype or (gpu_dtype if device.type == "cuda" else "float32"))
    providers = args.providers.split(",") if args.providers else default_providers(device, size)
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        return fail(f"unknown provider(s) {unknown}; choose from {list(PROVIDERS)}")
    for name in providers:
        reason = unavailable(name, device)
        if reason and args.suite in ("op", "all") and name not in OPTIONAL:  # optional: its rows say why
            return fail(f"--providers {name} {reason}")
    ignored = [
        flag
        for flag, given, suites in (
            ("--providers", args.providers is not None, ("op", "all")),
            ("--model", args.model is not None, ("dit",)),  # --size dit picks the op cases, not a model
            ("--ranks", args.ranks is not None, ("dist",)),
        )
        if given and args.suite not in suites
    ]
    if ignored:
        warnings.warn(f"{', '.join(ignored)} do(es) not apply to --suite {args.suite}: ignored", stacklevel=1)
    args.model = args.model or "all"
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    ranks = None
    if args.ranks is not None:  # checked before any suite runs
        try:
            ranks = [int(n) for n in args.ranks.split(",")]
        except ValueError:
            return fail(f"--ranks expects world sizes such as 1,2,4, got {args.ranks!r}")
        if any(n < 1 for n in ranks):
            return fail(f"--ranks must be world sizes >= 1, got {args.ranks}")
        if gpus and max(ranks) > gpus:
            return fail(f"--ranks {args.ranks}: at most the {gpus} visible GPUs")
    env = environment(device)
    out = Path(args.out)
    written = []
    if args.suite in ("op", "all"):
        cases = {
            "cpu": op_suite.cpu_cases,
            "full": op_suite.gpu_cases,
            "headline": op_suite.headline_cases,
            "dit": op_suite.dit_cases,
            "int8": op_suite.int8_cases,
            "cpu-int8": op_suite.cpu_int8_cases,
        }[size]()
        print(f"op suite: {len(cases)} cases x {len(providers)} providers on {env['device']} ({dtype})")
        rows = op_suite.run_op_suite(cases, providers, device=device, dtype=dtype, env=env)
        print(format_table(rows))
        if size in ("int8", "cpu-int8"):  # the 8-bit path is judged by these as much as by its speed
            print(op_suite.format_accuracy(rows))
        written += [*save_rows(rows, out, f"op-{size}", env["device"])]
        if not args.no_plot:
            written.append(plot_rows(rows, written[-2].with_suffix(".png")))
    if args.suite in ("unet", "all"):
        model = "tiny" if size in ("cpu", "cpu-int8") else "full"
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
    if args.suite == "dit":
        model = "tiny" if size == "cpu" else "full"
        models = ("flux", "sd3") if args.model == "all" else (args.model,)
        cases = dit_suite.cpu_cases(models) if model == "tiny" else dit_suite.gpu_cases(models)
        print(f"dit suite: {model} {', '.join(models)}, {len(cases)} cases on {env['device']} ({dtype})")
        rows = dit_suite.run_dit_suite(cases, size=model, device=device, dtype=dtype, env=env)
        print(dit_suite.format_dit_table(rows))
        written += [*save_rows(rows, out, f"dit-{model}-{args.model}", env["device"])]
        if not args.no_plot:
            title = f"DiT step ({model}), {cases[0].frames} frames, stock vs ours, {env['device']}"
            written.append(plot_rows(rows, written[-2].with_suffix(".png"), title, DIT_PANELS))
    if args.suite == "dist":
        from ..benchmark.dist_scaling import format_scaling_table, plot_scaling, run_scaling

        ranks = ranks or ([n for n in (1, 2, 4) if n <= gpus] if gpus else [1, 2])
        model = "random-sdxl" if device.type == "cuda" else "tiny-sd15"
        frames, steps = (16, 10) if device.type == "cuda" else (12, 3)
        rows = []
        for mode in ("window", "bank-recompute", "bank-broadcast"):
            sizes = [n for n in ranks if n > 1] if mode == "bank-broadcast" else ranks  # 1 rank: the same run
            if not sizes:
                continue
            print(f"dist suite: {model}, {mode} mode, {frames} frames, ranks {sizes} on {env['device']}")
            rows += run_scaling(
                model=model, world_sizes=sizes, mode=mode, frames=frames, steps=steps, device=device.type
            )
        rows = [{**row, **env} for row in rows]
        print(format_scaling_table(rows))
        written += [*save_rows(rows, out, f"dist-{model}", env["device"])]
        if not args.no_plot:
            written.append(plot_scaling(rows, written[-2].with_suffix(".png")))
    if args.suite == "motion":
        from ..motion.compiled import benchmark_compiled
        from ..motion.model import SemanticMotionPredictor

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
