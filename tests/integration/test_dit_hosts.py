"""Consistent attention on diffusion transformers (FLUX, SD3.5, PixArt-Σ) at the layer and denoiser level:
installed and removed exactly, rate 0 is the stock model, text rows never read other frames, image rows
match the reference op, and frames grow more alike with the rate."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from csa_kernels import consistent_attention_reference
from storydiff.consistency.config import ConsistencyConfig, InvalidSetting
from storydiff.families.attach import apply_consistent_attention, remove_consistent_attention
from storydiff.families.tiny_models import build_tiny_pipeline

NO_SKIP = {"warmup_steps": 0, "skip_prob_early": 0.0, "skip_prob_late": 0.0}
FRAMES, TEXT = 3, 7


@pytest.fixture(scope="module")
def pipes():
    return {
        name: build_tiny_pipeline(name, progress_bar=False)
        for name in ("tiny-flux", "tiny-sd3", "tiny-pixart")
    }


def denoiser_inputs(name, transformer, batch, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    timestep = torch.full((batch,), 500.0)
    if name == "tiny-flux":
        side = 4
        ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).flatten(
            0, 1
        )
        return {
            "hidden_states": randn(batch, side * side, transformer.config.in_channels),
            "encoder_hidden_states": randn(batch, TEXT, transformer.config.joint_attention_dim),
            "pooled_projections": randn(batch, transformer.config.pooled_projection_dim),
            "timestep": timestep / 1000,
            "img_ids": torch.cat([torch.zeros(side * side, 1), ids.float()], dim=1),
            "txt_ids": torch.zeros(TEXT, 3),
            "guidance": torch.full((batch,), 3.5),
        }
    if name == "tiny-sd3":
        return {
            "hidden_states": randn(batch, 4, 8, 8),
            "encoder_hidden_states": randn(batch, TEXT, transformer.config.joint_attention_dim),
            "pooled_projections": randn(batch, transformer.config.pooled_projection_dim),
            "timestep": timestep,
        }
    return {
        "hidden_states": randn(batch, 4, 8, 8),
        "encoder_hidden_states": randn(batch, TEXT, transformer.config.caption_channels),
        "timestep": timestep,
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


def run(name, transformer, batch, seed=0):
    with torch.no_grad():
        return transformer(**denoiser_inputs(name, transformer, batch, seed), return_dict=False)[0]


CASES = [("tiny-flux", 1), ("tiny-sd3", 1), ("tiny-sd3", 2), ("tiny-pixart", 1), ("tiny-pixart", 2)]


@pytest.mark.parametrize(("name", "groups"), CASES, ids=[f"{n}-g{g}" for n, g in CASES])
def test_rate_zero_is_the_stock_denoiser_and_removal_restores_it(pipes, name, groups):
    transformer = pipes[name].transformer
    original = dict(transformer.attn_processors)
    stock = run(name, transformer, FRAMES * groups)
    state = apply_consistent_attention(pipes[name], ConsistencyConfig(rate=0.0, layers="all", **NO_SKIP))
    try:
        state.begin_joint(FRAMES)
        assert torch.equal(run(name, transformer, FRAMES * groups), stock)
    finally:
        remove_consistent_attention(pipes[name])
    assert all(transformer.attn_processors[n] is p for n, p in original.items())
    assert not transformer._forward_pre_hooks


def test_default_layers_per_family(pipes):
    def names(name, layers="default"):
        state = apply_consistent_attention(pipes[name], ConsistencyConfig(layers=layers))
        remove_consistent_attention(pipes[name])
        return [layer.name for layer in state.layers]

    assert names("tiny-flux") == [f"single_transformer_blocks.{i}.attn.processor" for i in range(2)]
    assert names("tiny-flux", "all")[0] == "transformer_blocks.0.attn.processor"
    assert names("tiny-sd3") == [
        "transformer_blocks.0.attn.processor",
        "transformer_blocks.0.attn2.processor",
        "transformer_blocks.1.attn.processor",
    ]
    assert names("tiny-pixart") == [f"transformer_blocks.{i}.attn1.processor" for i in range(2)]
    with pytest.raises(InvalidSetting, match=r"layers 'up' is not a preset of flux denoisers"):
        apply_consistent_attention(pipes["tiny-flux"], ConsistencyConfig(layers="up"))
    with pytest.raises(ValueError, match="installs on UNet2DConditionModel"):
        apply_consistent_attention(torch.nn.Linear(2, 2))


def frame_similarity(out: torch.Tensor) -> float:
    flat = out.flatten(1)
    return F.cosine_similarity(flat[:, None], flat[None, :], dim=-1)[~torch.eye(len(flat), dtype=bool)].mean()


LAYER = {
    "tiny-flux": "transformer_blocks.0.attn",
    "tiny-sd3": "transformer_blocks.1.attn",
    "tiny-pixart": "transformer_blocks.1.attn1",
}


@pytest.mark.parametrize("name", list(LAYER))
def test_image_outputs_of_frames_grow_alike_with_the_rate(pipes, name):
    """At a consistent layer, frames with different inputs give more similar image outputs at rate 1."""
    transformer = pipes[name].transformer
    attn = transformer.get_submodule(LAYER[name])
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(FRAMES, 16, transformer.inner_dim, generator=gen)
    context = (
        None if name == "tiny-pixart" else torch.randn(FRAMES, TEXT, transformer.inner_dim, generator=gen)
    )
    kwargs = {}
    if name == "tiny-flux":
        ids = torch.cat([torch.zeros(TEXT, 3), torch.randn(16, 3, generator=gen)])
        kwargs["image_rotary_emb"] = transformer.pos_embed(ids)
    similarity = []
    for rate in (0.0, 1.0):
        state = apply_consistent_attention(pipes[name], ConsistencyConfig(rate=rate, layers="all", **NO_SKIP))
        try:
            state.begin_joint(FRAMES)
            with torch.no_grad():
                out = attn(hidden, context, **kwargs)
        finally:
            remove_consistent_attention(pipes[name])
        similarity.append(frame_similarity(out[0] if isinstance(out, tuple) else out))
    assert similarity[1] > similarity[0] + 0.05, similarity


# ---------------------------------------------------------------------------------- layer level


def flux_qkv(attn, hidden, context, rotary):
    """FLUX's joint q, k, v as its processor builds them: [text; image], RMS norms, then RoPE."""
    q, k, v = (proj(hidden).unflatten(-1, (-1, attn.head_dim)) for proj in (attn.to_q, attn.to_k, attn.to_v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if context is not None:
        cq, ck, cv = (
            proj(context).unflatten(-1, (-1, attn.head_dim))
            for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        )
        q = torch.cat([attn.norm_added_q(cq), q], dim=1)
        k = torch.cat([attn.norm_added_k(ck), k], dim=1)
        v = torch.cat([cv, v], dim=1)
    q, k = apply_rotary_emb(q, rotary, sequence_dim=1), apply_rotary_emb(k, rotary, sequence_dim=1)
    return (x.transpose(1, 2) for x in (q, k, v))


@pytest.mark.parametrize("block", ["double", "single"])
def test_flux_text_rows_stay_stock_and_image_rows_match_the_reference(pipes, block):
    transformer = pipes["tiny-flux"].transformer
    name = "transformer_blocks.0.attn" if block == "double" else "single_transformer_blocks.0.attn"
    attn = transformer.get_submodule(name)
    stock_processor = attn.processor
    gen = torch.Generator().manual_seed(1)
    image_tokens, dim = 16, transformer.inner_dim
    ids = torch.cat([torch.zeros(TEXT, 3), torch.randn(image_tokens, 3, generator=gen)])
    rotary = transformer.pos_embed(ids)
    image = torch.randn(FRAMES, image_tokens, dim, generator=gen)
    text = torch.randn(FRAMES, TEXT, dim, generator=gen)
    hidden, context = (image, text) if block == "double" else (torch.cat([text, image], dim=1), None)
    with torch.no_grad():
        stock = attn(hidden, context, image_rotary_emb=rotary)
        state = apply_consistent_attention(
            pipes["tiny-flux"], ConsistencyConfig(rate=0.5, layers="all", **NO_SKIP)
        )
        try:
            state.begin_joint(FRAMES)
            state.text_tokens = TEXT  # what the denoiser's forward hook records
            ours = attn(hidden, context, image_rotary_emb=rotary)
            layer = next(layer for layer in state.layers if layer.name == f"{name}.processor")
            ref_idx = state.reference_indices(layer, (TEXT, TEXT + image_tokens), hidden.device)
            q, k, v = flux_qkv(attn, hidden, context, rotary)
        finally:
            remove_consistent_attention(pipes["tiny-flux"])
        assert attn.processor is stock_processor
        expected = consistent_attention_reference(q, k, v, ref_idx, query_rows=(TEXT, TEXT + image_tokens))
        expected = expected.transpose(1, 2).flatten(2)
    if block == "double":
        torch.testing.assert_close(ours[1], stock[1], rtol=0, atol=0)  # the text stream: stock, exactly
        assert not torch.allclose(ours[0], stock[0])
        torch.testing.assert_close(ours[0], attn.to_out[0](expected[:, TEXT:]), rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(ours[:, :TEXT], stock[:, :TEXT], rtol=0, atol=0)
        assert not torch.allclose(ours[:, TEXT:], stock[:, TEXT:])
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_sd3_text_rows_stay_stock_and_image_rows_match_the_reference(pipes):
    transformer = pipes["tiny-sd3"].transformer
    attn = transformer.get_submodule("transformer_blocks.1.attn")
    gen = torch.Generator().manual_seed(2)
    image_tokens, dim = 16, transformer.inner_dim
    hidden = torch.randn(2 * FRAMES, image_tokens, dim, generator=gen)  # CFG: [uncond; cond]
    context = torch.randn(2 * FRAMES, TEXT, dim, generator=gen)
    with torch.no_grad():
        stock = attn(hidden, context)
        state = apply_consistent_attention(pipes["tiny-sd3"], ConsistencyConfig(rate=0.5, **NO_SKIP))
        try:
            state.begin_joint(FRAMES)
            ours = attn(hidden, context)
            layer = next(
                layer for layer in state.layers if layer.name == "transformer_blocks.1.attn.processor"
            )
            ref_idx = state.reference_indices(layer, (0, image_tokens), hidden.device).repeat(2, 1)
        finally:
            remove_consistent_attention(pipes["tiny-sd3"])

        def heads(x):
            return x.unflatten(-1, (attn.heads, -1))

        image_q, image_k = attn.norm_q(heads(attn.to_q(hidden))), attn.norm_k(heads(attn.to_k(hidden)))
        text_q = attn.norm_added_q(heads(attn.add_q_proj(context)))
        text_k = attn.norm_added_k(heads(attn.add_k_proj(context)))
        q, k = torch.cat([image_q, text_q], 1), torch.cat([image_k, text_k], 1)
        v = torch.cat([heads(attn.to_v(hidden)), heads(attn.add_v_proj(context))], 1)
        expected = consistent_attention_reference(
            *(x.transpose(1, 2) for x in (q, k, v)), ref_idx, groups=2, query_rows=(0, image_tokens)
        )
        expected = expected.transpose(1, 2).flatten(2)
        assert expected.shape[1] == image_tokens + TEXT
    torch.testing.assert_close(ours[1], stock[1], rtol=0, atol=0)  # text stream
    assert not torch.allclose(ours[0], stock[0])
    torch.testing.assert_close(ours[0], attn.to_out[0](expected[:, :image_tokens]), rtol=1e-5, atol=1e-5)
