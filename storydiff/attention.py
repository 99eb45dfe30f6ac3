"""Consistent self-attention as a diffusers attention processor, installed and removed in one call.

state = storydiff.apply_consistent_attention(pipe, ConsistencyConfig(rate=0.5))
state.begin_joint(num_frames=4)   # or begin_write / begin_read, see state.py
images = pipe(prompts, callback_on_step_end=state.step_callback).images
storydiff.remove_consistent_attention(pipe)
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from csa_kernels import consistent_attention
from csa_kernels.pool import gather_reference_pool
from csa_kernels.tiled import tiled_consistent_attention

from .config import ConsistencyConfig
from .state import ConsistencyState, LayerInfo

_STATE_ATTR = "_storydiff_consistency"  # set on the UNet so remove_consistent_attention can undo
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^mid_block\.")


class ConsistentAttnProcessor:
    """Self-attention (``attn1``) processor computing consistent attention with ``csa_kernels``.

    Mirrors diffusers' ``AttnProcessor2_0`` around the attention itself (norms, residual, rescale), so
    with consistency off it computes exactly the stock result.
    """

    def __init__(self, state: ConsistencyState, layer: LayerInfo) -> None:
        self.state = state
        self.layer = layer

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

        hidden_states = self._attend(query, key, value)

        hidden_states = (
            hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        state, layer = self.state, self.layer
        if not state.consistent_now(layer):
            return F.scaled_dot_product_attention(q, k, v)
        batch, _, tokens, _ = q.shape
        frames = state.chunk[1] - state.chunk[0] if state.phase == "window" else state.num_frames
        if batch % frames:
            raise RuntimeError(
                f"{layer.name}: batch of {batch} is not a multiple of the {frames} frames the "
                "state was told about (begin_joint / begin_write / begin_read / begin_chunk)"
            )
        groups = batch // frames  # 2 under classifier-free guidance: [uncond frames; cond frames]
        if state.phase == "read":
            return self._read(q, k, v, groups)
        if state.phase == "window":
            return self._window(q, k, v, groups, tokens)

        ref_idx = state.reference_indices(layer, tokens, q.device).repeat(groups, 1)
        out = consistent_attention(q, k, v, ref_idx, groups=groups, window=state.config.window)
        if state.phase == "write":
            state.bank.store(
                state.writing,
                state.step,
                layer.name,
                *(self._bank_tokens(x, ref_idx, groups) for x in (k, v)),
            )
        return out

    @staticmethod
    def _bank_tokens(x: torch.Tensor, ref_idx: torch.Tensor, groups: int) -> torch.Tensor:
        """(B, H, N, D) → (groups, H, frames·S, D): the sampled tokens of each CFG half."""
        pool = gather_reference_pool(x, ref_idx)  # [B, S, H, D]
        return pool.reshape(groups, -1, *pool.shape[2:]).transpose(1, 2).contiguous()

    def _window(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, tokens: int
    ) -> torch.Tensor:
        """Long-story mode: each frame's bank is the sampled K/V of its visible window neighbours."""
        state, layer = self.state, self.layer
        start, stop = state.chunk
        count = stop - start
        ref_idx = state.frame_reference_indices(layer, range(start, stop), tokens, q.device)
        if state.config.tile is not None:  # the paper's tiled form, within this chunk (all its frames)
            return tiled_consistent_attention(
                q, k, v, ref_idx.repeat(groups, 1), tile=state.config.tile, stride=1, groups=groups
            )
        # [G, F, H, S, D]: each chunk frame's sampled tokens, per CFG half
        both_halves = ref_idx.repeat(groups, 1)
        pools = [
            gather_reference_pool(x, both_halves).unflatten(0, (groups, count)).transpose(2, 3)
            for x in (k, v)
        ]
        window = state.config.window
        for local, frame in enumerate(range(start, stop)):  # offer tokens to frames of later chunks
            later = (j for j in state.pending if not start <= j < stop and abs(j - frame) <= window)
            if state.active[frame] and any(state.active[j] for j in later):
                # clone: a view would keep the whole chunk's pool alive after the chunk is done
                state.ref_cache[(layer.name, frame)] = (
                    pools[0][:, local].clone(),
                    pools[1][:, local].clone(),
                )

        def tokens_of(frame: int, kind: int) -> torch.Tensor:  # [G, H, S, D]
            if start <= frame < stop:
                return pools[kind][:, frame - start]
            return state.ref_cache[(layer.name, frame)][kind]

        by_count: dict[int, list[int]] = {}
        visible = {}
        for frame in range(start, stop):  # neighbours in this chunk or already computed at this step
            visible[frame] = [
                j for j in state.window_neighbours(frame) if start <= j < stop or j not in state.pending
            ]
            by_count.setdefault(len(visible[frame]), []).append(frame)
        out = None if len(by_count) == 1 else torch.empty_like(q)
        for num, members in by_count.items():
            rows = [g * count + (f - start) for g in range(groups) for f in members]
            rows_t = torch.tensor(rows, device=q.device)
            sub = (q, k, v) if out is None else (q[rows_t], k[rows_t], v[rows_t])
            if num == 0:
                result = F.scaled_dot_product_attention(*sub)
            else:
                bank_k, bank_v = (
                    torch.stack(
                        [
                            torch.cat([tokens_of(j, kind)[g] for j in visible[f]], dim=1)
                            for g in range(groups)
                            for f in members
                        ]
                    )
                    for kind in (0, 1)
                )
                no_refs = torch.empty(len(rows), 0, dtype=torch.int64, device=q.device)
                result = consistent_attention(*sub, no_refs, groups=len(rows), bank_k=bank_k, bank_v=bank_v)
            if out is None:
                return result
            out.index_copy_(0, rows_t, result)
        return out

    def _read(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
        state, layer = self.state, self.layer
        frames = state.num_frames
        out = None if len(state.read_sets) == 1 else torch.empty_like(q)
        for characters, members in state.read_sets.items():
            rows = torch.tensor([g * frames + f for g in range(groups) for f in members], device=q.device)
            sub = (q, k, v) if out is None else (q[rows], k[rows], v[rows])
            bank = state.bank.get(characters, state.step, layer.name, q.device) if characters else None
            if bank is None:  # an [NC] frame, or the writer skipped this (step, layer)
                result = F.scaled_dot_product_attention(*sub)
            else:
                state.bank.prefetch(characters, *state.next_layer(layer), q.device)
                bank_k, bank_v = (t.to(q.dtype) for t in bank)
                if bank_k.shape[0] != groups:
                    raise RuntimeError(
                        f"bank of {characters} was written with {bank_k.shape[0]} CFG group(s), but this "
                        f"batch has {groups}: write and read with the same guidance setting"
                    )
                no_refs = torch.empty(sub[0].shape[0], 0, dtype=torch.int64, device=q.device)
                result = consistent_attention(*sub, no_refs, groups=groups, bank_k=bank_k, bank_v=bank_v)
            if out is None:
                return result
            out.index_copy_(0, rows, result)
        return out


def _unet(pipe_or_unet):
    from diffusers import UNet2DConditionModel

    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
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
