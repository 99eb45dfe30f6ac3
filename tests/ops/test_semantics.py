"""What consistent attention means, checked independently of the reference's own formulation."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import Case, assert_matches_reference, make_inputs

from csa_kernels import (
    attended_keys,
    consistent_attention,
    consistent_attention_reference,
    sample_reference_indices,
)
from csa_kernels.pool import visible_frame_range
from csa_kernels.reference import visible_frames
from storydiff.benchmark.op_suite import OpCase, case_flops, headline_cases
from storydiff.consistency.official import keep_from_indices, official_a, official_a_mask

BACKENDS = ["triton", "torch"]


def dense_mask_oracle(q, k, v, ref_idx, groups, window, bank_k=None, bank_v=None, query_rows=None):
    """Official variant A (consistency/official.py): one SDPA per CFG half under a dense boolean mask, fp64.

    Uses the three extensions of the oracle's mask that the official code lacks but the reference has: a
    story window, bank columns that every frame of the half sees, and query rows (token positions) outside
    ``query_rows`` that see only their own frame's columns.
    """
    keep = keep_from_indices(ref_idx, q.shape[2], groups)
    bank_keep = None if bank_k is None else torch.ones(bank_k.shape[2], dtype=torch.bool)
    mask = official_a_mask(keep, window=window, bank_keep=bank_keep)
    if query_rows is not None:
        frames, tokens = q.shape[0] // groups, q.shape[2]
        frame_of = torch.arange(frames * tokens) // tokens  # query rows and the frames' key columns
        column_frame = torch.full((mask.shape[-1],), -1)  # bank columns belong to no frame
        column_frame[: frames * tokens] = frame_of
        token_of = torch.arange(frames * tokens) % tokens
        borrows = (token_of >= query_rows[0]) & (token_of < query_rows[1])
        mask = mask & (borrows[:, None] | (frame_of[:, None] == column_frame[None, :]))
    bank = {} if bank_k is None else {"bank_k": bank_k.double(), "bank_v": bank_v.double()}
    return official_a(q.double(), k.double(), v.double(), mask, groups=groups, **bank)


@pytest.mark.parametrize(
    "case",
    [Case(4, 2, 20, 8, 7), Case(6, 1, 13, 16, 5, groups=2, window=1, bank=3), Case(5, 1, 9, 8, 9, window=2)],
    ids=lambda c: c.id,
)
def test_reference_equals_dense_mask_oracle(case):
    inputs = make_inputs(case, torch.float64)
    ours = consistent_attention_reference(**inputs, upcast=False)  # float64 math
    torch.testing.assert_close(ours, dense_mask_oracle(**inputs), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "case",
    [
        Case(4, 2, 20, 8, 7, query_rows=(5, 20)),  # text first (FLUX)
        Case(6, 1, 13, 16, 5, groups=2, window=1, bank=3, query_rows=(0, 9)),  # text after (SD3)
        Case(5, 1, 9, 8, 9, window=2, bank=2, query_rows=(3, 6)),
        Case(4, 1, 9, 8, 4, bank=2, query_rows=(4, 4)),  # no row borrows
    ],
    ids=lambda c: c.id,
)
def test_reference_with_query_rows_equals_dense_mask_oracle(case):
    inputs = make_inputs(case, torch.float64)
    ours = consistent_attention_reference(**inputs, upcast=False)
    torch.testing.assert_close(ours, dense_mask_oracle(**inputs), rtol=1e-10, atol=1e-10)
    # and the range matters: the same call without it differs
    assert not torch.allclose(
        ours, consistent_attention_reference(**{**inputs, "query_rows": None}, upcast=False)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_references_is_plain_attention(backend):
    """S = 0, no bank, window None: every frame attends to itself only."""
    inputs = make_inputs(Case(3, 2, 70, 64, 0), torch.float32)
    out = consistent_attention(**inputs, backend=backend)
    plain = F.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"])
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=2e-6)


def test_visible_frame_range_matches_reference_rule():
    for frames in range(1, 9):
        for groups in (g for g in range(1, frames + 1) if frames % g == 0):
            for window in (None, 1, 2, 3, 10):
                for i in range(frames):
                    lo, hi = visible_frame_range(i, frames, groups, window)
                    assert [j for j in range(lo, hi) if j != i] == visible_frames(i, frames, groups, window)


def test_attended_keys_counts():
    # SDXL 1/16 level, 4 frames x CFG, rate 0.5: 4096 · (1 + 0.5 · 3) = 10240 keys per frame
    # (ARCHITECTURE.md §4).
    assert attended_keys(8, 4096, 2048, groups=2) == 8 * 10240
    assert attended_keys(4, 10, 3, window=1, bank_tokens=2) == 4 * 12 + 3 * 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_diffusers_layout_and_output_strides(backend):
    """Projections come as (B, N, H·D) viewed as (B, H, N, D): non-contiguous inputs must work."""
    frames, tokens, heads, dim = 4, 37, 2, 40
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(frames, tokens, heads * dim, generator=gen) for _ in range(3))
    view = lambda x: x.view(frames, tokens, heads, dim).transpose(1, 2)  # noqa: E731
    idx = sample_reference_indices(frames, tokens, 0.5, generator=gen)
    inputs = {"q": view(q), "k": view(k), "v": view(v), "ref_idx": idx, "groups": 2}
    out = consistent_attention(**inputs, backend=backend)
    assert_matches_reference(out, inputs)
    expected = consistent_attention_reference(
        **{key: (t.contiguous() if key in "qkv" else t) for key, t in inputs.items()}
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=2e-6)
    if backend == "triton":  # written in q's own layout, so diffusers' transpose back is free
        assert out.stride() == inputs["q"].stride()


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_fp16_stay_finite(backend):
    inputs = make_inputs(Case(4, 1, 65, 64, 30, groups=2, bank=5), torch.float16, std=6.0)
    out = consistent_attention(**inputs, backend=backend)
    assert torch.isfinite(out).all()
    # logits reach ~ ±36²·8 = 10^4 · 0.125: far outside fp16's exp range without max subtraction
    assert_matches_reference(out, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_runs_bit_identical(backend):
    inputs = make_inputs(Case(4, 2, 63, 40, 20, groups=2, window=1, bank=3), torch.float16)
    first = consistent_attention(**inputs, backend=backend)
    second = consistent_attention(**inputs, backend=backend)
    assert torch.equal(first, second)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_scale(backend):
    inputs = make_inputs(Case(3, 1, 30, 16, 10, bank=4), torch.float32)
    out = consistent_attention(**inputs, scale=0.37, backend=backend)
    expected = consistent_attention_reference(**inputs, scale=0.37)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=2e-6)


def test_autograd_uses_torch_path_and_matches_reference_gradients():
    inputs = make_inputs(Case(4, 1, 12, 8, 5, groups=2, window=1, bank=3), torch.float64)
    for key in ("q", "k", "v", "bank_k", "bank_v"):
        inputs[key].requires_grad_(True)
    out = consistent_attention(**inputs, backend="triton")  # requires grad: falls back to the torch path
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, [inputs[key] for key in ("q", "k", "v", "bank_k")], grad)
    expected_out = consistent_attention_reference(**inputs, upcast=False)
    expected = torch.autograd.grad(expected_out, [inputs[key] for key in ("q", "k", "v", "bank_k")], grad)
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_flop_count_example():
    """The op suite's FLOP count at the SDXL 1024² 1/16 level, 4 frames x CFG, rate 0.5: ≈ 860 GFLOP per
    layer call (ARCHITECTURE.md §4)."""
    case = OpCase("sdxl1024-1/16-f4-r0.5", frames=4, heads=10, tokens=4096, head_dim=64, rate=0.5)
    assert case in headline_cases()
    assert math.isclose(case_flops(case) / 1e9, 859.0, rel_tol=1e-3)
