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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .pool import gather_reference_pool, visible_frame_range


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


def consistent_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ref_idx: torch.Tensor,
    *,
    groups: int = 1,
    window: int | None = None,
    bank_k: torch.Tensor | None = None,
    bank_v: torch.Tensor | None = None,
    scale: float | None = None,
    query_rows: tuple[int, int] | None = None,
    pool_k: torch.Tensor | None = None,
) -> torch.Tensor:
    num_tokens = q.shape[2]
    borrowed = (ref_idx, groups, window, bank_k, bank_v, scale, pool_k)
    if query_rows is None or tuple(query_rows) == (0, num_tokens):
        return _borrowing_attention(q, k, v, *borrowed)
    start, stop = query_rows
    if start == stop:  # no row borrows: plain attention
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    parts = [_borrowing_attention(q[:, :, start:stop], k, v, *borrowed)]
    if start > 0:
        parts.insert(0, F.scaled_dot_product_attention(q[:, :, :start], k, v, scale=scale))
    if stop < num_tokens:
        parts.append(F.scaled_dot_product_attention(q[:, :, stop:], k, v, scale=scale))
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
) -> torch.Tensor:
    """Every row of q (B, H, N', D) attends to its frame's own N keys, pool segments and bank.
    ``pool_k`` (B, H, S, D), when given, is the key pool instead of k's rows at ``ref_idx``."""
    num_frames, num_heads, num_tokens, head_dim = k.shape
    num_refs = ref_idx.shape[1]
    num_bank = 0 if bank_k is None else bank_k.shape[2]

    def row_table(x: torch.Tensor, bank: torch.Tensor | None, pool: torch.Tensor | None) -> torch.Tensor:
        pool = gather_reference_pool(x, ref_idx) if pool is None else pool.transpose(1, 2)  # [B, S, H, D]
        parts = [x.transpose(1, 2).reshape(-1, num_heads, head_dim), pool.flatten(0, 1)]  # [rows, H, D]
        if bank is not None:
            parts.append(bank.transpose(1, 2).reshape(-1, num_heads, head_dim))
        return torch.cat(parts)

    table_k, table_v = row_table(k, bank_k, pool_k), row_table(v, bank_v, None)
    key_sets: dict[int, list[tuple[int, torch.Tensor]]] = {}  # key-set length -> [(frame, rows)]
    for i in range(num_frames):
        parts = _key_rows(i, num_frames, num_tokens, num_refs, groups, window, num_bank)
        rows = torch.cat([torch.arange(part.start, part.stop) for part in parts])
        key_sets.setdefault(len(rows), []).append((i, rows))

    out = q.new_empty(q.shape) if len(key_sets) > 1 else None
    for batch in key_sets.values():
        frames = [i for i, _ in batch]
        rows = torch.stack([r for _, r in batch]).to(q.device)  # [F', L]
        keys = table_k[rows].transpose(1, 2)  # [F', H, L, D]
        values = table_v[rows].transpose(1, 2)
        result = F.scaled_dot_product_attention(q[frames], keys, values, scale=scale)
        if out is None:
            return result
        out = out.index_copy(0, torch.tensor(frames, device=q.device), result)
    return out
