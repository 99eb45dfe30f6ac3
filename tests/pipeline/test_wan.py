"""Consistent attention on Wan 2.x (families/wan.py): shots as story frames, on tiny random pipelines.

- consistency off (rate 0) gives the stock pipeline's latents bit for bit: text to video with true CFG, Wan
  2.2's two experts; remove restores every processor of both experts;
- rate > 0 changes every shot and stays finite; both experts borrow (each runs its own steps);
- layer level: one ``attn1`` with consistency equals a test-local reference that rebuilds q, k, v (RMS
  norms, Wan's 3D RoPE) and places borrowed keys per policy independently (source rows, rows of a grid of
  2T frames for "shift", no rotation for "none"), through the reference op;
- "shift" puts borrowed keys on time positions T..2T-1: none is a position of the reading shot.
"""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from story_helpers import relative_change

from csa_kernels import consistent_attention_reference
from storydiff.consistency.config import ConsistencyConfig
from storydiff.families.attach import apply_consistent_attention, remove_consistent_attention
from storydiff.families.registry import family_of
from storydiff.families.tiny_models import build_tiny_pipeline
from storydiff.families.wan import WanConsistentProcessor, clean_prompts_without_ftfy, time_shift
from storydiff.runs.lockstep import LockstepDenoiser
from storydiff.runs.plan import RunPlan
from storydiff.runs.settings import RunSettings

NO_SKIP = {"warmup_steps": 0, "skip_prob_early": 0.0, "skip_prob_late": 0.0}
PROMPTS = ["a man walking in the rain", "a woman running on a beach", "a dog asleep"]
SIDE, STEPS = 32, 3


def build(name: str):
    return build_tiny_pipeline(name, progress_bar=False)


@pytest.fixture(scope="module", params=["tiny-wan", "tiny-wan2.2"])
def pipe(request):
    return build(request.param)


def stock_latents(pipe, prompts, seeds, guidance=5.0):
    return pipe(
        prompt=prompts,
        negative_prompt=[""] * len(prompts),
        num_frames=pipe.default_num_frames,
        height=SIDE,
        width=SIDE,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        max_sequence_length=pipe.tokenizer.model_max_length,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="latent",
    ).frames


def joint_latents(pipe, prompts, config: ConsistencyConfig, guidance=5.0) -> torch.Tensor:
    """Every shot denoised in one batch, all attending to each other (joint mode), through the family."""
    state = apply_consistent_attention(pipe, config)
    try:
        settings = RunSettings(
            mode="window", num_inference_steps=STEPS, guidance_scale=guidance, height=SIDE, width=SIDE, seed=1
        )
        denoiser = LockstepDenoiser(pipe, RunPlan.from_prompts(prompts, settings))
        state.begin_joint(len(prompts))
        for step in range(STEPS):
            state.set_step(step)
            denoiser.step(list(range(len(prompts))), step)
        return denoiser.latents
    finally:
        state.end()
        remove_consistent_attention(pipe)


@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["cfg", "no-cfg"])
def test_rate_zero_equals_the_stock_pipeline_bit_for_bit(pipe, guidance):
    seeds = [1 + i for i in range(len(PROMPTS))]  # RunSettings(seed=1): frame i starts from seed 1 + i
    stock = stock_latents(pipe, PROMPTS, seeds, guidance)
    ours = joint_latents(pipe, PROMPTS, ConsistencyConfig(rate=0.0, **NO_SKIP), guidance)
    assert torch.equal(ours, stock)


def test_remove_restores_every_processor_of_every_expert(pipe):
    experts = [t for t in (pipe.transformer, getattr(pipe, "transformer_2", None)) if t is not None]
    before = [dict(t.attn_processors) for t in experts]
    state = apply_consistent_attention(pipe, ConsistencyConfig(rate=0.5))
    for transformer in experts:
        processors = transformer.attn_processors
        ours = [n for n, p in processors.items() if isinstance(p, WanConsistentProcessor)]
        assert ours == [layer.name for layer in state.layers] == [n for n in processors if ".attn1." in n]
    remove_consistent_attention(pipe)
    for transformer, old in zip(experts, before, strict=True):
        assert transformer.attn_processors == old


def test_sharing_changes_every_shot_and_both_experts_borrow(pipe, monkeypatch):
    calls = {}
    real = WanConsistentProcessor.__call__

    def spy(self, attn, hidden_states, *args, **kwargs):
        owner = (
            "second" if any(attn is m for m in getattr(pipe.transformer_2, "modules", list)()) else "first"
        )
        calls[owner] = calls.get(owner, 0) + 1
        return real(self, attn, hidden_states, *args, **kwargs)

    monkeypatch.setattr(WanConsistentProcessor, "__call__", spy)
    plain = joint_latents(pipe, PROMPTS, ConsistencyConfig(rate=0.0, **NO_SKIP))
    shared = joint_latents(pipe, PROMPTS, ConsistencyConfig(rate=0.5, **NO_SKIP))
    assert torch.isfinite(shared).all()
    change = (shared - plain).flatten(1).abs().amax(dim=1) / plain.abs().max()
    assert (change > 1e-3).all(), change
    if pipe.transformer_2 is not None:
        assert calls.get("second", 0) > 0 and calls.get("first", 0) > 0, calls


