"""Consistent self-attention as a diffusers attention processor, installed and removed in one call.

state = storydiff.apply_consistent_attention(pipe, ConsistencyConfig(rate=0.5))
state.begin_joint(num_frames=4)   # or begin_write / begin_read (state.py), or a window mode (longstory/)
images = pipe(prompts, callback_on_step_end=state.step_callback).images
storydiff.remove_consistent_attention(pipe)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.attention_processor import Attention

from .config import ConsistencyConfig, InvalidSetting
from .hosts import find_host, selector
from .state import ConsistencyState, LayerInfo

_STATE_ATTR = "_storydiff_consistency"  # set on the UNet so remove_consistent_attention can undo
_BINDING_ATTR = "_storydiff_binding"  # set on each attention module consistency is installed on


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
    :func:`apply_consistent_attention` records one on every module it installs on, and
    :func:`remove_consistent_attention` removes them. No globals: two pipelines keep their own states.
    """

    def __init__(self, state: ConsistencyState | None = None, layer: LayerInfo | None = None, **options):
        if (state is None) != (layer is None):
            raise TypeError(f"{type(self).__name__} takes both state and layer, or neither")
        self._binding = Binding(state, layer, options) if state is not None else None

    def binding(self, attn: torch.nn.Module) -> Binding:
        """This processor's (state, layer, options): its own, or the attention module's."""
        if self._binding is not None:
            return self._binding
        bound = getattr(attn, _BINDING_ATTR, None)
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


def host_signature(denoiser, layers: list[LayerInfo]) -> dict:
    """What identifies the denoiser for an identity bank: its class and configuration (a hash: same for
    every checkpoint of one architecture) and each consistent layer's [heads, head dim]."""
    config = {k: v for k, v in dict(denoiser.config).items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    shapes = {}
    for layer in layers:
        attn = denoiser.get_submodule(layer.name.removesuffix(".processor"))
        shapes[layer.name] = [attn.heads, attn.to_k.out_features // attn.heads]
    return {"architecture": f"{type(denoiser).__name__}:{digest}", "layers": shapes}


def apply_consistent_attention(pipe_or_denoiser, config: ConsistencyConfig | None = None) -> ConsistencyState:
    """Install consistent-attention processors on the selected attention layers; returns the state.

    Works on a diffusers pipeline or its denoiser: a UNet (SD1.x/2.x, SDXL), FLUX, SD3/SD3.5 or PixArt
    transformer (``hosts.py`` lists which layers each gets by default). Calling it again replaces the
    previous installation (its state is discarded).
    """
    config = config or ConsistencyConfig()
    host = find_host(pipe_or_denoiser)
    if config.rope != "source" and not host.rope:
        raise InvalidSetting(
            "rope",
            f"applies to FLUX (RoPE) hosts only; this {host.family} denoiser has no rotary position "
            f"embedding, so borrowed keys carry no position to move: use 'source', got {config.rope!r}",
        )
    denoiser = host.denoiser
    if hasattr(denoiser, _STATE_ATTR):
        remove_consistent_attention(denoiser)
    chosen = selector(host, config)
    original = dict(denoiser.attn_processors)
    layers = []
    for name in original:  # attn_processors lists layers in module order, which is forward order
        if chosen(name):
            layers.append(LayerInfo(name=name, index=len(layers), level=host.level(name)))
    if isinstance(config.layers, list):
        unknown = sorted(set(config.layers) - {layer.name for layer in layers})
        if unknown:
            raise ValueError(
                f"config.layers names no consistent-capable attention processor of this {host.family} "
                f"denoiser: {unknown[:3]}"
            )
    if not layers:
        raise ValueError(f"config.layers selects no attention layer of this {host.family} denoiser")
    offload = config.offload_bank if config.offload_bank is not None else denoiser.device.type == "cuda"
    state = ConsistencyState(config, layers, offload_bank=offload)
    state.host = host_signature(denoiser, layers)
    if host.rope:  # a bank holds keys where this policy put them: reading it under another would mislead
        state.host["rope"] = config.rope
    processors = dict(original)
    for layer in layers:
        binding = Binding(state, layer, dict(host.options))
        # read by processors diffusers rebuilds without arguments (load_ip_adapter): see BoundProcessor
        setattr(denoiser.get_submodule(layer.name.removesuffix(".processor")), _BINDING_ATTR, binding)
        processors[layer.name] = host.processor(layer.name)(state, layer, **host.options)
    denoiser.set_attn_processor(processors)
    # the text length of joint sequences, for blocks that only see them concatenated (FLUX single-stream)
    hook = denoiser.register_forward_pre_hook(state.record_text_length, with_kwargs=True)
    setattr(denoiser, _STATE_ATTR, (state, original, hook))
    return state


def replaced_layers(pipe_or_denoiser) -> list[str]:
    """Consistent layers whose processor something else replaced after :func:`apply_consistent_attention`
    (e.g. FLUX's ``load_ip_adapter`` puts its own on the double-stream blocks): consistency is off there."""
    denoiser = find_host(pipe_or_denoiser).denoiser
    installed = getattr(denoiser, _STATE_ATTR, None)
    if installed is None:
        return []
    processors = denoiser.attn_processors
    return [
        layer.name for layer in installed[0].layers if not isinstance(processors[layer.name], BoundProcessor)
    ]


def remove_consistent_attention(pipe_or_denoiser) -> None:
    """Undo :func:`apply_consistent_attention`: the layers it installed on get back the processors they had
    before; every other layer keeps what it has now (e.g. the IP-Adapter processors ``load_ip_adapter``
    put on the cross-attention layers since)."""
    denoiser = find_host(pipe_or_denoiser).denoiser
    installed = getattr(denoiser, _STATE_ATTR, None)
    if installed is None:
        return
    state, original, hook = installed
    processors = dict(denoiser.attn_processors)
    for layer in state.layers:
        if isinstance(processors[layer.name], BoundProcessor):  # ours, or diffusers' rebuild of ours
            processors[layer.name] = original[layer.name]
        module = denoiser.get_submodule(layer.name.removesuffix(".processor"))
        if hasattr(module, _BINDING_ATTR):
            delattr(module, _BINDING_ATTR)
    denoiser.set_attn_processor(processors)
    hook.remove()
    delattr(denoiser, _STATE_ATTR)
