"""The Hopper path (tensor descriptors, ``triton_tma.py``) under the interpreter, against the float64
reference, outputs NaN-poisoned: the same case tables as the pointer kernel's tests (test_correctness.py,
test_query_rows.py, test_key_lengths.py, test_pool_ranges.py), so both paths answer for the same awkward
sizes — tails of every key range, padded head dims, empty pools, windows, groups, banks, row ranges,
per-frame key lengths (NaN padding), caller pools and their ranges (NaN rows no range reaches, heads-major
strides), fp32/fp16/bf16 — plus what only descriptors have: boxes past the tensor's end, a pool range's tail
whose next rows belong to another frame (poisoned here to prove they are never read into the output),
diffusers' (B, N, H, D) views, and the fallback to the pointer path for tensors TMA cannot address.
"""

import pytest
import test_correctness as pointer_cases
import test_key_lengths as length_cases
import test_pool_ranges as pool_cases
import test_query_rows as row_cases
import torch
from helpers import Case, assert_matches_reference, make_inputs

import csa_kernels.triton_kernel as tk
from csa_kernels import consistent_attention


@pytest.fixture
def tma(monkeypatch):
    """Every Triton call takes the descriptor path; records the launches that really went through it."""
    monkeypatch.setattr(tk, "FORCED_PATH", "tma")
    launches = []
    launch = tk._launch_tma
    monkeypatch.setattr(tk, "_launch_tma", lambda *a: launches.append(a) or launch(*a))
    return launches


ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# one dtype per case (the pointer tests run all three): the descriptor path's loads, casts and stores are the
# same code for every dtype, and each dtype still meets several tails, widths and ranges
TMA_CASES = [
    pytest.param(
        case,
        ALL_DTYPES[i % 3],
        id=f"{label}-{case.id}",
        # E (N=988, fp32, the longest softmax) tests the online softmax, the same code on both paths: slow
        marks=[pytest.mark.slow] if label == "E" else [],
    )
    for i, (label, case, _) in enumerate(pointer_cases.CASE_TABLE)
]


@pytest.mark.parametrize(("case", "dtype"), TMA_CASES)
def test_tma_matches_reference(case, dtype, tma, poisoned_outputs):
    inputs = make_inputs(case, dtype)
    out = consistent_attention(**inputs, backend="triton")
    assert_matches_reference(out, inputs)
    assert len(tma) == 1


@pytest.mark.parametrize("case", pointer_cases.SMALL_TILE_CASES, ids=lambda c: c.id)
def test_tma_small_tiles(case, tma, poisoned_outputs, monkeypatch):
    """16x16 boxes: every key range takes several full tiles and a tail."""
    monkeypatch.setattr(tk, "INTERPRETER_CONFIG", {"BLOCK_M": 16, "BLOCK_N": 16})
    inputs = make_inputs(case, torch.float16, seed=3)
    assert_matches_reference(consistent_attention(**inputs, backend="triton"), inputs)
    assert len(tma) == 1


@pytest.mark.parametrize(
    ("case", "tiles"),
    [pytest.param(case, tiles, id=label) for label, case, _, tiles in row_cases.CASE_TABLE],
)
def test_tma_query_rows(case, tiles, tma, poisoned_outputs, monkeypatch):
    if tiles is not None:
        monkeypatch.setattr(tk, "INTERPRETER_CONFIG", tiles)
    inputs = make_inputs(case, torch.float16, seed=1)
    assert_matches_reference(consistent_attention(**inputs, backend="triton"), inputs)


@pytest.mark.parametrize(
    ("case", "lengths", "dtype", "tiles"),
    [
        pytest.param(case, lengths, ALL_DTYPES[i % 3], tiles, id=label)
        for i, (label, case, lengths, _, tiles) in enumerate(length_cases.CASE_TABLE)
    ],
)
def test_tma_key_lengths(case, lengths, dtype, tiles, tma, poisoned_outputs, monkeypatch):
    """Own-key ranges that end at each frame's length (tails inside the descriptor's bound, NaN past them)."""
    if tiles is not None:
        monkeypatch.setattr(tk, "INTERPRETER_CONFIG", tiles)
    inputs = length_cases.with_key_lengths(case, lengths, dtype, seed=1)
    assert_matches_reference(consistent_attention(**inputs, backend="triton"), inputs)
    assert len(tma) == 1


@pytest.mark.parametrize(
    ("case", "rows", "ranges", "lengths", "layout", "dtype", "tiles"),
    [
        pytest.param(*row[1:6], ALL_DTYPES[i % 3], row[7], id=row[0])
        for i, row in enumerate(pool_cases.CASE_TABLE)
    ],
)
def test_tma_pool_ranges(
    case, rows, ranges, lengths, layout, dtype, tiles, tma, poisoned_outputs, monkeypatch
):
    """A caller's pool as one (1, H, R, D) descriptor (heads-major strides too), its ranges' tail boxes
    running into NaN rows no range reaches."""
    if tiles is not None:
        monkeypatch.setattr(tk, "INTERPRETER_CONFIG", tiles)
    inputs = pool_cases.with_pool(case, rows, ranges, lengths, layout, dtype, seed=1)
    assert_matches_reference(consistent_attention(**inputs, backend="triton"), inputs)
    assert len(tma) == 1


