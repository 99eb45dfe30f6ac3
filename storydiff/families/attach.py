"""Consistent attention on a diffusers pipeline or denoiser, installed and removed in one call.

state = storydiff.apply_consistent_attention(pipe, storydiff.ConsistencyConfig(rate=0.5))
state.begin_joint(num_frames=4)   # or begin_write / begin_read (consistency/state.py), or a window mode
images = pipe(prompts, callback_on_step_end=state.step_callback).images
storydiff.remove_consistent_attention(pipe)
"""

from __future__ import annotations

from ..consistency.config import ConsistencyConfig
from ..consistency.install import install, replaced, uninstall
from ..consistency.processors import ConsistentAttnProcessor
from ..consistency.state import ConsistencyState
from .registry import denoiser_of, host_of

__all__ = ["ConsistentAttnProcessor", "apply_consistent_attention", "remove_consistent_attention"]


def apply_consistent_attention(pipe_or_denoiser, config: ConsistencyConfig | None = None) -> ConsistencyState:
    """Install consistent-attention processors on the selected attention layers; returns the state.

    Works on a diffusers pipeline or its denoiser: a UNet (SD1.x/2.x, SDXL), FLUX, SD3/SD3.5 or PixArt
    transformer (each family module says which layers it gets by default). Calling it again replaces the
    previous installation (its state is discarded).
    """
    return install(host_of(pipe_or_denoiser), config or ConsistencyConfig())


def replaced_layers(pipe_or_denoiser) -> list[str]:
    """Consistent layers whose processor something else replaced since :func:`apply_consistent_attention`
    (e.g. FLUX's ``load_ip_adapter`` puts its own on the double-stream blocks): consistency is off there."""
    return replaced(denoiser_of(pipe_or_denoiser))


def remove_consistent_attention(pipe_or_denoiser) -> None:
    """Undo :func:`apply_consistent_attention`: the layers it installed on get back the processors they had
    before; every other layer keeps what it has now (e.g. IP-Adapter processors loaded since)."""
    uninstall(denoiser_of(pipe_or_denoiser))
