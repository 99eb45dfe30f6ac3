"""The op suite's baselines on joint text + image sequences (FLUX / SD3 layouts) compute consistent
attention with ``query_rows``: they agree with the reference under the project's error rule, their text
rows are plain attention over their own frame, and the rule is strict enough to catch a baseline that lets
text rows borrow. The suite's FLOP count is the number of True entries of the official dense mask."""

import pytest
import torch
import torch.nn.functional as F

from csa_kernels import reference_error_bound, sample_reference_indices
from storydiff.benchmark import op_suite
from storydiff.benchmark.op_suite import OpCase, case_flops, cpu_dit_cases, make_case_inputs
from storydiff.benchmark.providers import query_key_pairs, setup_provider
from storydiff.consistency.official import keep_from_indices, official_a_mask

FRAMES, HEADS, IMAGE, TEXT, DIM = 3, 2, 24, 7, 16
# (name, query_rows, groups): FLUX (text first, no CFG), SD3 (image first, CFG), image rows in the middle
LAYOUTS = [("flux", (TEXT, TEXT + IMAGE), 1), ("sd3", (0, IMAGE), 2), ("middle", (3, 3 + IMAGE), 1)]
BASELINES = ("official_a", "official_b", "flex")


def joint_inputs(query_rows, groups, *, halves_differ=False, bank=0, seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    batch, tokens = FRAMES * groups, IMAGE + TEXT
    q, k, v = (torch.randn(batch, HEADS, tokens, DIM, generator=gen) for _ in range(3))
    draws = groups if halves_differ else 1
    ref_idx = torch.cat(
        [sample_reference_indices(FRAMES, IMAGE, 0.5, generator=gen) for _ in range(draws)]
    ).repeat(groups // draws, 1)
    inputs = {"q": q, "k": k, "v": v, "ref_idx": ref_idx + query_rows[0], "groups": groups}
    inputs["query_rows"] = query_rows
    if bank:
        inputs["bank_k"], inputs["bank_v"] = (
            torch.randn(groups, HEADS, bank, DIM, generator=gen) for _ in "kv"
        )
    return inputs


@pytest.mark.parametrize("provider", BASELINES)
@pytest.mark.parametrize(("layout", "query_rows", "groups"), LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_joint_baselines_agree_with_the_reference(provider, layout, query_rows, groups):
    inputs = joint_inputs(query_rows, groups)
    out = setup_provider(provider, inputs)()
    reference_error_bound(inputs).check(out)
    # text rows: plain attention over their own frame, whatever the other frames hold
    text = torch.ones(IMAGE + TEXT, dtype=torch.bool)
    text[query_rows[0] : query_rows[1]] = False
    plain = F.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"])
    torch.testing.assert_close(out[:, :, text], plain[:, :, text], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("provider", ["official_a", "official_b"])
def test_joint_baselines_with_a_bank_and_per_half_draws(provider):
    """The bank is borrowed too (image rows only), and CFG halves with different draws stay apart."""
    inputs = joint_inputs((0, IMAGE), 2, halves_differ=True, bank=5)
    assert keep_from_indices(inputs["ref_idx"], IMAGE + TEXT, 2).ndim == 3  # the per-half keep path
    reference_error_bound(inputs).check(setup_provider(provider, inputs)())


@pytest.mark.parametrize("provider", BASELINES)
def test_the_rule_catches_text_rows_that_borrow(provider):
    """The same inputs without the row range: text rows read other frames, and the check fails."""
    inputs = joint_inputs((TEXT, TEXT + IMAGE), 1)
    leaky = setup_provider(provider, {key: val for key, val in inputs.items() if key != "query_rows"})()
    with pytest.raises(AssertionError, match="max error"):
        reference_error_bound(inputs).check(leaky)


@pytest.mark.parametrize("case", cpu_dit_cases() + op_suite.dit_cases(), ids=lambda case: case.name)
def test_joint_case_layout_and_flops(case):
    """Image span per layout, and FLOPs = 4·H·D·(True entries of the official dense mask) per CFG half."""
    start, stop = case.image_span
    assert stop - start == case.tokens and (start == case.text_tokens) == case.text_first
    small = OpCase("small", case.frames, 1, 12, 8, case.rate, case.cfg, 5, case.text_first)
    inputs = make_case_inputs(small, torch.float32, torch.device("cpu"))
    assert inputs["query_rows"] == small.image_span
    ref_idx = inputs["ref_idx"]
    assert ((ref_idx >= small.image_span[0]) & (ref_idx < small.image_span[1])).all()
    mask = official_a_mask(
        keep_from_indices(ref_idx, small.sequence, small.groups), query_rows=small.image_span
    )
    assert case_flops(small) == 4 * small.head_dim * small.groups * int(mask.sum())


def test_query_key_pairs_without_rows_is_the_keys_count():
    assert query_key_pairs(4, 10, 3, groups=2) == 10 * (4 * 10 + 4 * 3 * 1)  # 1 other frame per half
    assert query_key_pairs(2, 10, 3, query_rows=(4, 10)) == 2 * 10 * 10 + 6 * 2 * 3


def test_op_suite_times_every_joint_provider_after_its_check(monkeypatch):
    monkeypatch.setattr(op_suite, "median_ms", lambda fn, device: 1.0)
    case = OpCase("tiny-joint", 2, 1, 32, 16, 0.5, cfg=True, text_tokens=9, text_first=False)
    providers = ["reference", "official_a", "official_b", "sdpa_dense", "ours_torch"]
    rows = op_suite.run_op_suite([case], providers, device=torch.device("cpu"), dtype=torch.float32, env={})
    assert [row["status"] for row in rows] == ["ok"] * len(providers), rows
    assert all(row["max_err"] is not None for row in rows if row["provider"] != "sdpa_dense")
    assert {row["gflop"] for row in rows} == {case_flops(case) / 1e9}
    assert rows[0]["text_tokens"] == 9 and rows[0]["text_first"] is False
