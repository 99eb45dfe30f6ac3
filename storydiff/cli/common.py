"""What every ``storydiff`` command shares: error exits, devices and dtypes, argument types."""

from __future__ import annotations

import argparse
import re
import sys

DTYPES = ("float16", "bfloat16", "float32")
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
