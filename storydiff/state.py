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

Phase = Literal["off", "joint", "write", "read", "window"]


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
        window: long stories (longstory.py). Every frame with a character attends to the sampled tokens of
               story neighbours within ``config.window`` frames that also show one; the UNet sees one
               chunk of frames at a time (``begin_chunk``). Neighbours outside the chunk are seen only if
               their chunk was already computed at this step: their sampled K/V wait in ``ref_cache``
               (current step only). See longstory.py for the sweep order that makes this symmetric.
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
        # window phase
        self.active: list[bool] = []  # per story frame: takes part in consistency (shows a character)
        self.chunk: tuple[int, int] = (0, 0)  # story frames [a, b) in the UNet batch now
        self.pending: set[int] = set()  # story frames not yet computed at this step
        self.ref_cache: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (layer, frame)

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

    def begin_window(self, active: list[bool]) -> None:
        """Long-story mode over ``len(active)`` story frames; inactive ([NC]) frames stay stock."""
        if self.config.window is None and self.config.tile is None:
            raise ValueError("window mode needs config.window >= 1 (story neighbours to draw tokens from)")
        self._begin("window", len(active))
        self.active = list(active)
        self.pending = set(range(len(active)))

    def begin_chunk(self, start: int, stop: int) -> None:
        """The next UNet call computes story frames [start, stop) at the current step."""
        self.chunk = (start, stop)

    def end_chunk(self) -> None:
        start, stop = self.chunk
        self.pending.difference_update(range(start, stop))
        # keep only tokens some still-pending frame within the window can read
        window = self.config.window or 0
        self.ref_cache = {
            key: kv
            for key, kv in self.ref_cache.items()
            if any(abs(key[1] - j) <= window for j in self.pending)
        }

    def end(self) -> None:
        self.phase, self.writing, self.read_sets = "off", None, {}
        self._ref_cache.clear()
        self.ref_cache.clear()

    def set_step(self, step: int) -> None:
        self.step = step
        self._ref_cache.clear()
        self.ref_cache.clear()
        self.pending = set(range(len(self.active))) if self.phase == "window" else set()

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

    def frame_reference_indices(
        self, layer: LayerInfo, frames: range, num_tokens: int, device: torch.device
    ) -> torch.Tensor:
        """(len(frames), S) tokens offered by each story frame: one draw per (step, level, frame), so a
        frame offers the same tokens whichever chunk it is computed in."""
        rows = []
        for frame in frames:
            key = ("frame", self.step, layer.level, frame, num_tokens)
            if key not in self._ref_cache:
                gen = torch.Generator().manual_seed(self.seed_for("ref", *key))
                rate = self.config.rate_for(layer.level)
                self._ref_cache[key] = sample_reference_indices(1, num_tokens, rate, generator=gen).to(device)
            rows.append(self._ref_cache[key])
        return torch.cat(rows)

    def window_neighbours(self, frame: int) -> list[int]:
        """Active story frames within the window of active ``frame``, ascending (the order in which
        their tokens are concatenated)."""
        if not self.active[frame]:
            return []
        window, total = self.config.window, len(self.active)
        return [
            j
            for j in range(max(0, frame - window), min(total, frame + window + 1))
            if j != frame and self.active[j]
        ]

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
