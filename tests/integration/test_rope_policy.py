"""ConsistencyConfig.rope on FLUX: where borrowed keys sit (source, shift, none; consistency/rope.py).

- the fact the policies rest on: turning a RoPE-rotated key by Δ is rotating the raw key to pos + Δ, and
  turning it by -pos undoes it (fp32 rounding); ``rotate`` is diffusers' FLUX RoPE math, bit for bit;
- "source" is the plain path: the op gets no pool_k, and an identity re-positioning through every mode
  (joint, bank write, read, window chunks with their boundary cache) changes no bit;
- at layer level, "shift" and "none" image rows equal the reference op with borrowed keys computed
  independently from pre-RoPE keys (rotated to (1, h, w), or not at all); text rows stay exactly stock;
- the policies differ when tokens are borrowed, agree exactly at rate 0; a bank written with "shift" holds
  shifted keys and read frames attend to them; banks record the policy;
- other hosts and bad values are refused, naming ``rope``.
"""

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

import storydiff.consistency.modes as modes
import storydiff.consistency.rope as rope
from csa_kernels import consistent_attention_reference
from storydiff.consistency.bank import signature_differences
from storydiff.consistency.config import ConsistencyConfig, InvalidSetting
from storydiff.consistency.rope import rotate, shift_ids
from storydiff.consistency.window import WindowMode
from storydiff.families.attach import apply_consistent_attention, remove_consistent_attention
from storydiff.families.tiny_models import build_tiny_pipeline

NO_SKIP = {"warmup_steps": 0, "skip_prob_early": 0.0, "skip_prob_late": 0.0}
FRAMES, TEXT, SIDE = 3, 7, 4
IMAGE = (TEXT, TEXT + SIDE * SIDE)  # image tokens of the joint [text; image] sequence
POLICIES = ("source", "shift", "none")


@pytest.fixture(scope="module")
def flux():
    return build_tiny_pipeline("tiny-flux", progress_bar=False)


def grid_ids() -> torch.Tensor:
    """FLUX's ids of the joint sequence: text (0, 0, 0), image (0, h, w)."""
    rows, cols = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    image = torch.stack([torch.zeros(SIDE * SIDE), rows.flatten(), cols.flatten()], dim=1)
    return torch.cat([torch.zeros(TEXT, 3), image.float()])


