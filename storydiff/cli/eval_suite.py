"""``storydiff eval-suite``: a benchmark file's sets under several configurations, generated, scored and
compared.

The benchmark file, every --config and every set under every configuration are checked before anything
loads, so a typo answers at once; the model and the encoders load once, and only if some story still needs
them. Run the same command again after an interruption: finished stories are skipped
(``evaluation/suite.py``).

Under ``torchrun`` every rank plans the same jobs, rank 0 deals the unfinished stories over the ranks by
cost and each rank runs its share; rank 0 merges once every story's done marker is there
(``evaluation/suite_ranks.py``). ``--merge DIR`` merges a finished folder alone, from its ``suite.json``.
"""

from __future__ import annotations

import argparse
import sys

from ..runs.options import SUITE_OPTIONS
from .common import DTYPES, check_output_dir, fail, positive_int
from .eval import encoder_options


def register(subparsers, parents: list) -> None:
    parser = subparsers.add_parser(
        "eval-suite",
        parents=parents,
        help="run a benchmark file under several configurations, score every story, compare them",
        description="Generate every set of a benchmark file (the ConsiStory+ YAML format of 1Prompt1Story: "
        "style, subject, concept_token, settings; e.g. benchmarks/story_sets/example_consistory.yaml) "
        "under every --config into OUT/<config>/<set-id>/, score each like `storydiff eval`, and write "
        "OUT/comparison.json, OUT/comparison.csv and OUT/tradeoff.png (mean CLIP-T against mean identity "
        "similarity, one point per configuration). Resumable: run the same command again and the stories "
        "already generated and scored are skipped. Under torchrun (torchrun --nproc_per_node N -m "
        "storydiff.cli eval-suite ...) the unfinished stories are dealt over the ranks by cost, each rank "
        "on its own device, and rank 0 merges once every story is done; --merge DIR merges a finished "
        "folder alone.",
    )
    parser.add_argument("--benchmark", metavar="FILE", help="benchmark file (YAML); required")
    parser.add_argument(
        "--model",
        help="diffusers model path or hub id, or an offline random-weight model (tiny-sd15, tiny-sdxl, ...); "
        "required",
    )
    parser.add_argument(
        "--config",
        action="append",
        metavar="NAME[:KEY=VALUE,...]",
        help="a named configuration, repeatable, e.g. base:rate=0.0 and "
        "csa:rate=0.5,window=2,level-rate=32=0.5; each KEY=VALUE is a flag of `storydiff generate` as typed "
        "there, without its -- (a repeatable one repeated, a switch bare: no-skip); keys: "
        + ", ".join(option.key for option in SUITE_OPTIONS),
    )
    parser.add_argument("--out", metavar="DIR", help="output folder; required")
    # a whole number checked in run(): a bad one answers in one line, by rank 0 only under torchrun
    parser.add_argument("--limit", default=None, metavar="N", help="only the first N sets")
    parser.add_argument(
        "--steps", type=positive_int, default=30, help="denoising steps (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every story (default: %(default)s)")
    parser.add_argument("--height", type=int, default=None, help="image height (default: the model's size)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: the model's size)")
    parser.add_argument(
        "--style",
        default="none",
        help="our style template on top of each set's own style wording (default: %(default)s)",
    )
    encoder_options(parser)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None, help="default: float16 on CUDA, else float32"
    )
    parser.add_argument(
        "--merge",
        default=None,
        metavar="DIR",
        help="only merge the finished suite in DIR (comparison.json/.csv, tradeoff.png) from its suite.json, "
        "e.g. after a sharded run whose rank 0 stopped; alone, without the other options",
    )
    parser.set_defaults(run=run)


EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # the shell's codes for SIGINT and SIGTERM
# the options a plan needs, as the error names them when --merge is not given
REQUIRED = (("benchmark", "--benchmark"), ("model", "--model"), ("config", "--config"), ("out", "--out"))


def _check_args(args: argparse.Namespace) -> None:
    """ValueError (one line naming the option) for what argparse leaves to us: the options required
    without --merge, --limit, an --out that cannot be written."""
    missing = [flag for name, flag in REQUIRED if not getattr(args, name)]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise ValueError(f"{', '.join(missing)} {verb} required (or give --merge DIR alone)")
    if args.limit is not None:
        try:
            args.limit = int(args.limit)
        except ValueError:
            raise ValueError(f"--limit must be a whole number >= 1, got {args.limit!r}") from None
        if args.limit < 1:
            raise ValueError(f"--limit must be a whole number >= 1, got {args.limit}")
    _check_writable(args.out)


