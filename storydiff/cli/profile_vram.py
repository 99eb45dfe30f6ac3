"""``storydiff profile-vram``: memory over time and peak memory vs story length, per consistency mode."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import DTYPES, fail


def register(subparsers) -> None:
    vram = subparsers.add_parser(
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
    vram.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..benchmark.environment import environment
    from ..benchmark.memory import MemorySampler
    from ..benchmark.results import save_rows, write_json_file
    from ..benchmark.vram import MODES, profile_story_lengths, save_plots, timeline_rows
    from ..loading import load_pipeline

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
        return fail(str(exc))
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
