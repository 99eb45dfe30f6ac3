"""``storydiff eval-suite``: a benchmark file's sets under several configurations, generated, scored and
compared.

The benchmark file, every --config and every set under every configuration are checked before anything
loads, so a typo answers at once; the model and the encoders load once, and only if some story still needs
them. Run the same command again after an interruption: finished stories are skipped
(``evaluation/suite.py``).
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
        "already generated and scored are skipped.",
    )
    parser.add_argument("--benchmark", required=True, metavar="FILE", help="benchmark file (YAML)")
    parser.add_argument(
        "--model",
        required=True,
        help="diffusers model path or hub id, or an offline random-weight model (tiny-sd15, tiny-sdxl, ...)",
    )
    parser.add_argument(
        "--config",
        action="append",
        required=True,
        metavar="NAME[:KEY=VALUE,...]",
        help="a named configuration, repeatable, e.g. base:rate=0.0 and "
        "csa:rate=0.5,window=2,level-rate=32=0.5; each KEY=VALUE is a flag of `storydiff generate` as typed "
        "there, without its -- (a repeatable one repeated, a switch bare: no-skip); keys: "
        + ", ".join(option.key for option in SUITE_OPTIONS),
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--limit", type=positive_int, default=None, metavar="N", help="only the first N sets")
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
    parser.set_defaults(run=run)


def _plan(args: argparse.Namespace):
    """(jobs, encoder sources) from the arguments; ValueError naming what is wrong."""
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
    jobs = plan_suite(sets, configs, model=args.model, out_dir=args.out, base=base)
    encoders = {"clip": args.clip, "dino": None if args.no_dino else args.dino}
    return jobs, encoders


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..evaluation import load_clip, load_dino
    from ..evaluation.suite import build_comparison, run_suite
    from ..evaluation.tradeoff import write_comparison
    from ..models.loading import load_pipeline
    from ..support.progress import default_progress
    from .common import resolve_device, resolve_dtype

    try:
        device = resolve_device(args.device)
        jobs, encoders = _plan(args)
    except (OSError, ValueError) as exc:
        return fail(str(exc))

    def load_pipe():
        return load_pipeline(
            args.model, device=device, dtype=resolve_dtype(args.dtype), seed=args.seed, progress_bar=False
        )

    def load_encoders():
        clip = load_clip(args.clip, device)
        return clip, None if args.no_dino else load_dino(args.dino, device)

    try:
        result = run_suite(
            jobs,
            load_pipe=load_pipe,
            load_encoders=load_encoders,
            encoders=encoders,
            batch_size=args.batch_size,
            progress=default_progress(),
        )
        comparison = build_comparison(jobs, result.reports, benchmark=args.benchmark, encoders=encoders)
        paths = write_comparison(comparison, Path(args.out))
    except KeyboardInterrupt:
        print(
            f"interrupted: the finished stories are kept in {args.out}; run the same command again to "
            "continue after them",
            file=sys.stderr,
        )
        return 130
    except (OSError, ValueError, RuntimeError) as exc:  # ModelLoadError is a ValueError
        return fail(str(exc))
    counts = result.counts()
    print(
        f"{len(jobs)} stories: {counts['generated']} generated and scored, {counts['evaluated']} scored "
        f"(generated earlier), {counts['skipped']} done earlier and skipped"
    )
    for row in comparison["configs"]:
        scores = "  ".join(
            f"{key} {row[key]:.3f}" if row.get(key) is not None else f"{key} -"
            for key in (*comparison["identity_metrics"], "clip_t", "clip_t_styled")
        )
        print(f"{row['config']}: {row['sets']} sets  {scores}")
    print("written:\n  " + "\n  ".join(str(path) for path in paths.values()))
    return 0
