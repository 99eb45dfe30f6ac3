"""Hypothesis-driven fuzz over shapes, groups, windows, banks and query rows (small enough for a 2-core CI).

The interpreter pays per tile op (~2.5 s for a torch-path-sized draw on a 2-core machine), so the Triton
backend draws fewer, smaller cases (16 draws of ≤ 32 tokens and ≤ 2 heads, against 25 of ≤ 70 tokens and
≤ 3 heads): each test stays ≤ ~20 s on an idle 2-core machine.
"""

import torch
from helpers import Case, assert_matches_reference, make_inputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import csa_kernels.triton_kernel as tk
from csa_kernels import consistent_attention


@st.composite
def cases(draw, max_tokens: int, max_frames_per_group: int, max_heads: int):
    groups = draw(st.integers(1, 3))
    frames = groups * draw(st.integers(1, max_frames_per_group))
    tokens = draw(st.integers(1, max_tokens))
    rows = st.tuples(st.integers(0, tokens), st.integers(0, tokens)).map(lambda pair: tuple(sorted(pair)))
    return Case(
        frames=frames,
        heads=draw(st.integers(1, max_heads)),
        tokens=tokens,
        head_dim=draw(st.sampled_from([8, 16, 24, 40, 64, 72, 80, 96])),
        refs=draw(st.integers(0, tokens)),
        groups=groups,
        window=draw(st.one_of(st.none(), st.integers(1, 4))),
        bank=draw(st.one_of(st.none(), st.integers(0, 20))),
        query_rows=draw(st.one_of(st.none(), rows)),
    )


def fuzz(max_examples: int):
    # derandomize: the same draws every run, so CI never fails on a draw nobody saw before; explore more
    # shapes locally by raising max_examples or dropping derandomize.
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


DTYPES = st.sampled_from([torch.float32, torch.float16])
SEEDS = st.integers(0, 2**16)


def check(case: Case, dtype: torch.dtype, seed: int, backend: str) -> None:
    inputs = make_inputs(case, dtype, seed=seed)
    out = consistent_attention(**inputs, backend=backend)
    assert_matches_reference(out, inputs)


@fuzz(max_examples=6)
@given(case=cases(max_tokens=32, max_frames_per_group=3, max_heads=2), dtype=DTYPES, seed=SEEDS)
def test_fuzz_triton_matches_reference(case, dtype, seed, monkeypatch, poisoned_outputs):
    # 16x32 tiles: even these small draws take several full tiles and a tail
    monkeypatch.setattr(tk, "INTERPRETER_CONFIG", {"BLOCK_M": 16, "BLOCK_N": 32})
    check(case, dtype, seed, "triton")


@fuzz(max_examples=25)
@given(case=cases(max_tokens=70, max_frames_per_group=3, max_heads=3), dtype=DTYPES, seed=SEEDS)
def test_fuzz_torch_matches_reference(case, dtype, seed):
    check(case, dtype, seed, "torch")
