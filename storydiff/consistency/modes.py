"""The identity-bank modes: what each frame of a denoiser batch attends to.

* ``JointMode``: the frames of the batch attend to each other's sampled tokens (official "write" batch);
  with ``writing`` set, every consistent layer also banks those sampled K/V for that character.
* ``ReadMode``: each frame attends to its own tokens plus the banked tokens of the characters it shows.

Long stories have their own mode (``window.py``). Modes receive (B, H, N, D) q, k, v with B =
groups x frames, the CFG halves stacked as [uncond frames; cond frames]; in one pass of two-pass CFG the
batch is just the frames (groups = 1) and ``state.current_pass`` says which group it is: a write then banks
that group's tokens where a batched write puts them, and a read takes that group of the bank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from csa_kernels import consistent_attention
from csa_kernels.pool import gather_reference_pool, index_tensor

if TYPE_CHECKING:
    from .state import ConsistencyState, LayerInfo, Reposition, Span


def plain_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """The host's own self-attention of each frame; ``key_lengths`` (B,): frame b's keys end there (its
    text padding follows, Qwen-Image)."""
    if key_lengths is None:
        return F.scaled_dot_product_attention(q, k, v)
    valid = torch.arange(k.shape[2], device=key_lengths.device) < key_lengths[:, None]  # [B, N]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])


def call_precision(state: ConsistencyState, borrowed: int) -> str:
    """The op's ``precision`` for a call whose frames see ``borrowed`` keys from elsewhere (other frames'
    tokens, a bank, a pool): the run's ``attn_precision``, or "native" when there are none (a bank or pool
    of 0 tokens at rate 0, a joint batch of one frame): int8 there would only quantize the frame's own
    attention, so a run that borrows nothing keeps the stock model's arithmetic whatever the setting."""
    return state.config.attn_precision if borrowed else "native"


def lengths_kwarg(key_lengths: torch.Tensor | None) -> dict:
    """The op's ``key_lengths`` keyword, or nothing (every frame's keys are all its N tokens)."""
    return {} if key_lengths is None else {"key_lengths": key_lengths}


def rows_kwarg(image: Span, tokens: int) -> dict:
    """The op's ``query_rows`` keyword for an image span of a ``tokens``-long sequence: only the image
    rows read other frames. Nothing when the whole sequence is image (UNets), so their calls stay as
    they were."""
    return {} if image == (0, tokens) else {"query_rows": image}


def bank_tokens(
    x: torch.Tensor, ref_idx: torch.Tensor, groups: int, pool: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, H, N, D) → (groups, H, frames·S, D): the sampled tokens of each CFG half, bank layout.
    ``pool``: (B, H, S, D) tokens to bank instead of x's rows at ``ref_idx`` (re-positioned keys)."""
    pool = gather_reference_pool(x, ref_idx) if pool is None else pool.transpose(1, 2)  # [B, S, H, D]
    return pool.reshape(groups, -1, *pool.shape[2:]).transpose(1, 2).contiguous()


def offered_keys(
    k: torch.Tensor, ref_idx: torch.Tensor, reposition: Reposition | None
) -> torch.Tensor | None:
    """The op's ``pool_k``: k's rows at ``ref_idx`` moved by the host's ``reposition`` (RoPE policy), or
    None (the op gathers them itself) when keys are offered as they are. Only these S rows per frame are
    re-positioned: a rotation by Δ of a rotated key is the key rotated to its position + Δ."""
    if reposition is None:
        return None
    return reposition(gather_reference_pool(k, ref_idx).transpose(1, 2), ref_idx)


