"""``csa::consistent_attention``: the Triton forward as a typed torch.library custom op.

The fake implementation lets torch.compile(fullgraph=True) trace calls without a graph break. Only CUDA
tensors (or CPU tensors under TRITON_INTERPRET=1, in eager mode) reach it; see ``api.py``. The op is
registered on every install; without the triton package, running it raises a one-line error.
"""

from __future__ import annotations

from typing import Optional

import torch

from .pool import new_output
from .validation import require_triton


@torch.library.custom_op("csa::consistent_attention", mutates_args=())
def consistent_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ref_idx: torch.Tensor,
    groups: int,
    window: Optional[int],  # noqa: UP045 - torch.library's schema inference wants typing.Optional
    bank_k: Optional[torch.Tensor],  # noqa: UP045
    bank_v: Optional[torch.Tensor],  # noqa: UP045
    scale: float,
    query_row_start: Optional[int] = None,  # noqa: UP045
    query_row_end: Optional[int] = None,  # noqa: UP045
    pool_k: Optional[torch.Tensor] = None,  # noqa: UP045
    key_lengths: Optional[torch.Tensor] = None,  # noqa: UP045
    pool_rows_k: Optional[torch.Tensor] = None,  # noqa: UP045
    pool_rows_v: Optional[torch.Tensor] = None,  # noqa: UP045
    pool_ranges: Optional[torch.Tensor] = None,  # noqa: UP045
    segments: Optional[torch.Tensor] = None,  # noqa: UP045
    bank_segments: Optional[torch.Tensor] = None,  # noqa: UP045
    pool_segments: Optional[torch.Tensor] = None,  # noqa: UP045
    precision: str = "native",
) -> torch.Tensor:
    """``consistent_attention``'s arguments, positionally; ``query_rows=(a, b)`` travels as
    ``query_row_start=a, query_row_end=b`` (both None: every row borrows), ``pool=(keys, values)`` as
    ``pool_rows_k=keys, pool_rows_v=values``; with a pool, ``ref_idx`` is an empty (B, 0) tensor."""
    require_triton()  # a clear one-line error, not an ImportError from deep inside the kernel module
    # Imported here: Triton reads TRITON_INTERPRET when the kernel module is first imported.
    from .triton_kernel import triton_consistent_attention

    query_rows = None if query_row_start is None else (query_row_start, query_row_end)
    pool = None if pool_rows_k is None else (pool_rows_k, pool_rows_v)
    return triton_consistent_attention(
        q, k, v, ref_idx, groups, window, bank_k, bank_v, scale, query_rows, pool_k,
        key_lengths=key_lengths, pool=pool, pool_ranges=pool_ranges, segments=segments,
        bank_segments=bank_segments, pool_segments=pool_segments, precision=precision,
    )  # fmt: skip


@consistent_attention_op.register_fake
def _(q, *args, **kwargs):  # the output's shape and layout follow q alone
    return new_output(q)  # needs no Triton: torch.compile can trace calls on any install
