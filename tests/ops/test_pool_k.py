"""``pool_k``: the borrowed keys given pre-gathered (e.g. re-positioned for RoPE) instead of k at ref_idx.

- pool_k equal to k's rows at ref_idx is bit-identical to None on the reference, the torch path and the
  kernel (interpreter), whatever its strides;
- a random pool_k matches the float64 reference (which uses it for every borrowed key) on the kernel
  (NaN-poisoned outputs) and the torch path, fp32 and fp16, with and without bank, window, groups and
  query_rows; it changes the output (it is read), values still come from v;
- errors name ``pool_k``; the custom op's schema takes it (opcheck); gradients reach it.
"""

import pytest
import torch
from helpers import Case, assert_matches_reference, make_inputs

import csa_kernels.triton_kernel as tk
from csa_kernels import consistent_attention, consistent_attention_reference
from csa_kernels.op import consistent_attention_op

SMALL = {"BLOCK_M": 16, "BLOCK_N": 16}
CASES = [
    pytest.param(Case(3, 2, 40, 16, 9), None, id="plain"),
    pytest.param(Case(4, 1, 50, 16, 17, groups=2, window=1, bank=6), SMALL, id="groups-window-bank"),
    pytest.param(Case(3, 2, 77, 32, 20, bank=5, query_rows=(13, 77)), None, id="text-first-rows"),
    pytest.param(Case(4, 1, 63, 40, 21, window=2, bank=19, query_rows=(5, 40)), SMALL, id="across-tiles"),
]


def gathered_keys(inputs: dict) -> torch.Tensor:
    """k's rows at ref_idx as (B, H, S, D), built without csa_kernels' own gather."""
    k, ref_idx = inputs["k"], inputs["ref_idx"]
    return torch.stack([k[j][:, ref_idx[j]] for j in range(k.shape[0])])


