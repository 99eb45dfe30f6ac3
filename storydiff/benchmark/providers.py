"""Ways to compute one consistent-attention layer call, timed side by side by the op suite.

Official variants A and B (and flex, on variant A's mask rule) come from the one oracle,
``consistency/official.py``: given the same token selection they compute the same function as ours, the way
the official StoryDiffusion code does it.

Joint text + image inputs (``inputs["query_rows"] = (a, b)``, the DiT cases) go to the same functions with
the same row range: variant A's dense mask over all frames' joint tokens keeps text rows to their own frame,
variant B's per-frame loop masks text rows from the concatenated borrowed keys, and flex's ``mask_mod``
applies the same rule. The official code has no DiT support; these are its algorithm on joint sequences.

The 8-bit path (issue #25): ``ours_int8_torch`` / ``ours_int8_triton`` are our op with ``precision="int8"``
on either backend, judged by the accuracy contract rather than the 16-bit rounding bound (``INT8``). Its
speed anchors compute another function (``UNGATED``): dense attention over as many keys per query as the
consistent call, with torch SDPA's flash backend forced (``sdpa_flash``) and with the ``sageattention``
package's Triton INT8 kernel (``sageattention``), which is optional (``OPTIONAL``): without it, or where it
cannot run, its row says why.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from csa_kernels import attended_keys, consistent_attention, consistent_attention_reference
from csa_kernels.validation import TRITON_INSTALLED

from ..consistency.official import (
    borrowing_rows,
    keep_from_indices,
    official_a,
    official_a_mask,
    official_b,
    visible,
)


def _setup_official(name: str, inputs: dict) -> Callable[[], torch.Tensor]:
    """The oracle's op-level variants on our token selection, as the official keep mask.

    Built here, untimed: the keep mask (variant B draws one per layer call, an elementwise op next to its
    timed gather), variant A's dense mask and flex's block mask (the official code builds A's mask once
    per step and level, for all the level's layers).
    """
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    groups, bank_k, bank_v = inputs.get("groups", 1), inputs.get("bank_k"), inputs.get("bank_v")
    rows = inputs.get("query_rows")
    if inputs.get("window") is not None:
        raise NotImplementedError("the official code has no window")
    if inputs.get("segments") is not None:
        raise NotImplementedError("the official code has no segments (bounded attention)")
    keep = keep_from_indices(inputs["ref_idx"], q.shape[2], groups)
    if name == "official_b":
        return lambda: official_b(q, k, v, keep, groups=groups, bank_k=bank_k, bank_v=bank_v, query_rows=rows)
    if name == "flex":
        if bank_k is not None:
            raise NotImplementedError("the flex provider covers the official-A write mask (no bank)")
        return _setup_flex(q, k, v, keep, groups, rows)
    bank_keep = None if bank_k is None else torch.ones(bank_k.shape[2], dtype=torch.bool, device=q.device)
    mask = official_a_mask(keep, bank_keep=bank_keep, query_rows=rows)
    return lambda: official_a(q, k, v, mask, groups=groups, bank_k=bank_k, bank_v=bank_v)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _setup_flex(
    q, k, v, keep: torch.Tensor, groups: int, query_rows: tuple[int, int] | None = None
) -> Callable[[], torch.Tensor]:
    """FlexAttention over each CFG half's merged sequence, the official-A mask rule as its ``mask_mod``.

    Its block mask skips work only per 128 x 128 tile, so token sampling saves almost nothing here.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch, heads, tokens, dim = q.shape
    frames = batch // groups
    kept = (keep if keep.ndim == 3 else keep.expand(groups, -1, -1)).reshape(groups, -1).contiguous()
    rows = borrowing_rows(tokens, query_rows, q.device)

    def mask_mod(b, h, q_idx, kv_idx):
        borrows = None if rows is None else rows[q_idx % tokens]
        return visible(q_idx // tokens, kv_idx // tokens, kept[b, kv_idx], query_borrows=borrows)

    length = frames * tokens
    block_mask = create_block_mask(mask_mod, groups, None, length, length, device=q.device)

    def merge(x):  # [B, H, N, D] -> [G, H, F·N, D]
        return x.reshape(groups, frames, heads, tokens, dim).transpose(1, 2).flatten(2, 3)

    def run() -> torch.Tensor:
        if q.is_cuda:
            out = _compiled_flex()(merge(q), merge(k), merge(v), block_mask=block_mask)
        else:  # eager flex materializes the scores (and warns so): fine at CPU sizes
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                out = flex_attention(merge(q), merge(k), merge(v), block_mask=block_mask)
        return out.reshape(groups, heads, frames, tokens, dim).transpose(1, 2).flatten(0, 1)

    return run


def query_key_pairs(
    frames: int,
    tokens: int,
    refs: int,
    *,
    groups: int = 1,
    window: int | None = None,
    bank_tokens: int = 0,
    query_rows: tuple[int, int] | None = None,
) -> int:
    """(query, key) pairs of one head, summed over frames: every row sees its frame's own N keys, and the
    rows in ``query_rows`` (all by default) the borrowed ones too (other frames' refs and the bank)."""
    start, stop = query_rows or (0, tokens)
    keys = attended_keys(frames, tokens, refs, groups=groups, window=window, bank_tokens=bank_tokens)
    return frames * tokens * tokens + (stop - start) * (keys - frames * tokens)


def _dense_keys(inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Random dense K/V with as many (query, key) pairs as the consistent call (own + visible refs + bank,
    the borrowed keys for the ``query_rows`` only), rounded up to whole keys per frame."""
    q, ref_idx = inputs["q"], inputs["ref_idx"]
    frames, heads, tokens, dim = q.shape
    pairs = query_key_pairs(
        frames,
        tokens,
        ref_idx.shape[1],
        groups=inputs.get("groups", 1),
        bank_tokens=0 if inputs.get("bank_k") is None else inputs["bank_k"].shape[2],
        query_rows=inputs.get("query_rows"),
    )
    length = -(-pairs // (frames * tokens))
    return torch.randn(2, frames, heads, length, dim, dtype=q.dtype, device=q.device).unbind(0)


def _setup_sdpa_flash(inputs: dict) -> Callable[[], torch.Tensor]:
    """Dense SDPA of the same key length with the flash backend forced (the issue's 16-bit anchor), not
    whatever backend SDPA would pick: raises NotImplementedError where flash cannot take the inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = inputs["q"]
    if q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16):
        raise NotImplementedError(f"SDPA's flash backend takes float16 / bfloat16 on CUDA, not {q.dtype}")
    k, v = _dense_keys(inputs)

    def run() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def sageattention_kernel() -> Callable[..., torch.Tensor]:
    """The ``sageattention`` package's Triton kernel: ``sageattn_qk_int8_pv_fp16_triton`` in 2.x (whose
    ``sageattn`` dispatches to CUDA kernels by GPU), ``sageattn`` in 1.x (Triton only). Raises whatever
    importing the package raises."""
    import sageattention

    return getattr(sageattention, "sageattn_qk_int8_pv_fp16_triton", None) or sageattention.sageattn


def _setup_sageattention(inputs: dict) -> Callable[[], torch.Tensor]:
    """SageAttention on dense q/k/v of the same key length (a speed anchor: the same dense shape as
    ``sdpa_flash``), K smoothed by its mean as the package does by default."""
    q = inputs["q"]
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in (64, 128):
        raise NotImplementedError(
            f"sageattention's Triton kernel takes fp16/bf16 at hd64/hd128, not {q.dtype} hd{q.shape[-1]}"
        )
    kernel = sageattention_kernel()
    k, v = _dense_keys(inputs)

    def run() -> torch.Tensor:
        return kernel(q, k, v, tensor_layout="HND", is_causal=False)

    try:  # a third-party wheel built for another torch / Triton fails in its own ways: a row, not a crash
        run()
    except Exception as exc:  # any failure of the optional package becomes the row's reason
        raise NotImplementedError(f"sageattention failed: {type(exc).__name__}: {exc}") from exc
    return run


def setup_provider(name: str, inputs: dict) -> Callable[[], torch.Tensor]:
    """A zero-argument callable computing the layer with provider ``name``; setup work is not timed."""
    if name == "sdpa_dense":  # speed of light: plain SDPA over dense keys of the same length
        k, v = _dense_keys(inputs)
        return lambda: F.scaled_dot_product_attention(inputs["q"], k, v)
    if name == "sdpa_flash":
        return _setup_sdpa_flash(inputs)
    if name == "sageattention":
        return _setup_sageattention(inputs)
    if name in ("official_a", "official_b", "flex"):
        return _setup_official(name, inputs)
    fn = {
        "reference": consistent_attention_reference,
        # timed as the library calls it: indices from the seeded sampler, no range check (no host sync)
        "ours_torch": functools.partial(consistent_attention, backend="torch", check_indices=False),
        "ours_triton": functools.partial(consistent_attention, backend="triton", check_indices=False),
        "ours_int8_torch": functools.partial(
            consistent_attention, backend="torch", check_indices=False, precision="int8"
        ),
        "ours_int8_triton": functools.partial(
            consistent_attention, backend="triton", check_indices=False, precision="int8"
        ),
    }[name]
    return lambda: fn(**inputs)


PROVIDERS = (
    "reference",
    "official_a",
    "official_b",
    "flex",
    "sdpa_dense",
    "ours_torch",
    "ours_triton",
    "ours_int8_torch",
    "ours_int8_triton",
    "sdpa_flash",
    "sageattention",
)
# compute another function (dense attention over keys of the same length): timed as anchors, never compared
UNGATED = {"sdpa_dense", "sdpa_flash", "sageattention"}
# the 8-bit path: held to its accuracy contract (op_suite.INT8_CONTRACT), not to the 16-bit rounding bound
INT8 = {"ours_int8_torch", "ours_int8_triton"}
# optional third-party providers: when one cannot run, its rows say why (n/a) and the suite goes on
OPTIONAL = {"sageattention"}
# the sizes (``storydiff bench --size``) whose cases the 8-bit path's providers are timed on
INT8_SIZES = ("int8", "cpu-int8")


def unavailable(name: str, device: torch.device) -> str | None:
    """Why provider ``name`` cannot run on ``device`` (None: it can)."""
    import os

    if name in ("ours_triton", "ours_int8_triton"):
        if not TRITON_INSTALLED:
            return "needs Triton, which is not installed"
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return "needs a CUDA device (or TRITON_INTERPRET=1 to interpret the kernel on the CPU)"
        # the int8 kernel's integer MMAs (IMMA) exist from Ampere on; the API refuses older GPUs too
        if (
            name == "ours_int8_triton"
            and device.type == "cuda"
            and torch.cuda.get_device_capability(device) < (8, 0)
        ):
            return "needs an sm_80 or newer GPU (integer tensor-core MMA)"
    if name == "sageattention":
        try:  # checked before the device, so a CPU run still says whether the package is there
            sageattention_kernel()
        except Exception as exc:  # ImportError, or a wheel built for another torch / CUDA failing
            return (
                f"the sageattention package does not import ({type(exc).__name__}: {exc}); put its wheel in "
                "benchmarks/wheels/ for gpu_session.sh, or pip install sageattention"
            )
        if device.type != "cuda":
            return "needs a CUDA device (its kernel is Triton-compiled for GPUs)"
    return None


def default_providers(device: torch.device, size: str = "cpu") -> list[str]:
    """The providers ``storydiff bench`` runs by default at ``size`` on ``device``: the 8-bit sizes
    (``INT8_SIZES``) time our 16-bit and 8-bit op beside the dense anchors; the others compare our op with
    the official variants."""
    if size in INT8_SIZES:
        path = "triton" if device.type == "cuda" and TRITON_INSTALLED else "torch"
        names = [f"ours_{path}", f"ours_int8_{path}", "sdpa_flash", "sageattention"]
        return names if device.type == "cuda" else ["reference", *names]
    names = ["official_a", "official_b", "flex", "sdpa_dense", "ours_torch"]
    if device.type == "cuda":
        if TRITON_INSTALLED:  # optional (Linux wheels only): without it, "ours" is the torch path alone
            names.append("ours_triton")
        # flex compiles once per shape (~40 compiles would dominate the full suite; the DiT cases are few but
        # large, and the session's time is short), and torch.compile needs Triton to generate CUDA kernels
        if size in ("full", "dit") or not TRITON_INSTALLED:
            names.remove("flex")
    else:
        names.insert(0, "reference")  # cheap enough at CPU sizes, and slow to time on a GPU
    return names
