"""What every ``storydiff`` command shares: error exits, devices and dtypes, argument types."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from ..runs.options import DTYPES as DTYPES  # --dtype's choices, declared in the option table

EXIT_USAGE = 2  # argparse's own code for bad input; every input error exits with it


def fail(message: str) -> int:
    """Print ``error: message`` on stderr and return the input-error exit code."""
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def resolve_device(name: str | None):
    """The torch device for ``--device`` (default: cuda if available); ValueError if CUDA is asked for
    but absent."""
    import torch

    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda given but no CUDA device is available")
    return device


def resolve_dtype(name: str | None):
    import torch

    return getattr(torch, name) if name else None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def video_size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` with both positive multiples of 8."""
    match = re.fullmatch(r"(\d+)[xX](\d+)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 1024x576, got {text!r}")
    width, height = int(match[1]), int(match[2])
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise argparse.ArgumentTypeError(f"width and height must be positive multiples of 8, got {text!r}")
    return width, height


def output_options() -> argparse.ArgumentParser:
    """--verbose and --debug, shared by every command (a parent parser)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("output")
    group.add_argument(
        "--verbose", action="store_true", help="show the warnings and logs of torch, diffusers, transformers"
    )
    group.add_argument("--debug", action="store_true", help="show a traceback for unexpected errors")
    return parent


@contextmanager
def library_noise(verbose: bool) -> Iterator[None]:
    """Silence third-party warnings and info/warning logs unless ``verbose``.

    Our own messages stay: warnings raised by storydiff modules are not filtered, and errors are ours to
    print. transformers and diffusers log through their own loggers (truncated prompts, missing optional
    packages, deprecations), so their verbosity is lowered for the duration and restored after.
    """
    with warnings.catch_warnings():
        # ours read as one line ("warning: ..."), not Python's "file:line: Category: ..." with source
        warnings.showwarning = _show_warning
        if verbose:
            yield
            return
        with _quiet_libraries():
            yield


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=file or sys.stderr)


@contextmanager
def _quiet_libraries() -> Iterator[None]:
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    libraries = r"(torch|triton|diffusers|transformers|huggingface_hub|accelerate|safetensors|PIL|matplotlib)"
    levels = [(lib, lib.get_verbosity()) for lib in (diffusers_logging, transformers_logging)]
    hub = logging.getLogger("huggingface_hub")
    hub_level = hub.level
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=rf"{libraries}(\..*)?$")
        for lib, _ in levels:
            lib.set_verbosity_error()  # configures the library's logger first, so the level sticks
        hub.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lib, level in levels:
                lib.set_verbosity(level)
            hub.setLevel(hub_level)


def positive_int_list(text: str) -> list[int]:
    """``4,8,16``: whole numbers >= 1, comma-separated."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected whole numbers separated by commas, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected whole numbers >= 1 separated by commas, got {text!r}")
    return values


def check_output_dir(path: str, flag: str = "--out") -> None:
    """ValueError unless ``path`` is a folder or can become one (nothing is created here), so a command
    never runs for minutes and then fails to write its results."""
    from pathlib import Path

    target = Path(path)
    for parent in (target, *target.parents):
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == target else f"is inside {parent}, which is a file"
            raise ValueError(f"{flag} {path} {where}; give a folder")


def check_environment() -> None:
    """ValueError (one line naming the variable) for environment variables storydiff reads that hold
    nothing it can use: torchrun's RANK / WORLD_SIZE / LOCAL_RANK, CSA_KERNEL_PATH."""
    import os

    for name, least in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)):
        value = os.environ.get(name)
        if value is None:
            continue
        if not value.strip().isdigit() or int(value) < least:
            raise ValueError(
                f"environment variable {name}={value!r} is not a whole number >= {least} (torchrun sets it; "
                "unset it to run in one process)"
            )
    path = os.environ.get("CSA_KERNEL_PATH")
    if path:
        try:
            from csa_kernels.triton_kernel import PATHS
        except ImportError:  # no Triton: the variable changes nothing, but is still checked
            PATHS = ("pointer", "tma")
        if path not in PATHS:
            raise ValueError(
                f"environment variable CSA_KERNEL_PATH={path!r} must be one of {', '.join(PATHS)} (or unset)"
            )
