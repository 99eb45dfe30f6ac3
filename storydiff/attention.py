"""Consistent self-attention as a diffusers attention processor, installed and removed in one call.

state = storydiff.apply_consistent_attention(pipe, ConsistencyConfig(rate=0.5))
state.begin_joint(num_frames=4)   # or begin_write / begin_read (state.py), or a window mode (longstory/)
images = pipe(prompts, callback_on_step_end=state.step_callback).images
storydiff.remove_consistent_attention(pipe)
"""

from __future__ import annotations

import hashlib
import json
import re

import torch
from diffusers.models.attention_processor import Attention

from .config import ConsistencyConfig
from .state import ConsistencyState, LayerInfo

_STATE_ATTR = "_storydiff_consistency"  # set on the UNet so remove_consistent_attention can undo
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^mid_block\.")


class ConsistentAttnProcessor:
    """Self-attention (``attn1``) processor computing consistent attention with ``csa_kernels``.

    Mirrors diffusers' ``AttnProcessor2_0`` around the attention itself (norms, residual, rescale), so
    with consistency off it computes exactly the stock result; the attention itself is the state's
    (``ConsistencyState.attend``: stock, or whatever the current mode says).
    """

    def __init__(self, state: ConsistencyState, layer: LayerInfo) -> None:
        self.state = state
        self.layer = layer

    # Eager inside a torch.compile'd denoiser: the state's Python bookkeeping (mode, step, draws) would
    # otherwise be traced per layer and step and recompile without end; the layers around it compile.
    @torch.compiler.disable
    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(
                f"{self.layer.name}: consistent attention is for self-attention without a mask; "
                "got encoder_hidden_states or attention_mask"
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        # (B, N, H·D) viewed as (B, H, N, D): no copy; the op takes any strides
        query, key, value = (
            x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self.state.attend(self.layer, query, key, value)

        hidden_states = (
            hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _unet(pipe_or_unet):
    from diffusers import UNet2DConditionModel

    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    unet = getattr(unet, "_orig_mod", unet)  # torch.compile'd: its processors are the module's own
    if not isinstance(unet, UNet2DConditionModel):
        raise ValueError(
            "consistent attention needs a UNet2DConditionModel or a pipeline with one as `.unet` "
            f"(SDXL, SD1.5, SD2.x); got {type(pipe_or_unet).__name__}"
        )
    return unet


def _level_factor(unet, name: str) -> int | None:
    """Downsampling factor of a layer's block relative to the image (VAE factor 8 × 2^depth)."""
    match = _BLOCK.match(name)
    if match is None:
        return None
    num_levels = len(unet.config.block_out_channels)
    if name.startswith("mid_block."):
        depth = num_levels - 1
    elif match.group(1) == "down_blocks":
        depth = int(match.group(2))
    else:
        depth = num_levels - 1 - int(match.group(2))
    return 8 * 2**depth


def _selected(config: ConsistencyConfig, name: str) -> bool:
    if ".attn1." not in name:
        return False
    if callable(config.layers):
        return bool(config.layers(name))
    if isinstance(config.layers, list):
        return name in config.layers
    prefixes = {"up": ("up_blocks.",), "up+mid": ("up_blocks.", "mid_block."), "all": ("",)}[config.layers]
    return name.startswith(prefixes)


def host_signature(unet, layers: list[LayerInfo]) -> dict:
    """What identifies the denoiser for an identity bank: its class and configuration (a hash: same for
    every checkpoint of one architecture) and each consistent layer's [heads, head dim]."""
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    shapes = {}
    for layer in layers:
        attn = unet.get_submodule(layer.name.removesuffix(".processor"))
        shapes[layer.name] = [attn.heads, attn.to_k.out_features // attn.heads]
    return {"architecture": f"{type(unet).__name__}:{digest}", "layers": shapes}


def apply_consistent_attention(pipe_or_unet, config: ConsistencyConfig | None = None) -> ConsistencyState:
    """Install consistent-attention processors on the selected self-attention layers; returns the state.

    Calling it again replaces the previous installation (its state is discarded).
    """
    config = config or ConsistencyConfig()
    unet = _unet(pipe_or_unet)
    if hasattr(unet, _STATE_ATTR):
        remove_consistent_attention(unet)
    original = dict(unet.attn_processors)
    layers = []
    for name in original:  # attn_processors lists layers in module order: down, mid, up = forward order
        level = _level_factor(unet, name)
        if level is not None and _selected(config, name):
            layers.append(LayerInfo(name=name, index=len(layers), level=level))
    if isinstance(config.layers, list):
        unknown = sorted(set(config.layers) - {layer.name for layer in layers})
        if unknown:
            raise ValueError(f"config.layers names no self-attention processor of this UNet: {unknown[:3]}")
    if not layers:
        raise ValueError("config.layers selects no self-attention layer of this UNet")
    offload = config.offload_bank if config.offload_bank is not None else unet.device.type == "cuda"
    state = ConsistencyState(config, layers, offload_bank=offload)
    state.host = host_signature(unet, layers)
    processors = dict(original)
    for layer in layers:
        processors[layer.name] = ConsistentAttnProcessor(state, layer)
    unet.set_attn_processor(processors)
    setattr(unet, _STATE_ATTR, (state, original))
    return state


def remove_consistent_attention(pipe_or_unet) -> None:
    """Restore the processors that were installed before :func:`apply_consistent_attention`."""
    unet = _unet(pipe_or_unet)
    installed = getattr(unet, _STATE_ATTR, None)
    if installed is None:
        return
    _, original = installed
    unet.set_attn_processor(dict(original))
    delattr(unet, _STATE_ATTR)
