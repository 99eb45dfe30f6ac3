"""``ModelLoadError`` and the two helpers every loader words its errors with: one error type whose one-line
message names the model and says what to do, and a hub that cannot be reached said as such."""

from __future__ import annotations


class ModelLoadError(ValueError):
    """A model name, folder or file could not be loaded as what was asked for."""


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line; a first line that only announces a list (ends with ':') takes the
    list's first entry with it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if text.endswith(":") and len(lines) > 1:
        text = f"{text} {lines[1]}"
    return f"{type(exc).__name__}: {text}".rstrip(": ")


def is_offline(exc: BaseException) -> bool:
    """Whether loading failed because the hub could not be reached (no network, or offline mode)."""
    names = {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectionError", "ConnectError"}
    names |= {"ConnectTimeout", "ReadTimeout", "TimeoutException", "NameResolutionError", "MaxRetryError"}
    while exc is not None:
        if type(exc).__name__ in names or "offline" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False
