"""A benchmark suite sharded over ``torchrun`` ranks: the deal by cost, done markers, the plan record.

The unit of work is a story folder (``OUT/<config>/<set-id>/``, ``suite.py``): stories need no
communication while they run, so the ranks talk once, at the start. Rank 0 reads which stories are not
finished yet (``suite.job_state``: the one-process resume rules), deals those over the ranks by cost and
broadcasts the deal; then each rank runs its share with ``run_suite`` and, after each finished story,
writes ``<story>/eval/done.json`` (its rank, seconds, cost, and the run's id). Rank 0, after its own
share, polls the folder until every story of the deal has its marker, and merges. No collective ever
waits on another rank's stories: a share may take days, longer than any process-group timeout.

Cost model (``job_cost``): a story to generate costs ``frames × steps × (height/16) · (width/16)``, the
denoiser's work (its tokens at 16 pixels a token: the VAE's 8x and 2x2 patches, or a UNet's level of the
same size) summed over every frame and step; a story generated earlier and only to be scored costs
``frames × (height/16) · (width/16)`` (scoring a frame is about one step's work). A size the suite leaves
to the model counts as ``DEFAULT_SIDE`` (1024, SDXL's, FLUX's and SD3's native side): every job that leaves
it out has the model's one default, so it scales those jobs alike and only matters beside a configuration
that gives its own size. The deal is greedy, longest first, each to the least-loaded rank (the lower rank
on a tie): deterministic, and within 4/3 of the best makespan (Graham's bound).

What the folder must give several nodes (README "Running a benchmark suite on many GPUs"): ``os.replace``
atomic within a directory (every file here is written to a hidden temporary and renamed), and the other
nodes' finished files visible to rank 0's polling. No two ranks write the same file: stories are disjoint
by the deal; ``suite.json`` and the merged comparison are rank 0's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..runs.distributed import Partition, communicate, current_partition, init_from_environment
from ..support.atomic import write_json
from ..support.progress import Progress, progress_bar
from .suite import SuiteJob, job_state

__all__ = [
    "DEFAULT_SIDE",
    "DONE_FILE",
    "SUITE_FILE",
    "Deal",
    "broadcast_deal",
    "deal_jobs",
    "greedy_deal",
    "imbalance",
    "job_cost",
    "join_group",
    "rank_summary",
    "read_marker",
    "read_suite_record",
    "sha256_of",
    "wait_for_markers",
    "write_marker",
    "write_suite_record",
]

SUITE_FILE = "suite.json"  # OUT/suite.json: what --merge re-plans from
DONE_FILE = "done.json"  # OUT/<config>/<set-id>/eval/done.json: the story's done marker
SUITE_FORMAT = 1
DEFAULT_SIDE = 1024
TOKEN_SIDE = 16  # pixels per token side: the VAE's 8x, then 2x2 patches
# polling: quick at first (a short suite ends in seconds), then slower, never slower than this
FIRST_POLL_S, LONGEST_POLL_S = 0.25, 30.0


def job_cost(job: SuiteJob, *, generated: bool = False, default_side: int = DEFAULT_SIDE) -> int:
    """The job's cost (module docstring): ``frames × steps × (height/16)·(width/16)`` to generate it,
    ``frames × (height/16)·(width/16)`` when only its scoring is left (``generated``)."""
    height = job.settings.height or default_side
    width = job.settings.width or default_side
    tokens = max(1, height // TOKEN_SIDE) * max(1, width // TOKEN_SIDE)
    steps = 1 if generated else job.settings.num_inference_steps
    return len(job.story.frames) * steps * tokens


def greedy_deal(costs: list[int], world: int) -> list[int]:
    """The rank of each item: longest first (the earlier item on a tie), each to the least-loaded rank (the
    lower rank on a tie). Deterministic: every rank computing it gets the same deal."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    loads = [0] * world
    ranks = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        ranks[index] = rank
        loads[rank] += costs[index]
    return ranks


