"""The one tolerance rule (csa_kernels.reference_error_bound) used by the tests and the op suite's gate."""

import pytest
import torch
from helpers import Case, as_float64, make_inputs

import csa_kernels.tolerance as tolerance
from csa_kernels import consistent_attention, consistent_attention_reference, reference_error_bound


@pytest.mark.parametrize("query_rows", [None, (5, 30)], ids=["all-rows", "query-rows"])
def test_gold_in_query_chunks_equals_the_whole_reference(monkeypatch, query_rows):
    """Chunks of a few rows: query_rows is renumbered per chunk (chunks before, across and after it)."""
    inputs = make_inputs(Case(4, 2, 37, 16, 9, groups=2, bank=5, query_rows=query_rows), torch.float16)
    whole = consistent_attention_reference(**as_float64(inputs), upcast=False)
    monkeypatch.setattr(tolerance, "CHUNK_BYTES", 10_000)  # a few query rows per chunk
    chunked = reference_error_bound(inputs)
    torch.testing.assert_close(chunked.gold, whole, rtol=0, atol=1e-13)
    pytorch = consistent_attention_reference(**inputs, upcast=False).double()
    assert chunked.torch_error == pytest.approx((pytorch - whole).abs().max().item(), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_rule_is_twice_pytorchs_own_error_plus_atol(dtype):
    inputs = make_inputs(Case(4, 1, 40, 16, 10, groups=2), dtype)
    bound = reference_error_bound(inputs)
    assert bound.bound == 2 * bound.torch_error + tolerance.ATOL[dtype]
    out = consistent_attention(**inputs, backend="torch")
    assert bound.check(out) == bound.error(out) <= bound.bound
    off = out.clone()
    off[1, 0, 3, 2] += 3 * bound.bound
    with pytest.raises(AssertionError, match=r"max error .* > 2 x PyTorch's own"):
        bound.check(off)
    off[1, 0, 3, 2] = float("nan")
    with pytest.raises(AssertionError, match="max error nan"):
        bound.check(off)


def test_unknown_dtype_is_a_clear_error():
    inputs = make_inputs(Case(2, 1, 8, 8, 2), torch.float32)
    inputs["q"] = inputs["q"].to(torch.int32)
    with pytest.raises(ValueError, match=r"inputs\['q'\] has dtype torch.int32"):
        reference_error_bound(inputs)
