"""Checkpoints as users have them: single-file models and LoRA files.

Single files (Juggernaut XL, DreamShaper, ... as one ``.safetensors`` in the original Stability / LDM key
layout) load with diffusers' ``from_single_file``, which converts the keys but needs the diffusers configs of
the architecture. ``config``, a local diffusers folder of the same architecture (the base model's), gives
them offline; without it diffusers asks the Hugging Face hub, and offline that is a one-line error saying to
pass one. Whole checkpoints load for the UNet families (SD1.x/2.x, SDXL); FLUX.1 and SD3 files usually hold
only the transformer, so there the transformer comes from the file and everything else from ``config``.

LoRA files load through diffusers' peft integration, one named adapter each, weighted with
``set_adapters``. diffusers only warns when a LoRA's keys match nothing in the model, so every adapter is
checked to have been injected somewhere.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..families.registry import family_of_pipeline_class, single_file_families
from ..support.compat import dtype_kwargs
from .errors import ModelLoadError, is_offline, one_line

__all__ = ["SINGLE_FILE_SUFFIXES", "apply_loras", "is_single_file", "load_single_file", "parse_lora"]

# What a checkpoint file is called; pickled ones (.ckpt, .pt, .pth) are read by diffusers with
# torch.load(weights_only=True), which refuses arbitrary objects, so they are as safe to load as safetensors.
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
# Which families load from single files, and how: ``Family.single_file`` ("whole": UNet, VAE and text
# encoders in one file; "transformer": the denoiser only, the rest from ``config``).
_FAMILIES = "SD1.x/2.x and SDXL (whole checkpoints), FLUX.1 and SD3 (transformer files)"
_CONFIG_HINT = "a local diffusers folder of the same architecture, e.g. the base model's folder"


def is_single_file(model: str | os.PathLike) -> bool:
    """Whether ``model`` names a checkpoint file (by its suffix) rather than a folder, hub id or reserved
    name."""
    path = os.path.expanduser(os.fspath(model))
    return path.lower().endswith(SINGLE_FILE_SUFFIXES) and not os.path.isdir(path)


def _keys(path: str) -> list[str]:
    """A checkpoint's tensor names, without reading the tensors where the format allows."""
    if path.lower().endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    try:  # memory-mapped: only what is touched is read (zip-format files, all since PyTorch 1.6)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        state = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(state, dict) and "state_dict" in state:  # training checkpoints nest the weights
        state = state["state_dict"]
    return list(state) if isinstance(state, dict) else []


def _file_layout(keys: list[str]) -> str | None:
    """The pipeline class name an original-format whole checkpoint belongs to, from its text encoders' keys
    (None: no text encoders, e.g. a UNet-only or transformer-only file)."""
    for family in single_file_families():
        for prefix, cls in getattr(family, "single_file_layouts", {}).items():
            if any(k.startswith(prefix) for k in keys):
                return cls.__name__
    return None


def _config_classes(config: str, what: str) -> tuple[str, dict]:
    """The pipeline class name and component entries of the diffusers folder ``config``."""
    index = os.path.join(config, "model_index.json")
    if not os.path.isfile(index):
        raise ModelLoadError(
            f"cannot load {what}: config {config!r} is not a diffusers folder (no model_index.json); pass "
            f"{_CONFIG_HINT}"
        )
    with open(index, encoding="utf-8") as f:
        entries = json.load(f)
    return entries.get("_class_name", ""), entries


