"""``storydiff bench``: the op, UNet, DiT and motion-predictor benchmark suites.

Under torchrun (``torchrun --nproc_per_node N -m storydiff.cli bench --suite op|unet|dit|all``) every rank
runs the same suites on its own GPU (``cuda:LOCAL_RANK``) and rank 0 writes one file per suite with a row
per (case, provider, device) (``benchmark/ranks.py``); on CPUs that is refused, since ranks sharing cores
would time each other.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .common import DTYPES, EXIT_USAGE, check_environment, check_output_dir, fail, resolve_device

if TYPE_CHECKING:  # torch is imported when a command runs, so `storydiff --help` stays instant
    import torch

    from ..runs.distributed import Partition


def register(subparsers, parents: list) -> None:
    bench = subparsers.add_parser(
        "bench",
        parents=parents,
        help="benchmark consistent attention against the official variants and dense SDPA",
        description="Op suite: one layer call per provider, each first checked against the fp32 reference. "
        "UNet suite: one SDXL UNet step of 4 identity frames with official-A, official-B and our processors, "
        "and the identity bank each keeps. DiT suite: one FLUX.1-dev / SD3.5-large transformer step of 4 "
        "frames, stock vs ours. Default: real sizes on a GPU, a small configuration (about a minute) on a "
        "CPU.",
    )
    bench.add_argument(
        "--suite",
        choices=("op", "unet", "dit", "all", "motion", "dist"),
        default="all",
        help="all = op + unet; dit: FLUX.1-dev / SD3.5-large transformer step (see --model); motion: "
        "compiled vs eager Semantic Motion Predictor at batch 1 and 8; dist: a story over 1, 2, ... "
        "processes (--ranks): frames per minute, peak memory per rank, halo traffic (default: all)",
    )
    bench.add_argument(
        "--ranks",
        default=None,
        help="dist suite: world sizes, comma-separated (default: 1,2 on a CPU; 1 per visible GPU up to 4)",
    )
    bench.add_argument(
        "--size",
        choices=("auto", "cpu", "full", "headline", "dit", "int8", "cpu-int8"),
        default="auto",
        help="auto: full on a GPU, cpu otherwise; headline: the op cases the README quotes; dit: the op "
        "suite's FLUX / SD3.5 joint-attention cases only; int8: the 8-bit path (precision='int8') vs our "
        "16-bit op, SDPA's flash backend and SageAttention on the same key length, at the headline SDXL "
        "(hd64, hd128), FLUX and Wan shapes, with accuracy columns; cpu-int8: those rows at CPU sizes "
        "(default: auto)",
    )
    bench.add_argument(
        "--model",
        choices=("flux", "sd3", "wan", "wan14b", "all"),
        default=None,
        help="dit suite: FLUX.1-dev, SD3.5-large, Wan 2.1 1.3B or 14B (a 3-shot 480p story, two CFG passes), "
        "or all = FLUX.1-dev and SD3.5-large (default: all)",
    )
    bench.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    bench.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="default: fp32 on CPU; on GPU bf16 for the DiT suite and --size dit (DiTs run in bf16), "
        "else fp16",
    )
    bench.add_argument(
        "--providers", default=None, help="op suite providers, comma-separated (default: all that apply)"
    )
    bench.add_argument(
        "--out",
        default="benchmarks/results",
        help="results folder: JSON, CSV, PNG (default: benchmarks/results)",
    )
    bench.add_argument("--no-plot", action="store_true", help="write the data without plots")
    bench.set_defaults(run=run)


# The suites a torchrun run may measure on every rank: "dist" starts its own process groups, "motion"
# times torch.compile, whose compile workers the ranks of one node would share.
RANK_SUITES = ("op", "unet", "dit", "all")
CPU_RANKS_REFUSED = (
    "bench under torchrun times each rank's own GPU; CPU ranks share this machine's cores and would time "
    "each other: run it under torchrun on GPUs, or in one process on the CPU"
)


@dataclass(frozen=True)
class BenchJob:
    """A bench command's validated settings (``prepare``): what runs where, and where results go."""

    suite: str
    size: str  # the op suite's case set, "auto" resolved
    model: str  # the DiT suite's model(s)
    device: torch.device
    dtype: torch.dtype
    providers: list[str]
    ranks: list[int] | None  # the dist suite's world sizes (None: its default)
    gpus: int  # visible CUDA devices (0 on a CPU)
    out: Path
    plot: bool


