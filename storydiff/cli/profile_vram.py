"""``storydiff profile-vram``: memory over time and peak memory vs story length, per consistency mode."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .common import DTYPES, check_output_dir, fail, positive_int, positive_int_list, resolve_device


def register(subparsers, parents: list) -> None:
    vram = subparsers.add_parser(
        "profile-vram",
        parents=parents,
        help="memory over time and peak memory vs story length, official banks vs ours",
        description="Generates one-character stories of growing length per mode (official_a, official_b, "
        "ours, ours_offload, ours_lockstep, window, window_unchunked) while sampling device memory with "
        "NVML and torch's counters. Runs on UNet and diffusion-transformer models (FLUX, SD3, PixArt); "
        "the official modes exist for UNets only and are left out for a transformer. Default on a GPU: "
        "random-sdxl (the real SDXL UNet, random weights) at 1024². Without NVML: host memory, tiny-sdxl.",
    )
    vram.add_argument(
        "--model",
        default=None,
        help="default: random-sdxl on a GPU, tiny-sdxl otherwise; also tiny-flux, tiny-sd3, tiny-pixart, "
        "random-flux (the real FLUX.1-dev transformer and VAE, random bf16 weights: for a GPU) or a path",
    )
    vram.add_argument(
        "--lengths",
        type=positive_int_list,
        default=None,
        help="story lengths, comma-separated (default: 4,8,16,32 on a GPU, 4,8,16 without one)",
    )
    vram.add_argument(
        "--modes",
        default=None,
        help="comma-separated subset of the modes (default: all; a transformer model: all but official_a/b)",
    )
    vram.add_argument(
        "--steps", type=positive_int, default=None, help="denoising steps (default: 20 on a GPU, 2 without)"
    )
    vram.add_argument(
        "--size",
        type=positive_int,
        default=None,
        help="image side in pixels, a multiple of 8 (FLUX: 16; SD3/PixArt: 8 x patch size) "
        "(default: 1024 on a GPU, the model's own size without one)",
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
        "--dtype",
        choices=DTYPES,
        default=None,
        help="default: float16 on CUDA (random-flux: bfloat16), float32 on CPU",
    )
    vram.add_argument(
        "--out", default="benchmarks/results", help="results folder (default: benchmarks/results)"
    )
    vram.set_defaults(run=run)


def _lacks_official_variants(model: str) -> bool:
    """Whether ``model`` names a family the official code has no processors for (a diffusion transformer),
    where that is known without loading it: the reserved names and local folders with a
    ``model_index.json``; False otherwise (a hub id: known once it is loaded)."""
    from ..families.registry import family_of_pipeline_class, family_of_reserved

    family = family_of_reserved(model)
    if family is None:
        index = Path(os.path.expanduser(model)) / "model_index.json"
        try:
            family = family_of_pipeline_class(json.loads(index.read_text()).get("_class_name", ""))
        except (OSError, ValueError, AttributeError):
            return False
    return family is not None and not family.official_variants


def _official_refused(modes: list[str], what: str) -> str:
    return (
        f"{', '.join(modes)} need a UNet model and {what} is a diffusion transformer (the official "
        "StoryDiffusion code has no DiT variant); leave out --modes or choose from ours, ours_offload, "
        "ours_lockstep, window, window_unchunked"
    )


def _size(n: int | None) -> str:
    """Bytes in the largest unit that keeps the number >= 1 (tiny models' banks are KiB, real ones GiB)."""
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:6.1f} {unit}"
    return f"{n:6d} B"


def run(args: argparse.Namespace) -> int:
    import torch

    from ..benchmark.environment import environment
    from ..benchmark.memory import MemorySampler
    from ..benchmark.results import save_rows, slug, write_json_file
    from ..benchmark.vram import MODES, OFFICIAL_MODES, profile_story_lengths, save_plots, timeline_rows
    from ..families.registry import family_of
    from ..models.loading import load_pipeline

    modes = args.modes.split(",") if args.modes else None
    try:
        device = resolve_device(args.device)
        check_output_dir(args.out)
        if args.size is not None and args.size % 8:
            raise ValueError(f"--size must be a multiple of 8, got {args.size}")
        unknown = [m for m in modes or () if m not in MODES]
        if unknown:
            choices = ", ".join(MODES)
            raise ValueError(f"unknown mode(s) {', '.join(unknown)} in --modes; choose from {choices}")
    except ValueError as exc:
        return fail(str(exc))
    asked_official = [m for m in modes or () if m in OFFICIAL_MODES]
    if args.model and asked_official and _lacks_official_variants(args.model):
        return fail(_official_refused(asked_official, args.model))
    probe = MemorySampler(device)
    with probe:
        pass
    gpu = probe.source == "nvml"
    model = args.model or ("random-sdxl" if gpu else "tiny-sdxl")
    if not gpu:
        reason = probe.note or "no GPU"
        print(f"NVML unavailable for this run ({reason}); profiling host memory with {model}")
    lengths = args.lengths or ([4, 8, 16, 32] if gpu else [4, 8, 16])
    steps = args.steps or (20 if gpu else 2)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        pipe = load_pipeline(model, device=device, dtype=dtype, progress_bar=False)
        family = family_of(pipe)
        if not family.official_variants:
            if asked_official:
                return fail(_official_refused(asked_official, f"{model} ({family.name})"))
            if modes is None:
                modes = [m for m in MODES if m not in OFFICIAL_MODES]
                dropped = " and ".join(OFFICIAL_MODES)
                note = "the official code has UNet processors only"
                print(f"{model} is a {family.name} transformer: {dropped} left out ({note})")
        modes = modes or list(MODES)
        side = args.size or (1024 if gpu else family.default_size)
        if side % family.multiple:
            return fail(f"--size must be a multiple of {family.multiple} for {family.name}, got {side}")
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
    rows = [{**row, "model": model, "family": family.name, "resolution": side, **env} for row in rows]
    for row in rows:
        peak = row["peak_bytes"] / 2**30 if row["peak_bytes"] else float("nan")
        source, seconds = row["source"], row["seconds"]
        print(
            f"{row['mode']:<16} {row['frames']:>4} frames  peak {peak:7.2f} GiB ({source})  "
            f"bank alive {_size(row['bank_peak_bytes'])}  {seconds} s  {row['status']}"
        )
    name = slug(Path(model).name) or "model"  # a local path: its folder's name
    json_path, csv_path = save_rows(rows, Path(args.out), f"vram-{name}", env["device"])
    timeline = write_json_file(
        json_path.with_name(json_path.stem + "_timeline.json"), timeline_rows(timelines)
    )
    plots = save_plots(rows, timelines, json_path.with_suffix(""))
    print("written:\n  " + "\n  ".join(str(p) for p in (json_path, csv_path, timeline, *plots)))
    return 0
