"""The official StoryDiffusion variants as diffusers processors: baselines for the UNet and memory suites.

Written from the description in DESIGN.md §2, not from the official code. They keep what decides speed and
memory: variant A attends over all identity frames at once through a dense (frames·tokens)² boolean mask
and banks every frame's full hidden states; variant B loops over frames in Python, gathers the other
frames' Bernoulli-sampled tokens, concatenates and re-projects them, and banks only the sampled hidden
states. Both re-project the bank's hidden states to K/V on every read. The random layer skip and warm-up
are left out: the benchmarks time steps where consistency is on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

Variant = Literal["a", "b"]


@dataclass
class OfficialState:
    variant: Variant
    rate: float = 0.5
    phase: Literal["write", "read"] = "write"
    step: int = 0
    num_frames: int = 1  # frames per CFG half in the current batch
    bank: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def step_callback(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        self.step = step + 1
        return callback_kwargs

    def bank_bytes(self, step: int | None = None) -> int:
        return sum(t.numel() * t.element_size() for (s, _), t in self.bank.items() if step in (None, s))

    def draw(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Bernoulli(rate) keep-mask, as the official code draws it (variable count per draw; global RNG)."""
        return torch.rand(shape, device=device) < self.rate


def _heads(attn, x: torch.Tensor) -> torch.Tensor:
    return x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)


def _attend(
    attn, hidden: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    q, k, v = (
        _heads(attn, attn.to_q(hidden)),
        _heads(attn, attn.to_k(context)),
        _heads(attn, attn.to_v(context)),
    )
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


class OfficialAttnProcessor:
    def __init__(self, state: OfficialState, name: str) -> None:
        self.state, self.name = state, name

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **kw
    ):
        if hidden_states.ndim != 3 or encoder_hidden_states is not None:
            raise ValueError(f"{self.name}: the official processors handle transformer self-attention only")
        state = self.state
        batch, tokens, channels = hidden_states.shape
        groups = batch // state.num_frames
        halves = hidden_states.reshape(groups, state.num_frames, tokens, channels)
        key = (state.step, self.name)
        out = (self._write if state.phase == "write" else self._read)(attn, halves, key)
        out = attn.to_out[1](attn.to_out[0](out.reshape(batch, tokens, -1)))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def _write(self, attn, halves: torch.Tensor, key) -> torch.Tensor:
        state = self.state
        groups, frames, tokens, channels = halves.shape
        if state.variant == "a":
            state.bank[key] = halves.detach().clone()  # full hidden states of every identity frame
            # one draw per key token, shared by every query frame, head and CFG half
            frame_of = torch.arange(frames * tokens, device=halves.device) // tokens
            mask = (frame_of[:, None] == frame_of[None, :]) | state.draw((1, frames * tokens), halves.device)
            merged = halves.reshape(groups, frames * tokens, channels)
            return _attend(attn, merged, merged, mask).reshape(groups, frames, tokens, -1)
        keep = state.draw((frames, tokens), halves.device)  # per-frame independent draws
        sampled = [halves[:, j][:, keep[j]] for j in range(frames)]  # [G, S_j, C] each
        state.bank[key] = torch.cat(sampled, dim=1)
        outs = []
        for i in range(frames):
            context = torch.cat([halves[:, i]] + [sampled[j] for j in range(frames) if j != i], dim=1)
            outs.append(_attend(attn, halves[:, i], context))
        return torch.stack(outs, dim=1)

    def _read(self, attn, halves: torch.Tensor, key) -> torch.Tensor:
        state = self.state
        groups, frames, _, channels = halves.shape
        bank = state.bank[key]
        if state.variant == "a":  # bank: [G, F_id, N, C] full hidden states, sampled at read time
            bank = bank.reshape(groups, -1, channels)
            bank = bank[:, state.draw((bank.shape[1],), bank.device)]
        outs = [_attend(attn, halves[:, i], torch.cat([halves[:, i], bank], dim=1)) for i in range(frames)]
        return torch.stack(outs, dim=1)


def install_official(
    unet, variant: Variant, rate: float = 0.5, seed: int = 0
) -> tuple[OfficialState, Callable]:
    """Official processors on the up-block self-attention layers; returns (state, restore)."""
    original = dict(unet.attn_processors)
    state = OfficialState(variant=variant, rate=rate)
    processors = {
        name: OfficialAttnProcessor(state, name)
        if name.startswith("up_blocks.") and ".attn1." in name
        else proc
        for name, proc in original.items()
    }
    unet.set_attn_processor(processors)
    return state, lambda: unet.set_attn_processor(dict(original))
