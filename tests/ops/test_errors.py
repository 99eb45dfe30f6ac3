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


def pooled(**changes):
    """good() with an explicit pool: 10 rows, each frame's ranges [0, 2) and [3, 10)."""
    pool = (torch.zeros(10, 2, 8), torch.zeros(10, 2, 8))
    return replace(**{"ref_idx": None, "pool": pool, "pool_ranges": ranges(0, 2, 3, 10), **changes})


def ranges(*row):
    """The same pool_ranges row for each of the 4 frames."""
    return torch.tensor([row] * 4)


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
    "lengths-list": (lambda: replace(key_lengths=[16] * 4), TypeError, "key_lengths must be None or a torch"),
    "lengths-float": (
        lambda: replace(key_lengths=torch.full((4,), 16.0)),
        TypeError,
        "key_lengths must be int32 or int64, got torch.float32",
    ),
    "lengths-shape": (
        lambda: replace(key_lengths=torch.full((4, 1), 16)),
        ValueError,
        r"key_lengths must have shape \(B=4,\), got \(4, 1\)",
    ),
    "lengths-device": (
        lambda: replace(key_lengths=torch.full((4,), 16, device="meta")),
        ValueError,
        "key_lengths must be on the device of q",
    ),
    "lengths-zero": (
        lambda: replace(key_lengths=torch.tensor([16, 0, 16, 16])),
        ValueError,
        r"key_lengths values must lie in \[1, N=16\] .* got range \[0, 16\]",
    ),
    "lengths-past-n": (
        lambda: replace(key_lengths=torch.tensor([16, 17, 16, 16], dtype=torch.int32)),
        ValueError,
        r"key_lengths values must lie in \[1, N=16\]",
    ),
    "lengths-below-ref": (
        lambda: replace(ref_idx=torch.full((4, 4), 9), key_lengths=torch.tensor([16, 9, 16, 16])),
        ValueError,
        r"ref_idx values must be own keys .* ref_idx\[1, 0\] = 9 >= key_lengths\[1\] = 9",
    ),
    "ref-none": (
        lambda: replace(ref_idx=None),
        TypeError,
        r"ref_idx must be a torch.Tensor, got None \(None is",
    ),
    "pool-alone": (
        lambda: pooled(pool_ranges=None),
        ValueError,
        "pool and pool_ranges must be given together",
    ),
    "ranges-alone": (
        lambda: replace(pool_ranges=ranges(0, 2, 3, 10)),
        ValueError,
        "pool and pool_ranges must be given together",
    ),
    "pool-tensor": (
        lambda: pooled(pool=torch.zeros(2, 10, 2, 8)),
        TypeError,
        r"pool must be None or a pair \(keys, values\) of tensors, got Tensor",
    ),
    "pool-triple": (
        lambda: pooled(pool=(torch.zeros(10, 2, 8),) * 3),
        TypeError,
        "pool must be None or a pair",
    ),
    "pool-4d": (
        lambda: pooled(pool=(torch.zeros(4, 2, 10, 8),) * 2),
        ValueError,
        r"pool\[0\] \(keys\) must have shape \(R, H=2, D=8\) \(R pool rows\), got \(4, 2, 10, 8\)",
    ),
    "pool-heads": (
        lambda: pooled(pool=(torch.zeros(10, 2, 8), torch.zeros(10, 3, 8))),
        ValueError,
        r"pool\[1\] \(values\) must have shape \(R, H=2, D=8\)",
    ),
    "pool-rows-differ": (
        lambda: pooled(pool=(torch.zeros(10, 2, 8), torch.zeros(9, 2, 8))),
        ValueError,
        r"pool\[1\] \(values\) must have the shape of pool\[0\] \(keys\) \(10, 2, 8\), got \(9, 2, 8\)",
    ),
    "pool-dtype": (
        lambda: pooled(pool=(torch.zeros(10, 2, 8, dtype=torch.float16), torch.zeros(10, 2, 8))),
        ValueError,
        r"pool\[0\] \(keys\) must have the dtype of k \(torch.float32\), got torch.float16",
    ),
    "pool-device": (
        lambda: pooled(pool=(torch.zeros(10, 2, 8), torch.zeros(10, 2, 8, device="meta"))),
        ValueError,
        r"pool\[1\] \(values\) must be on the device of k",
    ),
    "ranges-float": (
        lambda: pooled(pool_ranges=ranges(0.0, 2.0, 3.0, 10.0)),
        TypeError,
        "pool_ranges must be int32 or int64, got torch.float32",
    ),
    "ranges-shape": (
        lambda: pooled(pool_ranges=torch.zeros(4, 2, dtype=torch.int64)),
        ValueError,
        r"pool_ranges must have shape \(B=4, 4\), got \(4, 2\)",
    ),
    "ranges-list": (
        lambda: pooled(pool_ranges=[[0, 2, 3, 10]] * 4),
        TypeError,
        "pool_ranges must be None or",
    ),
    "ranges-device": (
        lambda: pooled(pool_ranges=ranges(0, 2, 3, 10).to("meta")),
        ValueError,
        "pool_ranges must be on the device of q",
    ),
    "ranges-reversed": (
        lambda: pooled(pool_ranges=ranges(3, 2, 3, 10)),
        ValueError,
        r"pool_ranges rows .* 0 <= start <= end <= R=10 \(pool rows\), got \[3, 2, 3, 10\] for frame 0",
    ),
    "ranges-past-r": (
        lambda: pooled(pool_ranges=torch.tensor([[0, 2, 3, 10]] * 3 + [[0, 2, 3, 11]], dtype=torch.int32)),
        ValueError,
        r"pool_ranges .* R=10 .* got \[0, 2, 3, 11\] for frame 3",
    ),
    "ranges-negative": (lambda: pooled(pool_ranges=ranges(-1, 2, 3, 10)), ValueError, "pool_ranges rows"),
    "pool-with-ref-idx": (
        lambda: pooled(ref_idx=torch.zeros(4, 4, dtype=torch.int64)),
        ValueError,
        r"ref_idx must be None or empty \(B, 0\) when pool is given .* got shape \(4, 4\)",
    ),
    "pool-with-pool-k": (
        lambda: pooled(pool_k=torch.zeros(4, 2, 0, 8)),
        ValueError,
        r"pool_k must be None when pool is given",
    ),
    "pool-with-window": (
        lambda: pooled(window=1),
        ValueError,
        "window must be None when pool_ranges is given",
    ),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", BAD)
def test_bad_input_raises(name, backend):
    """Checked before any path runs: the same error on both backends."""
    make, error, message = BAD[name]
    inputs = make()
    inputs.setdefault("backend", backend)
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