# ------------------------------------------------------------------------------------ layer level

FRAMES, T, H, W = 2, 3, 2, 3  # shots, latent frames, token rows, token columns: N = 18


def rope_rows(transformer, frames: int):
    """Wan's (cos, sin), (1, N, 1, D), for a grid of ``frames`` latent frames."""
    probe = torch.zeros(1, transformer.config.in_channels, frames, 2 * H, 2 * W)
    return transformer.rope(probe)


def wan_rotate(x, cos, sin):
    """RoPE on (B, N, H, D) by (1, N, 1, D) rows, written out independently: pairs (2c, 2c+1)."""
    x0, x1 = x[..., 0::2].double(), x[..., 1::2].double()
    c, s = cos[..., 0::2].double(), sin[..., 0::2].double()
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)
    return out.to(x.dtype)


@pytest.mark.parametrize("policy", ["source", "shift", "none"])
def test_layer_matches_the_reference(policy):
    pipe = build("tiny-wan")
    transformer = pipe.transformer
    attn = transformer.blocks[1].attn1
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(FRAMES, T * H * W, attn.inner_dim, generator=gen)
    rotary = rope_rows(transformer, T)
    config = ConsistencyConfig(rate=0.5, rope=policy, **NO_SKIP)
    with torch.no_grad():
        state = apply_consistent_attention(pipe, config)
        try:
            state.begin_joint(FRAMES)
            ours = attn(hidden, None, None, rotary)
            layer = next(layer for layer in state.layers if layer.name == "blocks.1.attn1.processor")
            ref_idx = state.reference_indices(layer, (0, T * H * W), hidden.device)
        finally:
            remove_consistent_attention(pipe)
        q, k, v = (proj(hidden) for proj in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (x.unflatten(2, (attn.heads, -1)) for x in (q, k, v))
        rq, rk = (wan_rotate(x, *rotary) for x in (q, k))
        if policy == "source":
            borrowed = rk
        elif policy == "shift":  # the same (h, w), T latent frames later: rows T·H·W.. of a 2T-frame grid
            borrowed = wan_rotate(k, *(x[:, T * H * W :] for x in rope_rows(transformer, 2 * T)))
        else:
            borrowed = k
        borrowed = borrowed.transpose(1, 2)
        pool = torch.stack([borrowed[j][:, ref_idx[j]] for j in range(FRAMES)])
        out = consistent_attention_reference(
            rq.transpose(1, 2), rk.transpose(1, 2), v.transpose(1, 2), ref_idx, pool_k=pool
        )
        expected = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2)))
    assert ref_idx.shape[1] > 0
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_shift_lands_outside_every_position_of_the_reading_shot():
    """The shift rotation turns a key at (t, h, w) to (t + T, h, w): T..2T-1, never 0..T-1."""
    transformer = build("tiny-wan").transformer
    pos_embed = transformer.rope
    rotary = rope_rows(transformer, T)
    cos, sin = time_shift(rotary, pos_embed)
    table = pos_embed.freqs_cos[:, : pos_embed.t_dim], pos_embed.freqs_sin[:, : pos_embed.t_dim]
    t_channels = pos_embed.t_dim
    # the time channels of the shift equal the table's row T exactly (up to rounding), no other row
    distance = (cos[0, :t_channels] - table[0]).abs().amax(dim=1) + (
        sin[0, :t_channels] - table[1]
    ).abs().amax(dim=1)
    assert distance.argmin().item() == T and distance[T] < 1e-6
    # height and width channels are not turned
    assert torch.equal(cos[0, t_channels:], torch.ones_like(cos[0, t_channels:]))
    assert torch.equal(sin[0, t_channels:], torch.zeros_like(sin[0, t_channels:]))
    # a borrowed key at time t of its shot lands at t + T: outside the reader's 0..T-1 (and within the table)
    landed = {t + T for t in range(T)}
    assert landed.isdisjoint(range(T)) and max(landed) < transformer.config.rope_max_seq_len


def test_the_family():
    pipe = build("tiny-wan")
    # a config without a rate takes the family's: 0.1 for video, 0.5 (the official) for images
    state = apply_consistent_attention(pipe, ConsistencyConfig())
    remove_consistent_attention(pipe)
    image_pipe = build_tiny_pipeline("tiny-sd15", progress_bar=False)
    image_state = apply_consistent_attention(image_pipe, ConsistencyConfig())
    remove_consistent_attention(image_pipe)
    assert state.config.rate == 0.1 and image_state.config.rate == 0.5
    assert apply_consistent_attention(pipe, ConsistencyConfig(rate=0.3)).config.rate == 0.3
    remove_consistent_attention(pipe)
    family = family_of(pipe)
    assert family.name == "wan" and family.video and family.cfg_passes == 2
    assert family.noise_shape(SIDE, SIDE) == (4, 3, 4, 4)
    frames = family.decode(torch.zeros(4, 3, 4, 4), SIDE, SIDE)
    assert len(frames) == pipe.default_num_frames and frames[0].size == (SIDE, SIDE)


