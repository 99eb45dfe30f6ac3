"""The oracle of the official algorithm (consistency/official.py) does what ARCHITECTURE.md §3 says.

Its parity with our processor is in test_processor.py; here: op-level forms against the reference, what
each variant projects and banks, how variant A shares its draw, and the warm-up and layer-skip schedule.
"""

import types

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from helpers import Case, assert_matches_reference, make_inputs

import storydiff.consistency.official as official
from storydiff.benchmark.providers import setup_provider
from storydiff.consistency.official import OfficialAttnProcessor, OfficialState

CHANNELS, HEADS, TOKENS = 32, 2, 24


def make_layer(seed=0):
    torch.manual_seed(seed)
    return Attention(query_dim=CHANNELS, heads=HEADS, dim_head=CHANNELS // HEADS).eval()


def frames_input(batch, tokens=TOKENS, seed=1):
    return torch.randn(batch, tokens, CHANNELS, generator=torch.Generator().manual_seed(seed))


def oracle(variant, **options):
    return OfficialState(variant, **{"warmup": False, "layer_skip": False, **options})


def run(attn, state, hidden, name="up_blocks.0.attn1"):
    attn.set_processor(OfficialAttnProcessor(state, name))
    with torch.no_grad():
        return attn(hidden)


def plain(attn, hidden):
    attn.set_processor(AttnProcessor2_0())
    with torch.no_grad():
        return attn(hidden)


# -- op level ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shared", [True, False], ids=["halves-share-draw", "draw-per-half"])
@pytest.mark.parametrize("provider", ["official_a", "official_b", "flex"])
def test_op_level_providers_match_reference(provider, shared):
    inputs = make_inputs(Case(8, 2, 50, 16, 20, groups=2), torch.float32)
    if shared:
        inputs["ref_idx"] = inputs["ref_idx"][:4].repeat(2, 1)
    assert_matches_reference(setup_provider(provider, inputs)(), inputs)


@pytest.mark.parametrize("provider", ["official_a", "official_b"])
def test_op_level_read_path_with_a_bank_matches_reference(provider):
    inputs = make_inputs(Case(4, 2, 30, 16, 10, groups=2, bank=7), torch.float32)
    assert_matches_reference(setup_provider(provider, inputs)(), inputs)


def test_op_level_rejects_a_window_and_bad_keep():
    inputs = make_inputs(Case(4, 1, 10, 8, 3, window=1), torch.float32)
    with pytest.raises(NotImplementedError, match="no window"):
        setup_provider("official_a", inputs)
    q = inputs["q"]
    with pytest.raises(ValueError, match="keep must be a bool mask"):
        official.official_b(q, q, q, torch.ones(3, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="groups must be an int >= 1 dividing the batch of 4"):
        official.official_b(q, q, q, torch.ones(4, 10, dtype=torch.bool), groups=3)


# -- what variant A projects and banks ------------------------------------------------------------------
def count_projected_tokens(attn) -> list[int]:
    """Tokens per call of to_k (hidden states are (batch, tokens, channels))."""
    counts = []
    attn.to_k.register_forward_hook(lambda module, args, out: counts.append(args[0].shape[-2]))
    return counts


@pytest.mark.parametrize("groups", [1, 2], ids=["cfg-off", "cfg-on"])
def test_variant_a_banks_full_hidden_states_and_reads_all_of_them(groups):
    ids = 3
    attn, state = make_layer(), oracle("a", rate=0.3)
    id_hidden = frames_input(ids * groups)
    state.begin_write(ids)
    run(attn, state, id_hidden, name="l")
    torch.testing.assert_close(state.bank[(0, "l")], id_hidden.unflatten(0, (groups, ids)), rtol=0, atol=0)
    counts = count_projected_tokens(attn)
    state.begin_read(1)
    run(attn, state, frames_input(groups, seed=2), name="l")
    assert counts == [(ids + 1) * TOKENS]  # own tokens and every banked token, whatever the draw keeps


def test_variant_b_banks_and_reprojects_only_kept_tokens():
    ids = 3
    attn, state = make_layer(), oracle("b", rate=0.3)
    state.begin_write(ids)
    run(attn, state, frames_input(2 * ids), name="l")
    kept = state.bank[(0, "l")].shape[1]
    assert 0 < kept < ids * TOKENS * 0.6
    counts = count_projected_tokens(attn)
    state.begin_read(1)
    run(attn, state, frames_input(2, seed=2), name="l")
    assert counts == [TOKENS + kept]


# -- variant A's draw: one per (step, level) -------------------------------------------------------------
def record_masks(monkeypatch) -> list:
    masks, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(official, "F", types.SimpleNamespace(scaled_dot_product_attention=recording))
    return masks


def test_variant_a_draw_is_shared_by_a_levels_layers_and_redrawn_each_step(monkeypatch):
    frames = 3
    masks = record_masks(monkeypatch)
    attn, state = make_layer(), oracle("a", rate=0.5)
    state.begin_write(frames)
    hidden, other_level = frames_input(2 * frames), frames_input(2 * frames, tokens=TOKENS // 2)
    for name in ("l1", "l2"):
        run(attn, state, hidden, name)
    run(attn, state, other_level, "l3")
    state.set_step(1)
    run(attn, state, hidden, "l1")
    first, second, other, next_step = masks
    assert first.shape == (1, 1, frames * TOKENS, frames * TOKENS)  # one mask for both CFG halves
    assert torch.equal(first, second)  # the level's layers share the step's draw
    assert other.shape[-1] == frames * TOKENS // 2
    assert not torch.equal(first, next_step)
    # every query sees its own frame whole; a token of another frame is seen by all its queries or none
    mask, frame_of = first[0, 0], torch.arange(frames * TOKENS) // TOKENS
    foreign = frame_of[:, None] != frame_of[None, :]
    assert mask[~foreign].all()
    assert torch.equal((mask | ~foreign).all(dim=0), (mask & foreign).any(dim=0))
    assert 0.2 < mask[0, TOKENS:].float().mean().item() < 0.8


def test_variant_b_draws_again_at_every_layer_call():
    attn, state = make_layer(), oracle("b", rate=0.5)
    state.begin_write(3)
    hidden = frames_input(6)
    run(attn, state, hidden, "l1")
    run(attn, state, hidden, "l2")
    first, second = state.bank[(0, "l1")], state.bank[(0, "l2")]
    assert first.shape != second.shape or not torch.equal(first, second)


# -- schedule ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("variant", "warmup_steps"), [("a", 5), ("b", 1)])
def test_warmup_writes_with_plain_attention(variant, warmup_steps):
    attn, state = make_layer(), oracle(variant, rate=1.0, warmup=True)
    hidden = frames_input(6)
    expected = plain(attn, hidden)
    state.begin_write(3)
    for step in range(warmup_steps + 1):
        state.set_step(step)
        out = run(attn, state, hidden)
        assert torch.allclose(out, expected, atol=1e-6) == (step < warmup_steps), step


def test_variant_a_warmup_reads_the_unsampled_bank():
    """Steps < 5 see every banked token; from step 5 on only the draw's (none at rate 0)."""
    attn, read = make_layer(), frames_input(2, seed=2)
    everything = oracle("a", select=lambda step, frames, tokens: torch.ones(frames, tokens, dtype=torch.bool))
    state = oracle("a", rate=0.0, warmup=True)
    for s in (state, everything):
        s.begin_write(3)
        for step in (0, 5):  # the bank of steps 0 and 5
            s.set_step(step)
            run(attn, s, frames_input(6))
        s.begin_read(1)
    full_bank = run(attn, everything, read)
    assert torch.allclose(run(attn, state, read), full_bank, atol=1e-6)
    state.set_step(5)
    assert torch.allclose(run(attn, state, read), plain(attn, read), atol=1e-6)
    assert not torch.allclose(full_bank, plain(attn, read), atol=1e-3)


def test_layer_skip_probability_before_and_after_step_20():
    state = oracle("a", layer_skip=True, seed=3)
    skipped = {}
    for step in (5, 25):
        state.set_step(step)
        skipped[step] = sum(state.schedule() == "skip" for _ in range(2000)) / 2000
    assert 0.27 < skipped[5] < 0.33 and 0.08 < skipped[25] < 0.12, skipped
    state.layer_skip = False
    assert all(state.schedule() == "consistent" for _ in range(100))


@pytest.mark.parametrize("variant", ["a", "b"])
def test_a_skipped_layer_call_is_plain_attention(variant, monkeypatch):
    attn, state = make_layer(), oracle(variant, rate=1.0)
    hidden = frames_input(6)
    state.begin_write(3)
    consistent = run(attn, state, hidden)
    monkeypatch.setattr(state, "schedule", lambda: "skip")
    skipped = run(attn, state, hidden)
    expected = plain(attn, hidden)
    assert torch.allclose(skipped, expected, atol=1e-6) and not torch.allclose(
        consistent, expected, atol=1e-3
    )


def test_oracle_clear_errors():
    with pytest.raises(ValueError, match="variant must be 'a' or 'b'"):
        OfficialState("c")
    with pytest.raises(ValueError, match="rate must be a number in"):
        OfficialState("a", rate=2)
    attn, state = make_layer(), oracle("b")
    state.begin_read(1)
    with pytest.raises(RuntimeError, match="no bank for step 0"):
        run(attn, state, frames_input(2))
    state.begin_write(3)
    with pytest.raises(RuntimeError, match="not a multiple of the 3 frames"):
        run(attn, state, frames_input(4))
