"""``storydiff`` command line: one module per command, each parse → settings → library call.

Commands register their own parser (``register(subparsers)``) and run with the parsed arguments
(``run(args) -> exit code``). Importing this package stays light (no torch, no diffusers), so ``--help``
and argument errors answer at once; each command imports the library when it runs.
"""

from __future__ import annotations

import argparse
import sys

from . import bench, generate, profile_vram, train_motion, video

COMMANDS = (generate, bench, profile_vram, video, train_motion)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="storydiff",
        description="Consistent characters across the frames of a story (StoryDiffusion's Consistent "
        "Self-Attention) on Hugging Face diffusers: generate stories, transition videos, benchmarks.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (0 ok, 2 bad input, as argparse's own usage errors)."""
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed by argparse
        return exc.code if isinstance(exc.code, int) else 2
    return args.run(args)
