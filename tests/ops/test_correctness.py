"""Triton (interpreter on CPU) and torch paths against the float64 reference, awkward sizes included.

The torch path runs every case in every dtype (cheap). The interpreter pays per tile op, so it runs a
chosen (case, dtype) list instead, each test ≤ ~8 s on an idle 2-core machine; every output buffer starts
NaN-filled (``poisoned_outputs``), so an element the kernel never writes fails. What covers what:

- awkward N: 63 (own tile tail: A, C, F, H), 100 (G), 257 (B, D: several full tiles + a 1-token tail),
  988 (E: 15 full 64-tiles + a tail in the own range, 7 + a tail in the pool range), 50 with 16x16 tiles
  (small tiles: own, pool-before, pool-after and bank ranges each several full tiles + a tail);
- head dims 8 (I), 16 (small tiles), 40 (F), 64 (B, D, E, H), 80 (A), 128 (G), 160 (C), 256 (J): padded
  and unpadded HEAD_DIM_P (padded head dims stay at small N: the interpreter's fp16 dots get slow);
- S = 0 (D: empty pool ranges), 1 (B), N (C; small tiles N=16);
- groups 1 (A, D, E, G, H) and 2 (B, C, F, J; J has one frame per group: no pool at all);
- windows None, 1 (C, G), 2 (D, F); banks: none, M = 0 (I), 5 / 7 / 9 / 16 (F / B / D / H), 19 and 40
  (small tiles: several bank tiles);
- dtypes: fp32 (E: the tightest tolerance on the longest online softmax), fp16 and bf16 at N = 257 (B, D)
  and, like fp32, at every small case; bf16 runs with fp32 dots here (the interpreter's bf16 tl.dot is
  wrong, ARCHITECTURE.md §5), which checks its loads, stores and casts; bf16 tensor-core dots are checked
  by the GPU tests.
"""

import pytest
import torch
from helpers import Case, assert_matches_reference, make_inputs

import csa_kernels.triton_kernel as tk
from csa_kernels import consistent_attention

ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOW = (torch.float16, torch.bfloat16)
# (label, case, dtypes on the interpreter); the labels are the docstring's.
CASE_TABLE = [
    ("A", Case(4, 2, 63, 80, 32), ALL_DTYPES),
    ("B", Case(4, 1, 257, 64, 1, groups=2, bank=7), LOW),
    ("C", Case(6, 1, 63, 160, 63, groups=2, window=1), ALL_DTYPES),
    ("D", Case(5, 1, 257, 64, 0, window=2, bank=9), LOW),
    ("E", Case(2, 1, 988, 64, 494), (torch.float32,)),
    ("F", Case(8, 1, 63, 40, 20, groups=2, window=2, bank=5), ALL_DTYPES),
    ("G", Case(3, 2, 100, 128, 30, window=1), ALL_DTYPES),
    ("H", Case(1, 2, 63, 64, 31, bank=16), ALL_DTYPES),
    ("I", Case(2, 1, 16, 8, 8, bank=0), ALL_DTYPES),
    ("J", Case(2, 1, 40, 256, 13, groups=2), ALL_DTYPES),
]
CASES = [case for _, case, _ in CASE_TABLE]
INTERPRETER_CASES = [
    pytest.param(case, dtype, id=f"{label}-{case.id}-{dtype}")
    for label, case, dtypes in CASE_TABLE
    for dtype in dtypes
]


@pytest.mark.parametrize(("case", "dtype"), INTERPRETER_CASES)
def test_triton_matches_reference(case, dtype, poisoned_outputs):
    inputs = make_inputs(case, dtype)
    out = consistent_attention(**inputs, backend="triton")
    assert_matches_reference(out, inputs)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_torch_path_matches_reference(case, dtype):
    inputs = make_inputs(case, dtype)
    out = consistent_attention(**inputs, backend="torch")
    assert_matches_reference(out, inputs)


SMALL_TILE_CASES = [
    Case(4, 1, 63, 40, 21, window=2, bank=19),
    Case(6, 1, 50, 64, 33, groups=2, bank=40),
    Case(3, 1, 16, 16, 16, window=1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", SMALL_TILE_CASES, ids=lambda c: c.id)
def test_triton_small_tiles(case, dtype, poisoned_outputs, monkeypatch):
    """16x16 tiles: every key range (own, pool before/after, bank) takes several full tiles and a tail."""
    monkeypatch.setattr(tk, "INTERPRETER_CONFIG", {"BLOCK_M": 16, "BLOCK_N": 16})
    inputs = make_inputs(case, dtype, seed=3)
    out = consistent_attention(**inputs, backend="triton")
    assert_matches_reference(out, inputs)
