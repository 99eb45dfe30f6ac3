"""Stories split over processes (gloo on the CPU, tiny models): the frames are the single-process ones."""

import json
import shutil

import numpy as np
import pytest
import torch
from dist_helpers import (
    exchange_worker,
    killed_story_worker,
    spawn,
    spawn_unjoined,
    stories_worker,
    window_latents,
    window_worker,
)
from story_helpers import (
    MIN_RELATIVE_CHANGE,
    RECORD_LATENTS,
    bank_of_the_previous_step,
    merged_latents,
    read_frames,
    recorded_latents,
    relative_change,
    stacked,
)

from storydiff.cli import main
from storydiff.runs.distributed import HaloExchange, Partition, halo_bytes_per_layer

STORY = """\
[Bob] a man with red hair
[Alice] a woman in a yellow dress
---
[Bob] walks in the park #Bob takes a walk
[Alice] waters the flowers #Alice at home
[Bob] reads a newspaper
[Bob] and [Alice] have dinner #Dinner
[NC] a quiet street at night #Night falls
[Alice] rides a bicycle
[Bob] sleeps
"""
# no warm-up, no skipped layers: every step reads the banks (the CLI's --warmup-steps 0 --no-skip)
EVERY_STEP = {"warmup_steps": 0, "skip_prob_early": 0.0, "skip_prob_late": 0.0}


def test_blocks_are_contiguous_and_balanced():
    assert Partition(0, 3).blocks(7) == [(0, 3), (3, 5), (5, 7)]
    assert Partition(1, 2).block(5) == (3, 5)
    assert Partition().blocks(4) == [(0, 4)]


def test_crossing_frames():
    """Only frames that show a character and that a character frame of the other block reads cross."""
    active = [True, True, False, True, True, True, True]
    halo = HaloExchange(Partition(0, 2), active, window=2)  # blocks [0, 4), [4, 7)
    assert halo.crossing(0, 1) == [3]  # frame 2 is [NC]; 3 is within 2 of 4 and 5
    assert halo.crossing(1, 0) == [4, 5]  # 4, 5 reach 3 (2 is [NC] and does not read)


@pytest.mark.parametrize(("world", "window"), [(2, 1), (3, 2)], ids=["2ranks-w1", "3ranks-w2"])
def test_halo_exchange_sends_the_boundary_frames_only(world, window, tmp_path):
    active = [True, True, False, True, True, True, True, False, True]
    spawn(exchange_worker, world, tmp_path, str(tmp_path), active, window)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    partition = Partition(0, world)
    for rank, (start, stop) in enumerate(partition.blocks(len(active))):
        wanted = {
            j
            for i in range(start, stop)
            if active[i]
            for j in range(i - window, i + window + 1)
            if 0 <= j < len(active) and not start <= j < stop and active[j]
        }
        assert set(reports[rank]["received"]) == wanted
    expected = halo_bytes_per_layer(
        active, world, window, groups=2, heads=3, samples=5, head_dim=4, itemsize=4
    )
    assert sum(r["bytes_sent"] for r in reports) == expected > 0


@pytest.mark.parametrize(
    ("model", "world", "window", "active"),
    [
        pytest.param("tiny-sd15", 2, 1, [True, True, True, False, True], id="2ranks-w1-5frames"),
        pytest.param("tiny-sd15", 3, 2, [True, True, True, True, False, True, True], id="3ranks-w2-7frames"),
        pytest.param("tiny-wan", 2, 1, [True, True, True, False], id="wan-2ranks-w1-4shots"),
    ],
)
def test_window_mode_equals_the_unchunked_single_process_run(model, world, window, active, tmp_path):
    """Each rank denoises its block as one batch, in step with the others, reading the neighbour ranks'
    boundary frames: the unchunked single-process latents, bit for bit (no warm-up: both steps read the
    neighbours).

    Both runs use `batch_invariant_linear` (tests/dist_helpers.py): the CPU's BLAS rounds the UNet's
    per-frame time embedding differently in a rank's smaller batch (without it: max |Δ| 7.6e-6), which is
    the machine's arithmetic, not our exchange. Mutation twin: chunks of 2 frames (boundary neighbours
    seen on alternate steps only) move the latents by at least MIN_RELATIVE_CHANGE (measured max |Δ|,
    relative: 2ranks-w1 4.2e-2, 4.9e-3; 3ranks-w2 4.4e-2, 5.2e-3)."""
    spawn(window_worker, world, tmp_path, str(tmp_path), model, active, window, 2)
    single = window_latents(model, active, window, steps=2, chunk=len(active))
    for rank in range(world):
        part = torch.load(tmp_path / f"rank{rank}.pt")
        start, latents = part["start"], part["latents"]
        expected = single[start : start + len(latents)]
        assert torch.equal(latents, expected), (rank, (latents - expected).abs().max())
    chunked = window_latents(model, active, window, steps=2, chunk=2)
    assert relative_change(chunked, single) >= MIN_RELATIVE_CHANGE


