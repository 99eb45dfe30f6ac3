"""Workers of the distributed tests: each runs in its own process (``torch.multiprocessing.spawn``), joins a
gloo group through a ``file://`` rendezvous (no ports, so parallel test runs never clash) and writes what
it made into a folder the test reads."""

from __future__ import annotations

import contextlib
import datetime
import json
from pathlib import Path

import torch
import torch.distributed as dist

NO_SKIP = {"warmup_steps": 0, "skip_prob_early": 0.0, "skip_prob_late": 0.0}


@contextlib.contextmanager
def batch_invariant_linear(max_rows: int = 64):
    """CPU BLAS rounds a row of ``x @ W.T`` differently depending on how many rows share the call (MKL's
    small-M kernels: ``Linear(128, 128)`` on rows [6:10] of a 10-row batch vs those 4 rows alone is 2e-7
    apart). A rank batches only its block of frames, so the UNet's per-frame vectors (the time
    embedding: [batch, 128]) would differ from the one-process batch by that rounding alone. Inside this
    context, linear layers on at most ``max_rows`` rows compute each row on its own — identical
    whatever batch it sits in — so a test can demand bit-identical latents from differently batched runs.
    Larger inputs (the token rows) are left to BLAS: their row blocks already do not depend on the batch.
    """
    linear = torch.nn.functional.linear

    def row_by_row(x, weight, bias=None):
        if x.dim() == 2 and 1 < x.shape[0] <= max_rows:
            return torch.cat([linear(row, weight, bias) for row in x.split(1)])
        return linear(x, weight, bias)

    torch.nn.functional.linear = row_by_row
    try:
        yield
    finally:
        torch.nn.functional.linear = linear


def join(rank: int, world: int, rendezvous: str, timeout_s: float = 600.0) -> None:
    torch.set_num_threads(1)  # several ranks share the test machine's cores
    dist.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


# Ranks are forked from the test process: they inherit its imported torch/diffusers (a fresh interpreter
# spends ~10 s importing them on the 2-core test machines). Each rank runs one intra-op thread (``join``),
# so no OpenMP pool is needed after the fork.
START_METHOD = "fork"


def spawn(worker, world: int, tmp_path: Path, *args) -> None:
    import torch.multiprocessing as mp

    rendezvous = str(tmp_path / f"rendezvous-{worker.__name__}-{world}")
    mp.start_processes(
        worker, args=(world, rendezvous, *args), nprocs=world, join=True, start_method=START_METHOD
    )


# frames and masks of the bounded-attention runs: Alice on the left half, Bob on the right
BOUNDED_FRAMES = [("Alice",), ("Alice", "Bob"), ("Bob",), ("Alice", "Bob")]