def attend_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    row_sets: list[tuple[object, list[int]]],
    attend,
    key_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``attend(key, q_rows, k_rows, v_rows, key_lengths_rows)`` per set of batch rows and assemble the
    output.

    Rows that share a key set (same characters, same neighbours) go through one call; with a single set
    the whole batch goes through as is, without gathering rows.
    """
    if len(row_sets) == 1:
        return attend(row_sets[0][0], q, k, v, key_lengths)
    out = torch.empty_like(q)
    for key, rows in row_sets:
        index = index_tensor(rows, q.device)
        lengths = None if key_lengths is None else key_lengths[index]
        out.index_copy_(0, index, attend(key, q[index], k[index], v[index], lengths))
    return out


class JointMode:
    name = "joint"

    def __init__(self, num_frames: int, *, writing: str | None = None) -> None:
        self.num_frames = num_frames
        self.writing = writing  # character whose bank these frames write, if any
        if writing is not None:
            self.name = "write"

    def on_step(self) -> None:
        pass

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
        ref_idx = state.reference_indices(layer, image, q.device).repeat(groups, 1)
        pool_k = offered_keys(k, ref_idx, reposition)
        segments = None
        if state.bounded:  # bounded attention: each token's character (0: background or shared)
            segments = state.segments(state.batch_frames, image, q.shape[2], q.device).repeat(groups, 1)
        if ref_idx.shape[1] == 0:  # rate 0 at this level: nothing to borrow, exactly the host's attention
            out = plain_attention(q, k, v, key_lengths)
        else:
            rows = {**rows_kwarg(image, q.shape[2]), **lengths_kwarg(key_lengths)}
            if segments is not None:
                rows["segments"] = segments
            window = state.config.window
            # indices from the seeded sampler: no range check, so the step never syncs the host
            out = consistent_attention(
                q,
                k,
                v,
                ref_idx,
                groups=groups,
                window=window,
                pool_k=pool_k,
                check_indices=False,
                # a frame borrows from the others of its group: none in a one-frame batch
                precision=call_precision(state, q.shape[0] // groups - 1),
                **rows,
            )
        if self.writing is not None:
            # banked as offered: frames that read the bank see the keys this batch's frames saw
            bank_k, bank_v = bank_tokens(k, ref_idx, groups, pool_k), bank_tokens(v, ref_idx, groups)
            if segments is not None:  # the banked tokens' characters, for bounded reads
                banked = torch.gather(segments, 1, ref_idx).reshape(groups, -1)
                key = (self.writing, state.step, layer.level, image[1] - image[0])  # image tokens
                state.bank_segments[key] = banked[:1] if state.current_pass is not None else banked
            cfg_pass = state.current_pass
            if cfg_pass is None:
                state.bank.store(self.writing, state.step, layer.name, bank_k, bank_v)
            else:  # one group of two-pass CFG: the entry appears once every pass has banked its group
                state.bank.store_group(
                    self.writing,
                    state.step,
                    layer.name,
                    bank_k,
                    bank_v,
                    group=cfg_pass.group,
                    groups=cfg_pass.groups,
                )
        return out


class ReadMode:
    name = "read"

    def __init__(self, frame_characters: list[tuple[str, ...]]) -> None:
        self.num_frames = len(frame_characters)
        self.read_sets: dict[tuple[str, ...], list[int]] = {}  # characters -> frames of the batch
        for frame, chars in enumerate(frame_characters):
            self.read_sets.setdefault(tuple(chars), []).append(frame)

    def on_step(self) -> None:
        pass

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
        # reposition is not needed: reading frames offer nothing, and banked keys were re-positioned when
        # they were written
        frames = self.num_frames
        rows = rows_kwarg(image, q.shape[2])
        first, total = state.cfg_groups(groups)  # the bank groups this batch reads: [first, first + groups)

        def read(characters: tuple[str, ...], q_, k_, v_, lengths) -> torch.Tensor:
            bank = state.bank.get(characters, state.step, layer.name, q.device) if characters else None
            if bank is None:  # an [NC] frame, or the writer skipped this (step, layer)
                return plain_attention(q_, k_, v_, lengths)
            state.bank.prefetch(characters, *state.next_layer(layer), q.device)
            bank_k, bank_v = (t.to(q.dtype) for t in bank)
            if bank_k.shape[0] != total:
                raise RuntimeError(
                    f"bank of {characters} was written with {bank_k.shape[0]} CFG group(s), but this "
                    f"run has {total}: write and read with the same guidance setting"
                )
            if groups != total:  # one pass of two-pass CFG: its group of the bank
                bank_k, bank_v = bank_k[first : first + groups], bank_v[first : first + groups]
            no_refs = torch.empty(q_.shape[0], 0, dtype=torch.int64, device=q.device)
            bounded = {}
            if state.bounded:
                bounded = self.bounded_segments(state, layer, characters, image, q.shape[2], groups, q.device)
            return consistent_attention(
                q_,
                k_,
                v_,
                no_refs,
                groups=groups,
                bank_k=bank_k,
                bank_v=bank_v,
                check_indices=False,  # no sampled indices; key_lengths from the mask: nothing read back
                precision=call_precision(state, bank_k.shape[2]),  # a bank of 0 tokens at rate 0
                **rows,
                **bounded,
                **lengths_kwarg(lengths),
            )

        row_sets = [
            (chars, [g * frames + f for g in range(groups) for f in members])
            for chars, members in self.read_sets.items()
        ]
        return attend_rows(q, k, v, row_sets, read, key_lengths)

    def bounded_segments(self, state, layer, characters, image, tokens, groups, device) -> dict:
        """The op's ``segments`` for the rows reading ``characters`` (their frames' masks) and
        ``bank_segments`` for the banks they read (what the writers recorded)."""
        if state.batch_frames is None:
            raise RuntimeError(f"{layer.name}: bounded attention needs the read batch's story frames")
        members = self.read_sets[characters]
        frames = [state.batch_frames[f] for f in members]
        segments = state.segments(frames, image, tokens, device).repeat(groups, 1)
        parts = []
        for character in characters:
            # keyed by the image token count: a joint sequence's text length varies between batches
            banked = state.bank_segments.get((character, state.step, layer.level, image[1] - image[0]))
            if banked is None:
                raise RuntimeError(
                    f"bounded attention: the bank of {character!r} at step {state.step} was not written with "
                    "subject masks in this run (a loaded bank has no token segments)"
                )
            parts.append(banked[:1].expand(groups, -1))  # the same draws in every CFG group
        return {"segments": segments, "bank_segments": torch.cat(parts, dim=1).to(device)}
