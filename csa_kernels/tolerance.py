"""The one correctness rule, shared by the tests and the benchmarks' gate: tolerance is earned, not picked.

Gold is :func:`consistent_attention_reference` in float64. PyTorch's own error is the same reference
computed in the dtype under test. An output passes when its largest error against gold is at most twice
PyTorch's own plus a few ulps (``ATOL``), because a fused kernel sums in another order than the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import consistent_attention_reference

ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}
# The reference holds one frame's scores and their softmax at a time: H x N x keys each. At SDXL 1024²
# (10 heads, 4096 queries, 10240 keys) that is 3.4 GB per copy in float64, so gold is computed in query
# chunks of about this many bytes (consistent attention is independent per query row).
CHUNK_BYTES = 2**28


def _reference_in(inputs: dict, dtype: torch.dtype) -> torch.Tensor:
    """The reference with all math in ``dtype``, over query chunks that bound its score matrices."""

    def cast(val):
        if isinstance(val, (tuple, list)):  # pool=(keys, values)
            return type(val)(cast(item) for item in val)
        return val.to(dtype) if isinstance(val, torch.Tensor) and val.is_floating_point() else val

    args = {key: cast(val) for key, val in inputs.items()}
    q, ref_idx, pool = args["q"], args.get("ref_idx"), args.get("pool")
    frames, heads, tokens, _ = q.shape
    per_group = frames // args.get("groups", 1)
    bank = 0 if args.get("bank_k") is None else args["bank_k"].shape[2]
    # the most any frame attends to (a pool: both ranges may span it)
    borrowed = 2 * pool[0].shape[0] if pool is not None else ref_idx.shape[1] * (per_group - 1)
    keys = tokens + borrowed + bank
    rows = max(1, CHUNK_BYTES // (2 * heads * keys * q.element_size()))
    query_rows = args.get("query_rows")

    def chunk(start: int) -> dict:  # q rows [start, stop), query_rows renumbered from the chunk's start
        stop = min(start + rows, tokens)
        chunk_args = {**args, "q": q[:, :, start:stop]}
        if query_rows is not None:
            chunk_args["query_rows"] = tuple(min(max(row - start, 0), stop - start) for row in query_rows)
        if args.get("segments") is not None:  # the chunk's rows' segments; keys keep all N
            chunk_args["query_segments"] = args["segments"][:, start:stop]
        return chunk_args

    chunks = [
        consistent_attention_reference(**chunk(start), upcast=False) for start in range(0, tokens, rows)
    ]
    return torch.cat(chunks, dim=2)


@dataclass(frozen=True)
class ErrorBound:
    """Gold answer and allowed error for one set of ``consistent_attention`` inputs."""

    gold: torch.Tensor  # float64, (B, H, N, D)
    torch_error: float  # max |reference in the inputs' dtype - gold|
    atol: float

    @property
    def bound(self) -> float:
        return 2 * self.torch_error + self.atol

    def error(self, out: torch.Tensor) -> float:
        """Max |out - gold| (NaN when ``out`` has a NaN)."""
        diff = (out.double() - self.gold).abs()
        return float("nan") if diff.isnan().any() else diff.max().item()

    def check(self, out: torch.Tensor) -> float:
        """Return ``out``'s max error; raise ``AssertionError`` when it is above the bound or NaN."""
        err = self.error(out)
        if not err <= self.bound:
            raise AssertionError(
                f"max error {err:.3g} > 2 x PyTorch's own {self.torch_error:.3g} + atol {self.atol:.1g}"
            )
        return err


def reference_error_bound(inputs: dict) -> ErrorBound:
    """The rule for ``inputs`` (keyword arguments of ``consistent_attention_reference``: q, k, v, ref_idx,
    and optionally groups, window, bank_k, bank_v, scale, query_rows, pool_k, key_lengths, pool,
    pool_ranges, segments, bank_segments, pool_segments): gold in float64, and PyTorch's own error in the
    dtype of ``q``. Compute it once and check every implementation's output against it."""
    dtype = inputs["q"].dtype
    if dtype not in ATOL:
        raise ValueError(f"inputs['q'] has dtype {dtype}; the rule knows {list(ATOL)}")
    gold = _reference_in(inputs, torch.float64)
    torch_error = (_reference_in(inputs, dtype).double() - gold).abs().max().item()
    return ErrorBound(gold=gold, torch_error=torch_error, atol=ATOL[dtype])
