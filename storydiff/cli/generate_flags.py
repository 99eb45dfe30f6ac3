"""`storydiff generate`'s flags: the parser, built from the option table (``runs/options.py``).

Every flag is an ``Option`` there: its group, type, choices, help and default, the setting it sets, the
modes it applies to and whether ``--resume`` refuses it. Nothing is listed here a second time: ``FLAGS``
(the flag of each ``RunSettings`` / ``ConsistencyConfig`` field, for error messages) and ``RUN_FLAGS``
(the flags a run's metadata stores, which ``--resume`` refuses) are the table's.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..runs.options import GROUPS, OPTIONS, RUN_FLAGS, Option, parse_freeu

__all__ = ["FLAGS", "RUN_FLAGS", "add_parser", "argument", "parse_freeu"]

# Settings fields (RunSettings, ConsistencyConfig, and what the command checks) and the flags that set them.
FLAGS = {option.field: option.flag for option in OPTIONS if option.field}


def add_parser(subparsers, parents: list) -> argparse.ArgumentParser:
    """The `generate` parser: every option of the table, in its group."""
    gen = subparsers.add_parser(
        "generate",
        parents=parents,
        help="generate a consistent story: frames, comic pages and metadata",
        description="Story file: character lines `[Name] description`, a `---` line, then one frame per "
        "line with [Name] tags ([NC]: no character) and an optional `#caption`. Models: a diffusers path "
        "or hub id of SD1.x/2.x, SDXL, FLUX.1, SD3/SD3.5 or PixArt-Σ, or tiny-sdxl / tiny-sd15 / tiny-flux / "
        "tiny-sd3 / tiny-pixart (random weights, offline, for smoke tests).",
    )
    groups = {title: gen.add_argument_group(title) for title in GROUPS}
    for option in OPTIONS:
        groups[option.group].add_argument(option.flag, **argument(option))
    return gen


def argument(option: Option) -> dict[str, Any]:
    """``add_argument``'s keywords for ``option``. A setting not given stays None (so a preset's value, the
    mode's default or the owner's applies, and ``--resume`` sees what was given); only the command's own
    options that a resume allows take their default here."""
    from ..runs.settings import default_of

    keywords: dict[str, Any] = {
        "help": option.help.format(default=default_of(option), **option.mode_defaults),
        "default": option.default if option.owner == "cli" and not option.refused_on_resume else None,
    }
    if option.action != "store":
        keywords["action"] = option.action
    if option.parse is not None:
        keywords["type"] = option.parse if option.parse in (int, float) else _argparse_type(option.parse)
    if option.choices is not None:
        keywords["choices"] = option.choices
    if option.metavar is not None:
        keywords["metavar"] = option.metavar
    return keywords


def _argparse_type(parse):
    """``parse`` with its ValueError shown as argparse shows a type's own message."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert
