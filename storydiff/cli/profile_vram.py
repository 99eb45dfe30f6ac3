"""``storydiff profile-vram``: memory over time and peak memory vs story length, per consistency mode."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import DTYPES, check_output_dir, fail, positive_int, positive_int_list, resolve_device


def register(subparsers, parents: list) -> None:
    vram = subparsers.add_parser(
        "profile-vram",
        parents=parents,
        help="memory over time and peak memory vs story length, official banks vs ours",
        description="Generates one-character stories of growing length per mode (official_a, official_b, "
        "ours, ours_offload, ours_lockstep, window, window_unchunked) while sampling device memory with "
        "NVML and torch's "
        "counters. Default on a GPU: "
        "random-sdxl (the real SDXL UNet, random weights) at 1024². Without NVML: host memory, tiny-sdxl.",
    )
    vram.add_argument("--model", default=None, help="default: random-sdxl on a GPU, tiny-sdxl otherwise")
    vram.add_argument(
        "--lengths",
        type=positive_int_list,
        default=None,
        help="story lengths, comma-separated (default: 4,8,16,32 on a GPU, 4,8,16 without one)",
    )
    vram.add_argument("--modes", default=None, help="comma-separated subset of the modes (default: all)")
    vram.add_argument(
        "--steps", type=positive_int, default=None, help="denoising steps (default: 20 on a GPU, 2 without)"
    )
    vram.add_argument(
        "--size",
        type=positive_int,
        default=None,
        help="image side in pixels, a multiple of 8 (default: 1024 on a GPU, 128 without)",
    )
    vram.add_argument("--id-frames", type=positive_int, default=4, help="identity frames (default: 4)")
    vram.add_argument(
        "--read-batch",
        type=positive_int,
        default=4,
        help="our read batch; the official code reads 1 (default: 4)",
    )
    vram.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    vram.add_argument(
        "--dtype", choices=DTYPES, default=None, help="default: float16 on CUDA, float32 on CPU"
    )
    vram.add_argument(
        "--out", default="benchmarks/results", help="results folder (default: benchmarks/results)"
    )
    vram.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..benchmark.environment import environment
    from ..benchmark.memory import MemorySampler
    from ..benchmark.results import save_rows, write_json_file
    from ..benchmark.vram import MODES, profile_story_lengths, save_plots, timeline_rows
    from ..loading import load_pipeline

    try:
        device = resolve_device(args.device)
        check_output_dir(args.out)
        if args.size is not None and args.size % 8:
            raise ValueError(f"--size must be a multiple of 8, got {args.size}")
    except ValueError as exc:
        return fail(str(exc))
    probe = MemorySampler(device)
    with probe:
        pass
    gpu = probe.source == "nvml"
    if not gpu:
        reason = probe.note or "no GPU"
        print(f"NVML unavailable for this run ({reason}); profiling host memory with tiny-sdxl at tiny sizes")
    model = args.model or ("random-sdxl" if gpu else "tiny-sdxl")
    lengths = args.lengths or ([4, 8, 16, 32] if gpu else [4, 8, 16])
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
        return fail(str(exc))
    env = environment(device)
    rows = [{**row, "model": model, "resolution": side, **env} for row in rows]
    for row in rows:
        peak = row["peak_bytes"] / 2**30 if row["peak_bytes"] else float("nan")
        bank = row["bank_peak_bytes"] / 2**20 if row["bank_peak_bytes"] is not None else float("nan")
        source, seconds = row["source"], row["seconds"]
        print(
            f"{row['mode']:<16} {row['frames']:>4} frames  peak {peak:7.2f} GiB ({source})  "
            f"bank alive {bank:8.1f} MiB  {seconds} s  {row['status']}"
        )
    json_path, csv_path = save_rows(rows, Path(args.out), f"vram-{model}", env["device"])
    timeline = write_json_file(
        json_path.with_name(json_path.stem + "_timeline.json"), timeline_rows(timelines)
    )
    plots = save_plots(rows, timelines, json_path.with_suffix(""))
    print("written:\n  " + "\n  ".join(str(p) for p in (json_path, csv_path, timeline, *plots)))
    return 0
