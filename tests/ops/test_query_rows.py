"""``query_rows``: only some query rows of each frame borrow (joint text + image sequences of DiTs).

Triton (interpreter, NaN-poisoned outputs) and the torch path against the float64 reference, which
``test_semantics.py`` checks against an independent dense-mask oracle. What covers what (BLOCK_M = 64 by
default, 16 in the small-tile cases):

- text first, image rows at the end (FLUX): N=77, rows (13, 77): tile 0 straddles row 13, tile 1 borrows
  whole; text after the image (SD3): N=63, rows (0, 50): the one tile straddles row 50;
- small tiles: a range that starts and ends inside one tile (19, 27); one that straddles two tile
  boundaries (5, 40: straddling, whole, straddling, skipped tiles); a tile-aligned one ending at N (16, 50:
  skipped, whole tiles, and a last tile whose rows past N do not count); an empty one (30, 30: every tile
  skips the borrowed keys);
- groups 1 and 2, windows None, 1, 2, banks none, 5, 19, 40; fp32, fp16 and (fp32 dots, ARCHITECTURE.md §5)
  bf16;
- (0, N) is bit-identical to None on both paths; rows outside the range are plain attention over their own
  frame's keys (bit-exact on the kernel), rows inside differ from it.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import Case, assert_matches_reference, make_inputs

import csa_kernels.triton_kernel as tk
from csa_kernels import consistent_attention, consistent_attention_reference

ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SMALL = {"BLOCK_M": 16, "BLOCK_N": 16}
# (label, case, dtypes on the interpreter, interpreter tiles)
CASE_TABLE = [
    ("text-first", Case(3, 2, 77, 64, 20, bank=5, query_rows=(13, 77)), ALL_DTYPES, None),
    ("text-after", Case(4, 1, 63, 40, 20, groups=2, window=1, query_rows=(0, 50)), ALL_DTYPES, None),
    ("in-one-tile", Case(4, 1, 50, 16, 17, window=2, bank=19, query_rows=(19, 27)), ALL_DTYPES[:2], SMALL),
    ("across-tiles", Case(6, 1, 63, 40, 21, groups=2, bank=40, query_rows=(5, 40)), ALL_DTYPES[:2], SMALL),
    ("tile-aligned", Case(4, 1, 50, 16, 25, window=1, query_rows=(16, 50)), ALL_DTYPES[:2], SMALL),
    ("empty", Case(3, 1, 63, 40, 21, bank=3, query_rows=(30, 30)), ALL_DTYPES[:2], SMALL),
]
INTERPRETER_CASES = [
    pytest.param(case, dtype, tiles, id=f"{label}-{case.id}-{dtype}")
    for label, case, dtypes, tiles in CASE_TABLE
    for dtype in dtypes
]
TORCH_CASES = [pytest.param(case, id=f"{label}-{case.id}") for label, case, _, _ in CASE_TABLE]


@pytest.mark.parametrize(("case", "dtype", "tiles"), INTERPRETER_CASES)
def test_triton_matches_reference(case, dtype, tiles, poisoned_outputs, monkeypatch):
    if tiles is not None:
        monkeypatch.setattr(tk, "INTERPRETER_CONFIG", tiles)
    inputs = make_inputs(case, dtype, seed=1)
    out = consistent_attention(**inputs, backend="triton")
    assert_matches_reference(out, inputs)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", TORCH_CASES)
def test_torch_path_matches_reference(case, dtype):
    inputs = make_inputs(case, dtype, seed=1)
    out = consistent_attention(**inputs, backend="torch")
    assert_matches_reference(out, inputs)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_full_range_is_bit_identical_to_none(backend, poisoned_outputs, monkeypatch):
    monkeypatch.setattr(tk, "INTERPRETER_CONFIG", SMALL)
    inputs = make_inputs(Case(4, 1, 50, 16, 17, groups=2, window=1, bank=6), torch.float16)

    def run(**kwargs):
        if backend == "reference":
            return consistent_attention_reference(**inputs, **kwargs)
        return consistent_attention(**inputs, backend=backend, **kwargs)

    assert torch.equal(run(query_rows=(0, 50)), run())


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(
    ("case", "tiles"),
    [
        pytest.param(Case(4, 2, 77, 64, 20, groups=2, bank=5, query_rows=(13, 77)), None, id="text-first"),
        pytest.param(Case(3, 1, 63, 40, 21, window=1, bank=3, query_rows=(5, 40)), SMALL, id="across-tiles"),
    ],
)
def test_rows_outside_are_plain_attention(case, tiles, backend, poisoned_outputs, monkeypatch):
    """Rows outside the range see only their own frame's N keys; rows inside see borrowed keys too."""
    if tiles is not None:
        monkeypatch.setattr(tk, "INTERPRETER_CONFIG", tiles)
    inputs = make_inputs(case, torch.float32)
    start, stop = case.query_rows
    outside = torch.ones(case.tokens, dtype=torch.bool)
    outside[start:stop] = False
    out = consistent_attention(**inputs, backend=backend)
    plain = F.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"])
    torch.testing.assert_close(out[:, :, outside], plain[:, :, outside], rtol=1e-5, atol=2e-6)
    assert (out[:, :, ~outside] - plain[:, :, ~outside]).abs().amax(dim=(1, 2, 3)).min() > 1e-2
    if backend == "triton":
        # Bit-exact: a masked row's borrowed tiles leave its softmax state untouched, so it equals the
        # kernel's own run with nothing to borrow (no pool, no bank).
        nothing = torch.empty(case.frames, 0, dtype=torch.int64)
        alone = consistent_attention(inputs["q"], inputs["k"], inputs["v"], nothing, backend="triton")
        assert torch.equal(out[:, :, outside], alone[:, :, outside])


def test_gradients_match_reference():
    """Autograd takes the torch path (row blocks through SDPA, then concatenated) and agrees in float64."""
    inputs = make_inputs(Case(4, 1, 12, 8, 5, groups=2, window=1, bank=3, query_rows=(3, 9)), torch.float64)
    leaves = [inputs[key].requires_grad_(True) for key in ("q", "k", "v", "bank_k", "bank_v")]
    out = consistent_attention(**inputs, backend="auto")
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, leaves, grad)
    expected = torch.autograd.grad(consistent_attention_reference(**inputs, upcast=False), leaves, grad)
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