def load_single_file(
    path: str | os.PathLike, *, config: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32
) -> Any:
    """The pipeline in the checkpoint file ``path`` (on the CPU, in ``dtype``).

    ``config``: a local diffusers folder of the same architecture, whose configs (and, for transformer-only
    files, other components) are used; without it the architecture is read from the file's keys and diffusers
    fetches the configs from the hub (or its cache). Raises ``ModelLoadError``.
    """
    import diffusers

    path = os.path.expanduser(os.fspath(path))
    config = os.path.expanduser(os.fspath(config)) if config is not None else None
    what = f"checkpoint {path!r}"
    if not os.path.isfile(path):
        raise ModelLoadError(f"cannot load {what}: no such file")
    if config is not None and not os.path.isdir(config):
        raise ModelLoadError(f"cannot load {what}: config {config!r} is not a folder; pass {_CONFIG_HINT}")
    try:
        keys = _keys(path)
    except pickle.UnpicklingError as exc:
        # torch.load(weights_only=True) refuses pickles that would run code or rebuild arbitrary objects.
        raise ModelLoadError(
            f"cannot load {what}: the pickle holds more than tensors, which is unsafe to load; convert it to "
            f".safetensors where you trust it"
        ) from exc
    except Exception as exc:
        raise ModelLoadError(f"cannot load {what}: not a readable checkpoint ({one_line(exc)})") from exc
    layout = _file_layout(keys)
    name, entries = _config_classes(config, what) if config is not None else (layout, {})
    if name is None:
        raise ModelLoadError(
            f"cannot load {what}: it is not a whole SD1.x/2.x or SDXL checkpoint, so its architecture is "
            f"unknown; pass --config DIR, {_CONFIG_HINT}"
        )
    family = family_of_pipeline_class(name)
    if family is None or family.single_file is None:
        raise ModelLoadError(f"cannot load {what}: single files load for {_FAMILIES}; {config!r} is a {name}")
    pipeline_class = getattr(diffusers, name)
    whole = family.single_file == "whole"
    if whole:
        prefix = family.single_file_unet_prefix
        if not any(k.startswith(prefix) for k in keys):
            raise ModelLoadError(
                f"cannot load {what}: not an original-format SD/SDXL checkpoint (no UNet weights under "
                f"{prefix}*); for a diffusers folder pass the folder itself"
            )
        if layout is not None and layout != name:
            raise ModelLoadError(
                f"cannot load {what}: it is a {layout} checkpoint but config {config!r} is a {name}; pass "
                f"{_CONFIG_HINT}"
            )
    local = {"local_files_only": True} if config is not None else {}
    try:
        if whole:
            pipe = pipeline_class.from_single_file(path, config=config, **local, **dtype_kwargs(dtype))
        else:
            denoiser_class = getattr(diffusers, entries["transformer"][1])
            transformer = denoiser_class.from_single_file(
                path, config=config, subfolder="transformer", **local, **dtype_kwargs(dtype)
            )
            pipe = pipeline_class.from_pretrained(config, transformer=transformer, **dtype_kwargs(dtype))
    except Exception as exc:
        if config is None and is_offline(exc):
            raise ModelLoadError(
                f"cannot load {what}: without --config diffusers fetches its configs from the Hugging Face "
                f"hub, which cannot be reached from here; pass --config DIR, {_CONFIG_HINT}"
            ) from exc
        if "meta tensor" in str(exc):  # a parameter the file has no weights for was left unmaterialized
            raise ModelLoadError(
                f"cannot load {what}: it lacks weights the {name} architecture of "
                f"{config or 'its hub config'!r} needs; pass {_CONFIG_HINT}"
            ) from exc
        raise ModelLoadError(f"cannot load {what}: {one_line(exc)}") from exc
    return pipe


def parse_lora(text: str) -> tuple[str, float]:
    """``--lora PATH[:SCALE]`` → (path, scale); scale 1.0 by default.

    Only what follows the last ':' and parses as a number is a scale, so Windows drive letters and paths
    with colons stay paths. Raises ``ValueError`` for an empty path or a non-finite scale.
    """
    path, sep, tail = text.rpartition(":")
    scale = 1.0
    if sep:
        try:
            scale = float(tail)
        except ValueError:
            path = text  # the ':' belongs to the path
    else:
        path = text
    if not path:
        raise ValueError(f"--lora {text!r}: expected PATH[:SCALE], got no path")
    if not math.isfinite(scale):
        raise ValueError(f"--lora {text!r}: the scale must be a finite number, got {tail!r}")
    return path, scale


@contextlib.contextmanager
def _quiet_lora_loading() -> Iterator[None]:
    """Without diffusers' and peft's notices that hold for every LoRA without text-encoder keys (most of
    them) or for every second adapter; what matters, a LoRA that applies nowhere, is checked here."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            yield
    finally:
        diffusers_logging.set_verbosity(verbosity)


def _adapters(pipe) -> set[str]:
    return {name for names in pipe.get_list_adapters().values() for name in names}


def apply_loras(pipe, loras: Sequence[tuple[str, float]]) -> None:
    """Load each (path, scale) LoRA file (or diffusers LoRA folder) into ``pipe`` as adapter ``lora_<i>``
    and weight them by their scales. Raises ``ModelLoadError`` for a missing file, a file diffusers cannot
    read or apply, and a LoRA whose keys match nothing in ``pipe``."""
    if not loras:
        return
    if not hasattr(pipe, "load_lora_weights"):
        raise ModelLoadError(f"{type(pipe).__name__} takes no LoRA weights in diffusers")
    names = []
    for i, (path, _) in enumerate(loras):
        path, name = os.path.expanduser(os.fspath(path)), f"lora_{i}"
        what = f"LoRA {path!r}"
        if not os.path.exists(path):
            raise ModelLoadError(f"cannot load {what}: no such file")
        before = _adapters(pipe)
        try:
            with _quiet_lora_loading():
                pipe.load_lora_weights(path, adapter_name=name)
        except Exception as exc:
            raise ModelLoadError(
                f"cannot load {what}: {one_line(exc)} (is it a LoRA for this model's architecture?)"
            ) from exc
        if name not in _adapters(pipe) - before:
            raise ModelLoadError(
                f"cannot load {what}: none of its keys match a layer of this {type(pipe).__name__}; is it a "
                f"LoRA for another architecture?"
            )
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[float(scale) for _, scale in loras])
