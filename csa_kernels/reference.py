"""Plain PyTorch ground truth for consistent attention.

Everything else (the Triton kernel, the memory-efficient torch path, benchmarks, the diffusers
processors' tests) is checked against :func:`consistent_attention_reference`. It builds, for every
frame, the explicit concatenation of its own keys, the sampled keys of the frames it may see and the
bank, then does one softmax over that set. It is slow and memory hungry on purpose: it is obviously
right.
"""

from __future__ import annotations

import torch


def visible_frames(frame: int, num_frames: int, groups: int, window: int | None) -> list[int]:
    """Frames whose reference tokens ``frame`` attends to (never ``frame`` itself).

    ``num_frames`` splits into ``groups`` contiguous groups; a frame sees only frames of its own group,
    and with a ``window`` only those at story distance ``1 <= |i - j| <= window``.
    """
    per_group = num_frames // groups
    start = (frame // per_group) * per_group
    return [
        j
        for j in range(start, start + per_group)
        if j != frame and (window is None or abs(j - frame) <= window)
    ]


def attended_keys(
    num_frames: int,
    num_tokens: int,
    num_refs: int,
    *,
    groups: int = 1,
    window: int | None = None,
    bank_tokens: int = 0,
) -> int:
    """Total number of keys attended, summed over frames (for FLOP counts: 4·H·N·D per key)."""
    return sum(
        num_tokens + num_refs * len(visible_frames(i, num_frames, groups, window)) + bank_tokens
        for i in range(num_frames)
    )


def consistent_attention_reference(
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
    query_segments: torch.Tensor | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Consistent attention by explicit per-frame concatenation (see ``consistent_attention``).

    ``query_rows=(a, b)``: only query rows a <= r < b (rows of ``q``) attend to the borrowed keys (pool
    and bank); the scores of every other row over them are -inf, so those rows get plain softmax attention
    over their frame's own keys. None: every row borrows.

    ``pool_k``: (B, H, S, D) keys frame j offers in place of ``k[j][:, ref_idx[j]]`` (e.g. re-positioned
    for RoPE); the values offered are still ``v[j][:, ref_idx[j]]``.

    ``key_lengths``: (B,) — frame i's own keys are only its rows [0, key_lengths[i]); the rest is padding
    that no query of frame i attends to. Borrowed keys are unaffected.

    ``pool=(keys, values)``, each (R, H, D), with ``pool_ranges`` (B, 4): frame i borrows pool rows
    [before_start, before_end) then [after_start, after_end) of its row ``pool_ranges[i]`` (a row in both
    ranges is attended twice: it is concatenated twice), in place of the sampled tokens of its visible
    frames (``ref_idx`` is None or (B, 0), ``window`` None; ``groups`` then only picks the bank).

    ``segments`` (B, N): the segment id of every token of every frame (0: shared / background, c > 0: a
    character), ``bank_segments`` (groups, M) and ``pool_segments`` (R,) those of the bank and pool rows;
    None is all zeros. A borrowed key (sampled, pool or bank) of segment t is seen by a query row of segment
    c only when t == 0 or t == c; a frame's own keys are seen by all its rows. The borrowed tokens' segments
    are their source tokens' (``segments[j, ref_idx[j]]``). ``query_segments`` (B, N'): the segments of q's
    rows when q is a slice of the frames' rows (tolerance.py's query chunks); default ``segments``.

    With ``upcast=True`` (the default) all math is fp32; ``upcast=False`` does the same math in the
    inputs' dtype, which measures PyTorch's own low-precision error for test tolerances.
    Returns (B, H, N', D) (N' = q's rows) in the dtype of ``q``.
    """
    num_frames, _, num_queries, head_dim = q.shape
    num_tokens = k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    cast = (lambda t: t.float()) if upcast else (lambda t: t)
    qc, kc, vc = cast(q), cast(k), cast(v)
    per_group = num_frames // groups
    lengths = [num_tokens] * num_frames if key_lengths is None else [int(n) for n in key_lengths]
    if query_segments is None:
        query_segments = segments
    with_segments = any(t is not None for t in (segments, bank_segments, pool_segments))

    def ids(t: torch.Tensor | None, count: int) -> torch.Tensor:  # segment ids as int64, None: zeros
        return torch.zeros(count, dtype=torch.int64) if t is None else t.cpu().to(torch.int64)

    outs = []
    for i in range(num_frames):
        own = lengths[i]
        keys, values = [kc[i][:, :own]], [vc[i][:, :own]]
        borrowed = []  # segment ids of the borrowed keys, in their order
        if pool_ranges is not None:
            before_start, before_end, after_start, after_end = (int(r) for r in pool_ranges[i])
            for start, end in ((before_start, before_end), (after_start, after_end)):
                keys.append(cast(pool[0][start:end]).transpose(0, 1))  # [R', H, D] -> [H, R', D]
                values.append(cast(pool[1][start:end]).transpose(0, 1))
                borrowed.append(ids(pool_segments, pool[0].shape[0])[start:end])
        else:
            for j in visible_frames(i, num_frames, groups, window):
                keys.append(kc[j][:, ref_idx[j]] if pool_k is None else cast(pool_k[j]))
                values.append(vc[j][:, ref_idx[j]])
                borrowed.append(ids(None if segments is None else segments[j], num_tokens)[ref_idx[j].cpu()])
        if bank_k is not None:
            keys.append(cast(bank_k[i // per_group]))
            values.append(cast(bank_v[i // per_group]))
            bank = None if bank_segments is None else bank_segments[i // per_group]
            borrowed.append(ids(bank, bank_k.shape[2]))
        key, value = torch.cat(keys, dim=1), torch.cat(values, dim=1)  # [H, L, D]
        logits = (qc[i] @ key.transpose(-1, -2)) * scale  # [H, N', L]
        if query_rows is not None:
            rows = torch.arange(num_queries, device=q.device)
            own_only = (rows < query_rows[0]) | (rows >= query_rows[1])
            logits[:, own_only, own:] = float("-inf")
        if with_segments:  # a borrowed key of segment t is hidden from rows of segment c unless t in (0, c)
            t = torch.cat([torch.zeros(0, dtype=torch.int64), *borrowed])[None, :]
            c = ids(None if query_segments is None else query_segments[i], num_queries)[:, None]
            hidden = ((t != 0) & (t != c)).to(q.device)  # [N', L - own]
            logits[:, :, own:] = logits[:, :, own:].masked_fill(hidden, float("-inf"))
        outs.append(logits.softmax(dim=-1) @ value)
    return torch.stack(outs).to(q.dtype)
