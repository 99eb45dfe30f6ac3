"""Memory-efficient PyTorch path: the CPU fallback and the path that supports autograd.

All key/value rows a frame may attend to live in one row table per tensor: every frame's own tokens,
then the reference pool (pool.py), then the banks. A frame's key set is a list of row numbers into that
table: its own N rows, the pool rows of the visible frames before and after it, and its group's bank.
Frames whose key sets have the same length (all of them without a window) are gathered together and go
through ``scaled_dot_product_attention`` in one batched call. Extra memory is the gathered key sets,
about (1 + visible frames · S/N) times K and V; never a (B·N)² mask.

With ``query_rows=(a, b)`` only query rows [a, b) take that path; the rows before a and after b need
nothing but their own frame's keys, so they go through one plain SDPA call each on (B, H, N, D) K and V
as they are (no gather, no mask), and the three row blocks are concatenated.

``key_lengths`` (frame b's own keys are rows [0, key_lengths[b])) becomes a (frames, 1, 1, keys) boolean
mask over the own columns, built on the device (no value is read on the host); the padding rows are
zeroed first (one masked copy of K and V), so whatever they hold never reaches the output.

An explicit ``pool`` with ``pool_ranges``: ranges on the CPU are read (no sync to pay) and every frame's key
set is its own rows, its two pool ranges and its bank, gathered compactly and batched by length as above —
the same key sets, in the same order, as the concatenation. Ranges on a device only that device knows, so
there every frame gets the same key set, [own N | all R pool rows | its bank M], under a (B, 1, 1,
N + R + M) additive mask: -inf outside the frame's two ranges, 0 inside one, log 2 inside both (a row in
both ranges counts twice, as in the concatenation). Extra memory is B·(N + R + M) rows of K and V, with rows
outside a frame's ranges zeroed in its copy.

Segment ids (``segments``, ``bank_segments``, ``pool_segments``) give every row of the table an id (own rows
0: always shown) and every query row one; both forms then mask per (query row, key) — a (frames, 1, N', keys)
boolean mask, or the additive mask widened to (B, 1, N', N + R + M) — built on the device from the ids (no
value read on the host). All-zero ids leave the masks all true (all zero): the same result bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .pool import gather_reference_pool, index_tensor, to_device_async, visible_frame_range
from .quantize import dequantize, quantize_inputs


def _key_rows(
    frame: int,
    num_frames: int,
    num_tokens: int,
    num_refs: int,
    groups: int,
    window: int | None,
    num_bank: int,
) -> list[range]:
    """Row ranges of ``frame``'s key set in the table [own tokens (B·N) | pool (B·S) | banks (G·M)]."""
    lo, hi = visible_frame_range(frame, num_frames, groups, window)
    pool, bank = num_frames * num_tokens, num_frames * (num_tokens + num_refs)
    group = frame // (num_frames // groups)
    return [
        range(frame * num_tokens, (frame + 1) * num_tokens),
        range(pool + lo * num_refs, pool + frame * num_refs),
        range(pool + (frame + 1) * num_refs, pool + hi * num_refs),
        range(bank + group * num_bank, bank + (group + 1) * num_bank),
    ]


