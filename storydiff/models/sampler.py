"""The sampler a story runs with: the scheduler and FreeU, set for one run and restored after it.

``RunSettings.scheduler`` "model" keeps the pipeline's own scheduler, "ddim" swaps in diffusers'
``DDIMScheduler`` built from that scheduler's config (as the official app does: same betas and timestep
spacing, DDIM's update). ``RunSettings.freeu`` (s1, s2, b1, b2) turns FreeU on with those factors
(diffusers' ``enable_freeu``); None leaves the pipeline's FreeU as it is. Both exist for UNets only:
FreeU rescales a UNet's skip connections, and the DiT families are flow-matching models DDIM does not fit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ..consistency.config import InvalidSetting

if TYPE_CHECKING:  # a name for annotations only: the option table reads SCHEDULERS without torch
    from ..families.base import Family

SCHEDULERS = ("model", "ddim")
#: FreeU's factors on a UNet's up blocks, in ``enable_freeu``'s argument order.
FREEU_FACTORS = ("s1", "s2", "b1", "b2")


def freeu_factors(unet) -> tuple[float, float, float, float] | None:
    """The FreeU factors a UNet runs with now (None: FreeU off), read where ``enable_freeu`` puts them."""
    block = unet.up_blocks[0]
    values = tuple(getattr(block, name, None) for name in FREEU_FACTORS)
    return None if any(value is None for value in values) else values


@contextmanager
def run_sampler(family: Family, scheduler: str, freeu: tuple[float, ...] | None) -> Iterator[None]:
    """``family.pipe`` with ``scheduler`` and ``freeu`` (``RunSettings`` values) inside the block, as it was
    after. InvalidSetting naming the setting when asked for what the family has not
    (``Family.official_sampler``).
    """
    if not family.official_sampler:
        if scheduler != "model":
            raise InvalidSetting(
                "scheduler", f"'{scheduler}' applies to UNet models; this is a {family.name} model"
            )
        if freeu is not None:
            raise InvalidSetting(
                "freeu",
                f"applies to UNet models (it rescales their skip connections); this is a {family.name} model",
            )
        yield
        return
    from diffusers import DDIMScheduler

    pipe = family.pipe
    saved_scheduler, saved_freeu = pipe.scheduler, freeu_factors(pipe.unet)
    try:
        if scheduler == "ddim":
            pipe.scheduler = DDIMScheduler.from_config(saved_scheduler.config)
        if freeu is not None:
            pipe.enable_freeu(*freeu)
        yield
    finally:
        pipe.scheduler = saved_scheduler
        if saved_freeu is None:
            pipe.disable_freeu()
        else:
            pipe.enable_freeu(*saved_freeu)
