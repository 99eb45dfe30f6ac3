"""Every bad input named in the contract raises the documented error, naming the argument."""

import pytest
import torch
from helpers import Case, make_inputs

from csa_kernels import consistent_attention


def good():
    return make_inputs(Case(4, 2, 16, 8, 4, groups=2, bank=3), torch.float32)


def replace(**changes):
    inputs = good()
    inputs.update(changes)
    return inputs


BAD = {
    "q-not-tensor": (lambda: replace(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    "q-3d": (lambda: replace(q=torch.zeros(4, 16, 8)), ValueError, "q must be 4-D"),
    "q-int": (lambda: replace(q=torch.zeros(4, 2, 16, 8, dtype=torch.int32)), TypeError, "q must be float16"),
    "k-shape": (lambda: replace(k=torch.zeros(4, 2, 17, 8)), ValueError, "k must have the shape of q"),
    "v-shape": (lambda: replace(v=torch.zeros(4, 2, 16, 16)), ValueError, "v must have the shape of q"),
    "k-dtype": (
        lambda: replace(k=torch.zeros(4, 2, 16, 8, dtype=torch.float16)),
        ValueError,
        "k must have the dtype",
    ),
    "v-device": (
        lambda: replace(v=torch.zeros(4, 2, 16, 8, device="meta")),
        ValueError,
        "v must be on the device",
    ),
    "ref-dtype": (
        lambda: replace(ref_idx=torch.zeros(4, 4, dtype=torch.int32)),
        TypeError,
        "ref_idx must be int64",
    ),
    "ref-shape": (
        lambda: replace(ref_idx=torch.zeros(3, 4, dtype=torch.int64)),
        ValueError,
        r"ref_idx must have shape \(B=4",
    ),
    "ref-1d": (
        lambda: replace(ref_idx=torch.zeros(4, dtype=torch.int64)),
        ValueError,
        "ref_idx must have shape",
    ),
    "ref-high": (
        lambda: replace(ref_idx=torch.full((4, 4), 16)),
        ValueError,
        r"ref_idx values must be .* \[0, N=16\)",
    ),
    "ref-negative": (lambda: replace(ref_idx=torch.full((4, 4), -1)), ValueError, "ref_idx values"),
    "ref-device": (
        lambda: replace(ref_idx=torch.zeros(4, 4, dtype=torch.int64, device="meta")),
        ValueError,
        "ref_idx must be on",
    ),
    "groups-split": (lambda: replace(groups=3, bank_k=None, bank_v=None), ValueError, "B % groups"),
    "groups-zero": (lambda: replace(groups=0), ValueError, "groups must be an int >= 1"),
    "window-zero": (lambda: replace(window=0), ValueError, "window must be None or an int >= 1"),
    "window-float": (lambda: replace(window=1.5), ValueError, "window"),
    "bank-alone": (lambda: replace(bank_v=None), ValueError, "bank_k and bank_v must be given together"),
    "bank-groups": (
        lambda: replace(bank_k=torch.zeros(1, 2, 3, 8), bank_v=torch.zeros(1, 2, 3, 8)),
        ValueError,
        r"bank_k must have shape \(groups=2",
    ),
    "bank-3d": (
        lambda: replace(bank_k=torch.zeros(2, 3, 8), bank_v=torch.zeros(2, 3, 8)),
        ValueError,
        "bank_k must have shape",
    ),
    "bank-mismatch": (
        lambda: replace(bank_v=torch.zeros(2, 2, 5, 8)),
        ValueError,
        "bank_v must have the shape of bank_k",
    ),
    "bank-dtype": (
        lambda: replace(bank_v=torch.zeros(2, 2, 3, 8, dtype=torch.float16)),
        ValueError,
        "bank_v must have the dtype",
    ),
    "scale-negative": (lambda: replace(scale=-1.0), ValueError, "scale must be"),
    "backend-unknown": (lambda: replace(backend="cuda"), ValueError, "backend must be one of"),
    "rows-int": (lambda: replace(query_rows=3), TypeError, r"query_rows must be None or a pair \(a, b\)"),
    "rows-triple": (lambda: replace(query_rows=(0, 4, 8)), TypeError, "query_rows must be None or a pair"),
    "rows-str": (lambda: replace(query_rows="ab"), TypeError, "query_rows must be None or a pair"),
    "rows-float": (lambda: replace(query_rows=(0.0, 8)), TypeError, "query_rows must be None or a pair"),
    "rows-bool": (lambda: replace(query_rows=(False, 8)), TypeError, "query_rows must be None or a pair"),
    "rows-tensor": (lambda: replace(query_rows=torch.tensor([0, 8])), TypeError, "query_rows"),
    "rows-reversed": (lambda: replace(query_rows=(9, 3)), ValueError, r"query_rows .* 0 <= a <= b <= N=16"),
    "rows-past-n": (lambda: replace(query_rows=(3, 17)), ValueError, r"query_rows .* got \(3, 17\)"),
    "rows-negative": (lambda: replace(query_rows=(-1, 8)), ValueError, "query_rows"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_raises(name):
    make, error, message = BAD[name]
    inputs = make()
    inputs.setdefault("backend", "torch")
    with pytest.raises(error, match=message):
        consistent_attention(**inputs)


@pytest.mark.parametrize("head_dim", [12, 264])
def test_triton_rejects_unsupported_head_dim(head_dim):
    inputs = make_inputs(Case(2, 1, 8, head_dim, 2), torch.float16)
    with pytest.raises(ValueError, match=f"head dims .* got D={head_dim}"):
        consistent_attention(**inputs, backend="triton")
    consistent_attention(**inputs, backend="torch")  # the torch path takes any head dim


def test_triton_rejects_float64():
    inputs = make_inputs(Case(2, 1, 8, 8, 2), torch.float64)
    with pytest.raises(TypeError, match="backend='triton' supports float16, bfloat16 and float32"):
        consistent_attention(**inputs, backend="triton")