def _check_writable(out: str) -> None:
    """ValueError unless ``out`` is (or can become) a folder this process may read and write: checked
    before any model loads (on a shared filesystem, every rank sees the same answer)."""
    import os
    from pathlib import Path

    check_output_dir(out)
    target = Path(out)
    try:
        existing = next(p for p in (target, *target.parents) if p.exists() or p == p.parent)
    except OSError as exc:  # a parent we may not even look into
        raise ValueError(f"--out {out}: cannot read there ({exc.strerror or exc})") from None
    wanted = os.R_OK | os.W_OK | os.X_OK
    if not os.access(existing, wanted):
        where = "" if existing == target else f" (inside {existing})"
        raise ValueError(f"--out {out}: cannot read and write there{where}; give a folder you may write")


def _plan(args: argparse.Namespace):
    """The suite's jobs from the arguments; ValueError naming what is wrong."""
    from ..consistency.config import InvalidSetting
    from ..evaluation.benchmark_file import load_benchmark
    from ..evaluation.suite import parse_config, plan_suite
    from ..runs.options import flag_for
    from ..runs.settings import RunSettings

    check_output_dir(args.out)
    try:
        base = RunSettings(
            num_inference_steps=args.steps,
            seed=args.seed,
            height=args.height,
            width=args.width,
            style=args.style,
        )
    except InvalidSetting as exc:
        raise ValueError(f"{flag_for(exc.field)} {exc.problem}") from None
    configs = [parse_config(text, base) for text in args.config]
    sets = load_benchmark(args.benchmark)[: args.limit]
    return plan_suite(sets, configs, model=args.model, out_dir=args.out, base=base)


def _encoders(args: argparse.Namespace) -> dict:
    return {"clip": args.clip, "dino": None if args.no_dino else args.dino}


def _suite_record(args: argparse.Namespace) -> dict:
    """What ``suite.json`` keeps to re-plan the suite (``--merge``)."""
    from pathlib import Path

    from ..evaluation.suite_ranks import sha256_of

    return {
        "benchmark": args.benchmark,  # as given: comparison.json names it so
        "benchmark_path": str(Path(args.benchmark).resolve()),
        "benchmark_sha256": sha256_of(args.benchmark),
        "configs": list(args.config),
        "limit": args.limit,
        "steps": args.steps,
        "seed": args.seed,
        "height": args.height,
        "width": args.width,
        "style": args.style,
        "model": args.model,
        "encoders": _encoders(args),
    }


def run(args: argparse.Namespace) -> int:
    import os

    from ..runs.distributed import Partition, launched_by_torchrun
    from .common import EXIT_USAGE, check_environment, resolve_device

    try:
        check_environment()
    except ValueError as exc:
        return fail(str(exc))
    sharded = launched_by_torchrun()
    # every rank checks the same arguments and gets the same answer: rank 0 says it, once
    speaks = not sharded or int(os.environ["RANK"]) == 0
    if args.merge is not None:
        if sharded:
            return fail("--merge runs in one process: run it without torchrun") if speaks else EXIT_USAGE
        return _merge(args)
    try:
        _check_args(args)
        device = resolve_device(args.device)
        jobs = _plan(args)
    except (OSError, ValueError) as exc:
        return fail(str(exc)) if speaks else EXIT_USAGE
    if not sharded:
        return _run(args, jobs, Partition(), device)

    import torch
    import torch.distributed as dist

    from ..evaluation.suite_ranks import join_group

    if device.type == "cuda" and device.index is None:  # each rank its own GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    try:
        partition = join_group(device)
    except (RuntimeError, ValueError) as exc:
        return fail(f"cannot join the torchrun process group: {exc}")
    try:
        return _run(args, jobs, partition, device)
    finally:
        if dist.is_initialized():  # left after the deal already, unless the deal failed
            dist.destroy_process_group()


