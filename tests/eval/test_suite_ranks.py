"""`storydiff eval-suite` over torchrun ranks (``evaluation/suite_ranks.py``): the deal by cost, 2 ranks ==
one process (numbers and frames), no file written by two ranks, a killed rank and the resume on another
world size, ``--merge``, and the input errors answered by rank 0 in one line.

Every suite is the example file's first three sets (4, 3 and 5 frames) under two configurations, 2 steps at
64x64 on tiny-sd15 with the tiny random encoders. Ranks are forked from the test process (``dist_helpers``:
a ``file://`` rendezvous, no ports) except in the killed-rank test, which needs torchrun's own agent.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dist_helpers import join, spawn

from storydiff.cli import main
from storydiff.evaluation import suite_ranks
from storydiff.evaluation.suite_ranks import Deal, greedy_deal, imbalance

EXAMPLE = Path(__file__).resolve().parents[2] / "benchmarks" / "story_sets" / "example_consistory.yaml"
CONFIGS = ["--config", "base:rate=0.0", "--config", "csa:rate=0.5,window=2"]
SETS = ["animals_0", "animals_1", "humans_baker"]
LABELS = [f"{config}/{set_id}" for config in ("base", "csa") for set_id in SETS]
SCORES = ("clip_i", "dino", "clip_t", "clip_t_styled")


def _argv(out, *extra) -> list[str]:
    argv = ["eval-suite", "--benchmark", EXAMPLE, "--model", "tiny-sd15", "--out", out, "--limit", "3"]
    argv += ["--steps", "2", "--height", "64", "--width", "64", "--clip", "tiny", "--dino", "tiny"]
    return [str(a) for a in (*argv, *CONFIGS, *extra)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process suite every sharded run must equal."""
    out = tmp_path_factory.mktemp("single") / "out"
    assert main(_argv(out)) == 0
    return out


def _story_files(out: Path) -> dict[str, bytes]:
    """Every frame's PNG bytes, by path under ``out``."""
    return {
        str(path.relative_to(out)): path.read_bytes()
        for label in LABELS
        for path in sorted((out / label / "frames").glob("*.png"))
    }


def _report_numbers(out: Path) -> dict[str, dict]:
    """Each set's scores from its own eval/report.json."""
    numbers = {}
    for label in LABELS:
        report = json.loads((out / label / "eval" / "report.json").read_text())
        numbers[label] = {
            "clip_t": report["clip_t_mean"],
            "clip_t_styled": report["clip_t_styled_mean"],
            "characters": report["characters"],
        }
    return numbers


def _assert_same_suite(out: Path, single: Path) -> None:
    """Comparison numbers equal, every frame byte-identical, every set's report numbers equal."""
    mine, theirs = (json.loads((d / "comparison.json").read_text())["configs"] for d in (out, single))
    for row, expected in zip(mine, theirs, strict=True):
        assert row["config"] == expected["config"] and row["sets"] == expected["sets"] == 3
        assert {key: row[key] for key in SCORES} == {key: expected[key] for key in SCORES}
        assert row["per_set"] == expected["per_set"]
    frames = _story_files(out)
    assert len(frames) == 2 * (4 + 3 + 5) and frames == _story_files(single)
    assert _report_numbers(out) == _report_numbers(single)


# ---------------------------------------------------------------------------------------------------------
# The deal


def test_greedy_deal_is_longest_first_to_the_least_loaded():
    assert greedy_deal([3, 5, 4, 3, 5, 4], 2) == [0, 0, 0, 1, 1, 1]  # 5, 5, 4, 4, 3, 3: loads 12 and 12
    assert greedy_deal([7, 1, 1, 1], 3) == [0, 1, 2, 1]
    assert greedy_deal([], 4) == [] and greedy_deal([2, 2], 1) == [0, 0]
    assert imbalance([10.0, 20.0]) == pytest.approx(20 / 15) and imbalance([0.0, 0.0]) is None
    deal = Deal("r", 2, {"a/x": 0, "a/y": 1}, {"a/x": 3, "a/y": 4}, ("a/z",))
    assert deal.loads() == [3, 4] and Deal.from_dict(json.loads(json.dumps(deal.to_dict()))) == deal