def denoiser_inputs(transformer, batch: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    config = transformer.config
    ids = grid_ids()
    return {
        "hidden_states": torch.randn(batch, SIDE * SIDE, config.in_channels, generator=gen),
        "encoder_hidden_states": torch.randn(batch, TEXT, config.joint_attention_dim, generator=gen),
        "pooled_projections": torch.randn(batch, config.pooled_projection_dim, generator=gen),
        "timestep": torch.full((batch,), 0.5),
        "img_ids": ids[TEXT:],
        "txt_ids": ids[:TEXT],
        "guidance": torch.full((batch,), 3.5),
    }


def run_denoiser(transformer, batch: int, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**denoiser_inputs(transformer, batch, seed), return_dict=False)[0]


# ------------------------------------------------------------------------------ the rotation fact


def test_rotating_a_rotated_key_moves_it(flux):
    pos_embed = flux.transformer.pos_embed
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(2, TEXT + SIDE * SIDE, 2, 16, generator=gen)  # (B, N, H, D), FLUX's layout
    ids = grid_ids()
    at_source = pos_embed(ids)
    rotated = apply_rotary_emb(k, at_source, sequence_dim=1)
    # ``rotate`` is diffusers' math exactly (one row of cos/sin per token, broadcast over heads)
    assert torch.equal(rotate(k, at_source[0][:, None], at_source[1][:, None]), rotated)
    # by the shift ids: the raw key rotated to (1, h, w); by any Δ: to pos + Δ
    for delta in (shift_ids(3), torch.tensor([[0.7, -2.0, 3.5]])):
        by_delta = pos_embed(delta)
        moved = rotate(rotated, *by_delta)
        expected = apply_rotary_emb(k, pos_embed(ids + delta), sequence_dim=1)
        torch.testing.assert_close(moved, expected, rtol=1e-6, atol=2e-6)
    # by -pos (cos, -sin of the source row): no rotation
    undone = rotate(rotated, at_source[0][:, None], -at_source[1][:, None])
    torch.testing.assert_close(undone, k, rtol=1e-6, atol=2e-6)


# ------------------------------------------------------------------------- "source" is the plain path


def test_source_hands_the_op_no_pool(flux, monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("pool_k"))
        return real(*args, **kwargs)

    real = modes.consistent_attention
    monkeypatch.setattr(modes, "consistent_attention", spy)
    state = apply_consistent_attention(flux, ConsistencyConfig(rate=0.5, layers="all", **NO_SKIP))
    try:
        state.begin_joint(FRAMES)
        run_denoiser(flux.transformer, FRAMES)
    finally:
        remove_consistent_attention(flux)
    assert len(calls) == len(state.layers) and all(pool is None for pool in calls)


def run_every_mode(flux, config: ConsistencyConfig) -> list[torch.Tensor]:
    """Joint, write (+ the bank), read, and a window story in two chunks (frame 2 reads frame 1 from the
    boundary cache)."""
    transformer = flux.transformer
    state = apply_consistent_attention(flux, config)
    outputs = []
    try:
        state.begin_joint(FRAMES)
        outputs.append(run_denoiser(transformer, FRAMES))
        state.begin_write("A", FRAMES)
        outputs.append(run_denoiser(transformer, FRAMES, seed=1))
        outputs += state.bank.get(("A",), 0, state.layers[-1].name, "cpu")
        state.begin_read([("A",), ()])
        outputs.append(run_denoiser(transformer, 2, seed=2))
        mode = WindowMode([True] * 4, window=1)
        state.begin(mode)
        for start, stop in ((0, 2), (2, 4)):
            mode.begin_chunk(start, stop)
            outputs.append(run_denoiser(transformer, 2, seed=3 + start))
            mode.end_chunk()
    finally:
        remove_consistent_attention(flux)
    return outputs


def test_identity_repositioning_changes_no_bit(flux, monkeypatch):
    """The pool_k path itself (gather, hand to the op, bank, boundary cache) is exact: re-positioning by
    nothing gives "source"'s outputs bit for bit in every mode."""
    config = ConsistencyConfig(rate=0.5, layers="all", **NO_SKIP)
    plain = run_every_mode(flux, config)
    monkeypatch.setattr(rope, "reposition_for", lambda *args: lambda pool, positions: pool)
    identity = run_every_mode(flux, config)
    for a, b in zip(plain, identity, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------ layer level


def flux_qkv(attn, hidden, context):
    """FLUX's joint q, k, v before RoPE, (B, N, H, D): [text; image], RMS norms, as its processor."""
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
    return q, k, v


def borrowed_keys(raw_k: torch.Tensor, ref_idx: torch.Tensor, policy: str, pos_embed) -> torch.Tensor:
    """(B, H, S, D) keys other frames see, from pre-RoPE keys: rotated to the source ids, to the source
    ids + (1, 0, 0), or not at all."""
    ids = grid_ids()
    if policy == "source":
        raw_k = apply_rotary_emb(raw_k, pos_embed(ids), sequence_dim=1)
    elif policy == "shift":
        raw_k = apply_rotary_emb(raw_k, pos_embed(ids + torch.tensor([1.0, 0.0, 0.0])), sequence_dim=1)
    k = raw_k.transpose(1, 2)  # (B, H, N, D)
    return torch.stack([k[j][:, ref_idx[j]] for j in range(k.shape[0])])


def layer_inputs(transformer, block: str, seed: int, frames: int = FRAMES):
    name = "transformer_blocks.0.attn" if block == "double" else "single_transformer_blocks.0.attn"
    attn = transformer.get_submodule(name)
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(frames, SIDE * SIDE, transformer.inner_dim, generator=gen)
    text = torch.randn(frames, TEXT, transformer.inner_dim, generator=gen)
    hidden, context = (image, text) if block == "double" else (torch.cat([text, image], dim=1), None)
    return name, attn, hidden, context


def image_and_text(out, block: str):
    """(image rows, text rows) of an attention module's output (double blocks project each stream)."""
    return (out[0], out[1]) if block == "double" else (out[:, TEXT:], out[:, :TEXT])


def expected_rows(attn, hidden, context, ref_idx, policy, pos_embed, block, **op_kwargs):
    """Image rows of the layer's output from the reference op, borrowed keys built independently."""
    raw_q, raw_k, v = flux_qkv(attn, hidden, context)
    rotary = pos_embed(grid_ids())
    q, k = (apply_rotary_emb(x, rotary, sequence_dim=1).transpose(1, 2) for x in (raw_q, raw_k))
    pool = borrowed_keys(raw_k, ref_idx, policy, pos_embed)
    out = consistent_attention_reference(
        q, k, v.transpose(1, 2), ref_idx, query_rows=IMAGE, pool_k=pool, **op_kwargs
    )
    out = out.transpose(1, 2).flatten(2)[:, TEXT:]
    return attn.to_out[0](out) if block == "double" else out


@pytest.mark.parametrize("block", ["double", "single"])
@pytest.mark.parametrize("policy", POLICIES)
def test_image_rows_match_the_reference_and_text_rows_stay_stock(flux, policy, block):
    transformer = flux.transformer
    name, attn, hidden, context = layer_inputs(transformer, block, seed=1)
    rotary = transformer.pos_embed(grid_ids())
    config = ConsistencyConfig(rate=0.5, layers="all", rope=policy, **NO_SKIP)
    with torch.no_grad():
        stock = image_and_text(attn(hidden, context, image_rotary_emb=rotary), block)
        state = apply_consistent_attention(flux, config)
        try:
            state.begin_joint(FRAMES)
            state.text_tokens = TEXT  # what the denoiser's forward hook records
            ours = image_and_text(attn(hidden, context, image_rotary_emb=rotary), block)
            layer = next(layer for layer in state.layers if layer.name == f"{name}.processor")
            ref_idx = state.reference_indices(layer, IMAGE, hidden.device)
        finally:
            remove_consistent_attention(flux)
        expected = expected_rows(attn, hidden, context, ref_idx, policy, transformer.pos_embed, block)
    torch.testing.assert_close(ours[1], stock[1], rtol=0, atol=0)  # text rows: stock, exactly
    torch.testing.assert_close(ours[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["shift", "none"])
def test_window_mode_repositions_in_chunk_and_across_the_boundary(flux, policy):
    """Story of 3 frames, window 1: one chunk (frames see neighbours in the batch), then chunks [0, 2) and
    [2, 3) (frame 2 reads frame 1's keys from the boundary cache): both re-positioned."""
    transformer = flux.transformer
    name, attn, hidden, context = layer_inputs(transformer, "single", seed=4)
    rotary = transformer.pos_embed(grid_ids())
    config = ConsistencyConfig(rate=0.5, layers="all", rope=policy, window=1, **NO_SKIP)
    with torch.no_grad():
        state = apply_consistent_attention(flux, config)
        try:
            state.text_tokens = TEXT
            state.begin(WindowMode([True] * FRAMES, window=1))
            whole = attn(hidden, context, image_rotary_emb=rotary)
            mode = WindowMode([True] * FRAMES, window=1)
            state.begin(mode)
            mode.begin_chunk(0, 2)
            attn(hidden[:2], None, image_rotary_emb=rotary)
            mode.end_chunk()
            mode.begin_chunk(2, 3)
            last = attn(hidden[2:], None, image_rotary_emb=rotary)
            layer = next(layer for layer in state.layers if layer.name == f"{name}.processor")
            ref_idx = state.frame_reference_indices(layer, range(FRAMES), IMAGE, hidden.device)
        finally:
            remove_consistent_attention(flux)
        expected = expected_rows(
            attn, hidden, None, ref_idx, policy, transformer.pos_embed, "single", window=1
        )
    torch.testing.assert_close(whole[:, TEXT:], expected, rtol=1e-5, atol=1e-5)
    # frame 2 sees frame 1 only: the reference over frames 1 and 2, frame 2's rows
    pair = expected_rows(attn, hidden[1:], None, ref_idx[1:], policy, transformer.pos_embed, "single")
    torch.testing.assert_close(last[:, TEXT:], pair[1:], rtol=1e-5, atol=1e-5)


def test_policies_differ_when_borrowing_and_agree_at_rate_zero(flux):
    def outputs(rate: float) -> list[torch.Tensor]:
        result = []
        for policy in POLICIES:
            apply_consistent_attention(
                flux, ConsistencyConfig(rate=rate, layers="all", rope=policy, **NO_SKIP)
            )
            try:
                flux.transformer._storydiff_consistency[0].begin_joint(FRAMES)
                result.append(run_denoiser(flux.transformer, FRAMES))
            finally:
                remove_consistent_attention(flux)
        return result

    stock = run_denoiser(flux.transformer, FRAMES)
    assert all(torch.equal(out, stock) for out in outputs(0.0))
    source, shift, none = outputs(0.5)
    for a, b in ((source, shift), (source, none), (shift, none)):
        assert (a - b).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------- banks


def test_a_bank_written_with_shift_holds_shifted_keys_and_readers_see_them(flux):
    transformer = flux.transformer
    name, attn, hidden, context = layer_inputs(transformer, "double", seed=5)
    rotary = transformer.pos_embed(grid_ids())
    config = ConsistencyConfig(rate=0.5, layers="all", rope="shift", **NO_SKIP)
    with torch.no_grad():
        state = apply_consistent_attention(flux, config)
        try:
            assert state.host["rope"] == "shift"  # recorded in the bank signature
            state.begin_write("A", FRAMES)
            attn(hidden, context, image_rotary_emb=rotary)
            layer = next(layer for layer in state.layers if layer.name == f"{name}.processor")
            ref_idx = state.reference_indices(layer, IMAGE, hidden.device)
            bank_k, bank_v = state.bank.get(("A",), 0, layer.name, "cpu")
            _, _, reader_hidden, reader_context = layer_inputs(transformer, "double", 6, frames=1)
            state.begin_read([("A",)])
            read = attn(reader_hidden, reader_context, image_rotary_emb=rotary)
        finally:
            remove_consistent_attention(flux)
        _, raw_k, v = flux_qkv(attn, hidden, context)
        shifted = borrowed_keys(raw_k, ref_idx, "shift", transformer.pos_embed)  # (B, H, S, D)
        values = torch.stack([v.transpose(1, 2)[j][:, ref_idx[j]] for j in range(FRAMES)])

        def bank_layout(x):  # (B, H, S, D) -> (1, H, B·S, D): frames one after another
            return x.transpose(1, 2).flatten(0, 1)[None].transpose(1, 2)

        torch.testing.assert_close(bank_k, bank_layout(shifted), rtol=1e-5, atol=1e-5)
        assert torch.equal(bank_v, bank_layout(values))  # values are never moved

        q, k, v = flux_qkv(attn, reader_hidden, reader_context)
        q, k = (apply_rotary_emb(x, rotary, sequence_dim=1).transpose(1, 2) for x in (q, k))
        nothing = torch.empty(1, 0, dtype=torch.int64)
        expected = consistent_attention_reference(
            q, k, v.transpose(1, 2), nothing, bank_k=bank_layout(shifted), bank_v=bank_v, query_rows=IMAGE
        )
        expected = attn.to_out[0](expected.transpose(1, 2).flatten(2)[:, TEXT:])
    torch.testing.assert_close(read[0], expected, rtol=1e-5, atol=1e-5)


def test_banks_record_the_policy():
    assert signature_differences({"rope": "shift"}, {"rope": "source"}) == [
        "RoPE policy of borrowed keys (rope): bank 'shift', this run 'source'"
    ]
    assert signature_differences({}, {"rope": "source"}) == []  # banks written before it was recorded
    assert signature_differences({}, {"rope": "none"})
    assert signature_differences({"rope": "none"}, {}) == []  # hosts without RoPE record nothing


# --------------------------------------------------------------------------------------- refusals


def test_rope_is_refused_on_hosts_without_rope():
    pipe = build_tiny_pipeline("tiny-sd15", progress_bar=False)
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(
        InvalidSetting, match=r"^rope applies to RoPE hosts only \(FLUX, Qwen-Image\); this unet"
    ) as info:
        apply_consistent_attention(pipe, ConsistencyConfig(rope="none"))
    assert info.value.field == "rope"
    assert dict(pipe.unet.attn_processors) == before  # refused before anything was installed
    state = apply_consistent_attention(pipe, ConsistencyConfig(rope="source"))
    remove_consistent_attention(pipe)
    assert "rope" not in state.host


@pytest.mark.parametrize("value", ["rotate", "", None, 1])
def test_bad_values_name_rope(value):
    with pytest.raises(InvalidSetting, match=r"^rope must be one of \('source', 'shift', 'none'\)") as info:
        ConsistencyConfig(rope=value)
    assert info.value.field == "rope"


@pytest.mark.parametrize("policy", POLICIES)
def test_the_policy_round_trips_through_metadata(policy):
    config = ConsistencyConfig(rope=policy)
    assert ConsistencyConfig.from_dict(config.to_dict()) == config
    assert ConsistencyConfig.from_dict({}).rope == "source"  # metadata written before the setting existed