@dataclass(frozen=True)
class SuiteRun:
    """One suite of a job: its result files' prefix, what it prints before measuring, how it measures,
    and how its rows are shown and plotted (``plot(rows, png path, devices)``; None: data only)."""

    stem: str
    header: str  # "": the suite prints its own progress lines
    measure: Callable[[], list[dict]]
    table: Callable[[list[dict]], str]
    plot: Callable[[list[dict], Path, str], Path] | None = None


def run(args: argparse.Namespace) -> int:
    import os

    import torch

    from ..runs.distributed import Partition, launched_by_torchrun

    try:
        check_environment()
        device = resolve_device(args.device)
        check_output_dir(args.out)
    except ValueError as exc:
        return fail(str(exc))
    if not launched_by_torchrun():
        try:
            job = prepare(args, device)
        except ValueError as exc:
            return fail(str(exc))
        return run_job(job, Partition())
    # under torchrun: refused before anything is measured or any group is joined where it cannot mean much;
    # the ranks of a node (same flags, same GPUs) reach the same verdict, so its first rank alone says it
    if device.type != "cuda":
        return fail_once(CPU_RANKS_REFUSED)
    if args.suite not in RANK_SUITES:
        return fail_once(
            f"--suite {args.suite} does not run under torchrun (each rank measures "
            f"{', '.join(RANK_SUITES)} on its own GPU): run it in one process"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if local_rank >= torch.cuda.device_count():
        return fail(  # this rank's own problem
            f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible on this node"
        )
    try:
        job = prepare(args, torch.device("cuda", local_rank))
    except ValueError as exc:
        return fail_once(str(exc))
    import torch.distributed as dist

    from ..benchmark.ranks import GATHER_TIMEOUT
    from ..runs.distributed import init_from_environment

    try:
        partition = init_from_environment(None, job.device, GATHER_TIMEOUT.total_seconds())
    except (RuntimeError, ValueError) as exc:
        return fail(f"cannot join the torchrun process group: {exc}")
    try:
        return run_job(job, partition)
    finally:
        dist.destroy_process_group()


def fail_once(message: str) -> int:
    """``fail(message)`` on each node's first torchrun rank (``LOCAL_RANK`` 0): one line per node, not one
    per GPU; the other ranks exit with the same code silently."""
    import os

    return fail(message) if os.environ.get("LOCAL_RANK", "0").strip() == "0" else EXIT_USAGE


def prepare(args: argparse.Namespace, device: torch.device) -> BenchJob:
    """The job ``args`` ask for on ``device``; ValueError (one line) for what cannot run, before anything
    is measured. Warns about flags the suite ignores."""
    import torch

    from ..benchmark.providers import OPTIONAL, PROVIDERS, default_providers, unavailable

    size = args.size if args.size != "auto" else ("full" if device.type == "cuda" else "cpu")
    dit = args.suite == "dit" or size == "dit"
    gpu_dtype = "bfloat16" if dit else "float16"
    dtype = getattr(torch, args.dtype or (gpu_dtype if device.type == "cuda" else "float32"))
    providers = args.providers.split(",") if args.providers else default_providers(device, size)
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; choose from {list(PROVIDERS)}")
    for name in providers:
        reason = unavailable(name, device)
        if reason and args.suite in ("op", "all") and name not in OPTIONAL:  # optional: its rows say why
            raise ValueError(f"--providers {name} {reason}")
    ignored = [
        flag
        for flag, given, suites in (
            ("--providers", args.providers is not None, ("op", "all")),
            ("--model", args.model is not None, ("dit",)),  # --size dit picks the op cases, not a model
            ("--ranks", args.ranks is not None, ("dist",)),
        )
        if given and args.suite not in suites
    ]
    if ignored:
        warnings.warn(f"{', '.join(ignored)} do(es) not apply to --suite {args.suite}: ignored", stacklevel=1)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    ranks = None
    if args.ranks is not None:  # checked before any suite runs
        try:
            ranks = [int(n) for n in args.ranks.split(",")]
        except ValueError:
            raise ValueError(f"--ranks expects world sizes such as 1,2,4, got {args.ranks!r}") from None
        if any(n < 1 for n in ranks):
            raise ValueError(f"--ranks must be world sizes >= 1, got {args.ranks}")
        if gpus and max(ranks) > gpus:
            raise ValueError(f"--ranks {args.ranks}: at most the {gpus} visible GPUs")
    return BenchJob(
        suite=args.suite,
        size=size,
        model=args.model or "all",
        device=device,
        dtype=dtype,
        providers=providers,
        ranks=ranks,
        gpus=gpus,
        out=Path(args.out),
        plot=not args.no_plot,
    )


def run_job(job: BenchJob, partition: Partition) -> int:
    """Measure ``job``'s suites on this rank's device and write their results.

    One process (``partition.world == 1``): each suite's table is printed and its files written as soon as
    it is measured. Several ranks: every rank measures every suite, then one gather brings all rows to rank
    0 (``ranks.gather_device_rows``), which prints a table per device and writes one file per suite; the
    other ranks write nothing. Tests run the ranks on gloo/CPU with an injected timer (the CPU refusal is
    ``run``'s, not this function's).
    """
    from ..benchmark.environment import environment
    from ..benchmark.ranks import by_device, describe_device, device_info, gather_device_rows
    from ..benchmark.results import devices_label

    env = environment(job.device)
    suites = plan_suites(job, env)
    written: list[Path] = []
    if not partition.distributed:
        for suite in suites:
            if suite.header:
                print(suite.header)
            rows = suite.measure()
            print(suite.table(rows))
            written += write_suite(suite, rows, job, env["device"])
    else:
        measured = {}
        for suite in suites:
            if partition.leader and suite.header:  # the ranks run the same suites: one header, not one each
                print(f"{suite.header}, on each of {partition.world} ranks")
            measured[suite.stem] = suite.measure()
        merged = gather_device_rows(partition, measured, device_info(job.device, partition))
        if not partition.leader:
            return 0
        for suite in suites:
            rows = merged.get(suite.stem, [])
            for info, device_rows in by_device(rows):
                print(describe_device(info))
                print(suite.table(device_rows))
            written += write_suite(suite, rows, job, devices_label(rows) if rows else env["device"])
    print("written:\n  " + "\n  ".join(str(p) for p in written))
    return 0


def write_suite(suite: SuiteRun, rows: list[dict], job: BenchJob, devices: str) -> list[Path]:
    """``suite``'s rows as JSON + CSV (+ PNG unless --no-plot) in ``job.out``, named after ``devices``."""
    from ..benchmark.results import write_results

    plot = None
    if job.plot and suite.plot is not None:
        draw = suite.plot

        def plot(rows: list[dict], path: Path) -> Path:
            return draw(rows, path, devices)

    return write_results(rows, job.out, suite.stem, devices, plot)


def plan_suites(job: BenchJob, env: dict) -> list[SuiteRun]:
    """The suites ``job.suite`` names, in the order they run, each ready to measure on ``job.device``."""
    from ..benchmark import dit_suite, op_suite, unet_suite
    from ..benchmark.results import DIT_PANELS, UNET_PANELS, format_table, plot_rows

    device, dtype, size = job.device, job.dtype, job.size
    suites = []
    if job.suite in ("op", "all"):
        cases = {
            "cpu": op_suite.cpu_cases,
            "full": op_suite.gpu_cases,
            "headline": op_suite.headline_cases,
            "dit": op_suite.dit_cases,
            "int8": op_suite.int8_cases,
            "cpu-int8": op_suite.cpu_int8_cases,
        }[size]()

        def op_table(rows: list[dict]) -> str:
            if size in ("int8", "cpu-int8"):  # the 8-bit path is judged by these as much as by its speed
                return format_table(rows) + "\n" + op_suite.format_accuracy(rows)
            return format_table(rows)

        suites.append(
            SuiteRun(
                f"op-{size}",
                f"op suite: {len(cases)} cases x {len(job.providers)} providers on {env['device']} ({dtype})",
                lambda: op_suite.run_op_suite(cases, job.providers, device=device, dtype=dtype, env=env),
                op_table,
                lambda rows, path, devices: plot_rows(rows, path),  # its title names the rows' devices
            )
        )
    if job.suite in ("unet", "all"):
        unet_model = "tiny" if size in ("cpu", "cpu-int8") else "full"
        unet_cases = unet_suite.cpu_cases() if unet_model == "tiny" else unet_suite.gpu_cases()
        suites.append(
            SuiteRun(
                f"unet-{unet_model}",
                f"unet suite: {unet_model} SDXL UNet, {len(unet_cases)} cases on {env['device']} ({dtype})",
                lambda: unet_suite.run_unet_suite(
                    unet_cases,
                    list(unet_suite.PROVIDERS),
                    size=unet_model,
                    device=device,
                    dtype=dtype,
                    env=env,
                ),
                unet_suite.format_unet_table,
                lambda rows, path, devices: plot_rows(
                    rows, path, f"SDXL UNet ({unet_model}) step, 4 identity frames, {devices}", UNET_PANELS
                ),
            )
        )
    if job.suite == "dit":
        dit_model = "tiny" if size == "cpu" else "full"
        models = ("flux", "sd3") if job.model == "all" else (job.model,)
        dit_cases = dit_suite.cpu_cases(models) if dit_model == "tiny" else dit_suite.gpu_cases(models)
        title = f"DiT step ({dit_model}), {dit_cases[0].frames} frames, stock vs ours"
        suites.append(
            SuiteRun(
                f"dit-{dit_model}-{job.model}",
                f"dit suite: {dit_model} {', '.join(models)}, {len(dit_cases)} cases on {env['device']} "
                f"({dtype})",
                lambda: dit_suite.run_dit_suite(
                    dit_cases, size=dit_model, device=device, dtype=dtype, env=env
                ),
                dit_suite.format_dit_table,
                lambda rows, path, devices: plot_rows(rows, path, f"{title}, {devices}", DIT_PANELS),
            )
        )
    if job.suite == "dist":
        suites.append(_dist_suite(job, env))
    if job.suite == "motion":
        suites.append(_motion_suite(job, env))
    return suites


def _dist_suite(job: BenchJob, env: dict) -> SuiteRun:
    """A story over 1, 2, ... processes (the suite starts its own process groups)."""
    from ..benchmark.dist_scaling import format_scaling_table, plot_scaling, run_scaling

    gpus, device = job.gpus, job.device
    ranks = job.ranks or ([n for n in (1, 2, 4) if n <= gpus] if gpus else [1, 2])
    model = "random-sdxl" if device.type == "cuda" else "tiny-sd15"
    frames, steps = (16, 10) if device.type == "cuda" else (12, 3)

    def measure() -> list[dict]:
        rows = []
        for mode in ("window", "bank-recompute", "bank-broadcast"):
            sizes = [n for n in ranks if n > 1] if mode == "bank-broadcast" else ranks  # 1 rank: the same run
            if not sizes:
                continue
            print(f"dist suite: {model}, {mode} mode, {frames} frames, ranks {sizes} on {env['device']}")
            rows += run_scaling(
                model=model, world_sizes=sizes, mode=mode, frames=frames, steps=steps, device=device.type
            )
        return [{**row, **env} for row in rows]

    return SuiteRun(
        f"dist-{model}",
        "",
        measure,
        format_scaling_table,
        lambda r, p, d: plot_scaling(r, p),
    )


def _motion_suite(job: BenchJob, env: dict) -> SuiteRun:
    """The Semantic Motion Predictor, compiled vs eager, at batch 1 and 8 (data only, no plot)."""
    device = job.device

    def measure() -> list[dict]:
        from ..motion.compiled import benchmark_compiled
        from ..motion.model import SemanticMotionPredictor

        # paper-like predictor on a GPU (CLIP ViT-H/14 width 1024, 8 layers); a small one on a CPU
        gpu_size = {"embed_dim": 1024, "hidden_dim": 1024, "num_layers": 8}
        cpu_size = {"embed_dim": 64, "hidden_dim": 64, "num_layers": 2, "num_heads": 4}
        size = gpu_size if device.type == "cuda" else cpu_size
        model = SemanticMotionPredictor(num_frames=14, **size)
        return [{**row, **env} for row in benchmark_compiled(model, (1, 8), device)]

    def table(rows: list[dict]) -> str:
        return "\n".join(
            f"motion predictor batch {row['batch_size']}: eager {row['eager_ms']:.2f} ms, compiled "
            f"{row['compiled_ms']:.2f} ms ({row['speedup']:.2f}x, outputs match: {row['match']})"
            for row in rows
        )

    return SuiteRun("motion-compiled", "", measure, table)
