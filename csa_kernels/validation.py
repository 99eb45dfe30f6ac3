"""Argument checks for ``consistent_attention``: clear errors instead of crashes deep in a kernel."""

from __future__ import annotations

import importlib.util
import math

import torch

from .quantize import PRECISIONS

BACKENDS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DTYPES = (*TRITON_DTYPES, torch.float64)  # float64: torch path only (gradcheck, gold answers)
INDEX_DTYPES = (torch.int32, torch.int64)  # key_lengths, pool_ranges, segment ids
MAX_TRITON_HEAD_DIM = 256
MAX_SEGMENT_ID = 2**31 - 1  # segment ids reach the kernels as int32

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
    key_lengths: torch.Tensor | None = None,
    pool: tuple[torch.Tensor, torch.Tensor] | None = None,
    pool_ranges: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
    bank_segments: torch.Tensor | None = None,
    pool_segments: torch.Tensor | None = None,
    check_indices: bool = True,
    precision: str = "native",
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the bad argument and what was expected.

    ``check_indices``: also check the values of the index tensors: ``ref_idx`` are token positions below
    their frame's ``key_lengths``, ``key_lengths`` lie in [1, N], ``pool_ranges`` lie in the pool. That
    reads the data (a host-device sync on CUDA), so it runs only when the values can be read without one
    being recorded: never while tracing or compiling, on fake tensors or during CUDA graph capture.

    ``ref_idx`` may be None only with ``pool`` (the caller's pool replaces the sampled tokens)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ref_idx is None and pool is None:
        raise TypeError("ref_idx must be a torch.Tensor, got None (None is only allowed with pool=...)")
    if ref_idx is not None and not isinstance(ref_idx, torch.Tensor):
        raise TypeError(f"ref_idx must be a torch.Tensor, got {type(ref_idx).__name__}")
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

    if ref_idx is not None:
        check_ref_idx(ref_idx, q, check_indices)

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
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    check_query_rows(query_rows, num_tokens)
    check_key_lengths(key_lengths, q, ref_idx, check_indices)
    if pool is None and pool_ranges is None:
        check_pool_k(pool_k, k, ref_idx)
    else:
        check_pool(pool, pool_ranges, k, ref_idx, window, pool_k, check_indices)
    check_segments(segments, bank_segments, pool_segments, q, groups, bank_k, pool, check_indices)


def check_ref_idx(ref_idx: torch.Tensor, q: torch.Tensor, check_indices: bool) -> None:
    """(B, S) int64 on q's device; with ``check_indices``, values in [0, N)."""
    num_frames, num_tokens = q.shape[0], q.shape[2]
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


def _check_index_tensor(name: str, t: object, shape: tuple[int, ...], shape_text: str, q: torch.Tensor):
    """An int32 or int64 tensor of ``shape`` on q's device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be None or a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape_text}, got {tuple(t.shape)}")
    if t.device != q.device:
        raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")


def check_key_lengths(
    key_lengths: torch.Tensor | None, q: torch.Tensor, ref_idx: torch.Tensor | None, check_indices: bool
) -> None:
    """None, or (B,) int32/int64 on q's device; with ``check_indices``, values in [1, N] and every ``ref_idx``
    row below its frame's length (a sampled padding row would lend a key no query of its frame sees)."""
    if key_lengths is None:
        return
    num_frames, num_tokens = q.shape[0], q.shape[2]
    _check_index_tensor("key_lengths", key_lengths, (num_frames,), f"(B={num_frames},)", q)
    if not (check_indices and values_readable(key_lengths)):
        return
    lo, hi = int(key_lengths.min()), int(key_lengths.max())
    if lo < 1 or hi > num_tokens:
        raise ValueError(
            f"key_lengths values must lie in [1, N={num_tokens}] (every frame keeps at least one own key), "
            f"got range [{lo}, {hi}]"
        )
    if ref_idx is not None and ref_idx.numel() and values_readable(ref_idx):
        past = ref_idx >= key_lengths[:, None].to(ref_idx.dtype)
        if bool(past.any()):
            frame, col = (int(i) for i in past.nonzero()[0])
            raise ValueError(
                f"ref_idx values must be own keys of their frame (ref_idx[b] < key_lengths[b]): "
                f"ref_idx[{frame}, {col}] = {int(ref_idx[frame, col])} >= key_lengths[{frame}] = "
                f"{int(key_lengths[frame])}"
            )


def check_pool(
    pool: tuple[torch.Tensor, torch.Tensor] | None,
    pool_ranges: torch.Tensor | None,
    k: torch.Tensor,
    ref_idx: torch.Tensor | None,
    window: int | None,
    pool_k: torch.Tensor | None,
    check_indices: bool,
) -> None:
    """An explicit pool: ``pool=(keys, values)``, each (R, H, D) with k's dtype and device, given with
    ``pool_ranges`` (B, 4) int32/int64 on k's device; ``ref_idx`` None or (B, 0), no ``pool_k``, no
    ``window``. With ``check_indices``, every range satisfies 0 <= start <= end <= R."""
    if pool is None or pool_ranges is None:
        raise ValueError("pool and pool_ranges must be given together (or both None)")
    if (
        not isinstance(pool, (tuple, list))
        or len(pool) != 2
        or not all(isinstance(t, torch.Tensor) for t in pool)
    ):
        raise TypeError(f"pool must be None or a pair (keys, values) of tensors, got {type(pool).__name__}")
    num_frames, num_heads, _, head_dim = k.shape
    keys, values = pool
    for name, t in (("pool[0] (keys)", keys), ("pool[1] (values)", values)):
        if t.dim() != 3 or t.shape[1] != num_heads or t.shape[2] != head_dim:
            raise ValueError(
                f"{name} must have shape (R, H={num_heads}, D={head_dim}) (R pool rows), got {tuple(t.shape)}"
            )
        if t.dtype != k.dtype:
            raise ValueError(f"{name} must have the dtype of k ({k.dtype}), got {t.dtype}")
        if t.device != k.device:
            raise ValueError(f"{name} must be on the device of k ({k.device}), got {t.device}")
    if keys.shape != values.shape:
        raise ValueError(
            f"pool[1] (values) must have the shape of pool[0] (keys) {tuple(keys.shape)}, "
            f"got {tuple(values.shape)}"
        )
    _check_index_tensor("pool_ranges", pool_ranges, (num_frames, 4), f"(B={num_frames}, 4)", k)
    if ref_idx is not None and ref_idx.shape[1] != 0:
        raise ValueError(
            f"ref_idx must be None or empty (B, 0) when pool is given (the pool replaces the sampled "
            f"tokens), got shape {tuple(ref_idx.shape)}"
        )
    if pool_k is not None:
        raise ValueError("pool_k must be None when pool is given (pool[0] holds the borrowed keys)")
    if window is not None:
        raise ValueError(
            f"window must be None when pool_ranges is given (the ranges say which pool rows each frame "
            f"sees), got {window!r}"
        )
    if check_indices and pool_ranges.numel() and values_readable(pool_ranges):
        num_rows = keys.shape[0]
        starts, ends = pool_ranges[:, 0::2], pool_ranges[:, 1::2]
        bad = (starts < 0) | (starts > ends) | (ends > num_rows)
        if bool(bad.any()):
            frame = int(bad.any(dim=1).nonzero()[0, 0])
            raise ValueError(
                f"pool_ranges rows [before_start, before_end, after_start, after_end] must have "
                f"0 <= start <= end <= R={num_rows} (pool rows), got {pool_ranges[frame].tolist()} "
                f"for frame {frame}"
            )


def check_segments(
    segments: torch.Tensor | None,
    bank_segments: torch.Tensor | None,
    pool_segments: torch.Tensor | None,
    q: torch.Tensor,
    groups: int,
    bank_k: torch.Tensor | None,
    pool: tuple[torch.Tensor, torch.Tensor] | None,
    check_indices: bool,
) -> None:
    """Segment ids, each None or int32/int64 on q's device: ``segments`` (B, N), ``bank_segments``
    (groups, M) only with a bank, ``pool_segments`` (R,) only with a pool; with ``check_indices``, ids in
    [0, 2**31) (the kernels read int32; with ``check_indices=False`` larger int64 ids wrap there)."""
    num_frames, _, num_tokens, _ = q.shape
    if segments is not None:
        _check_index_tensor(
            "segments", segments, (num_frames, num_tokens), f"(B={num_frames}, N={num_tokens})", q
        )
    if bank_segments is not None:
        if bank_k is None:
            raise ValueError("bank_segments must be None without a bank (bank_k, bank_v): it has no tokens")
        bank = bank_k.shape[2]
        _check_index_tensor("bank_segments", bank_segments, (groups, bank), f"(groups={groups}, M={bank})", q)
    if pool_segments is not None:
        if pool is None:
            raise ValueError("pool_segments must be None without pool=(keys, values): it has no rows")
        rows = pool[0].shape[0]
        _check_index_tensor("pool_segments", pool_segments, (rows,), f"(R={rows},) (pool rows)", q)
    if not check_indices:
        return
    for name, t in (
        ("segments", segments),
        ("bank_segments", bank_segments),
        ("pool_segments", pool_segments),
    ):
        if t is not None and t.numel() and values_readable(t):
            lowest, highest = int(t.min()), int(t.max())
            if lowest < 0 or highest > MAX_SEGMENT_ID:
                raise ValueError(
                    f"{name} must be segment ids in [0, {MAX_SEGMENT_ID}] (0: shared; the kernels read "
                    f"int32), got range [{lowest}, {highest}]"
                )


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


#: the Triton kernels' int8 Q·Kᵀ is integer MMA: compute capability 8.0 (Ampere) and newer
INT8_MIN_CAPABILITY = (8, 0)


def int8_device_problem(device: torch.device | str) -> str | None:
    """Why the Triton kernels cannot run ``precision="int8"`` on ``device`` (a CUDA GPU older than compute
    capability 8.0: no integer MMA), as "needs ...; <device> is <major>.<minor>"; None where they can
    (CPU tensors: the interpreter)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    capability = tuple(torch.cuda.get_device_capability(device))
    if capability >= INT8_MIN_CAPABILITY:
        return None
    need, has = ("{}.{}".format(*c) for c in (INT8_MIN_CAPABILITY, capability))
    return f"needs a GPU of compute capability {need}+ (integer MMA); {device} is {has}"


def check_int8_device(device: torch.device) -> None:
    """ValueError (one line) if the Triton kernels cannot run ``precision="int8"`` on ``device``."""
    problem = int8_device_problem(device)
    if problem is not None:
        raise ValueError(
            f"precision='int8' on the Triton path {problem}: use precision='native', or backend='torch'"
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
