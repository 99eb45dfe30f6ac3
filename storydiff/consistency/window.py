"""Window mode: every frame that shows a character attends to the sampled tokens of its story neighbours.

A frame that shows a character reads the sampled K/V (drawn per step, level and frame) of the frames within
``config.window`` of it that also show one; [NC] frames neither read nor offer tokens. The denoiser sees one
chunk of consecutive story frames at a time (``begin_chunk``). A neighbour outside the chunk is seen only if
its chunk was already computed at this step: its sampled K/V wait in a boundary cache that holds just the
current step and just the frames some pending frame can still read. See ``runs/window_run.py`` for the
sweep order that makes chunk boundaries symmetric over steps.

The op does the reading: each call hands it one pool (the sampled tokens of the frames the chunk may read,
in story order) and per frame the range of its neighbours before it and after it (``pool_ranges``), so no
per-frame key set is stacked here.

Under two-pass CFG (``state.CfgPass``) each chunk is computed twice per step, one CFG group per denoiser
call: the cache is keyed by the group too, so a pass reads only its own group's tokens of earlier chunks
(and, over ranks, of the halo), exactly the half a batched [uncond; cond] call would read.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import TYPE_CHECKING

import torch

from csa_kernels import consistent_attention
from csa_kernels.pool import gather_reference_pool, index_tensor
from csa_kernels.tiled import tiled_consistent_attention

from .modes import attend_rows, call_precision, lengths_kwarg, offered_keys, plain_attention, rows_kwarg

if TYPE_CHECKING:
    from ..runs.distributed import HaloExchange
    from .state import ConsistencyState, LayerInfo


class WindowMode:
    name = "window"

    def __init__(
        self,
        active: list[bool],
        *,
        window: int | None,
        tile: int | None = None,
        halo: HaloExchange | None = None,
    ) -> None:
        if window is None and tile is None:
            raise ValueError("window mode needs config.window >= 1 (story neighbours to draw tokens from)")
        if halo is not None and tile is not None:
            raise ValueError("the tiled form (tile) runs in one process only")
        self.active = list(active)  # per story frame: takes part in consistency (shows a character)
        # distributed runs: this rank's block is one chunk computed together with the other ranks' blocks,
        # whose boundary frames arrive from the neighbour ranks at every consistent layer
        self.halo = halo
        self.window, self.tile = window or 0, tile
        self.chunk = (0, len(active))  # story frames [a, b) in the denoiser batch now
        self.pending = set(range(len(active)))  # story frames not yet computed at this step
        # over ranks: the other ranks' frames whose tokens arrived at this step, per CFG pass (None: the
        # batch holds every group) — a pass sees what its own exchanges brought, as a batched call would
        self.arrived: dict[int | None, set[int]] = {}
        # (layer, frame, CFG pass) -> sampled (k, v), [G, H, S, D]: frames of finished chunks that pending
        # ones read; the pass is None when the batch holds every CFG group, else its group (two-pass CFG)
        self.boundary: dict[tuple[str, int, int | None], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_frames(self) -> int:
        return self.chunk[1] - self.chunk[0]

    def on_step(self) -> None:
        self.pending = set(range(len(self.active)))
        self.boundary.clear()
        self.arrived.clear()

    def begin_chunk(self, start: int, stop: int) -> None:
        """The next denoiser call computes story frames [start, stop) at the current step."""
        if not 0 <= start < stop <= len(self.active):
            raise ValueError(f"chunk [{start}, {stop}) is not inside the story's {len(self.active)} frames")
        self.chunk = (start, stop)

    def end_chunk(self) -> None:
        start, stop = self.chunk
        self.pending.difference_update(range(start, stop))
        # keep only tokens some still-pending frame within the window can read
        self.boundary = {
            key: kv
            for key, kv in self.boundary.items()
            if any(abs(key[1] - j) <= self.window for j in self.pending)
        }

    def attend(
        self,
        state: ConsistencyState,
        layer: LayerInfo,
        q,
        k,
        v,
        groups: int,
        image,
        reposition=None,
        key_lengths=None,
    ) -> torch.Tensor:
        start, stop = self.chunk
        count = stop - start
        ref_idx = state.frame_reference_indices(layer, range(start, stop), image, q.device)
        rows = rows_kwarg(image, q.shape[2])
        both_halves = ref_idx.repeat(groups, 1)
        if self.tile is not None:  # the paper's tiled form, within this chunk (all its frames)
            if rows or reposition is not None or key_lengths is not None:
                raise ValueError("the tiled form (tile) supports image-only self-attention (UNets, PixArt)")
            return tiled_consistent_attention(
                q, k, v, both_halves, tile=self.tile, stride=1, groups=groups, check_indices=False,
                precision=call_precision(state, both_halves.shape[1]),
            )  # fmt: skip
        # [G, F, H, S, D]: each chunk frame's sampled tokens, per CFG half; keys as offered (re-positioned
        # when the host asks), so the boundary cache hands later chunks the same keys this chunk saw
        pool_k = offered_keys(k, both_halves, reposition)
        if pool_k is None:
            pool_k = gather_reference_pool(k, both_halves).transpose(1, 2)
        pool_v = gather_reference_pool(v, both_halves).transpose(1, 2)
        pools = [pool.unflatten(0, (groups, count)) for pool in (pool_k, pool_v)]
        # the CFG group of a two-pass call: its tokens are cached, and read, apart from the other group's
        cfg_pass = None if state.current_pass is None else state.current_pass.group
        if self.halo is None:
            self._offer(layer, pools, cfg_pass)
        elif pools[0].shape[3]:  # every rank skips alike: the sample count depends on the level only
            # every rank runs the same passes in the same order: each message holds the same group
            for frame, kv in self.halo.exchange(*pools).items():
                self.boundary[(layer.name, frame, cfg_pass)] = kv
                self.arrived.setdefault(cfg_pass, set()).add(frame)  # computed at this step, on its rank
        arrived = self.arrived.get(cfg_pass, set())

        def tokens_of(frame: int, kind: int) -> torch.Tensor:  # [G, H, S, D]
            if start <= frame < stop:
                return pools[kind][:, frame - start]
            if not pools[kind].shape[3]:  # nothing sampled at this level: no frame offers a token
                return pools[kind][:, 0]
            return self.boundary[(layer.name, frame, cfg_pass)][kind]

        # The frames this chunk reads, in story order: its own active frames, and the active frames already
        # computed at this step (here, or on another rank) within the window of an active frame of it. A
        # frame's visible neighbours are those within its window: one run just before it, one just after.
        readers_of = [f for f in range(start, stop) if self.active[f]]
        lo, hi = max(0, start - self.window), min(len(self.active), stop + self.window)
        shared = [
            j
            for j in range(lo, hi)
            if self.active[j]
            and (
                start <= j < stop
                or (
                    (j not in self.pending or j in arrived)
                    and any(abs(f - j) <= self.window for f in readers_of)
                )
            )
        ]
        size = pools[0].shape[3]  # S: every frame offers as many tokens at this level
        ranges, readers = [], []
        for g in range(groups):
            for frame in range(start, stop):
                base = g * len(shared)
                if not self.active[frame]:  # an [NC] frame reads nothing
                    ranges.append((0, 0, 0, 0))
                    continue
                own = shared.index(frame)
                first = bisect_left(shared, frame - self.window)
                last = bisect_right(shared, frame + self.window)
                ranges.append(
                    (
                        (base + first) * size,
                        (base + own) * size,
                        (base + own + 1) * size,
                        (base + last) * size,
                    )
                )
                if last - first > 1:
                    readers.append(g * count + frame - start)

        def read(borrows: bool, q_, k_, v_, lengths) -> torch.Tensor:
            if not borrows:
                return plain_attention(q_, k_, v_, lengths)
            # one pool per call: the shared frames' tokens, CFG group by group, each frame's S rows in story
            # order; a frame reads the rows of its neighbours before it and after it (the op's pool_ranges)
            pool = tuple(
                torch.cat([tokens_of(j, kind)[g] for g in range(groups) for j in shared], dim=1).transpose(
                    0, 1
                )
                for kind in (0, 1)
            )  # (R, H, D) each
            # made on the host, copied pinned and non-blocking; no range check: nothing is read back
            mine = index_tensor([ranges[i] for i in readers], q.device)
            bounded = {}
            if state.bounded:
                bounded = self._bounded(state, layer, shared, readers, image, q.shape[2], groups, q.device)
            return consistent_attention(
                q_,
                k_,
                v_,
                None,
                pool=pool,
                pool_ranges=mine,
                check_indices=False,
                precision=call_precision(state, size),  # every frame offers 0 tokens at rate 0
                **rows,
                **bounded,
                **lengths_kwarg(lengths),
            )

        reading = set(readers)
        row_sets = [(False, [i for i in range(groups * count) if i not in reading]), (True, readers)]
        row_sets = [(borrows, members) for borrows, members in row_sets if members]
        return attend_rows(q, k, v, row_sets, read, key_lengths)

    def _bounded(self, state, layer, shared, readers, image, tokens, groups, device) -> dict:
        """Bounded attention in window mode: the reading rows' ``segments`` and the pool rows'
        ``pool_segments`` — each shared frame's sampled tokens' characters, read through the same seeded
        draw (one per story frame), so neighbours from earlier chunks or other ranks get theirs too."""
        start, stop = self.chunk
        # on the device the draws are cached on (the chunk's own call made them there): no host sync
        drawn = state.frame_reference_indices(layer, shared, image, device)
        pool_segments = torch.gather(state.segments(shared, image, tokens, device), 1, drawn).flatten()
        rows = state.segments(range(start, stop), image, tokens, device).repeat(groups, 1)
        return {
            "segments": rows.index_select(0, index_tensor(readers, device)),
            "pool_segments": pool_segments.repeat(groups),
        }

    def _offer(self, layer: LayerInfo, pools: list[torch.Tensor], cfg_pass: int | None) -> None:
        """Keep the sampled tokens of this chunk's frames that frames of later chunks will read (of the CFG
        group ``cfg_pass`` under two-pass CFG; None: every group, as the batch holds them)."""
        start, stop = self.chunk
        for local, frame in enumerate(range(start, stop)):
            later = (j for j in self.pending if not start <= j < stop and abs(j - frame) <= self.window)
            if self.active[frame] and any(self.active[j] for j in later):
                # clone: a view would keep the whole chunk's pool alive after the chunk is done
                kv = (pools[0][:, local].clone(), pools[1][:, local].clone())
                self.boundary[(layer.name, frame, cfg_pass)] = kv
