"""Progress reporting that suits where the output goes: a bar on a terminal, a plain line per unit of
work in a log file (bars there turn into escape codes and carriage returns), or nothing."""

from __future__ import annotations

import sys
import time
from typing import Literal

from tqdm.auto import tqdm

Progress = bool | Literal["bar", "lines"]


def default_progress() -> Literal["bar", "lines"]:
    """A bar when stderr is a terminal, plain lines otherwise."""
    return "bar" if sys.stderr.isatty() else "lines"


class _Lines:
    """The part of tqdm's interface our loops use, printing one line per finished unit to stderr."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.postfix = ""
        self.start = time.perf_counter()

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def update(self, n: int = 1) -> None:
        self.n += n
        elapsed = time.perf_counter() - self.start
        note = f" ({self.postfix})" if self.postfix else ""
        print(f"{self.desc}: {self.unit} {self.n}/{self.total} done{note}, {elapsed:.1f} s", file=sys.stderr)

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str, progress: Progress, *, initial: int = 0):
    """tqdm for ``progress`` True or "bar", plain lines for "lines", a silent tqdm for False."""
    if progress == "lines":
        return _Lines(total, desc, unit, initial)
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=not progress)
