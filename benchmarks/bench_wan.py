"""Wan 2.x benchmarks (issue #23): the op suite at Wan shapes, one denoiser step of the real Wan 2.1
transformers, and profile-vram on a Wan story — the ``wan-*`` sections of ``benchmarks/gpu_session.sh``.
The library does the work (``storydiff/benchmark/``); this script picks the cases and writes the rows
(JSON + CSV, plots) to ``benchmarks/results/`` as ``storydiff bench`` / ``profile-vram`` do.

    python benchmarks/bench_wan.py op                        # 1.3B / 14B, 480p, 81 frames, 3 shots
    python benchmarks/bench_wan.py dit wan [SHOT_FRAMES]     # Wan-1.3B step, 3 shots at 480p (81 frames)
    python benchmarks/bench_wan.py dit wan14b [SHOT_FRAMES]  # Wan-14B (28.6 GB of bf16 weights)
    python benchmarks/bench_wan.py vram random-wan [STEPS]   # 2- and 4-shot 480p stories: bank, peak

Without a GPU: ``op`` reports the real-size cases as skipped (their memory estimate is over the CPU budget),
``dit`` runs tiny-wan, ``vram`` needs ``tiny-wan`` as the model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from storydiff.benchmark import dit_suite, op_suite
from storydiff.benchmark.environment import environment
from storydiff.benchmark.providers import default_providers
from storydiff.benchmark.results import format_table, save_rows, write_json_file
from storydiff.benchmark.vram import (
    RANDOM_WAN,
    build_random_wan,
    profile_story_lengths,
    save_plots,
    timeline_rows,
)

OUT = Path("benchmarks/results")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32  # Wan runs in bf16


def op() -> None:
    env = environment(DEVICE)
    providers = default_providers(DEVICE, "dit")  # flex left out on a GPU: one compile per shape
    rows = op_suite.run_op_suite(op_suite.wan_cases(), providers, device=DEVICE, dtype=DTYPE, env=env)
    print(format_table(rows))
    print(*save_rows(rows, OUT, "op-wan", env["device"]), sep="\n")


def dit(model: str = "wan", shot_frames: str = "81") -> None:
    env = environment(DEVICE)
    size = "full" if DEVICE.type == "cuda" else "tiny"
    cases = [dit_suite.wan_case(model, int(shot_frames))] if size == "full" else dit_suite.cpu_cases(("wan",))
    rows = dit_suite.run_dit_suite(cases, size=size, device=DEVICE, dtype=DTYPE, env=env)
    print(dit_suite.format_dit_table(rows))
    stem = f"dit-full-{model}-{shot_frames}f" if size == "full" else "dit-tiny-wan"
    print(*save_rows(rows, OUT, stem, env["device"]), sep="\n")


def vram(model: str = "random-wan", steps: str = "4") -> None:
    env = environment(DEVICE)
    if model in RANDOM_WAN:
        pipe = build_random_wan(model, DEVICE, DTYPE)
        height, width, shot_frames = 480, 832, 81
    else:  # a tiny model (tiny-wan) on any device
        from storydiff.models.loading import load_pipeline

        pipe = load_pipeline(model, device=DEVICE, progress_bar=False)
        height, width, shot_frames = 32, 48, None
    rows, timelines = profile_story_lengths(
        pipe,
        lengths=[2, 4],
        modes=["ours_lockstep", "ours"],
        steps=int(steps),
        height=height,
        width=width,
        id_frames=2,
        read_batch=2,
        device=DEVICE,
        shot_frames=shot_frames,
        rate=0.1,
    )
    rows = [{**row, "model": model, "family": "wan", "height": height, "width": width, **env} for row in rows]
    for row in rows:
        peak = row["peak_bytes"] / 2**30 if row["peak_bytes"] else float("nan")
        bank, shots, status = row["bank_peak_bytes"] or 0, row["frames"], row["status"]
        print(f"{row['mode']:<14} {shots} shots  peak {peak:7.2f} GiB  bank {bank:,} bytes alive  {status}")
    json_path, csv_path = save_rows(rows, OUT, f"vram-{model}", env["device"])
    timeline = write_json_file(
        json_path.with_name(json_path.stem + "_timeline.json"), timeline_rows(timelines)
    )
    print(json_path, csv_path, timeline, *save_plots(rows, timelines, json_path.with_suffix("")), sep="\n")


if __name__ == "__main__":
    commands = {"op": op, "dit": dit, "vram": vram}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python benchmarks/bench_wan.py {{{','.join(commands)}}} [ARGS]: see the docstring")
    commands[sys.argv[1]](*sys.argv[2:])