def test_bounded_window_mode_over_two_ranks_equals_one_process(tmp_path):
    """Subject masks and bounded attention in window mode over 2 ranks: each frame's pool segments come
    from the same seeded draw on every rank (neighbours from the other rank included), so the latents are
    the one-process run's bit for bit; without masks and bounds they differ (they act)."""
    active = [True] * 4
    spawn(window_worker, 2, tmp_path, str(tmp_path), "tiny-sd15", active, 1, 2, True)
    single = window_latents("tiny-sd15", active, 1, steps=2, chunk=4, bounded=True)
    for rank in range(2):
        part = torch.load(tmp_path / f"rank{rank}.pt")
        start, latents = part["start"], part["latents"]
        assert torch.equal(latents, single[start : start + len(latents)]), rank
    unbounded = window_latents("tiny-sd15", active, 1, steps=2, chunk=4)
    assert relative_change(unbounded, single) >= MIN_RELATIVE_CHANGE


def test_bank_mode_over_two_ranks_is_bit_identical(tmp_path):
    """The characters dealt over the ranks, each bank broadcast by its owner (the default; lockstep and
    stored schedules), or every bank recomputed on every rank: the one-process latents (and frames) every
    way; each rank gets the frames it made (its characters' identity frames included) and only rank 0 makes
    pages. All 3 steps read the banks (no warm-up). Mutation twins, run by the same ranks: reading the
    other rank's bank (Bob's frames read Alice's, dealt to rank 1, and vice versa) or the previous step's
    bank moves the latents by at least MIN_RELATIVE_CHANGE (measured: other rank's 8.0e-3, previous step's
    3.0e-3)."""
    settings = {"num_inference_steps": 3, "id_frames": 1, "read_batch_size": 2, "seed": 5}
    config = {"rate": 0.5, "seed": 2, **EVERY_STEP}
    runs = {  # the stored run last: its banks outlive it (a later story on the pipeline would read them)
        "lockstep": settings,
        "recompute": {**settings, "bank_sharing": "recompute"},
        "other-rank": {**settings, "mutation": "swapped"},
        "previous-step": {**settings, "mutation": "previous_step"},
        "stored": {**settings, "bank_schedule": "stored"},
    }
    with recorded_latents() as single_latents:  # first: the forked ranks inherit its imports
        story_worker_single(tmp_path / "single", settings, config)
    spawn(
        stories_worker,
        2,
        tmp_path,
        [(str(tmp_path / k), v) for k, v in runs.items()],
        "tiny-sd15",
        STORY,
        config,
    )
    single, reference = read_frames(tmp_path / "single"), stacked(single_latents)
    for folder in ("lockstep", "recompute", "stored"):
        assert torch.equal(merged_latents(tmp_path / folder, 2), reference), folder
        split = read_frames(tmp_path / folder)
        assert len(split) == 7 and all(np.array_equal(a, b) for a, b in zip(split, single, strict=True))
        metadata = json.loads((tmp_path / folder / "metadata.json").read_text())
        assert metadata["status"] == "complete" and metadata["world_size"] == 2
        assert metadata["settings"]["bank_sharing"] == ("recompute" if folder == "recompute" else "broadcast")
        results = [json.loads((tmp_path / folder / f"result-rank{r}.json").read_text()) for r in range(2)]
        assert results[0]["pages"] >= 1 and results[1]["pages"] == 0
        # identity frames: Bob 0 (rank 0), Alice 1 (rank 1 unless recomputed); reads [2, 3], [4, 5] | [6]
        assert results[1]["frames"] == ([6] if folder == "recompute" else [1, 6])
        received = [r["bank_bytes_received"] for r in results]
        if folder == "recompute":
            assert received == [None, None]  # no traffic
        else:  # each rank received the other's character; rank 0's banks hold both, every step
            written = sum(metadata["bank_bytes"].values())
            assert min(received) > 0 and sum(received) == written
    assert (tmp_path / "recompute" / "pages" / "page_000.png").is_file()
    for mutant in ("other-rank", "previous-step"):
        change = relative_change(merged_latents(tmp_path / mutant, 2), reference)
        assert change >= MIN_RELATIVE_CHANGE, (mutant, change)


