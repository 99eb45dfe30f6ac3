"""`storydiff bench` under torchrun: each rank measures on its own device, rank 0 writes one file per suite
with a row per (case, provider, device), and CPU ranks are refused.

The ranks are forked gloo processes (``dist_helpers``) that run the CLI's own ``prepare`` and ``run_job``
(what ``run`` calls once it has joined the group on a GPU) with an injected timer, 1.0 + rank ms, and a
fake GPU per rank, so the merged rows are known exactly without a GPU. The CPU refusal is ``run``'s, so it
is tested through ``main`` with torchrun's environment variables.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from dist_helpers import join, spawn

import storydiff.benchmark.op_suite as op_suite
from storydiff.benchmark.op_suite import OpCase
from storydiff.benchmark.ranks import device_info, gather_device_rows, merge_device_rows
from storydiff.benchmark.results import rows_figure
from storydiff.cli import build_parser, main
from storydiff.runs.distributed import Partition

CASES = [OpCase("tiny-a", 2, 2, 64, 16, 0.5), OpCase("tiny-b", 2, 1, 32, 8, 0.5)]
PROVIDERS = ["sdpa_dense", "ours_torch"]
FAKE_GPU = "Fake GPU 80GB"


def fake_device(device, partition) -> dict:
    """What ``ranks.device_info`` says on a node of fake GPUs: rank r holds GPU r."""
    return {
        "rank": partition.rank,
        "host": socket.gethostname(),
        "device": FAKE_GPU,
        "device_index": partition.rank,
    }


def bench_worker(rank, world, rendezvous, out, reports) -> None:
    """One torchrun rank of `bench --suite op --size cpu`, timed by the injected timer (1.0 + rank ms)."""
    from storydiff.cli import bench
    from storydiff.runs.distributed import current_partition

    join(rank, world, rendezvous)  # the default, generous timeout: load never trips it
    writes = []
    try:
        args = build_parser().parse_args(
            ["bench", "--suite", "op", "--size", "cpu", "--providers", ",".join(PROVIDERS), "--out", out]
        )
        import storydiff.benchmark.results as results

        write_results = results.write_results
        with (
            mock.patch.object(op_suite, "cpu_cases", lambda: CASES),
            mock.patch.object(op_suite, "median_ms", lambda fn, device, **kw: 1.0 + rank),
            mock.patch("storydiff.benchmark.ranks.device_info", fake_device),
            mock.patch.object(
                results, "write_results", lambda *a, **k: writes.append(a[2]) or write_results(*a, **k)
            ),
        ):
            code = bench.run_job(bench.prepare(args, torch.device("cpu")), current_partition())
        (Path(reports) / f"rank{rank}.json").write_text(json.dumps({"code": code, "writes": writes}))
    finally:
        dist.destroy_process_group()


def test_two_ranks_write_one_file_with_a_row_per_device(tmp_path):
    out, reports = tmp_path / "out", tmp_path / "reports"
    reports.mkdir()
    spawn(bench_worker, 2, tmp_path, str(out), str(reports))
    done = {rank: json.loads((reports / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    assert done[0] == {"code": 0, "writes": ["op-cpu"]}  # rank 0 writes the suite's one result
    assert done[1] == {"code": 0, "writes": []}  # rank 1 measured, and writes nothing
    files = sorted(path.name for path in out.iterdir())
    assert [Path(name).suffix for name in files] == [".csv", ".json", ".png"], files
    assert files[0].startswith("op-cpu_fake-gpu-80gb-x2-ranks_")
    rows = json.loads((out / files[1]).read_text())
    # a row per (case, provider, rank), the ranks of one (case, provider) side by side
    assert [(row["name"], row["provider"], row["rank"]) for row in rows] == [
        (case.name, provider, rank) for case in CASES for provider in PROVIDERS for rank in (0, 1)
    ]
    for row in rows:
        assert row["status"] == "ok"
        assert row["ms"] == 1.0 + row["rank"]  # the injected timer of the rank that measured it
        assert row["device"] == FAKE_GPU and row["device_index"] == row["rank"]
        assert row["host"] == socket.gethostname()
        assert row["speedup_vs_" + next(p for p in PROVIDERS if p != row["provider"])] == 1.0  # within a rank
    header = (out / files[0]).read_text().splitlines()[0].split(",")
    assert {"rank", "host", "device", "device_index", "ms"} <= set(header)


def test_merge_orders_rows_by_case_provider_then_rank():
    def rows(rank: int) -> list[dict]:
        return [{"name": c, "provider": p, "ms": 1.0 + rank} for c in ("a", "b") for p in ("x", "y")]

    info = {1: {"rank": 1, "device_index": 1}, 0: {"rank": 0, "device_index": 0}}
    parts = [{"op": [{**row, **info[r]} for row in rows(r)], "unet": []} for r in (0, 1)]
    merged = merge_device_rows(parts)
    assert list(merged) == ["op", "unet"] and merged["unet"] == []
    assert [(r["name"], r["provider"], r["rank"], r["ms"]) for r in merged["op"]] == [
        (c, p, rank, 1.0 + rank) for c in ("a", "b") for p in ("x", "y") for rank in (0, 1)
    ]
    # one process: its rows tagged with its device, nothing gathered
    single = gather_device_rows(Partition(), {"op": rows(0)}, {"rank": 0, "device_index": None})
    assert all(row["rank"] == 0 and row["device_index"] is None for row in single["op"])
    cpu = device_info(torch.device("cpu"), Partition())
    assert cpu["rank"] == 0 and cpu["device_index"] is None and cpu["device"] and cpu["host"]


def test_plot_draws_each_rank_beside_the_others():
    rows = [
        {"name": c, "provider": p, "rank": r, "device": FAKE_GPU, "tflops": 10.0 * r + (p == "y")}
        for c in ("a", "b")
        for p in ("x", "y")
        for r in (0, 1)
    ]
    (ax,) = rows_figure(rows).axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a r0", "a r1", "b r0", "b r1"]
    heights = {bars.get_label(): [bar.get_height() for bar in bars] for bars in ax.containers}
    assert heights == {"x": [0.0, 10.0, 0.0, 10.0], "y": [1.0, 11.0, 1.0, 11.0]}
    assert FAKE_GPU + " x2 ranks" in ax.get_title()


@pytest.fixture
def torchrun_env(monkeypatch):
    """The environment torchrun gives rank 0 of 2 (no group is joined: the command must stop before)."""
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    measured = []
    monkeypatch.setattr(op_suite, "run_op_suite", lambda *a, **k: measured.append(1) or [])
    return measured


@pytest.mark.parametrize("device", [["--device", "cpu"], []])  # asked for, or the default without CUDA
def test_cpu_ranks_are_refused_before_measuring(tmp_path, capsys, torchrun_env, monkeypatch, device):
    monkeypatch.setattr("storydiff.cli.bench.resolve_device", lambda name: torch.device("cpu"))
    out = tmp_path / "out"
    assert main(["bench", "--suite", "op", *device, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert line.startswith("error: ") and "CPU" in line and "torchrun on GPUs" in line
    assert not captured.out and not out.exists() and not torchrun_env
    assert not dist.is_initialized()
    # the node's other ranks reach the same verdict and exit with it silently: one line per node
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert main(["bench", "--suite", "op", *device, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert not captured.err and not captured.out and not out.exists() and not torchrun_env


def test_suites_that_start_their_own_ranks_are_refused_under_torchrun(
    tmp_path, capsys, torchrun_env, monkeypatch
):
    monkeypatch.setattr("storydiff.cli.bench.resolve_device", lambda name: torch.device("cuda"))
    assert main(["bench", "--suite", "dist", "--out", str(tmp_path / "out")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "--suite dist does not run under torchrun" in line
    assert not (tmp_path / "out").exists() and not dist.is_initialized()