# ------------------------------------------------------------------------------------ image to video


def keyframe(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((SIDE, SIDE, 3)) * 255).astype("uint8"))


def i2v_latents(pipe, prompts, keyframes, config: ConsistencyConfig) -> torch.Tensor:
    state = apply_consistent_attention(pipe, config)
    try:
        settings = RunSettings(mode="window", num_inference_steps=STEPS, height=SIDE, width=SIDE, seed=1)
        plan = dataclasses.replace(RunPlan.from_prompts(prompts, settings), keyframes=tuple(keyframes))
        denoiser = LockstepDenoiser(pipe, plan)
        state.begin_joint(len(prompts))
        for step in range(STEPS):
            state.set_step(step)
            denoiser.step(list(range(len(prompts))), step)
        return denoiser.latents
    finally:
        state.end()
        remove_consistent_attention(pipe)


@pytest.mark.parametrize(
    ("name", "last"),
    [
        ("tiny-wan2.2-i2v", False),
        ("tiny-wan2.2-i2v", True),
        ("tiny-wan-i2v", False),
        ("tiny-wan-flf2v", True),
    ],
    ids=["two-experts", "two-experts-first-last", "2.1-i2v", "2.1-flf2v"],
)
def test_image_to_video_rate_zero_equals_the_stock_pipeline(name, last):
    """The stock pipeline conditions a batch on one image (and one last image): so do the shots here."""
    pipe = build(name)
    clean_prompts_without_ftfy()  # what the family does for the stock pipeline when ftfy is missing
    prompts = PROMPTS[:2]
    first, end = keyframe(0), keyframe(1) if last else None
    stock = pipe(
        image=first,
        last_image=end,
        prompt=prompts,
        negative_prompt=[""] * len(prompts),
        num_frames=pipe.default_num_frames,
        height=SIDE,
        width=SIDE,
        num_inference_steps=STEPS,
        max_sequence_length=pipe.tokenizer.model_max_length,
        generator=[torch.Generator().manual_seed(1 + i) for i in range(len(prompts))],
        output_type="latent",
    ).frames
    ours = i2v_latents(pipe, prompts, [(first, end)] * len(prompts), ConsistencyConfig(rate=0.0, **NO_SKIP))
    assert torch.equal(ours, stock)
    shared = i2v_latents(pipe, prompts, [(first, end)] * len(prompts), ConsistencyConfig(rate=0.5, **NO_SKIP))
    assert torch.isfinite(shared).all() and relative_change(shared, stock) > 1e-3


def test_each_shot_gets_its_own_keyframe():
    """A shot's condition comes from its own keyframe: another image for shot 1 changes shot 1 only."""
    pipe = build("tiny-wan2.2-i2v")
    config = ConsistencyConfig(rate=0.0, **NO_SKIP)
    a = i2v_latents(pipe, PROMPTS[:2], [(keyframe(0), None), (keyframe(1), None)], config)
    b = i2v_latents(pipe, PROMPTS[:2], [(keyframe(0), None), (keyframe(2), None)], config)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])


@pytest.mark.parametrize(("name", "last"), [("tiny-wan-i2v", True), ("tiny-wan-flf2v", False)])
def test_image_encoder_models_take_the_keyframes_they_are_made_for(name, last):
    pipe = build(name)
    with pytest.raises(ValueError, match="FLF2V"):
        i2v_latents(pipe, PROMPTS[:1], [(keyframe(0), keyframe(1) if last else None)], ConsistencyConfig())


def test_fused_projections_give_the_same_layer():
    """``fuse_qkv_projections`` (one to_qkv linear): our processor reads it as the stock one does."""
    pipe = build("tiny-wan")
    attn = pipe.transformer.blocks[0].attn1
    hidden = torch.randn(FRAMES, T * H * W, attn.inner_dim, generator=torch.Generator().manual_seed(4))
    rotary = rope_rows(pipe.transformer, T)

    def layer() -> torch.Tensor:
        state = apply_consistent_attention(pipe, ConsistencyConfig(rate=0.5, **NO_SKIP))
        try:
            state.begin_joint(FRAMES)
            with torch.no_grad():
                return attn(hidden, None, None, rotary)
        finally:
            remove_consistent_attention(pipe)

    separate = layer()
    pipe.transformer.fuse_qkv_projections()
    assert attn.fused_projections
    torch.testing.assert_close(layer(), separate, rtol=1e-5, atol=1e-5)