@pytest.mark.parametrize("path", tk.PATHS)
def test_pool_tails_never_read_other_frames(path, monkeypatch):
    """3 frames, window 1, S = 20 pool rows per frame, 16-row boxes: frame 0's after-range [20, 40) ends in
    a tail box that runs into frame 2's rows, frame 1's before-range [0, 20) in one that runs into its own.
    Those rows must score -inf and weigh 0 whatever they hold: with them NaN, frames 0 and 1 are unchanged
    bit for bit (both paths)."""
    monkeypatch.setattr(tk, "FORCED_PATH", path)
    monkeypatch.setattr(tk, "INTERPRETER_CONFIG", {"BLOCK_M": 16, "BLOCK_N": 16})
    inputs = make_inputs(Case(3, 1, 32, 16, 20, window=1), torch.float32, seed=4)
    clean = consistent_attention(**inputs, backend="triton")
    gather = tk.gather_pools
    for poisoned, unchanged in ((2, 0), (1, 1)):

        def poisoned_gather(*args, frame=poisoned, **kwargs):
            pools = gather(*args, **kwargs)
            for pool in pools:
                pool[frame] = float("nan")
            return pools

        monkeypatch.setattr(tk, "gather_pools", poisoned_gather)
        out = consistent_attention(**inputs, backend="triton")
        assert torch.equal(out[unchanged], clean[unchanged])
        assert out.isnan().any()  # and the poison did reach the frames that see it


def test_diffusers_layout_and_bank_views(tma, poisoned_outputs):
    """q/k/v as diffusers makes them ((B, N, H, D) transposed to (B, H, N, D): strides not in B, H, N, D
    order) and a bank sliced from a larger buffer: descriptors take the strides as they are."""
    case = Case(4, 2, 63, 64, 21, groups=2, bank=9)
    inputs = make_inputs(case, torch.float16, seed=5)
    for name in ("q", "k", "v"):
        inputs[name] = inputs[name].transpose(1, 2).contiguous().transpose(1, 2)
    for name in ("bank_k", "bank_v"):
        wide = torch.zeros(*inputs[name].shape[:2], 16, 64, dtype=torch.float16)
        wide[:, :, 3:12] = inputs[name]
        inputs[name] = wide[:, :, 3:12]
    assert_matches_reference(consistent_attention(**inputs, backend="triton"), inputs)
    assert len(tma) == 1


def test_misaligned_tensors_take_the_pointer_path(tma, poisoned_outputs):
    """A q whose base is not 16-byte aligned (an odd offset into a buffer) cannot be a descriptor: the
    pointer kernel runs instead, with the same result."""
    case = Case(2, 1, 40, 16, 8)
    inputs = make_inputs(case, torch.float16, seed=6)
    buffer = torch.empty(inputs["q"].numel() + 1, dtype=torch.float16)
    inputs["q"] = buffer[1:].view_as(inputs["q"]).copy_(inputs["q"])
    assert not tk.tma_compatible(inputs["q"])
    assert_matches_reference(consistent_attention(**inputs, backend="triton"), inputs)
    assert tma == []


def test_kernel_path_by_device(monkeypatch):
    """Interpreter and CPU: the pointer kernel; CSA_KERNEL_PATH forces a path, and says so when wrong."""
    q = torch.zeros(1, 1, 16, 16)
    assert tk.kernel_path(q) == "pointer"
    monkeypatch.setattr(tk, "FORCED_PATH", "tma")
    assert tk.kernel_path(q) == "tma"
    monkeypatch.setattr(tk, "FORCED_PATH", "fast")
    with pytest.raises(ValueError, match="CSA_KERNEL_PATH must be one of pointer, tma, got 'fast'"):
        tk.kernel_path(q)


@pytest.mark.parametrize("gather_k", [True, False])
def test_one_launch_gathers_both_pools(gather_k):
    """gather_pools == gather_reference_pool of K and of V, bit for bit, on diffusers-strided inputs and an
    S that is not a multiple of its 32-row blocks."""
    from csa_kernels.pool import gather_reference_pool
    from csa_kernels.triton_gather import gather_pools

    inputs = make_inputs(Case(3, 2, 50, 40, 37), torch.float16, seed=7)
    k, v = (inputs[n].transpose(1, 2).contiguous().transpose(1, 2) for n in ("k", "v"))
    pool_k, pool_v = gather_pools(k, v, inputs["ref_idx"], gather_k=gather_k)
    assert torch.equal(pool_v, gather_reference_pool(v, inputs["ref_idx"])) and pool_v.is_contiguous()
    if gather_k:
        assert torch.equal(pool_k, gather_reference_pool(k, inputs["ref_idx"]))
    else:
        assert pool_k is None