def with_random_pool(case: Case, dtype: torch.dtype, device: str = "cpu") -> dict:
    inputs = make_inputs(case, dtype, device=device, seed=2)
    gen = torch.Generator().manual_seed(7)
    shape = (case.frames, case.heads, case.refs, case.head_dim)
    inputs["pool_k"] = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    return inputs


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_gathered_pool_is_bit_identical_to_none(backend, poisoned_outputs, monkeypatch):
    monkeypatch.setattr(tk, "INTERPRETER_CONFIG", SMALL)
    inputs = make_inputs(
        Case(4, 2, 50, 16, 17, groups=2, window=1, bank=6, query_rows=(7, 50)), torch.float16
    )

    def run(**kwargs):
        if backend == "reference":
            return consistent_attention_reference(**inputs, **kwargs)
        return consistent_attention(**inputs, backend=backend, **kwargs)

    pool = gathered_keys(inputs)  # contiguous (B, H, S, D)
    expected = run()
    assert torch.equal(run(pool_k=pool), expected)
    # the kernel's own pool layout, (B, S, H, D) memory seen as (B, H, S, D): strides do not matter
    assert torch.equal(run(pool_k=pool.transpose(1, 2).contiguous().transpose(1, 2)), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(("case", "tiles"), CASES)
def test_triton_matches_reference(case, tiles, dtype, poisoned_outputs, monkeypatch):
    if tiles is not None:
        monkeypatch.setattr(tk, "INTERPRETER_CONFIG", tiles)
    inputs = with_random_pool(case, dtype)
    out = consistent_attention(**inputs, backend="triton")
    assert_matches_reference(out, inputs)
    without = consistent_attention(**{**inputs, "pool_k": None}, backend="triton")
    assert (out - without).abs().max() > 1e-2  # the given keys are read, not k's


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(("case", "tiles"), CASES)
def test_torch_path_matches_reference(case, tiles, dtype):
    inputs = with_random_pool(case, dtype)
    inputs["pool_k"] = inputs["pool_k"].transpose(1, 2).contiguous().transpose(1, 2)  # any strides
    out = consistent_attention(**inputs, backend="torch")
    assert_matches_reference(out, inputs)
    without = consistent_attention(**{**inputs, "pool_k": None}, backend="torch")
    assert (out - without).abs().max() > 1e-2


def test_reference_uses_pool_k_as_the_borrowed_keys():
    """Independent check of the ground truth: frame 0 of two attends to [k0; pool_k[1]] with [v0; v1 rows]."""
    inputs = with_random_pool(Case(2, 1, 6, 8, 3), torch.float64)
    q, k, v, ref_idx, pool = (inputs[key] for key in ("q", "k", "v", "ref_idx", "pool_k"))
    out = consistent_attention_reference(q, k, v, ref_idx, pool_k=pool, upcast=False)
    keys = torch.cat([k[0], pool[1]], dim=1)
    values = torch.cat([v[0], v[1][:, ref_idx[1]]], dim=1)
    expected = torch.softmax(q[0] @ keys.transpose(-1, -2) * 8**-0.5, dim=-1) @ values
    torch.testing.assert_close(out[0], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("pool_k", "error", "match"),
    [
        (lambda: [0.0], TypeError, "pool_k must be None or a torch.Tensor"),
        (
            lambda: torch.zeros(4, 2, 5, 8),
            ValueError,
            r"pool_k must have shape \(B, H, S, D\) = \(4, 2, 4, 8\)",
        ),
        (lambda: torch.zeros(4, 4, 2, 8), ValueError, "pool_k must have shape"),
        (lambda: torch.zeros(4, 2, 4, 8, dtype=torch.float16), ValueError, "pool_k must have the dtype of k"),
        (lambda: torch.zeros(4, 2, 4, 8, device="meta"), ValueError, "pool_k must be on the device of k"),
    ],
    ids=["not-tensor", "wrong-S", "wrong-layout", "dtype", "device"],
)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_errors_name_pool_k(pool_k, error, match, backend):
    inputs = make_inputs(Case(4, 2, 16, 8, 4, groups=2, bank=3), torch.float32)
    with pytest.raises(error, match=match):
        consistent_attention(**inputs, pool_k=pool_k(), backend=backend)


def test_opcheck():
    """Schema (pool_k: the op's last, optional tensor), fake tensor and dispatch checks."""
    inputs = with_random_pool(Case(4, 1, 20, 16, 5, groups=2, bank=3, query_rows=(7, 20)), torch.float32)
    args = [inputs[key] for key in ("q", "k", "v", "ref_idx", "groups", "window", "bank_k", "bank_v")]
    args += [0.3, *inputs["query_rows"], inputs["pool_k"]]
    torch.library.opcheck(
        consistent_attention_op,
        args,
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )


def test_gradients_reach_pool_k():
    """With grad on, the torch path is taken and pool_k gets the reference's gradient (float64)."""
    inputs = with_random_pool(
        Case(4, 1, 12, 8, 5, groups=2, window=1, bank=3, query_rows=(3, 9)), torch.float64
    )
    leaves = [inputs[key].requires_grad_(True) for key in ("q", "k", "v", "pool_k")]
    out = consistent_attention(**inputs, backend="triton")  # grad sends it to the torch path
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, leaves, grad)
    expected = torch.autograd.grad(consistent_attention_reference(**inputs, upcast=False), leaves, grad)
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert ours[3].abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_compiled_kernel_on_a_flux_like_layer(dtype, poisoned_outputs):
    """The compiled kernel (tensor-core dots): 512 text rows, then image rows that borrow a given pool."""
    case = Case(4, 24, 1536, 128, 512, window=1, bank=256, query_rows=(512, 1536))
    inputs = with_random_pool(case, dtype, device="cuda")
    assert_matches_reference(consistent_attention(**inputs, backend="triton"), inputs)
    plain = {**inputs, "pool_k": None}
    gathered = consistent_attention(**plain, pool_k=gathered_keys(inputs), backend="triton")
    assert torch.equal(gathered, consistent_attention(**plain, backend="triton"))
