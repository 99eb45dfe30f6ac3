"""Masks from joint text+image attention: the recorder as ``ConsistencyState.observer``.

On tiny-flux (text before the image in each joint sequence) the recorded maps equal an independent float64
recomputation from the same queries and keys: the full softmax over every joint key, summed over the
subject's prompt columns, averaged over heads and calls; and a known region made to attend to the subject
token (latents differ inside it; each consistent block's key projection fitted so the subject's key points
where the region's queries do) is recovered at every level. The image-first layout (SD3, Qwen-Image, with
text padding masked by key lengths) is checked on constructed queries and keys with a known region.
"""

from __future__ import annotations

import pytest
import torch

from storydiff import ConsistencyConfig, apply_consistent_attention, remove_consistent_attention
from storydiff.consistency.config import ConsistencyConfig as Config
from storydiff.consistency.cross_attention_masks import SubjectAttentionRecorder
from storydiff.consistency.state import COND, UNCOND, ConsistencyState, LayerInfo
from storydiff.consistency.subject_masks import level_grid, resize_mask

SIZE = (128, 128)  # tiny-flux: 8x8 image tokens, the 1/16 level
NO_SKIP = {"warmup_steps": 0, "skip_prob_early": 0.0, "skip_prob_late": 0.0}


def reference_map(captured, frame_row: int, cols: list[int], text_offset) -> torch.Tensor:
    """float64 mean over calls and heads of softmax(q kᵀ / √D) summed over the subject's columns."""
    total = 0
    for q, k, image in captured:
        a, b = image
        scores = q[frame_row, :, a:b].double() @ k[frame_row].double().transpose(-1, -2) / q.shape[-1] ** 0.5
        prob = scores.softmax(-1)[..., [text_offset(image, k.shape[2]) + j for j in cols]].sum(-1)
        total = total + prob.mean(0)
    return (total / len(captured)).view(8, 8)


@pytest.fixture(scope="module")
def flux():
    from storydiff.families.tiny_models import build_tiny_pipeline

    return build_tiny_pipeline("tiny-flux", progress_bar=False)


def test_tiny_flux_maps_equal_the_full_softmax(flux):
    pipe = flux
    state = apply_consistent_attention(pipe, ConsistencyConfig(rate=0.2, **NO_SKIP))
    recorder = SubjectAttentionRecorder(SIZE)
    subjects = [{"Bob": [0, 1]}, {"Alice": [2]}]
    recorder.set_batch([0, 1], subjects)
    captured = []

    def observer(st, layer, q, k, image, key_lengths):
        captured.append((q.detach().clone(), k.detach().clone(), image))
        recorder.observe(st, layer, q, k, image, key_lengths)

    state.observer = observer
    try:
        state.begin_joint(2)
        pipe(
            ["Bob walks", "Alice sits"],
            num_inference_steps=2,
            height=SIZE[0],
            width=SIZE[1],
            max_sequence_length=16,
            callback_on_step_end=state.step_callback,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )
    finally:
        remove_consistent_attention(pipe)
    assert len(captured) == 4 and all(image == (16, 80) for *_, image in captured)  # 2 layers, 2 steps
    assert recorder.calls == {(0, "Bob"): 4, (1, "Alice"): 4}
    maps = recorder.maps()
    for row, (character, cols) in enumerate(((("Bob"), [0, 1]), ("Alice", [2]))):
        expected = reference_map(captured, row, cols, lambda image, total: 0)  # text first
        torch.testing.assert_close(maps[(row, character)], expected, atol=1e-6, rtol=1e-5)


