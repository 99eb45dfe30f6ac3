"""``storydiff bench`` under torchrun: every rank measures the same suites on its own GPU, and rank 0 gets
every rank's rows, each tagged with where it was measured, so a node's GPUs sit side by side in one file.

Ranks exchange nothing while they measure (a collective in the middle would time the slowest GPU's wait,
not the op); the rows travel once, at the end, in one ``gather_object`` (a few hundred small dicts).
Nothing here needs a GPU: the tests run it on gloo/CPU ranks with an injected timer.
"""

from __future__ import annotations

import datetime
import platform
import socket

import torch
import torch.distributed as dist

from ..runs.distributed import Partition

# What a merged row says about where it was measured: the rank, the machine (ranks of several nodes),
# the device's name (e.g. "NVIDIA H100 80GB HBM3", the key single-process rows already use) and index.
DEVICE_COLUMNS = ("rank", "host", "device", "device_index")

# How long the end-of-run gather waits for the slowest rank. Every rank runs the same suite on like
# GPUs, so they arrive within minutes of each other, but a full op suite is an hour and the gather is
# the first collective after it: the wait must cover a slower card's whole lag. A rank that dies does
# not leave the others waiting this long: torchrun stops the group when a worker fails.
GATHER_TIMEOUT = datetime.timedelta(hours=4)


def device_info(device: torch.device, partition: Partition) -> dict:
    """This rank's ``DEVICE_COLUMNS``: the CUDA device's name and index, or the CPU's (index None)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
    else:
        index, name = None, platform.processor() or "cpu"
    return {"rank": partition.rank, "host": socket.gethostname(), "device": name, "device_index": index}


def tag_rows(rows: list[dict], info: dict) -> list[dict]:
    """Copies of ``rows`` with this rank's device columns (``info`` wins over a row's own ``device``:
    they name the same card, and the merged file must say it in one place)."""
    return [{**row, **info} for row in rows]


def merge_device_rows(parts: list[dict[str, list[dict]]]) -> dict[str, list[dict]]:
    """Every rank's ``{suite: tagged rows}`` (in rank order) as one ``{suite: rows}``, each suite's rows
    ordered case by case and provider by provider, the ranks of one (case, provider) next to each other
    (so a reader of the CSV compares the GPUs on adjacent lines)."""
    merged: dict[str, list[dict]] = {}
    for suite in dict.fromkeys(name for part in parts for name in part):
        rows = [row for part in parts for row in part.get(suite, [])]
        order = {key: i for i, key in enumerate(dict.fromkeys(_case_key(row) for row in rows))}
        merged[suite] = sorted(rows, key=lambda row: order[_case_key(row)])  # stable: rank order kept
    return merged


def _case_key(row: dict) -> tuple:
    return (row.get("name"), row.get("provider"))


def gather_device_rows(
    partition: Partition, suites: dict[str, list[dict]], info: dict
) -> dict[str, list[dict]]:
    """Every rank's rows of every suite on rank 0, merged (``merge_device_rows``); ``{}`` on the others.

    ``suites``: ``{suite name: rows}`` this rank measured; ``info``: its ``device_info`` (tests pass their
    own). One collective for all suites, however many ran. In a single process: the rows, tagged.
    """
    mine = {suite: tag_rows(rows, info) for suite, rows in suites.items()}
    if not partition.distributed:
        return merge_device_rows([mine])
    gathered = [None] * partition.world if partition.leader else None
    try:
        dist.gather_object(mine, gathered, dst=0)
    except (RuntimeError, dist.DistError) as exc:
        raise RuntimeError(
            f"rank {partition.rank} of {partition.world}: gathering the benchmark rows failed — another rank "
            f"stopped or took more than {GATHER_TIMEOUT} longer ({exc})"
        ) from exc
    if not partition.leader:
        return {}
    return merge_device_rows(gathered)


def by_device(rows: list[dict]) -> list[tuple[dict, list[dict]]]:
    """``rows`` split per rank, in rank order: ``[(device columns, that rank's rows)]`` (for printing each
    device's table with its suite's own formatter)."""
    ranks: dict = {}
    for row in rows:
        info = {column: row.get(column) for column in DEVICE_COLUMNS}
        ranks.setdefault(row.get("rank"), (info, []))[1].append(row)
    return [ranks[rank] for rank in sorted(ranks, key=lambda rank: (rank is None, rank))]


def describe_device(info: dict) -> str:
    """ "rank 1: NVIDIA H100 80GB HBM3 (cuda:1 on node-a)": a per-device table's heading."""
    where = f"cuda:{info['device_index']}" if info.get("device_index") is not None else "cpu"
    return f"rank {info['rank']}: {info['device']} ({where} on {info['host']})"