def test_cost_is_frames_steps_tokens(tmp_path):
    from storydiff.evaluation.benchmark_file import load_benchmark
    from storydiff.evaluation.suite import parse_config, plan_suite
    from storydiff.runs.settings import RunSettings

    base = RunSettings(num_inference_steps=30)
    configs = [parse_config("a"), parse_config("b:height=512,width=768")]
    jobs = plan_suite(load_benchmark(EXAMPLE)[:1], configs, model="m", out_dir=tmp_path, base=base)
    default, sized = (suite_ranks.job_cost(job) for job in jobs)
    assert default == 4 * 30 * 64 * 64  # the model's size left out: DEFAULT_SIDE 1024
    assert sized == 4 * 30 * 32 * 48 and suite_ranks.job_cost(jobs[1], generated=True) == 4 * 32 * 48


# ---------------------------------------------------------------------------------------------------------
# 2 ranks == 1 process; no file written by two ranks; --merge


@contextlib.contextmanager
def _write_spy(written: list[str]):
    """Records every path opened for writing and every rename's target (what ``atomic_path`` does)."""
    opened, replace, rename = builtins.open, os.replace, os.rename

    def spy_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            written.append(os.path.abspath(file))
        return opened(file, mode, *args, **kwargs)

    def spy_replace(src, dst, *args, **kwargs):
        written.append(os.path.abspath(dst))
        return replace(src, dst, *args, **kwargs)

    def spy_rename(src, dst, *args, **kwargs):
        written.append(os.path.abspath(dst))
        return rename(src, dst, *args, **kwargs)

    builtins.open = io.open = spy_open
    os.replace, os.rename = spy_replace, spy_rename
    try:
        yield
    finally:
        builtins.open = io.open = opened
        os.replace, os.rename = replace, rename


def _rank_worker(rank, world, rendezvous, argv, spy_dir) -> None:
    """One rank as torchrun starts it (RANK, WORLD_SIZE, LOCAL_RANK set), the CLI under the write spy."""
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    join(rank, world, rendezvous)  # the default, generous timeout: load never trips it
    written: list[str] = []
    out, err = io.StringIO(), io.StringIO()
    try:
        with _write_spy(written), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        if dist.is_initialized():  # the CLI leaves the group after its deal
            dist.destroy_process_group()
    record = {"code": code, "written": written, "stdout": out.getvalue(), "stderr": err.getvalue()}
    (Path(spy_dir) / f"rank{rank}.json").write_text(json.dumps(record))


