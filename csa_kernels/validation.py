"""Argument checks for ``consistent_attention``: clear errors instead of crashes deep in a kernel."""

from __future__ import annotations

import importlib.util
import math

import torch

BACKENDS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DTYPES = (*TRITON_DTYPES, torch.float64)  # float64: torch path only (gradcheck, gold answers)
MAX_TRITON_HEAD_DIM = 256

# Triton is optional: it has wheels for Linux only, and CPU-only installs may lack it. Read once at import (a
# module constant, so torch.compile treats it as a constant); without it "auto" always takes the torch path.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
TRITON_MISSING = (
    "backend='triton' needs the triton package, which is not installed (Triton has wheels for Linux only: "
    "pip install triton, or a CUDA build of torch, which brings it); backend='auto' or 'torch' needs none"
)


def require_triton() -> None:
    """Raise ``ModuleNotFoundError`` (one line, naming the package) when Triton is not installed."""
    if not TRITON_INSTALLED:
        raise ModuleNotFoundError(TRITON_MISSING, name="triton")


def triton_supports(q: torch.Tensor) -> bool:
    head_dim = q.shape[-1]
    return q.dtype in TRITON_DTYPES and head_dim <= MAX_TRITON_HEAD_DIM and head_dim % 8 == 0


def values_readable(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values now is an eager read (not traced, not fake, not inside CUDA graph
    capture, where a sync would break the capture)."""
    from torch._subclasses.fake_tensor import is_fake

    if torch.compiler.is_compiling() or is_fake(t):
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ref_idx: torch.Tensor,
    groups: int,
    window: int | None,
    bank_k: torch.Tensor | None,
    bank_v: torch.Tensor | None,
    scale: float | None,
    backend: str,
    query_rows: tuple[int, int] | None = None,
    pool_k: torch.Tensor | None = None,
    check_indices: bool = True,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the bad argument and what was expected.

    ``check_indices``: also check that ``ref_idx`` values are token positions. That reads the data (a
    host-device sync on CUDA), so it runs only when the values can be read without one being recorded:
    never while tracing or compiling, on fake tensors or during CUDA graph capture."""
    for name, t in (("q", q), ("k", k), ("v", v), ("ref_idx", ref_idx)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D (B, H, N, D), got shape {tuple(q.shape)}")
    num_frames, num_heads, num_tokens, head_dim = q.shape
    if min(q.shape) < 1:
        raise ValueError(f"q must have B, H, N, D >= 1, got shape {tuple(q.shape)}")
    if q.dtype not in DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 (or float64 on the torch path), got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")

    if ref_idx.dtype != torch.int64:
        raise TypeError(f"ref_idx must be int64, got {ref_idx.dtype}")
    if ref_idx.dim() != 2 or ref_idx.shape[0] != num_frames:
        raise ValueError(f"ref_idx must have shape (B={num_frames}, S), got {tuple(ref_idx.shape)}")
    if ref_idx.device != q.device:
        raise ValueError(f"ref_idx must be on the device of q ({q.device}), got {ref_idx.device}")
    if check_indices and ref_idx.numel() and values_readable(ref_idx):
        lo, hi = int(ref_idx.min()), int(ref_idx.max())
        if lo < 0 or hi >= num_tokens:
            raise ValueError(
                f"ref_idx values must be token positions in [0, N={num_tokens}), got range [{lo}, {hi}]"
            )

    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    if num_frames % groups:
        raise ValueError(f"B % groups must be 0: B={num_frames} frames do not split into groups={groups}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or an int >= 1, got {window!r}")

    if (bank_k is None) != (bank_v is None):
        raise ValueError("bank_k and bank_v must be given together (or both None)")
    if bank_k is not None:
        for name, t in (("bank_k", bank_k), ("bank_v", bank_v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4 or t.shape[0] != groups or t.shape[1] != num_heads or t.shape[3] != head_dim:
                raise ValueError(
                    f"{name} must have shape (groups={groups}, H={num_heads}, M, D={head_dim}), "
                    f"got {tuple(t.shape)}"
                )
            if t.dtype != q.dtype:
                raise ValueError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
            if t.device != q.device:
                raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
        if bank_k.shape != bank_v.shape:
            raise ValueError(
                f"bank_v must have the shape of bank_k {tuple(bank_k.shape)}, got {tuple(bank_v.shape)}"
            )

    if scale is not None and (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise ValueError(f"scale must be None or a finite number > 0, got {scale!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_query_rows(query_rows, num_tokens)
    check_pool_k(pool_k, k, ref_idx)


def check_pool_k(pool_k: torch.Tensor | None, k: torch.Tensor, ref_idx: torch.Tensor) -> None:
    """None, or the (B, H, S, D) keys borrowed in place of k's rows at ref_idx: k's dtype and device."""
    if pool_k is None:
        return
    if not isinstance(pool_k, torch.Tensor):
        raise TypeError(f"pool_k must be None or a torch.Tensor, got {type(pool_k).__name__}")
    num_frames, num_heads, _, head_dim = k.shape
    expected = (num_frames, num_heads, ref_idx.shape[1], head_dim)
    if tuple(pool_k.shape) != expected:
        raise ValueError(
            f"pool_k must have shape (B, H, S, D) = {expected} (S = ref_idx.shape[1]), "
            f"got {tuple(pool_k.shape)}"
        )
    if pool_k.dtype != k.dtype:
        raise ValueError(f"pool_k must have the dtype of k ({k.dtype}), got {pool_k.dtype}")
    if pool_k.device != k.device:
        raise ValueError(f"pool_k must be on the device of k ({k.device}), got {pool_k.device}")


def check_query_rows(query_rows: tuple[int, int] | None, num_tokens: int) -> None:
    """None, or a pair (a, b) of ints with 0 <= a <= b <= N."""
    if query_rows is None:
        return
    if (
        not isinstance(query_rows, (tuple, list))
        or len(query_rows) != 2
        or any(isinstance(row, bool) or not isinstance(row, int) for row in query_rows)
    ):
        raise TypeError(f"query_rows must be None or a pair (a, b) of ints, got {query_rows!r}")
    start, stop = query_rows
    if not 0 <= start <= stop <= num_tokens:
        raise ValueError(
            f"query_rows (a, b) must have 0 <= a <= b <= N={num_tokens}, got {tuple(query_rows)}"
        )


def check_triton_inputs(q: torch.Tensor) -> None:
    """What backend='triton' adds to ``check_inputs`` (not checked when autograd sends it to torch)."""
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"backend='triton' supports float16, bfloat16 and float32, got {q.dtype}")
    if not triton_supports(q):
        raise ValueError(
            f"backend='triton' supports head dims D <= {MAX_TRITON_HEAD_DIM} with D % 8 == 0, "
            f"got D={q.shape[-1]}"
        )
    require_triton()
