"""Consistent self-attention as a diffusers attention processor, installed and removed in one call.

state = storydiff.apply_consistent_attention(pipe, ConsistencyConfig(rate=0.5))
state.begin_joint(num_frames=4)   # or begin_write / begin_read (state.py), or a window mode (longstory/)
images = pipe(prompts, callback_on_step_end=state.step_callback).images
storydiff.remove_consistent_attention(pipe)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.attention_processor import Attention

from .state import ConsistencyState, LayerInfo

BINDING_ATTR = "_storydiff_binding"  # set on each attention module consistency is installed on (install.py)


def head_projections(attn: Attention, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(B, H, N, D) query, key and value of ``hidden_states`` (B, N, C) with the layer's own projections
    and q/k norms — diffusers' ``AttnProcessor2_0`` math. Views of the (B, N, H·D) projections, no copy:
    the op takes any strides."""
    batch = hidden_states.shape[0]
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


@dataclass(frozen=True)
class Binding:
    """What a consistent processor on one attention module works with: the run's state, the layer, and the
    host's processor options (``Host.options``: FLUX's position embedder)."""

    state: ConsistencyState
    layer: LayerInfo
    options: dict[str, Any] = field(default_factory=dict)


class BoundProcessor:
    """Base of every consistent processor: built with ``(state, layer, **options)``, or with no arguments.

    diffusers rebuilds processors by calling their class with no arguments — ``load_ip_adapter`` does so for
    every attention layer it does not give an IP-Adapter processor (self-attention included), and so does
    ``unload_ip_adapter``. Such a processor reads its binding from the attention module it is called with:
    ``install.install`` records one on every module it installs on, and ``install.uninstall``
    removes them. No globals: two pipelines keep their own states.
    """

    def __init__(self, state: ConsistencyState | None = None, layer: LayerInfo | None = None, **options):
        if (state is None) != (layer is None):
            raise TypeError(f"{type(self).__name__} takes both state and layer, or neither")
        self._binding = Binding(state, layer, options) if state is not None else None

    def binding(self, attn: torch.nn.Module) -> Binding:
        """This processor's (state, layer, options): its own, or the attention module's."""
        if self._binding is not None:
            return self._binding
        bound = getattr(attn, BINDING_ATTR, None)
        if bound is None:
            raise RuntimeError(
                f"{type(self).__name__} was built without (state, layer) and is called on an attention "
                "module consistent attention is not installed on; use apply_consistent_attention"
            )
        return bound


class ConsistentAttnProcessor(BoundProcessor):
    """Self-attention (``attn1``) processor computing consistent attention with ``csa_kernels``.

    Mirrors diffusers' ``AttnProcessor2_0`` around the attention itself (norms, residual, rescale), so
    with consistency off it computes exactly the stock result; the attention itself is the state's
    (``ConsistencyState.attend``: stock, or whatever the current mode says).
    """

    # Eager inside a torch.compile'd denoiser. Its body traces without a graph break or a host sync (the
    # draws become graph constants; tests/integration/test_fullgraph.py compiles a whole UNet with it,
    # fullgraph=True), but what it decides depends on the step (warm-up, skip schedule, draws), so a traced
    # processor would recompile the denoiser at every step; as an eager island the layers around it compile
    # once.
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
        binding = self.binding(attn)
        state, layer = binding.state, binding.layer
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(
                f"{layer.name}: consistent attention is for self-attention without a mask; "
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

        query, key, value = head_projections(attn, hidden_states)

        hidden_states = state.attend(layer, query, key, value)

        hidden_states = (
            hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * query.shape[-1]).to(query.dtype)
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
