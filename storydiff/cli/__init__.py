"""``storydiff`` command line: one module per command, each parse → settings → library call.

Commands register their own parser (``register(subparsers, parents)``) and run with the parsed arguments
(``run(args) -> exit code``). Importing this package stays light (no torch, no diffusers), so ``--help``
and argument errors answer at once; each command imports the library when it runs.

Exit codes: 0 done, 2 bad input (argparse's own code, used for every input error), 130 interrupted
(Ctrl-C), 1 an unexpected error (one line; ``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import sys

from . import bench, eval, eval_suite, generate, profile_vram, train_motion, video
from .common import library_noise, output_options

COMMANDS = (generate, bench, profile_vram, video, train_motion, eval, eval_suite)
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="storydiff",
        description="Consistent characters across the frames of a story (StoryDiffusion's Consistent "
        "Self-Attention) on Hugging Face diffusers: generate stories, transition videos, benchmarks.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    parents = [output_options()]
    for command in COMMANDS:
        command.register(subparsers, parents)
    return parser


def _quiet_rank() -> bool:
    """Whether this process is a torchrun rank other than its node's first: every rank parses the same
    arguments, so a usage error (several lines) is printed by each node's first rank only."""
    import os

    # no int(): a malformed WORLD_SIZE is the command's to report, in its own words
    return (
        os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1")
        and os.environ.get("LOCAL_RANK", "0") != "0"
    )


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (see the module docstring)."""
    import contextlib
    import io

    quiet = contextlib.redirect_stderr(io.StringIO()) if _quiet_rank() else contextlib.nullcontext()
    try:
        with quiet:
            args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed by argparse
        return exc.code if isinstance(exc.code, int) else 2
    try:
        with library_noise(args.verbose):
            return args.run(args)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if args.debug:
            raise
        message = str(exc).strip().splitlines()
        print(
            f"error: unexpected {type(exc).__name__}: {message[0] if message else ''} "
            "(run again with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