def _run(args: argparse.Namespace, jobs: list, partition, device) -> int:
    """One rank's suite (the single process is rank 0 of 1): the deal, its share, and on rank 0 the wait
    for the others' markers and the merge."""
    from pathlib import Path

    from ..evaluation import load_clip, load_dino, suite_ranks
    from ..evaluation.suite import run_suite
    from ..models.loading import load_pipeline
    from ..support.progress import default_progress
    from .common import EXIT_USAGE, resolve_dtype

    out, encoders = Path(args.out), _encoders(args)

    def make_deal():
        deal = suite_ranks.deal_jobs(jobs, encoders, partition.world)
        try:
            suite_ranks.write_suite_record(out, _suite_record(args), deal)
        except OSError as exc:  # the first write into --out: say which option it is
            raise ValueError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
        return deal

    try:
        deal = suite_ranks.broadcast_deal(partition, make_deal)
    except (OSError, ValueError) as exc:  # rank 0 says it for every rank
        return fail(str(exc)) if partition.leader else EXIT_USAGE
    except RuntimeError as exc:  # another rank is gone before the start
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if partition.distributed:
        # the group served the deal, its one message; left now, because a story run splits its frames over
        # the default group when there is one (pipeline.py), and each rank here runs whole stories alone
        import torch.distributed as dist

        dist.destroy_process_group()
    mine = deal.jobs_of(jobs, partition.rank)
    progress = default_progress()

    def load_pipe():
        return load_pipeline(
            args.model, device=device, dtype=resolve_dtype(args.dtype), seed=args.seed, progress_bar=False
        )

    def load_encoders():
        clip = load_clip(args.clip, device)
        return clip, None if args.no_dino else load_dino(args.dino, device)

    def mark_done(job, action: str, seconds: float) -> None:
        marker = {"run": deal.run, "rank": partition.rank, "world": partition.world, "seconds": seconds}
        marker.update(cost=deal.cost[job.label], action=action, encoders=encoders)
        suite_ranks.write_marker(job, marker)

    desc = f"eval-suite rank {partition.rank}" if partition.distributed else "eval-suite"
    try:
        with _sigterm_as_interrupt():
            run_suite(
                mine,
                load_pipe=load_pipe,
                load_encoders=load_encoders,
                encoders=encoders,
                batch_size=args.batch_size,
                progress=progress,
                on_done=mark_done,
                desc=desc,
            )
            if not partition.leader:
                return 0
            others = [job for job in jobs if deal.share.get(job.label, 0) != 0]
            suite_ranks.wait_for_markers(others, deal.run, progress=progress)
    except KeyboardInterrupt as exc:
        return _stopped(exc, mine, deal, partition, out)
    except (OSError, ValueError, RuntimeError) as exc:  # ModelLoadError is a ValueError
        return fail(str(exc))
    try:
        comparison, paths = _merged(jobs, encoders, deal, out, benchmark=args.benchmark)
    except (OSError, ValueError) as exc:
        return fail(str(exc))
    _print_summary(comparison, paths, len(jobs))
    return 0


def _stopped(exc: KeyboardInterrupt, mine: list, deal, partition, out) -> int:
    """One line on stderr naming this rank's unfinished sets (finished folders stay); the exit code."""
    from ..evaluation.suite_ranks import read_marker

    why = "SIGTERM" if exc.args == ("SIGTERM",) else "interrupted"
    unfinished = [
        job.label
        for job in mine
        if job.label in deal.share and (read_marker(job) or {}).get("run") != deal.run
    ]
    sets = ", ".join(unfinished) or "none"
    who = f"rank {partition.rank} of {partition.world} stopped ({why})" if partition.distributed else why
    print(
        f"{who}: unfinished sets: {sets}; the finished stories are kept in {out}; run the same command "
        "again (on any number of ranks) to continue after them",
        file=sys.stderr,
    )
    return EXIT_TERMINATED if why == "SIGTERM" else EXIT_INTERRUPTED


def _sigterm_as_interrupt():
    """SIGTERM (what torchrun sends the surviving ranks when one dies) raised as KeyboardInterrupt
    ("SIGTERM"), so a rank names its unfinished sets on the way out; the previous handler after."""
    import signal
    from contextlib import contextmanager

    @contextmanager
    def handled():
        def stop(signum, frame):
            raise KeyboardInterrupt("SIGTERM")

        try:
            previous = signal.signal(signal.SIGTERM, stop)
        except ValueError:  # not the main thread: signals stay the caller's
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    return handled()