def test_two_ranks_equal_one_process_and_never_write_the_same_file(single, tmp_path, capsys):
    out, spy_dir = tmp_path / "out", tmp_path / "spy"
    spy_dir.mkdir()
    spawn(_rank_worker, 2, tmp_path, _argv(out), str(spy_dir))
    ranks = [json.loads((spy_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["code"] for r in ranks] == [0, 0], [r["stderr"][-2000:] for r in ranks]
    _assert_same_suite(out, single)

    # the deal: 3 stories of cost 12 frame-steps... each; every marker names the rank the deal gave
    record = json.loads((out / "suite.json").read_text())
    share = record["deal"]["share"]
    assert sorted(share) == sorted(LABELS) and sorted(share.values()) == [0, 0, 0, 1, 1, 1]
    assert Deal.from_dict(record["deal"]).loads() == [12 * 2 * 16, 12 * 2 * 16]  # 4x4 tokens a frame
    for label, rank in share.items():
        marker = json.loads((out / label / "eval" / "done.json").read_text())
        assert (marker["rank"], marker["world"], marker["run"]) == (rank, 2, record["deal"]["run"])

    # no file written by two ranks: the story folders by the deal, the suite's own files by rank 0
    paths = [{p for p in r["written"] if p.startswith(str(out))} for r in ranks]
    assert paths[0] and paths[1] and not paths[0] & paths[1]
    for rank, mine in enumerate(paths):
        folders = {str(out / label) for label, r in share.items() if r == rank}
        outside = {p for p in mine if not any(p.startswith(folder + os.sep) for folder in folders)}
        expected = {str(out / name) for name in ("suite.json", "comparison.json", "comparison.csv")}
        expected.add(str(out / "tradeoff.png"))
        assert {p for p in outside if not Path(p).name.startswith(".")} == (expected if rank == 0 else set())

    # one voice: rank 0 prints the summary with the per-rank seconds and the imbalance
    assert ranks[1]["stdout"] == ""
    assert "6 stories: 6 generated and scored" in ranks[0]["stdout"]
    assert (
        "2 ranks: seconds per rank" in ranks[0]["stdout"]
        and "imbalance (slowest ÷ mean)" in ranks[0]["stdout"]
    )
    comparison = json.loads((out / "comparison.json").read_text())
    summary = comparison["ranks"]
    assert summary["world"] == 2 and summary["stories"] == [3, 3] and summary["imbalance"] >= 1.0
    with capsys.disabled():  # the number the README quotes: shown with pytest -s
        print(f"\nimbalance (slowest rank ÷ mean), 2 ranks: {summary['imbalance']:.3f} {summary['seconds']}")

    # --merge from the folder alone writes the same comparison
    (out / "comparison.json").unlink()
    assert main(["eval-suite", "--merge", str(out)]) == 0
    assert json.loads((out / "comparison.json").read_text()) == comparison
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------------------
# A killed rank under torchrun, the resume on 1 process


KILL_RANK_1 = """\
import os, signal, sys
if os.environ["RANK"] == "1":  # dies (no cleanup) right after its first story's done marker
    import storydiff.evaluation.suite_ranks as ranks
    write = ranks.write_marker
    def write_then_die(job, marker):
        write(job, marker)
        os.kill(os.getpid(), signal.SIGKILL)
    ranks.write_marker = write_then_die
from storydiff.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_rank_then_resume_on_one_process(single, tmp_path, capsys):
    out = tmp_path / "out"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    torchrun += ["--max-restarts", "0", "--monitor-interval", "0.1"]
    command = [*torchrun, "--no-python", sys.executable, "-c", KILL_RANK_1, *_argv(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread, as the tests: bit-identical CPU math
    # timeout: a guard against a hang only
    killed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert killed.returncode != 0
    lines = [line for line in killed.stderr.splitlines() if "rank 0 of 2 stopped (SIGTERM)" in line]
    assert len(lines) == 1, killed.stderr[-3000:]
    share = json.loads((out / "suite.json").read_text())["deal"]["share"]
    run = json.loads((out / "suite.json").read_text())["deal"]["run"]
    unfinished = [
        label
        for label in LABELS
        if share[label] == 0 and (suite_ranks.read_marker(_Job(out / label)) or {}).get("run") != run
    ]
    assert lines[0].split("unfinished sets: ")[1].startswith(", ".join(unfinished) or "none")
    finished_by_1 = [
        label for label in LABELS if share[label] == 1 and (out / label / "eval" / "done.json").exists()
    ]
    assert len(finished_by_1) == 1  # rank 1 died after its first story

    # merging the unfinished folder names a story, in one line
    assert main(["eval-suite", "--merge", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --merge {out}: story "), err
    assert any(what in err[0] for what in ("is missing", "is unfinished", "not scored yet")), err

    # 1 process finishes it; the finished stories are kept
    kept = (out / finished_by_1[0] / "frames" / "frame_000.png").stat().st_mtime_ns
    assert main(_argv(out)) == 0
    printed = capsys.readouterr().out
    assert "6 stories:" in printed and "done earlier and skipped" in printed
    assert (out / finished_by_1[0] / "frames" / "frame_000.png").stat().st_mtime_ns == kept
    _assert_same_suite(out, single)


KILL_RANK_1_ONCE = KILL_RANK_1.replace(
    'if os.environ["RANK"] == "1":',
    'if os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":',
)


@pytest.mark.slow  # another torchrun group (~20 s); the kill and the resume are tested above
def test_max_restarts_resumes_by_itself(single, tmp_path):
    """With --max-restarts 1 the group restarts after rank 1's death and finishes: the restarted ranks
    join a fresh group (``join_group``'s per-attempt prefix; without it gloo reads the dead rank 0's
    address) and deal what is left."""
    out = tmp_path / "out"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    torchrun += ["--max-restarts", "1", "--monitor-interval", "0.1"]
    command = [*torchrun, "--no-python", sys.executable, "-c", KILL_RANK_1_ONCE, *_argv(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    restarted = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "rank 0 of 2 stopped (SIGTERM)" in restarted.stderr
    assert "done earlier and skipped" in restarted.stdout
    _assert_same_suite(out, single)


class _Job:
    """What ``read_marker`` reads of a job: its folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder


# ---------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_is_one_line_from_rank_0(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    for rank, lines in (("0", 1), ("1", 0)):  # every rank refuses; rank 0 says it
        monkeypatch.setenv("RANK", rank)
        assert main(_argv(tmp_path / "out", "--limit", "0")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == lines and (
            not err or err[0] == "error: --limit must be a whole number >= 1, got 0"
        )
    monkeypatch.setenv("RANK", "0")
    assert main(_argv(tmp_path / "out", "--limit", "two")) == 2
    assert capsys.readouterr().err.strip() == "error: --limit must be a whole number >= 1, got 'two'"
    assert not (tmp_path / "out").exists()
    # the same under torchrun itself: every rank refuses before joining, one line in all
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*torchrun, "-m", "storydiff.cli", *_argv(tmp_path / "out", "--limit", "0")]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=600)  # a hang guard only
    assert refused.returncode != 0 and "exitcode  : 2" in refused.stderr, refused.stderr[-3000:]
    assert refused.stderr.count("error: --limit must be a whole number >= 1, got 0") == 1
    assert not (tmp_path / "out").exists()


def test_unwritable_out_is_one_line(tmp_path, monkeypatch, capsys):
    shared = tmp_path / "shared"
    shared.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: real_access(path, mode) and Path(path) != shared)
    assert main(_argv(shared / "out")) == 2  # as a user without write access there sees it
    err = capsys.readouterr().err.strip().splitlines()
    where = f"--out {shared / 'out'}: cannot read and write there (inside {shared})"
    assert err == [f"error: {where}; give a folder you may write"]
    monkeypatch.undo()
    # a folder nobody may create (root included): the deal's first write fails, one line
    assert main(_argv("/proc/self/storydiff-suite/out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --out /proc/self/storydiff-suite/out: cannot"), err


def test_merge_refuses_what_it_cannot_merge(tmp_path, capsys):
    assert main(["eval-suite", "--merge", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no suite.json there" in err[0]
    assert main(["eval-suite", "--merge", str(tmp_path), "--model", "tiny-sd15"]) == 2
    assert "--merge takes the folder alone: --model" in capsys.readouterr().err
    # a benchmark file changed after the plan
    bench = tmp_path / "bench.yaml"
    bench.write_text(EXAMPLE.read_text())
    out = tmp_path / "out"
    record = {
        "format": 1,
        "benchmark": str(bench),
        "benchmark_path": str(bench),
        "benchmark_sha256": "0" * 64,
    }
    out.mkdir()
    (out / "suite.json").write_text(json.dumps(record))
    assert main(["eval-suite", "--merge", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"the benchmark file {bench} changed since the suite was planned" in err[0]
