"""The consistent-attention processor on a single diffusers Attention layer.

Parity: small reimplementations of the official StoryDiffusion variants (DESIGN.md §2), fed the same
token selection, must match the processor.
"""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from storydiff.attention import ConsistentAttnProcessor
from storydiff.config import ConsistencyConfig
from storydiff.state import ConsistencyState, LayerInfo

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


def heads(x, attn):
    return x.view(x.shape[0], -1, attn.heads, CHANNELS // HEADS).transpose(1, 2)


def finish(out, attn):
    out = out.transpose(1, 2).reshape(out.shape[0], -1, CHANNELS)
    return attn.to_out[1](attn.to_out[0](out))


def official_a(attn, hidden, ref_idx, groups):
    """Variant A: per CFG half, all frames' tokens in one sequence, a dense boolean mask, one SDPA."""
    batch, tokens, _ = hidden.shape
    frames = batch // groups
    sampled = torch.zeros(batch, tokens, dtype=torch.bool)
    sampled.scatter_(1, ref_idx, True)
    frame_of = torch.arange(frames * tokens) // tokens
    outs = []
    for g in range(groups):
        x = hidden[g * frames : (g + 1) * frames].reshape(1, frames * tokens, CHANNELS)
        q, k, v = (heads(proj(x), attn) for proj in (attn.to_q, attn.to_k, attn.to_v))
        mask = (frame_of[:, None] == frame_of[None, :]) | sampled[g * frames : (g + 1) * frames].reshape(
            1, -1
        )
        outs.append(
            finish(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), attn).reshape(frames, tokens, -1)
        )
    return torch.cat(outs)


def official_b(attn, hidden, ref_idx, groups):
    """Variant B: a loop over frames; gather the other frames' sampled hidden states, concat, re-project."""
    batch = hidden.shape[0]
    frames = batch // groups
    outs = []
    for i in range(batch):
        g0 = (i // frames) * frames
        context = torch.cat([hidden[i]] + [hidden[j][ref_idx[j]] for j in range(g0, g0 + frames) if j != i])
        q = heads(attn.to_q(hidden[i : i + 1]), attn)
        k, v = heads(attn.to_k(context[None]), attn), heads(attn.to_v(context[None]), attn)
        outs.append(finish(F.scaled_dot_product_attention(q, k, v), attn))
    return torch.cat(outs)


@pytest.mark.parametrize("groups", [1, 2], ids=["cfg-off", "cfg-on"])
@pytest.mark.parametrize("official", [official_a, official_b], ids=["variant-A", "variant-B"])
def test_parity_with_official_variants(official, groups):
    frames = 4
    attn, state = make_layer(rate=0.4)
    hidden = frames_input(frames * groups)
    state.begin_joint(frames)
    with torch.no_grad():
        ours = attn(hidden)
        ref_idx = state.reference_indices(LAYER, hidden.shape[1], hidden.device).repeat(groups, 1)
        expected = official(attn, hidden, ref_idx, groups)
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
