"""``storydiff`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = ("float16", "bfloat16", "float32")


def _bench(args: argparse.Namespace) -> int:
    import torch

    from .benchmark.environment import environment
    from .benchmark.op_suite import cpu_cases, gpu_cases, headline_cases, run_op_suite
    from .benchmark.providers import PROVIDERS, default_providers
    from .benchmark.results import format_table, plot_rows, save_rows

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda given but no CUDA device is available", file=sys.stderr)
        return 2
    size = args.size if args.size != "auto" else ("full" if device.type == "cuda" else "cpu")
    cases = {"cpu": cpu_cases, "full": gpu_cases, "headline": headline_cases}[size]()
    dtype_name = args.dtype or ("float16" if device.type == "cuda" else "float32")
    providers = args.providers.split(",") if args.providers else default_providers(device)
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        print(f"error: unknown provider(s) {unknown}; choose from {list(PROVIDERS)}", file=sys.stderr)
        return 2
    env = environment(device)
    print(f"op suite: {len(cases)} cases x {len(providers)} providers on {env['device']} ({dtype_name})")
    rows = run_op_suite(cases, providers, device=device, dtype=getattr(torch, dtype_name), env=env)
    print(format_table(rows))
    json_path, csv_path = save_rows(rows, Path(args.out), f"op-{size}", env["device"])
    print(f"results: {json_path} and {csv_path}")
    if not args.no_plot:
        print(f"plot: {plot_rows(rows, json_path.with_suffix('.png'))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="storydiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser(
        "bench",
        help="benchmark consistent attention against the official variants and dense SDPA",
        description="Times one layer call per provider after checking it against the fp32 reference. "
        "Default: real sizes on a GPU, a small configuration (about a minute) on a CPU.",
    )
    bench.add_argument("--size", choices=("auto", "cpu", "full", "headline"), default="auto")
    bench.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    bench.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp16 on GPU, fp32 on CPU")
    bench.add_argument("--providers", default=None, help="comma-separated subset (default: all that apply)")
    bench.add_argument("--out", default="benchmarks/results", help="results folder (JSON, CSV, PNG)")
    bench.add_argument("--no-plot", action="store_true")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