def story_worker_single(out_dir, settings, config, model="tiny-sd15"):
    from storydiff.consistency.config import ConsistencyConfig
    from storydiff.families.tiny_models import build_tiny_pipeline
    from storydiff.pipeline import StoryDiffusionPipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run: CPU kernels' summation order depends on the thread count
    try:
        tiny = build_tiny_pipeline(model, progress_bar=False)
        StoryDiffusionPipeline(tiny, ConsistencyConfig(**config))(
            STORY, out_dir=out_dir, progress=False, **settings
        )
    finally:
        torch.set_num_threads(threads)


def test_a_killed_rank_fails_the_others_clearly_and_resume_finishes_the_run(tmp_path, capsys):
    """Rank 1 dies after its first checkpoint (window mode, 2 ranks): rank 0 stops with a clear error at
    its next exchange (gloo sees the closed connection; the group's timeout is generous so that load on the
    test machine never trips it), its metadata says failed, the finished state stays;
    a resume with the same world size gives the latents (and frames) of an uninterrupted 2-rank run.
    Mutation twin: the same checkpoints resumed as if written at step 3 (not 2) move the latents by at least
    MIN_RELATIVE_CHANGE (measured: 0.20)."""
    settings = {"num_inference_steps": 4, "mode": "window", "chunk_size": 8, "checkpoint_every": 2, "seed": 5}
    config = {"rate": 0.5, "seed": 2, "window": 2, **EVERY_STEP}  # frames 3 and 5 cross the ranks' boundary
    killed = tmp_path / "killed"
    codes = spawn_unjoined(
        killed_story_worker, 2, tmp_path, str(killed), "tiny-sd15", STORY, settings, config, 600
    )
    assert codes[1] == -9 and codes[0] == 0  # rank 0 caught its error and recorded it
    error = (killed / "error-rank0.txt").read_text()
    assert "rank 0 of 2" in error and "another rank stopped" in error, error
    assert json.loads((killed / "metadata.json").read_text())["status"] == "failed"
    assert (killed / "checkpoint-rank0-of-2.pt").is_file() and (killed / "checkpoint-rank1-of-2.pt").is_file()

    # one process cannot take over the checkpoints of two
    assert main(["generate", "--resume", str(killed)]) == 2
    assert "generated by 2 process(es); resume it with the same number" in capsys.readouterr().err

    misread = tmp_path / "misread"
    shutil.copytree(killed, misread)
    runs = [
        (str(killed), {**settings, "resume": True}),
        (str(tmp_path / "whole"), settings),
        (str(misread), {**settings, "resume": True, "mutation": "resumed_later"}),
    ]
    spawn(stories_worker, 2, tmp_path, runs, "tiny-sd15", STORY, config)  # resume, a run in one go, a twin
    whole_latents = merged_latents(tmp_path / "whole", 2)
    assert torch.equal(merged_latents(killed, 2), whole_latents)
    resumed, whole = read_frames(killed), read_frames(tmp_path / "whole")
    assert len(resumed) == 7 and all(np.array_equal(a, b) for a, b in zip(resumed, whole, strict=True))
    assert json.loads((killed / "metadata.json").read_text())["status"] == "complete"
    assert not list(killed.glob("checkpoint*.pt"))
    change = relative_change(merged_latents(misread, 2), whole_latents)
    assert change >= MIN_RELATIVE_CHANGE, change


