"""Scaling of a story over processes: frames per minute, per-rank peak memory and traffic per world size.

Each world size starts its ranks from here (``torch.multiprocessing``, a ``file://`` rendezvous: no ports),
every rank runs the same two-character story through ``StoryDiffusionPipeline`` (window mode: halo
exchange; bank mode: banks recomputed on every rank or broadcast by their writers) and reports its wall
time, its peak memory (CUDA: the allocator's peak on its device; CPU: the process's peak RSS) and the
bytes it sent or received. One GPU machine has one device, so on a GPU this measures only 1 rank; several
GPUs run the same function (ranks take ``cuda:rank``). On the CPU, gloo ranks share the machine's cores:
the rows show the scaling's shape and the traffic, not a speed-up.
"""

from __future__ import annotations

import datetime
import json
import resource
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

CHARACTERS = (
    "[Hero] a young explorer with a red scarf and a leather backpack",
    "[Guide] an old sailor with a white beard and a blue coat",
)
STORY_LINE = "[{name}] scene {i} of the long journey"


def story_text(frames: int) -> str:
    """Two characters taking turns (bank mode: two identity batches, which "broadcast" deals over ranks)."""
    lines = [STORY_LINE.format(name=("Hero", "Guide")[i % 2], i=i) for i in range(frames)]
    return "\n".join([*CHARACTERS, "---", *lines]) + "\n"


def _rank(rank: int, world: int, rendezvous: str, spec: dict, report: str) -> None:
    from ..consistency.config import ConsistencyConfig
    from ..models.loading import load_pipeline
    from ..pipeline import StoryDiffusionPipeline

    cuda = spec["device"] == "cuda"
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, spec["threads"] // world))  # ranks share the cores
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=spec["timeout_s"]),
    )
    try:
        pipe = load_pipeline(spec["model"], device=device, progress_bar=False)
        window = spec["window"] if spec["mode"] == "window" else None
        story = StoryDiffusionPipeline(pipe, ConsistencyConfig(window=window), model_name=spec["model"])
        settings = {"num_inference_steps": spec["steps"], "mode": spec["mode"], "progress": False}
        if spec["mode"] == "window":
            settings["chunk_size"] = spec["frames"]
        else:  # "bank-recompute" or "bank-broadcast" (the same run in one process)
            settings["mode"] = "bank"
            settings.update(id_frames=spec["id_frames"], read_batch_size=spec["read_batch"])
            if world > 1:
                settings["bank_sharing"] = spec["mode"].removeprefix("bank-")
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        dist.barrier()
        start = time.perf_counter()
        result = story(story_text(spec["frames"]), **settings)
        dist.barrier()
        seconds = time.perf_counter() - start
        peak = (
            torch.cuda.max_memory_allocated(device)
            if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB
        )
        row = {
            "rank": rank,
            "seconds": seconds,
            "peak_bytes": peak,
            "halo_bytes_sent": result.metadata.get("halo_bytes_sent", 0),
            "bank_bytes_received": result.metadata.get("bank_bytes_received", 0),
        }
        Path(report, f"rank{rank}.json").write_text(json.dumps(row))
    finally:
        dist.destroy_process_group()


def run_scaling(
    *,
    model: str,
    world_sizes: list[int],
    mode: str = "window",
    frames: int = 8,
    steps: int = 3,
    window: int = 2,
    id_frames: int = 2,
    read_batch: int = 2,
    device: str = "cpu",
    timeout_s: float = 600.0,
) -> list[dict]:
    """One row per world size: frames per minute, the largest per-rank peak, the total traffic. ``mode``:
    "window", "bank-recompute" (every rank writes every bank) or "bank-broadcast" (each rank writes its
    characters' banks and broadcasts them); the two bank modes are the same run on one rank."""
    import os

    import torch.multiprocessing as mp

    rows = []
    for world in world_sizes:
        spec = {
            "model": model,
            "mode": mode,
            "frames": frames,
            "steps": steps,
            "window": window,
            "id_frames": id_frames,
            "read_batch": read_batch,
            "device": device,
            "threads": os.cpu_count() or 1,
            "timeout_s": timeout_s,
        }
        with tempfile.TemporaryDirectory() as scratch:
            rendezvous = str(Path(scratch, "rendezvous"))
            mp.start_processes(_rank, args=(world, rendezvous, spec, scratch), nprocs=world, join=True)
            ranks = [json.loads(Path(scratch, f"rank{r}.json").read_text()) for r in range(world)]
        seconds = max(r["seconds"] for r in ranks)
        rows.append(
            {
                "suite": "dist",
                "model": model,
                "mode": mode,
                "ranks": world,
                "frames": frames,
                "steps": steps,
                "seconds": round(seconds, 3),
                "frames_per_minute": round(60 * frames / seconds, 2),
                "peak_bytes_per_rank": max(r["peak_bytes"] for r in ranks),
                "halo_bytes_sent": sum(r["halo_bytes_sent"] for r in ranks),
                "bank_bytes_received": sum(r["bank_bytes_received"] for r in ranks),
                "backend": "nccl" if device == "cuda" else "gloo",
            }
        )
    return rows


def format_scaling_table(rows: list[dict]) -> str:
    columns = ("ranks", 5), ("frames/min", 11), ("peak/rank MiB", 14), ("traffic MiB", 12), ("s", 7)
    lines = [f"{'mode':<15} " + " ".join(f"{name:>{width}}" for name, width in columns)]
    for row in rows:
        traffic = (row["halo_bytes_sent"] + row["bank_bytes_received"]) / 2**20
        lines.append(
            f"{row['mode']:<15} {row['ranks']:>5} {row['frames_per_minute']:>11.1f} "
            f"{row['peak_bytes_per_rank'] / 2**20:>14.1f} {traffic:>12.2f} {row['seconds']:>7.1f}"
        )
    return "\n".join(lines)


def plot_scaling(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(9, 3.6))
    for mode in sorted({r["mode"] for r in rows}):
        mine = [r for r in rows if r["mode"] == mode]
        ranks = [r["ranks"] for r in mine]
        speed.plot(ranks, [r["frames_per_minute"] for r in mine], marker="o", label=mode)
        memory.plot(ranks, [r["peak_bytes_per_rank"] / 2**20 for r in mine], marker="o", label=mode)
    speed.set(xlabel="ranks", ylabel="frames per minute", title="throughput")
    memory.set(xlabel="ranks", ylabel="MiB", title="peak memory per rank")
    for axis in (speed, memory):
        axis.set_xticks(sorted({r["ranks"] for r in rows}))
        axis.legend()
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