def own_key_mask(key_lengths: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, N) bool: key n of frame b is an own key (n < key_lengths[b]). Computed on the device."""
    return torch.arange(num_tokens, device=key_lengths.device) < key_lengths[:, None]


def consistent_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ref_idx: torch.Tensor | None,
    *,
    groups: int = 1,
    window: int | None = None,
    bank_k: torch.Tensor | None = None,
    bank_v: torch.Tensor | None = None,
    scale: float | None = None,
    query_rows: tuple[int, int] | None = None,
    pool_k: torch.Tensor | None = None,
    key_lengths: torch.Tensor | None = None,
    pool: tuple[torch.Tensor, torch.Tensor] | None = None,
    pool_ranges: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
    bank_segments: torch.Tensor | None = None,
    pool_segments: torch.Tensor | None = None,
) -> torch.Tensor:
    num_tokens = q.shape[2]
    own_k, own_v, own_mask = k, v, None
    seg = _Segments.of(q, ref_idx, groups, bank_k, pool, segments, bank_segments, pool_segments)
    if key_lengths is not None:
        valid = own_key_mask(key_lengths, num_tokens)  # [B, N]
        own_k, own_v = (torch.where(valid[:, None, :, None], x, 0) for x in (k, v))  # padding zeroed
        own_mask = valid[:, None, None, :]  # [B, 1, 1, N]

    def borrowing(rows: torch.Tensor, first: int = 0) -> torch.Tensor:
        row_seg = None if seg is None else seg.for_rows(first, first + rows.shape[2])
        if pool_ranges is not None and _host_known(pool_ranges):
            return _host_range_attention(
                rows, k, own_k, own_v, pool, pool_ranges, groups, bank_k, bank_v, scale, key_lengths, row_seg
            )
        if pool_ranges is not None:
            return _pool_range_attention(
                rows, own_k, own_v, pool, pool_ranges, groups, bank_k, bank_v, scale, own_mask, row_seg
            )
        return _borrowing_attention(
            rows, k, v, ref_idx, groups, window, bank_k, bank_v, scale, pool_k, own_k, own_v, key_lengths,
            row_seg,
        )  # fmt: skip

    def plain(rows: torch.Tensor) -> torch.Tensor:  # own keys only
        return F.scaled_dot_product_attention(rows, own_k, own_v, attn_mask=own_mask, scale=scale)

    if query_rows is None or tuple(query_rows) == (0, num_tokens):
        return borrowing(q)
    start, stop = query_rows
    if start == stop:  # no row borrows: plain attention
        return plain(q)
    parts = [borrowing(q[:, :, start:stop], start)]
    if start > 0:
        parts.insert(0, plain(q[:, :, :start]))
    if stop < num_tokens:
        parts.append(plain(q[:, :, stop:]))
    return torch.cat(parts, dim=2)


def _borrowing_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ref_idx: torch.Tensor,
    groups: int,
    window: int | None,
    bank_k: torch.Tensor | None,
    bank_v: torch.Tensor | None,
    scale: float | None,
    pool_k: torch.Tensor | None,
    own_k: torch.Tensor,
    own_v: torch.Tensor,
    key_lengths: torch.Tensor | None,
    segments: _RowSegments | None = None,
) -> torch.Tensor:
    """Every row of q (B, H, N', D) attends to its frame's own N keys, pool segments and bank.
    ``pool_k`` (B, H, S, D), when given, is the key pool instead of k's rows at ``ref_idx``. The own rows
    come from ``own_k`` / ``own_v`` (k and v with padding zeroed), masked past ``key_lengths``; the pool
    is gathered from ``k`` and ``v``."""
    num_frames, _, num_tokens, _ = k.shape
    num_refs = ref_idx.shape[1]
    num_bank = 0 if bank_k is None else bank_k.shape[2]

    def row_table(x: torch.Tensor, own: torch.Tensor, bank: torch.Tensor | None, pool: torch.Tensor | None):
        pool = gather_reference_pool(x, ref_idx) if pool is None else pool.transpose(1, 2)  # [B, S, H, D]
        return _row_table(own, pool.flatten(0, 1), bank)

    table_k, table_v = row_table(k, own_k, bank_k, pool_k), row_table(v, own_v, bank_v, None)
    key_rows = [
        torch.cat([torch.arange(part.start, part.stop) for part in parts])
        for parts in (
            _key_rows(i, num_frames, num_tokens, num_refs, groups, window, num_bank)
            for i in range(num_frames)
        )
    ]
    return _key_set_attention(q, table_k, table_v, key_rows, num_tokens, key_lengths, scale, segments)


def _key_set_attention(
    q: torch.Tensor,
    table_k: torch.Tensor,
    table_v: torch.Tensor,
    key_rows: list[torch.Tensor],
    num_tokens: int,
    key_lengths: torch.Tensor | None,
    scale: float | None,
    segments: _RowSegments | None = None,
) -> torch.Tensor:
    """Frame i's rows of q attend to rows ``key_rows[i]`` of the (rows, H, D) tables, whose first
    ``num_tokens`` are its own keys (masked past ``key_lengths``); frames with key sets of one length go
    through one batched SDPA call. ``segments``: the query rows' segment ids and the table rows' (the same
    row numbers); a borrowed column is masked for the rows whose segment it does not show to."""
    key_sets: dict[int, list[tuple[int, torch.Tensor]]] = {}  # key-set length -> [(frame, rows)]
    for i, rows in enumerate(key_rows):
        key_sets.setdefault(len(rows), []).append((i, rows))

    out = q.new_empty(q.shape) if len(key_sets) > 1 else None
    for batch in key_sets.values():
        frames = [i for i, _ in batch]
        # indices copied to the device pinned and non-blocking: no host sync (a list index would be one)
        index = index_tensor(frames, q.device)
        rows = to_device_async(torch.stack([r for _, r in batch]), q.device)  # [F', L]
        keys = table_k[rows].transpose(1, 2)  # [F', H, L, D]
        values = table_v[rows].transpose(1, 2)
        mask = None
        columns = torch.arange(rows.shape[1], device=q.device)
        if key_lengths is not None:  # the own keys are the first N columns of every key set
            lengths = key_lengths if out is None else key_lengths[index]
            mask = ((columns >= num_tokens) | (columns < lengths[:, None]))[:, None, None, :]
        if segments is not None:  # [F', 1, N', L]: own columns always, borrowed ones by segment
            shown = segments.shown(segments.table[rows], index if out is not None else None)
            shown = shown | (columns < num_tokens)[None, None, :]
            mask = shown[:, None] if mask is None else mask & shown[:, None]
        result = F.scaled_dot_product_attention(q[index], keys, values, attn_mask=mask, scale=scale)
        if out is None:
            return result
        out = out.index_copy(0, index, result)
    return out


def _host_known(ranges: torch.Tensor) -> bool:
    """Whether reading ``ranges`` costs nothing: CPU values, not being traced."""
    tracing = torch.compiler.is_compiling() or isinstance(ranges, torch._subclasses.FakeTensor)
    return ranges.device.type == "cpu" and not tracing


def _host_range_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    own_k: torch.Tensor,
    own_v: torch.Tensor,
    pool: tuple[torch.Tensor, torch.Tensor],
    pool_ranges: torch.Tensor,
    groups: int,
    bank_k: torch.Tensor | None,
    bank_v: torch.Tensor | None,
    scale: float | None,
    key_lengths: torch.Tensor | None,
    segments: _RowSegments | None = None,
) -> torch.Tensor:
    """Pool ranges known on the host: the compact key sets [own N | two pool ranges | bank M] of each frame,
    rows of the table [own tokens (B·N) | pool (R) | banks (G·M)], clamped to the pool as the kernels do."""
    num_frames, _, num_tokens, _ = k.shape
    num_rows, num_bank = pool[0].shape[0], 0 if bank_k is None else bank_k.shape[2]
    pool_start, bank_start = num_frames * num_tokens, num_frames * num_tokens + num_rows

    key_rows = []
    for frame, (b0, b1, a0, a1) in enumerate(pool_ranges.tolist()):
        group = frame // (num_frames // groups)
        parts = [range(frame * num_tokens, (frame + 1) * num_tokens)]
        for start, end in ((b0, b1), (a0, a1)):
            start, end = min(max(start, 0), num_rows), min(max(end, 0), num_rows)
            parts.append(range(pool_start + start, pool_start + max(start, end)))
        parts.append(range(bank_start + group * num_bank, bank_start + (group + 1) * num_bank))
        key_rows.append(torch.cat([torch.arange(part.start, part.stop) for part in parts]))
    table_k, table_v = _row_table(own_k, pool[0], bank_k), _row_table(own_v, pool[1], bank_v)
    return _key_set_attention(q, table_k, table_v, key_rows, num_tokens, key_lengths, scale, segments)


def _row_table(own: torch.Tensor, pool_rows: torch.Tensor, bank: torch.Tensor | None) -> torch.Tensor:
    """The (rows, H, D) table [own tokens (B·N) | pool rows | banks (G·M)] key sets index into."""
    heads, head_dim = own.shape[1], own.shape[3]
    parts = [own.transpose(1, 2).reshape(-1, heads, head_dim), pool_rows]
    if bank is not None:
        parts.append(bank.transpose(1, 2).reshape(-1, heads, head_dim))
    return torch.cat(parts)


def _pool_range_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pool: tuple[torch.Tensor, torch.Tensor],
    pool_ranges: torch.Tensor,
    groups: int,
    bank_k: torch.Tensor | None,
    bank_v: torch.Tensor | None,
    scale: float | None,
    own_mask: torch.Tensor | None,
    segments: _RowSegments | None = None,
) -> torch.Tensor:
    """Every row of q (B, H, N', D) attends to its frame's own keys (k, v: padding already zeroed, masked by
    ``own_mask`` (B, 1, 1, N) when given), the pool rows of its two ranges, and its group's bank."""
    num_frames, _, num_tokens, _ = k.shape
    num_rows = pool[0].shape[0]
    rows = torch.arange(num_rows, device=q.device)
    starts, ends = pool_ranges[:, 0::2], pool_ranges[:, 1::2]  # [B, 2]
    inside = (rows[None, None, :] >= starts[..., None]) & (rows[None, None, :] < ends[..., None])  # [B, 2, R]
    count = inside.sum(dim=1)  # [B, R]: 0, 1 or 2 ranges hold the row
    # log(count): -inf outside both ranges, 0 in one, log 2 in both (the row's weight doubles)
    pool_bias = torch.where(count > 0, count.to(q.dtype).clamp(min=1).log(), float("-inf"))
    own_bias = torch.zeros(num_frames, num_tokens, dtype=q.dtype, device=q.device)
    if own_mask is not None:
        own_bias = own_bias.masked_fill(~own_mask[:, 0, 0], float("-inf"))
    biases = [own_bias, pool_bias]
    group_of = torch.arange(num_frames, device=q.device) // (num_frames // groups)

    def key_set(x: torch.Tensor, rows_x: torch.Tensor, bank: torch.Tensor | None) -> torch.Tensor:
        borrowed = rows_x.transpose(0, 1)[None]  # [1, H, R, D]
        # each frame's copy holds only the rows of its ranges: the others never reach the output
        parts = [x, torch.where(count[:, None, :, None] > 0, borrowed, 0)]  # [B, H, N | R, D]
        if bank is not None:
            parts.append(bank[group_of])  # [B, H, M, D]
        return torch.cat(parts, dim=2)

    keys, values = key_set(k, pool[0], bank_k), key_set(v, pool[1], bank_v)
    if bank_k is not None:
        biases.append(torch.zeros(num_frames, bank_k.shape[2], dtype=q.dtype, device=q.device))
    bias = torch.cat(biases, dim=1)[:, None, None, :]  # [B, 1, 1, N + R + M]
    if segments is not None:  # [B, 1, N', N + R + M]: borrowed columns hidden by segment
        table = segments.table[num_frames * num_tokens :]  # [R + G·M]: the pool's, then the banks'
        bank = torch.zeros(0, dtype=torch.int64, device=q.device)
        if bank_k is not None:
            bank_rows = group_of[:, None] * bank_k.shape[2] + torch.arange(bank_k.shape[2], device=q.device)
            bank = table[num_rows:][bank_rows]  # [B, M]
        borrowed = torch.cat([table[:num_rows].expand(num_frames, -1), bank.reshape(num_frames, -1)], dim=1)
        shown = segments.shown(borrowed)  # [B, N', R + M]
        hidden = torch.cat([torch.zeros_like(shown[..., :num_tokens]), ~shown], dim=2)
        bias = bias.masked_fill(hidden[:, None], float("-inf"))
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=scale)


class _RowSegments:
    """Segment ids of a call's query rows (``rows``: (B, N')) and of its row table (``table``: one id per
    row of [own tokens (B·N) | pool rows | banks (G·M)], own rows 0: own keys are always shown)."""

    def __init__(self, rows: torch.Tensor, table: torch.Tensor):
        self.rows, self.table = rows, table

    def shown(self, key_segments: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        """(F', N', L) bool: key l (segment ids (F', L)) is shown to row r: its segment is 0 or r's."""
        rows = self.rows if frames is None else self.rows[frames]
        keys = key_segments[:, None, :]
        return (keys == 0) | (keys == rows[:, :, None])


class _Segments:
    """A call's segment ids as int64 on q's device, missing parts as zeros: every token's (B, N), and the
    row table's (see _RowSegments)."""

    def __init__(self, tokens: torch.Tensor, table: torch.Tensor):
        self.tokens, self.table = tokens, table

    @classmethod
    def of(cls, q, ref_idx, groups, bank_k, pool, segments, bank_segments, pool_segments) -> _Segments | None:
        if segments is None and bank_segments is None and pool_segments is None:
            return None
        num_frames, _, num_tokens, _ = q.shape

        def ids(t: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
            if t is None:
                return torch.zeros(shape, dtype=torch.int64, device=q.device)
            return t.to(torch.int64)

        tokens = ids(segments, (num_frames, num_tokens))
        if pool is not None:
            pooled = ids(pool_segments, (pool[0].shape[0],))
        else:  # the gathered pool: frame j's sampled tokens at rows j·S .. j·S + S - 1
            pooled = tokens.gather(1, ref_idx).flatten()
        parts = [torch.zeros(num_frames * num_tokens, dtype=torch.int64, device=q.device), pooled]
        if bank_k is not None:
            parts.append(ids(bank_segments, (groups, bank_k.shape[2])).flatten())
        return cls(tokens, torch.cat(parts))

    def for_rows(self, start: int, stop: int) -> _RowSegments:
        return _RowSegments(self.tokens[:, start:stop], self.table)


def int8_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ref_idx: torch.Tensor | None,
    bank_k: torch.Tensor | None,
    bank_v: torch.Tensor | None,
    pool_k: torch.Tensor | None,
    pool: tuple[torch.Tensor, torch.Tensor] | None,
    **options,
) -> torch.Tensor:
    """``precision="int8"`` on the torch path, the 8-bit path's reference implementation: the pre-pass of
    ``quantize.py`` (per-row int8 codes and scales, keys smoothed by the call's key mean), its rows
    dequantized in float32, then :func:`consistent_attention_torch` in float32 (values too) — scores equal
    to the int32 products times the scales up to float32 summation order. Output in q's dtype."""
    quantized = quantize_inputs(
        q,
        k,
        key_lengths=options.get("key_lengths"),
        pool_k=pool_k,
        bank_k=bank_k,
        pool_keys=None if pool is None else pool[0],
    )

    def rows(pair):
        return None if pair is None else dequantize(*pair)

    def wide(t):
        return None if t is None else t.to(torch.float32)

    explicit = None if pool is None else (rows(quantized.pool_keys), wide(pool[1]))
    out = consistent_attention_torch(
        rows(quantized.q),
        rows(quantized.k),
        wide(v),
        ref_idx,
        bank_k=rows(quantized.bank_k),
        bank_v=wide(bank_v),
        pool_k=rows(quantized.pool_k),
        pool=explicit,
        **options,
    )
    return out.to(q.dtype)