def _merged(jobs: list, encoders: dict, deal, out, *, benchmark: str):
    """comparison.json/.csv and tradeoff.png of the finished ``jobs`` (ValueError naming the first story
    missing or unfinished), with the ranks of run ``deal.run`` (``suite_ranks.rank_summary``)."""
    from ..evaluation import suite_ranks
    from ..evaluation.suite import build_comparison, job_state, read_job_report
    from ..evaluation.tradeoff import write_comparison

    states = {job.label: job_state(job, encoders) for job in jobs}
    left = [job for job in jobs if states[job.label] != "finished"]
    if left:
        job = left[0]
        what = "missing" if not job.folder.exists() else "unfinished"
        if states[job.label] == "generated":
            what = "generated but not scored yet (by these encoders)"
        more = f" ({len(left) - 1} more unfinished)" if len(left) > 1 else ""
        raise ValueError(
            f"story {job.label} is {what} ({job.folder}){more}: run the suite command again to finish it"
        )
    reports = {job.label: read_job_report(job) for job in jobs}
    comparison = build_comparison(jobs, reports, benchmark=benchmark, encoders=encoders)
    comparison["ranks"] = suite_ranks.rank_summary(jobs, deal)
    return comparison, write_comparison(comparison, out)


def _merge(args: argparse.Namespace) -> int:
    """``--merge DIR``: re-plan from DIR/suite.json and merge; exit 2 and one line if the benchmark file
    changed or a story is missing or unfinished."""
    from pathlib import Path

    from ..evaluation.suite_ranks import Deal, read_suite_record, sha256_of

    given = [flag for name, flag in REQUIRED if getattr(args, name)]
    if given:
        return fail(f"--merge takes the folder alone: {', '.join(given)} come from its suite.json")
    out = Path(args.merge)
    try:
        record = read_suite_record(out)
        path = record["benchmark_path"]
        try:
            digest = sha256_of(path)
        except OSError as exc:
            raise ValueError(
                f"--merge {out}: cannot read the benchmark file {path}: {exc.strerror}"
            ) from None
        if digest != record["benchmark_sha256"]:
            raise ValueError(
                f"--merge {out}: the benchmark file {path} changed since the suite was planned (its sha256 "
                "differs): its sets may not be the ones generated"
            )
        plan = argparse.Namespace(out=str(out), benchmark=path, config=record["configs"])
        for key in ("limit", "steps", "seed", "height", "width", "style", "model"):
            setattr(plan, key, record[key])
        jobs = _plan(plan)
        deal = Deal.from_dict(record["deal"])
        comparison, paths = _merged(jobs, record["encoders"], deal, out, benchmark=record["benchmark"])
    except KeyError as exc:
        return fail(f"--merge {out}: suite.json lacks {exc}; run the suite command again to rewrite it")
    except (OSError, ValueError) as exc:
        return fail(f"--merge {out}: {exc}" if not str(exc).startswith("--merge") else str(exc))
    _print_summary(comparison, paths, len(jobs))
    return 0


def _print_summary(comparison: dict, paths: dict, stories: int) -> None:
    ranks = comparison["ranks"]
    counts = ranks["counts"]
    print(
        f"{stories} stories: {counts['generated']} generated and scored, {counts['evaluated']} scored "
        f"(generated earlier), {counts['skipped']} done earlier and skipped"
    )
    for row in comparison["configs"]:
        scores = "  ".join(
            f"{key} {row[key]:.3f}" if row.get(key) is not None else f"{key} -"
            for key in (*comparison["identity_metrics"], "clip_t", "clip_t_styled")
        )
        print(f"{row['config']}: {row['sets']} sets  {scores}")
    if ranks["world"] > 1:
        seconds = ", ".join(f"{s:.1f}" for s in ranks["seconds"])
        balance = "-" if ranks["imbalance"] is None else f"{ranks['imbalance']:.3f}"
        print(f"{ranks['world']} ranks: seconds per rank {seconds}; imbalance (slowest ÷ mean) {balance}")
    print("written:\n  " + "\n  ".join(str(path) for path in paths.values()))
