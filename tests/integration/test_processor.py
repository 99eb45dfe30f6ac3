"""The consistent-attention processor on a single diffusers Attention layer.

Parity: the official StoryDiffusion variants (the oracle, consistency/official.py), fed our token selection,
must match the processor when writing and when reading a bank.
"""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from storydiff.consistency.config import ConsistencyConfig
from storydiff.consistency.official import OfficialAttnProcessor, OfficialState, keep_from_indices
from storydiff.consistency.processors import ConsistentAttnProcessor
from storydiff.consistency.state import ConsistencyState, LayerInfo

CHANNELS, HEADS = 32, 2
LAYER = LayerInfo(name="up_blocks.0.attentions.0.transformer_blocks.0.attn1.processor", index=0, level=16)


def make_layer(rate, seed=0, **config):
    torch.manual_seed(seed)
    attn = Attention(query_dim=CHANNELS, heads=HEADS, dim_head=CHANNELS // HEADS).eval()
    config = {"warmup_steps": 0, "skip_prob_early": 0.0, "skip_prob_late": 0.0, **config}
    cfg = ConsistencyConfig(rate=rate, **config)
    state = ConsistencyState(cfg, [LAYER], offload_bank=False)
    attn.set_processor(ConsistentAttnProcessor(state, LAYER))
    return attn, state


def frames_input(batch, tokens=24, seed=1):
    return torch.randn(batch, tokens, CHANNELS, generator=torch.Generator().manual_seed(seed))


def install_oracle(attn, variant, keep):
    """The official processor on ``attn``, schedule off, reading our selection ``keep`` (frames, tokens)."""
    oracle = OfficialState(variant, warmup=False, layer_skip=False, select=lambda step, frames, tokens: keep)
    attn.set_processor(OfficialAttnProcessor(oracle, LAYER.name))
    return oracle


@pytest.mark.parametrize("groups", [1, 2], ids=["cfg-off", "cfg-on"])
@pytest.mark.parametrize("variant", ["a", "b"], ids=["variant-A", "variant-B"])
def test_parity_with_official_variants(variant, groups):
    """Identity frames denoised together: our processor and the official one on our token selection."""
    frames, tokens = 4, 24
    attn, state = make_layer(rate=0.4)
    hidden = frames_input(frames * groups, tokens)
    state.begin_joint(frames)
    with torch.no_grad():
        ours = attn(hidden)
        keep = keep_from_indices(state.reference_indices(LAYER, (0, tokens), hidden.device), tokens)
        install_oracle(attn, variant, keep).begin_write(frames)
        expected = attn(hidden)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2], ids=["cfg-off", "cfg-on"])
@pytest.mark.parametrize("variant", ["a", "b"], ids=["variant-A", "variant-B"])
def test_read_parity_with_official_variants(variant, groups):
    """Two frames reading the bank of three identity frames (official A: full hidden states masked by
    the draw; B: sampled hidden states; ours: sampled K/V) give the same outputs."""
    ids, tokens = 3, 24
    attn, state = make_layer(rate=0.4)
    id_hidden, read_hidden = frames_input(ids * groups, tokens), frames_input(2 * groups, tokens, seed=2)
    with torch.no_grad():
        state.begin_write("hero", ids)
        attn(id_hidden)
        keep = keep_from_indices(state.reference_indices(LAYER, (0, tokens), id_hidden.device), tokens)
        state.begin_read([("hero",), ("hero",)])
        ours = attn(read_hidden)
        oracle = install_oracle(attn, variant, keep)
        oracle.begin_write(ids)
        attn(id_hidden)
        oracle.begin_read(2)
        expected = attn(read_hidden)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_rate_zero_equals_stock_processor():
    attn, state = make_layer(rate=0.0)
    hidden = frames_input(6)
    state.begin_joint(3)
    with torch.no_grad():
        ours = attn(hidden)
        attn.set_processor(AttnProcessor2_0())
        stock = attn(hidden)
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-6)


def mean_cross_frame_similarity(out, frames):
    flat = F.normalize(out.reshape(frames, -1), dim=1)
    sim = flat @ flat.T
    return (sim.sum() - sim.diagonal().sum()).item() / (frames * (frames - 1))


def test_consistency_makes_frames_more_alike():
    """Cosine similarity between frames' attention outputs rises with the sampling rate."""
    frames = 4
    hidden = frames_input(frames, tokens=64, seed=5)
    sims = []
    for rate in (0.0, 0.5, 1.0):
        attn, state = make_layer(rate=rate)
        state.begin_joint(frames)
        with torch.no_grad():
            sims.append(mean_cross_frame_similarity(attn(hidden), frames))
    assert sims[0] < sims[1] < sims[2], sims


def test_off_phase_and_warmup_are_stock():
    attn, state = make_layer(rate=1.0, warmup_steps=2)
    hidden = frames_input(2)
    with torch.no_grad():
        off = attn(hidden)  # phase "off"
        state.begin_joint(2)
        warm = attn(hidden)  # step 0 < warmup_steps
        state.set_step(2)
        active = attn(hidden)
        attn.set_processor(AttnProcessor2_0())
        plain = attn(hidden)
    torch.testing.assert_close(off, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(warm, plain, rtol=0, atol=1e-6)
    assert not torch.allclose(active, plain, atol=1e-3)


def test_batch_not_multiple_of_frames_is_a_clear_error():
    attn, state = make_layer(rate=0.5)
    state.begin_joint(4)
    with pytest.raises(RuntimeError, match="not a multiple of the 4 frames"):
        attn(frames_input(6))


def test_skip_schedule_is_deterministic_and_near_its_probability():
    cfg = ConsistencyConfig(skip_prob_early=0.3, skip_prob_late=0.1, skip_switch_step=20, warmup_steps=0)
    layers = [LayerInfo(f"l{i}", i, 32) for i in range(200)]
    state = ConsistencyState(cfg, layers, offload_bank=False)
    state.begin_joint(2)
    early = [state.consistent_now(layer) for layer in layers]
    again = [state.consistent_now(layer) for layer in layers]
    state.set_step(25)
    late = [state.consistent_now(layer) for layer in layers]
    assert early == again
    assert 0.2 < 1 - sum(early) / 200 < 0.4 and 0.03 < 1 - sum(late) / 200 < 0.18


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": 1.5}, "rate must be a number in"),
        ({"rate": -0.1}, "rate must be a number in"),
        ({"level_rates": {16: 2.0}}, r"level_rates\[16\]"),
        ({"level_rates": {12: 0.5}}, "level_rates keys"),
        ({"layers": "down"}, "layers must be one of"),
        ({"window": 0}, "window must be None"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"skip_prob_early": 2}, "skip_prob_early"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConsistencyConfig(**kwargs)
