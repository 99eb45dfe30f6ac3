"""Hypothesis-driven fuzz over shapes, groups, windows and banks (small enough for a 2-core CI)."""

import pytest
import torch
from helpers import Case, assert_matches_reference, make_inputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import csa_kernels.triton_kernel as tk
from csa_kernels import consistent_attention


@st.composite
def cases(draw):
    groups = draw(st.integers(1, 3))
    frames = groups * draw(st.integers(1, 3))
    tokens = draw(st.integers(1, 70))
    return Case(
        frames=frames,
        heads=draw(st.integers(1, 3)),
        tokens=tokens,
        head_dim=draw(st.sampled_from([8, 16, 24, 40, 64, 72, 80, 96])),
        refs=draw(st.integers(0, tokens)),
        groups=groups,
        window=draw(st.one_of(st.none(), st.integers(1, 4))),
        bank=draw(st.one_of(st.none(), st.integers(0, 20))),
    )


# derandomize: the same 25 draws every run, so CI never fails on a draw nobody saw before; explore more
# shapes locally by raising max_examples or dropping derandomize.
FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@FUZZ
@given(case=cases(), dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 2**16))
def test_fuzz_matches_reference(backend, case, dtype, seed, monkeypatch, poisoned_outputs):
    monkeypatch.setattr(tk, "INTERPRETER_CONFIG", {"BLOCK_M": 16, "BLOCK_N": 32})
    inputs = make_inputs(case, dtype, seed=seed)
    out = consistent_attention(**inputs, backend=backend)
    assert_matches_reference(out, inputs)