def bounded_masks(size: tuple[int, int]):
    from storydiff.consistency.subject_masks import SubjectMasks

    left = torch.zeros(size, dtype=torch.bool)
    left[:, : size[1] // 2] = True
    side = {"Alice": left, "Bob": ~left}
    given = {f: {c: side[c] for c in chars} for f, chars in enumerate(BOUNDED_FRAMES)}
    return SubjectMasks.from_mapping(given, BOUNDED_FRAMES, size)


def window_latents(
    model: str, active: list[bool], window: int, steps: int, chunk: int, partition=None, bounded=False
) -> torch.Tensor:
    """Window-mode latents of a tiny story; ``bounded``: with ``bounded_masks`` and bounded attention (the
    story's frames are ``BOUNDED_FRAMES``)."""
    from storydiff.consistency.config import ConsistencyConfig
    from storydiff.families.attach import apply_consistent_attention, remove_consistent_attention
    from storydiff.families.tiny_models import build_tiny_pipeline
    from storydiff.runs.plan import RunPlan
    from storydiff.runs.settings import RunSettings
    from storydiff.runs.window_run import run_window

    pipe = build_tiny_pipeline(model, progress_bar=False)
    state = apply_consistent_attention(pipe, ConsistencyConfig(window=window, seed=1, **NO_SKIP))
    frames = len(active)
    try:
        settings = RunSettings(mode="window", num_inference_steps=steps, guidance_scale=5.0, chunk_size=chunk)
        prompts = [f"a man with a red scarf, scene {i}" for i in range(frames)]
        plan = RunPlan.from_prompts(prompts, settings, active=active, partition=partition)
        if bounded:
            side = pipe.unet.config.sample_size * pipe.vae_scale_factor  # the size run_window uses
            state.set_subject_masks(bounded_masks((side, side)), bounded=True)
        with batch_invariant_linear():  # ranks batch their blocks only: see there
            return run_window(pipe, state, plan, progress=False)
    finally:
        remove_consistent_attention(pipe)


def window_worker(rank, world, rendezvous, out, model, active, window, steps, bounded=False) -> None:
    from storydiff.runs.distributed import current_partition

    join(rank, world, rendezvous)
    try:
        partition = current_partition()
        latents = window_latents(
            model, active, window, steps, chunk=len(active), partition=partition, bounded=bounded
        )
        start, stop = partition.block(len(active))
        torch.save({"start": start, "latents": latents[start:stop].clone()}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def exchange_worker(rank, world, rendezvous, out, active, window) -> None:
    """Pools whose values name their frame, CFG half and row: what arrives must be exactly the
    neighbours' frames the formula says, and nothing else."""
    from storydiff.runs.distributed import HaloExchange, current_partition

    join(rank, world, rendezvous)
    try:
        partition = current_partition()
        start, stop = partition.block(len(active))
        groups, heads, samples, dim = 2, 3, 5, 4

        def pool(frame: int, sign: float) -> torch.Tensor:  # [G, H, S, D]
            base = torch.arange(groups * heads * samples * dim, dtype=torch.float32).view(
                groups, heads, samples, dim
            )
            return sign * (1000 * frame + base)

        pool_k = torch.stack([pool(f, 1.0) for f in range(start, stop)], dim=1)
        pool_v = torch.stack([pool(f, -1.0) for f in range(start, stop)], dim=1)
        halo = HaloExchange(partition, active, window)
        received = halo.exchange(pool_k, pool_v)
        for frame, (k, v) in received.items():
            assert torch.equal(k, pool(frame, 1.0)) and torch.equal(v, pool(frame, -1.0)), frame
        report = {"received": sorted(received), "bytes_sent": halo.bytes_sent}
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def story_worker(rank, world, rendezvous, out_dir, model, story, settings, config, timeout_s=600.0) -> None:
    """One rank of a story run through the pipeline (what the CLI does under torchrun)."""
    stories_worker(rank, world, rendezvous, [(out_dir, settings)], model, story, config, timeout_s)


def stories_worker(rank, world, rendezvous, runs, model, story, config, timeout_s=600.0) -> None:
    """Several story runs, one after the other, by the same ranks: ``runs`` = [(out_dir, settings)]. Each
    rank saves the latents of the frames it decoded in ``out_dir/latents-rank{rank}.pt`` ({frame: latent});
    a ``"mutation"`` key in settings names a ``story_helpers.MUTATIONS`` entry the run is made under."""
    from contextlib import nullcontext

    from story_helpers import MUTATIONS, recorded_latents

    from storydiff.consistency.config import ConsistencyConfig
    from storydiff.families.tiny_models import build_tiny_pipeline
    from storydiff.pipeline import StoryDiffusionPipeline

    join(rank, world, rendezvous, timeout_s)
    try:
        tiny = build_tiny_pipeline(model, progress_bar=False)
        pipe = StoryDiffusionPipeline(tiny, ConsistencyConfig(**config), model_name=model)
        for out_dir, run_settings in runs:
            settings = dict(run_settings)
            mutation = settings.pop("mutation", None)
            with recorded_latents() as latents, MUTATIONS[mutation]() if mutation else nullcontext():
                result = pipe(story, out_dir=out_dir, progress=False, **settings)
            torch.save(latents, Path(out_dir) / f"latents-rank{rank}.pt")
            (Path(out_dir) / f"result-rank{rank}.json").write_text(
                json.dumps(
                    {
                        "frames": result.frame_indices,
                        "pages": len(result.pages),
                        "bank_bytes_received": result.metadata.get("bank_bytes_received"),
                    }
                )
            )
    finally:
        dist.destroy_process_group()


def killed_story_worker(rank, world, rendezvous, out_dir, model, story, settings, config, timeout_s) -> None:
    """As ``story_worker``, but rank 1 dies (SIGKILL: no cleanup) right after its first checkpoint; the
    other ranks record the error they end with in ``error-rank{r}.txt``."""
    import os
    import signal

    import storydiff.runs.lockstep as lockstep

    if rank == 1:
        save = lockstep.save_checkpoint

        def save_then_die(*args, **kwargs):
            save(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)

        lockstep.save_checkpoint = save_then_die
    try:
        story_worker(rank, world, rendezvous, out_dir, model, story, settings, config, timeout_s)
    except Exception as exc:
        (Path(out_dir) / f"error-rank{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")


def spawn_unjoined(worker, world: int, tmp_path: Path, *args):
    """Start ``world`` ranks and wait for each to end on its own (``spawn`` would kill the others as soon as
    one rank fails, which is what the kill test must not do); returns their exit codes."""
    import torch.multiprocessing as mp

    rendezvous = str(tmp_path / f"rendezvous-{worker.__name__}-{world}")
    context = mp.start_processes(
        worker, args=(world, rendezvous, *args), nprocs=world, join=False, start_method=START_METHOD
    )
    for process in context.processes:
        process.join()
    return [process.exitcode for process in context.processes]