@dataclass(frozen=True)
class Deal:
    """Who runs what in one run of the suite: ``run`` its id (markers of this run carry it), ``world`` the
    ranks, ``share`` {label: rank} and ``cost`` {label: cost} of the stories not finished at the start;
    ``finished`` the labels finished before it (rank 0 lists them as skipped)."""

    run: str
    world: int
    share: dict[str, int] = field(default_factory=dict)
    cost: dict[str, int] = field(default_factory=dict)
    finished: tuple[str, ...] = ()

    def jobs_of(self, jobs: list[SuiteJob], rank: int) -> list[SuiteJob]:
        """``rank``'s stories in plan order; rank 0's include the finished ones (run_suite skips them)."""
        return [
            job
            for job in jobs
            if self.share.get(job.label) == rank or (rank == 0 and job.label in self.finished)
        ]

    def loads(self) -> list[int]:
        """Each rank's summed cost."""
        loads = [0] * self.world
        for label, rank in self.share.items():
            loads[rank] += self.cost[label]
        return loads

    def to_dict(self) -> dict:
        return {
            "run": self.run,
            "world": self.world,
            "share": self.share,
            "cost": self.cost,
            "finished": list(self.finished),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Deal:
        return cls(data["run"], data["world"], data["share"], data["cost"], tuple(data["finished"]))


def deal_jobs(jobs: list[SuiteJob], encoders: dict[str, str | None], world: int) -> Deal:
    """Rank 0's deal: which stories are not finished (``job_state``), each one's cost, the greedy deal;
    a fresh run id. ValueError for a finished run of other settings (as the one-process suite)."""
    states = {job.label: job_state(job, encoders) for job in jobs}
    pending = [job for job in jobs if states[job.label] != "finished"]
    costs = [job_cost(job, generated=states[job.label] == "generated") for job in pending]
    ranks = greedy_deal(costs, world)
    return Deal(
        run=uuid.uuid4().hex,
        world=world,
        share={job.label: rank for job, rank in zip(pending, ranks, strict=True)},
        cost={job.label: cost for job, cost in zip(pending, costs, strict=True)},
        finished=tuple(job.label for job in jobs if states[job.label] == "finished"),
    )


# ------------------------------------------------------------------------------------------------------
# The process group: joined once, used once


def join_group(device, timeout_s: float = 1800.0) -> Partition:
    """Join the group ``torchrun`` describes (RANK, WORLD_SIZE, MASTER_ADDR...) over gloo, whatever the
    device: the one message is a small Python object, so no NCCL communicator takes GPU memory. A CUDA
    rank takes device ``LOCAL_RANK``. A group already joined (a test's forked ranks) is kept.

    Restarts under ``--max-restarts`` join a fresh group: ``runs.distributed.init_from_environment``."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return current_partition()
    return init_from_environment("gloo", device, timeout_s)


def broadcast_deal(partition: Partition, make: Callable[[], Deal]) -> Deal:
    """``make()`` on rank 0, its deal on every rank: the suite's one collective. If it raised, rank 0
    re-raises and the others raise ValueError("rank 0: ...") — nobody waits for a rank that gave up."""
    import torch.distributed as dist

    deal, error = None, None
    if partition.leader:
        try:
            deal = make()
        except Exception as exc:  # every rank must hear of it before rank 0 raises
            error = exc
    box = [None if deal is None else deal.to_dict(), None if error is None else str(error)]
    if partition.distributed:
        hint = "the process group's timeout passed; no story has started"
        communicate(partition, "dealing the stories", lambda: dist.broadcast_object_list(box, src=0), hint)
    if error is not None:
        raise error
    if box[1] is not None:
        raise ValueError(f"rank 0: {box[1]}")
    return Deal.from_dict(box[0])


# ------------------------------------------------------------------------------------------------------
# Files: the plan record, the done markers


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_suite_record(out: Path, plan: dict, deal: Deal) -> Path:
    """``OUT/suite.json``: the arguments that re-plan the suite (``plan``: benchmark path and sha256,
    configurations, limit, steps, seed, size, style, model, encoders) and this run's deal. Rank 0's."""
    out.mkdir(parents=True, exist_ok=True)
    return write_json(out / SUITE_FILE, {"format": SUITE_FORMAT, **plan, "deal": deal.to_dict()})


def read_suite_record(out: Path) -> dict:
    """``OUT/suite.json``; ValueError naming the folder if it is missing, unreadable or newer."""
    path = out / SUITE_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(
            f"--merge {out}: no {SUITE_FILE} there (not an eval-suite folder, or one written before --merge "
            "existed: run the suite command again to write it)"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--merge {out}: cannot read {path}: {exc}") from None
    if not isinstance(record, dict) or record.get("format", 0) > SUITE_FORMAT:
        raise ValueError(f"--merge {out}: {path} is of a newer storydiff; merge it with that version")
    return record


def write_marker(job: SuiteJob, marker: dict) -> Path:
    """``<story>/eval/done.json`` (``marker``: run, rank, world, seconds, cost, action, encoders); written
    by the rank that finished the story, after its last file."""
    return write_json(job.folder / "eval" / DONE_FILE, marker)


def read_marker(job: SuiteJob) -> dict | None:
    """The story's done marker, or None (none yet, or caught half-visible on a network filesystem)."""
    try:
        return json.loads((job.folder / "eval" / DONE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def wait_for_markers(
    jobs: list[SuiteJob],
    run: str,
    *,
    progress: Progress = True,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Poll until each of ``jobs`` has a done marker of run ``run``. No timeout (a share may take days):
    a rank that died is torchrun's to report, which stops this one too. The progress line names the next
    story waited for."""
    waiting = list(jobs)
    pause = FIRST_POLL_S
    bar = progress_bar(len(jobs), "waiting for the other ranks", "story", progress)
    try:
        while waiting:
            done = [job for job in waiting if (read_marker(job) or {}).get("run") == run]
            if done:
                waiting = [job for job in waiting if job not in done]
                bar.update(len(done))
                pause = FIRST_POLL_S
            if waiting:
                bar.set_postfix_str(f"next: {waiting[0].label}")
                sleep(pause)
                pause = min(LONGEST_POLL_S, pause * 2)
    finally:
        bar.close()


def imbalance(seconds: list[float]) -> float | None:
    """Slowest rank ÷ mean over the ranks (1.0: perfectly even); None when no rank did anything."""
    mean = math.fsum(seconds) / len(seconds) if seconds else 0.0
    return max(seconds) / mean if mean > 0 else None


def rank_summary(jobs: list[SuiteJob], deal: Deal) -> dict:
    """What ``comparison.json`` records of the ranks of run ``deal.run``, from its markers alone (so
    ``--merge`` writes the same): per rank its seconds, stories and cost, and the imbalance."""
    seconds, stories, cost = [0.0] * deal.world, [0] * deal.world, [0] * deal.world
    actions = {"generated": 0, "evaluated": 0}
    for job in jobs:
        marker = read_marker(job)
        if not marker or marker.get("run") != deal.run or not 0 <= marker.get("rank", -1) < deal.world:
            continue
        rank = marker["rank"]
        seconds[rank] += float(marker["seconds"])
        stories[rank] += 1
        cost[rank] += int(marker["cost"])
        actions[marker.get("action", "generated")] = actions.get(marker.get("action", "generated"), 0) + 1
    return {
        "run": deal.run,
        "world": deal.world,
        "seconds": seconds,
        "stories": stories,
        "cost": cost,
        "imbalance": imbalance(seconds),
        "counts": {**actions, "skipped": len(deal.finished)},
    }