def test_cli_under_torchrun(tmp_path):
    """`torchrun -m storydiff.cli generate`: bank mode over 2 ranks (each step's banks broadcast by their
    owners, the default) makes the one-process latents (and frames); one voice on stdout. The ranks run the
    CLI's ``main`` through ``RECORD_LATENTS`` (what ``-m storydiff.cli`` runs, saving the decoded latents).
    Mutation twin (one process): the previous step's bank moves the latents by at least MIN_RELATIVE_CHANGE
    (measured: 3.2e-3)."""
    import os
    import subprocess
    import sys

    story = tmp_path / "story.txt"
    story.write_text(STORY)
    args = ["generate", "--model", "tiny-sd15", "--story", str(story), "--steps", "3", "--id-frames", "1"]
    args += ["--read-batch", "2", "--no-skip", "--warmup-steps", "0"]  # every step reads the banks
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the ranks' thread count, for bit-identical CPU math
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    split_dir, latents_dir = tmp_path / "split", tmp_path / "latents"
    latents_dir.mkdir()
    command = ["--no-python", sys.executable, "-c", RECORD_LATENTS, str(latents_dir)]
    split = subprocess.run(
        [*torchrun, *command, *args, "--out", str(split_dir)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert split.returncode == 0, split.stderr[-3000:]
    assert split.stdout.count("7 frames and ") == 1, split.stdout
    settings = {"num_inference_steps": 3, "id_frames": 1, "read_batch_size": 2}
    config = {"rate": 0.5, "seed": 0, **EVERY_STEP}
    with recorded_latents() as single_latents:
        story_worker_single(tmp_path / "single", settings, config)
    assert torch.equal(merged_latents(latents_dir, 2), stacked(single_latents))
    a, b = read_frames(split_dir), read_frames(tmp_path / "single")
    assert len(a) == 7 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert json.loads((split_dir / "metadata.json").read_text())["world_size"] == 2
    with recorded_latents() as mutant_latents, bank_of_the_previous_step():
        story_worker_single(tmp_path / "mutant", settings, config)
    change = relative_change(stacked(mutant_latents), stacked(single_latents))
    assert change >= MIN_RELATIVE_CHANGE, change


@pytest.mark.slow  # spawns its own ranks again; the distributed paths it times are tested above
def test_scaling_benchmark_rows():
    """`storydiff bench --suite dist` measures with the same code: a 2-rank window story reports its
    throughput, per-rank peak and the traffic of its halo exchange."""
    from storydiff.benchmark.dist_scaling import format_scaling_table, run_scaling

    (row,) = run_scaling(model="tiny-sd15", world_sizes=[2], mode="window", frames=4, steps=2)
    assert row["ranks"] == 2 and row["frames_per_minute"] > 0 and row["peak_bytes_per_rank"] > 0
    assert row["halo_bytes_sent"] > 0 and row["backend"] == "gloo"
    assert "window" in format_scaling_table([row])


def test_bank_sharing_is_checked(tmp_path, capsys):
    from storydiff.consistency.config import InvalidSetting
    from storydiff.runs.settings import RunSettings

    with pytest.raises(InvalidSetting, match="bank_sharing must be one of recompute, broadcast"):
        RunSettings(bank_sharing="scatter")
    with pytest.raises(InvalidSetting, match="bank_sharing does not apply in window mode"):
        RunSettings(mode="window", bank_sharing="broadcast")
    story = tmp_path / "story.txt"
    story.write_text(STORY)
    args = ["generate", "--model", "tiny-sd15", "--story", str(story), "--out", str(tmp_path / "o")]
    assert main([*args, "--id-frames", "1", "--dist-bank", "broadcast"]) == 2
    assert "--dist-bank applies to runs over several processes (torchrun)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