def test_image_first_layout_with_padding_and_two_pass_cfg():
    state = ConsistencyState(Config(rate=0.2), [LayerInfo("joint", 0, 16)], offload_bank=False)
    recorder = SubjectAttentionRecorder(SIZE)
    recorder.set_batch([5], [{"Bob": [1]}])
    gen = torch.Generator().manual_seed(0)
    known = torch.zeros(8, 8, dtype=torch.bool)
    known[2:7, 1:5] = True
    heads, dim, text = 2, 16, 6
    direction = torch.nn.functional.normalize(torch.randn(heads, 1, dim, generator=gen), dim=-1)
    sign = known.flatten().float()[None, :, None] * 2 - 1
    q_image = torch.randn(heads, 64, dim, generator=gen) * 0.3 + 3 * sign * direction
    k = torch.randn(1, heads, 64 + text, dim, generator=gen) * 0.3
    k[0, :, 64 + 1] = 3 * direction[:, 0]  # the subject: prompt token 1, after the 64 image tokens
    k[0, :, 64 + 4 :] = 50 * direction[:, 0]  # padding past key_lengths: would swamp the map if read
    q = torch.cat([q_image, torch.randn(heads, text, dim, generator=gen)], dim=1)[None]
    lengths = torch.tensor([64 + 4])
    state.observer = recorder.observe
    for group in (UNCOND, COND):
        with state.cfg_pass(group):
            queries = q if group == COND else torch.randn_like(q)
            state.attend(state.layers[0], queries, k, k, (0, 64), None, lengths)
    assert recorder.calls == {(5, "Bob"): 1}  # the unconditional pass is not recorded
    # image-only self-attention (no text keys) is not recorded either
    state.attend(state.layers[0], q[:, :, :64], k[:, :, :64], k[:, :, :64])
    assert recorder.calls == {(5, "Bob"): 1}
    masks = recorder.masks([()] * 5 + [("Bob",)])
    for level in (8, 16, 32):
        grid = level_grid(SIZE, level)
        got, expected = masks.mask(5, "Bob", grid), resize_mask(known, grid)
        assert float((got & expected).sum()) / float((got | expected).sum()) >= 0.9, level


def test_tiny_flux_recovers_a_known_region(flux):
    pipe = flux
    regions = [torch.zeros(8, 8, dtype=torch.bool) for _ in range(2)]
    regions[0][:4, :4] = True
    regions[1][4:] = True
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 64, 16, generator=gen) * 0.3  # packed: 8x8 tokens
    for frame, known in enumerate(regions):
        latents[frame] += torch.where(known.flatten()[:, None], 1.5, -1.5)
    subject = 0  # the subject's prompt token
    state = apply_consistent_attention(pipe, ConsistencyConfig(rate=0.0, **NO_SKIP))
    blocks = {
        layer.name: pipe.transformer.get_submodule(layer.name[: -len(".processor")]) for layer in state.layers
    }
    queries, inputs = {}, {}
    hooks = [
        attn.to_k.register_forward_pre_hook(
            lambda m, args, name=name: inputs.__setitem__(name, args[0].clone())
        )
        for name, attn in blocks.items()
    ]

    def call():
        state.begin_joint(2)
        pipe(
            ["Bob walks", "Alice sits"],
            num_inference_steps=1,
            height=SIZE[0],
            width=SIZE[1],
            max_sequence_length=16,
            latents=latents.clone(),
            output_type="latent",
            callback_on_step_end=state.step_callback,
        )

    state.observer = lambda st, layer, q, k, image, lengths: queries.__setitem__(
        layer.name, (q.clone(), image)
    )
    target = torch.cat([known.flatten().float() * 2 - 1 for known in regions])  # +1 in the region
    try:
        with torch.no_grad():
            for layer in state.layers:  # forward order: each fit sees what the earlier fits produce
                call()
                q, (a, b) = queries[layer.name]
                heads, dim = q.shape[1], q.shape[3]
                image_q = q[:, :, a:b].transpose(0, 1).reshape(heads, -1, dim)  # [H, 2·64, D]
                ones = torch.ones(image_q.shape[1], 1)
                w = torch.cat(
                    [
                        torch.linalg.lstsq(torch.cat([image_q[h], ones], 1), target[:, None]).solution[
                            :dim, 0
                        ]
                        for h in range(heads)
                    ]
                )
                attn = blocks[layer.name]
                # the subject's key before its RMS norm, so that after it the key points along w
                wanted = 10 * w / w.norm() / attn.norm_k.weight.repeat(heads)
                hidden = inputs[layer.name][:, subject]  # [2 frames, C]
                residual = wanted[None] - attn.to_k(hidden)
                attn.to_k.weight += residual.T @ torch.linalg.pinv(hidden.T)  # least-norm: both frames exact
        recorder = SubjectAttentionRecorder(SIZE)
        recorder.set_batch([0, 1], [{"Bob": [subject]}, {"Alice": [subject]}])
        state.observer = recorder.observe
        call()
    finally:
        for hook in hooks:
            hook.remove()
        remove_consistent_attention(pipe)
    masks = recorder.masks([("Bob",), ("Alice",)])
    for level in (8, 16, 32, 64):
        grid = level_grid(SIZE, level)
        for frame, character in ((0, "Bob"), (1, "Alice")):
            got, expected = masks.mask(frame, character, grid), resize_mask(regions[frame], grid)
            assert float((got & expected).sum()) / float((got | expected).sum()) >= 0.9, (level, frame)
