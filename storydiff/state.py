"""Explicit, seeded state shared by the consistent-attention processors of one UNet.

The pipeline sets the phase and the step; the processors only read them. Nothing is inferred from call
counts, and every random choice is a pure function of (seed, what, step, layer or level), so batching
frames differently never changes a result.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import torch

from csa_kernels import sample_reference_indices

from .bank import IdBank
from .config import ConsistencyConfig

Phase = Literal["off", "joint", "write", "read"]


@dataclass(frozen=True)
class LayerInfo:
    name: str  # processor name in ``unet.attn_processors``
    index: int  # position among consistent layers, in forward order
    level: int  # downsampling factor relative to the image: 8, 16, 32 or 64


class ConsistencyState:
    """Phase, step, frames and bank for one UNet's consistent-attention processors.

    Phases:
        off:   stock self-attention.
        joint: the frames of a batch attend to each other's sampled tokens (no bank).
        write: like joint, and each consistent layer stores the sampled K/V in the bank of ``writing``.
        read:  every frame attends to its own tokens plus the banks of the characters it shows.
    """

    def __init__(self, config: ConsistencyConfig, layers: list[LayerInfo], *, offload_bank: bool) -> None:
        self.config = config
        self.layers = layers
        self.bank = IdBank(offload=offload_bank)
        self.phase: Phase = "off"
        self.step = 0
        self.num_frames = 0
        self.writing: str | None = None
        self.read_sets: dict[tuple[str, ...], list[int]] = {}
        self._ref_cache: dict[tuple, torch.Tensor] = {}

    # -- driven by the pipeline ----------------------------------------------------------------------
    def begin_joint(self, num_frames: int) -> None:
        self._begin("joint", num_frames)

    def begin_write(self, character: str, num_frames: int) -> None:
        self._begin("write", num_frames)
        self.writing = character
        self.bank.start(character)

    def begin_read(self, frame_characters: list[tuple[str, ...]]) -> None:
        """One entry per frame of the batch: the characters it shows (empty for an [NC] frame)."""
        missing = sorted({c for chars in frame_characters for c in chars if not self.bank.has(c)})
        if missing:
            raise ValueError(f"no identity bank for character(s) {missing}: write or load them first")
        self._begin("read", len(frame_characters))
        self.read_sets = {}
        for frame, chars in enumerate(frame_characters):
            self.read_sets.setdefault(tuple(chars), []).append(frame)

    def end(self) -> None:
        self.phase, self.writing, self.read_sets = "off", None, {}
        self._ref_cache.clear()

    def set_step(self, step: int) -> None:
        self.step = step
        self._ref_cache.clear()

    def step_callback(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """For diffusers' ``callback_on_step_end``: step ``step`` just finished."""
        self.set_step(step + 1)
        return callback_kwargs

    def _begin(self, phase: Phase, num_frames: int) -> None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.end()
        self.phase, self.num_frames, self.step = phase, num_frames, 0

    # -- read by the processors ----------------------------------------------------------------------
    def consistent_now(self, layer: LayerInfo) -> bool:
        """False during warm-up and when this (step, layer) randomly falls back to plain attention."""
        if self.phase == "off" or self.step < self.config.warmup_steps:
            return False
        prob = self.config.skip_prob(self.step)
        return not (prob > 0 and self.uniform("skip", self.step, layer.index) < prob)

    def reference_indices(self, layer: LayerInfo, num_tokens: int, device: torch.device) -> torch.Tensor:
        """(num_frames, S) token positions each frame offers; one draw per (step, level), shared by the
        level's layers and by both CFG halves, as in the official code."""
        key = (self.step, layer.level, self.num_frames, num_tokens, self.writing)
        if key not in self._ref_cache:
            gen = torch.Generator().manual_seed(self.seed_for("ref", *key))
            idx = sample_reference_indices(
                self.num_frames, num_tokens, self.config.rate_for(layer.level), generator=gen
            )
            self._ref_cache[key] = idx.to(device)
        return self._ref_cache[key]

    def next_layer(self, layer: LayerInfo) -> tuple[int, LayerInfo]:
        """(step, layer) that follows ``layer`` in forward order, for bank prefetch."""
        if layer.index + 1 < len(self.layers):
            return self.step, self.layers[layer.index + 1]
        return self.step + 1, self.layers[0]

    def seed_for(self, *key) -> int:
        digest = hashlib.blake2b(repr((self.config.seed, *key)).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & (2**63 - 1)

    def uniform(self, *key) -> float:
        return self.seed_for(*key) / 2**63
