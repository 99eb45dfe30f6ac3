"""The one table of model families, and the only code that asks "which family is this pipeline / model?".

Everything else asks the family object (``Family``) what it needs to know. A new family is a new module
and one line in ``STORY_FAMILIES``.
"""

from __future__ import annotations

import dataclasses

from ..consistency.install import Host
from .base import Family
from .flux import FluxFamily
from .pixart import PixArtFamily
from .qwen import QwenImageFamily
from .sd3 import SD3Family
from .unet import UNetFamily
from .wan import WanFamily, WanImageToVideoFamily

STORY_FAMILIES: tuple[type[Family], ...] = (
    UNetFamily,
    FluxFamily,
    SD3Family,
    PixArtFamily,
    QwenImageFamily,
    WanFamily,
    WanImageToVideoFamily,
)


def find_family(pipe) -> Family | None:
    """The family that drives ``pipe`` (a diffusers pipeline), or None."""
    for family in STORY_FAMILIES:
        if family.drives(pipe):
            return family(pipe)
    return None


def family_of(pipe) -> Family:
    """The family that drives ``pipe`` (ValueError for a pipeline stories cannot run on)."""
    family = find_family(pipe)
    if family is None:
        names = ", ".join(
            f"{', '.join(cls.__name__ for cls in family.pipelines)} ({family.title})"
            for family in STORY_FAMILIES
        )
        raise ValueError(f"stories run on {names}; got {type(pipe).__name__}")
    return family


def denoiser_of(pipe_or_denoiser):
    """A pipeline's denoiser (its ``unet`` or ``transformer``), or the denoiser itself; a
    ``torch.compile``'d denoiser's own module (its processors are the module's)."""
    denoiser = pipe_or_denoiser
    for attribute in ("unet", "transformer"):
        if getattr(pipe_or_denoiser, attribute, None) is not None:
            denoiser = getattr(pipe_or_denoiser, attribute)
            break
    return getattr(denoiser, "_orig_mod", denoiser)


def host_of(pipe_or_denoiser) -> Host:
    """Where consistent attention installs on a diffusers pipeline or a bare denoiser."""
    denoiser = denoiser_of(pipe_or_denoiser)
    for family in STORY_FAMILIES:
        if family.hosts(denoiser):
            experts = family.experts(pipe_or_denoiser) if pipe_or_denoiser is not denoiser else ()
            return dataclasses.replace(family.host(denoiser), experts=experts)
    names = ", ".join(family.denoiser_class.__name__ for family in STORY_FAMILIES)
    raise ValueError(
        f"consistent attention installs on {names} denoisers, or pipelines with one as `.unet` / "
        f"`.transformer`; got {type(pipe_or_denoiser).__name__}"
    )


def family_named(name: str) -> type[Family]:
    """The family called ``name`` ("unet", "flux", ...)."""
    for family in STORY_FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"no model family {name!r}; families: {', '.join(f.name for f in STORY_FAMILIES)}")


def family_of_pipeline_class(class_name: str) -> type[Family] | None:
    """The family whose diffusers pipeline class is called ``class_name`` (a ``model_index.json``'s
    ``_class_name``), or None."""
    for family in STORY_FAMILIES:
        if any(cls.__name__ == class_name for cls in family.pipelines):
            return family
    return None


def family_of_reserved(model: str) -> type[Family] | None:
    """The family of a reserved offline model name (``reserved.py``), or None (also for video models)."""
    for family in STORY_FAMILIES:
        if model in family.reserved:
            return family
    return None


def single_file_families() -> tuple[type[Family], ...]:
    """The families whose checkpoints load from single files (``Family.single_file``)."""
    return tuple(family for family in STORY_FAMILIES if family.single_file is not None)


def reserved_story_models() -> tuple[str, ...]:
    """Every story family's offline random-weight model names."""
    return tuple(name for family in STORY_FAMILIES for name in family.reserved)
