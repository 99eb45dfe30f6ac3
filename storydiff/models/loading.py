"""Loading models by name: the offline random-weight ones, local folders and files, hub ids.

One error type, ``ModelLoadError``, with a one-line message that names the model and says what to do; a
mistyped local path never turns into a hub request, and a hub id without a network says so instead of
printing a connection traceback. Reserved names (``families/reserved.py``) build offline
(``families/tiny_models.py``, imported only then).
Single-file checkpoints and LoRA files: ``model_files.py``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ..families.registry import family_of, family_of_reserved, reserved_story_models
from ..families.reserved import NATIVE_DTYPES, TINY_SVD
from ..families.svd import SVDPipeline
from ..support.compat import dtype_kwargs
from .errors import ModelLoadError, is_offline, one_line
from .model_files import apply_loras, is_single_file, load_single_file

__all__ = [
    "ModelLoadError",
    "default_dtype",
    "is_offline",
    "load_pipeline",
    "load_svd_pipeline",
    "looks_like_local_path",
    "one_line",
]


def default_dtype(device: torch.device) -> torch.dtype:
    """float16 on CUDA (the real models' own precision), float32 elsewhere (CPUs lack fast fp16)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def looks_like_local_path(model: str) -> bool:
    # Hub ids are "name" or "org/name" and never start like this, so these can only mean a local path.
    return model.startswith(("/", ".", "~")) or os.path.isabs(model) or os.path.exists(model)


def from_pretrained(cls: Any, model: str, what: str, hint: str = "", **kwargs: Any) -> Any:
    """``cls.from_pretrained(model, **kwargs)`` with ``ModelLoadError`` for every way it can fail.

    ``what`` names what was expected ("model", "SVD model"); ``hint`` is appended.
    """
    hint = f" ({hint})" if hint else ""
    path = os.path.expanduser(model)
    if looks_like_local_path(model) and not os.path.exists(path):
        raise ModelLoadError(f"cannot load {what} {model!r}: no such file or folder{hint}")
    try:
        return cls.from_pretrained(path, **kwargs)
    except Exception as exc:
        if not os.path.exists(path) and is_offline(exc):
            raise ModelLoadError(
                f"cannot load {what} {model!r}: it is not a local folder, and the Hugging Face hub cannot be "
                f"reached from here (no network, or HF_HUB_OFFLINE set); download it where a network "
                f"exists and pass the local folder{hint}"
            ) from exc
        raise ModelLoadError(f"cannot load {what} {model!r}: {one_line(exc)}{hint}") from exc


def load_pipeline(
    model: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    progress_bar: bool = True,
    config: str | os.PathLike | None = None,
    loras: Sequence[tuple[str, float]] = (),
):
    """A text-to-image pipeline stories can run on (reserved name, local folder, hub id or single-file
    checkpoint) on ``device``: SD1.x/2.x, SDXL, FLUX.1, SD3/SD3.5, PixArt-Σ (``families.py``).

    ``dtype`` defaults to ``default_dtype(device)`` (``random-flux``: bfloat16, FLUX.1's own precision);
    ``seed`` only matters for the reserved models (their random weights). A ``.safetensors`` / ``.ckpt``
    file loads with ``model_files.load_single_file``; ``config``, a local diffusers folder of the same
    architecture, gives its configs offline (single files only). ``loras``: (path, scale) LoRA files applied
    as weighted adapters (``model_files.apply_loras``). Raises ``ModelLoadError`` when loading fails or the
    pipeline is of another kind.
    """
    from diffusers import DiffusionPipeline

    model = os.fspath(model)
    config = os.path.expanduser(os.fspath(config)) if config is not None else None
    device = torch.device(device)
    dtype = dtype or NATIVE_DTYPES.get(model) or default_dtype(device)
    single_file = is_single_file(model)
    if config is not None and not single_file:
        raise ModelLoadError(
            f"config {config!r} applies to single-file checkpoints (.safetensors, .ckpt) only; {model!r} is "
            f"not one (a diffusers folder or hub id has its own configs)"
        )
    if family_of_reserved(model) is not None:
        from ..families.tiny_models import build_tiny_pipeline  # tiny builders load only when asked for

        pipe = build_tiny_pipeline(model, seed=seed, dtype=dtype, progress_bar=progress_bar, device=device)
        apply_loras(pipe, loras)
        return pipe
    if model == TINY_SVD:
        names = ", ".join(reserved_story_models())
        raise ModelLoadError(f"{model!r} is a video model; text-to-image models: {names}")
    if single_file:
        pipe = load_single_file(model, config=config, dtype=dtype)
    else:
        tiny = [name for name in reserved_story_models() if name.startswith("tiny-")]
        hint = f"offline random-weight models: {', '.join(tiny)}"
        pipe = from_pretrained(DiffusionPipeline, model, "model", hint, **dtype_kwargs(dtype))
    try:
        family_of(pipe)
    except ValueError as exc:
        raise ModelLoadError(f"{model!r} cannot tell stories: {exc}") from None
    if not progress_bar:
        pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    apply_loras(pipe, loras)
    return pipe


def load_svd_pipeline(
    model: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    seed: int = 0,
    progress_bar: bool = True,
):
    """Stable Video Diffusion: ``"tiny-svd"`` (offline, random weights), a local folder or a hub id."""
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    if model == TINY_SVD:
        from ..families.tiny_models import build_tiny_pipeline

        return build_tiny_pipeline(model, seed=seed, dtype=dtype, progress_bar=progress_bar, device=device)
    hint = f"offline random-weight model: {TINY_SVD}"
    pipe = from_pretrained(SVDPipeline, model, "SVD model", hint, **dtype_kwargs(dtype))
    if not progress_bar:
        pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
