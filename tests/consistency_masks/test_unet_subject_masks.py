"""Masks from a real denoiser's cross-attention: tiny-sd15's UNet, its attn2 layers recorded.

The tiny UNet has random weights, so nothing in it looks at a subject by itself. The test makes a known
region R of each frame attend to the subject token: the latents differ inside and outside R, the subject
token's embedding is a direction no other token uses, and each 1/16-level cross-attention's key weights
for that direction are fitted (least squares, layer by layer in forward order, each fitted on the queries
its earlier layers produce) so that queries inside R score high on the subject key. The recorder then sees a
real denoiser call through ``SubjectRecordingProcessor`` and must recover R.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from storydiff.consistency.cross_attention_masks import (
    SubjectAttentionRecorder,
    install_subject_recorder,
    remove_subject_recorder,
)
from storydiff.consistency.subject_masks import level_grid, resize_mask

SIZE = (128, 128)  # tiny-sd15: 16x16 latents; level 16 is an 8x8 grid
SUBJECT = 3  # the subject token's column in each prompt
TOKENS = 8


class QueryCapture:
    """Stock cross-attention that keeps each module's queries."""

    def __init__(self) -> None:
        self.queries: dict[int, torch.Tensor] = {}
        self.stock = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        self.queries[id(attn)] = attn.to_q(hidden_states)
        return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / float((a | b).sum())


@pytest.fixture(scope="module")
def unet_setup():
    from storydiff.families.tiny_models import build_tiny_pipeline

    unet = build_tiny_pipeline("tiny-sd15", progress_bar=False).unet.eval()
    gen = torch.Generator().manual_seed(0)
    regions = [torch.zeros(8, 8, dtype=torch.bool) for _ in range(2)]
    regions[0][0:4, 0:4] = True
    regions[1][4:8, :] = True  # both aligned with every level's grid, down to 1/64's 2x2
    latents = torch.randn(2, 4, 16, 16, generator=gen) * 0.3
    for frame, known in enumerate(regions):
        latents[frame] += torch.where(known.repeat_interleave(2, 0).repeat_interleave(2, 1), 1.5, -1.5)
    text = torch.randn(2, TOKENS, 32, generator=gen)
    text[:, :, 0] = 0  # dimension 0 is the subject token's alone
    text[:, SUBJECT] = 0
    text[:, SUBJECT, 0] = 1.0
    timestep = torch.tensor(500)

    stock = dict(unet.attn_processors)
    cross = [name for name in stock if ".attn2." in name]
    modules = {name: unet.get_submodule(name.removesuffix(".processor")) for name in cross}
    capture = QueryCapture()
    unet.set_attn_processor({**stock, **dict.fromkeys(cross, capture)})
    with torch.no_grad():
        unet(latents, timestep, encoder_hidden_states=text)
    level16 = [name for name in cross if capture.queries[id(modules[name])].shape[1] == 64]
    assert len(level16) == 5  # down_blocks.1 (2), up_blocks.2 (3)
    target = torch.cat([known.flatten().float() * 2 - 1 for known in regions])  # +1 in R, -1 outside
    with torch.no_grad():
        for name in level16:  # forward order: each fit sees the queries the earlier fits produce
            unet(latents, timestep, encoder_hidden_states=text)
            attn = modules[name]
            q = capture.queries[id(attn)]  # [2, 64, C]
            head_dim = q.shape[-1] // attn.heads
            per_head = q.view(2 * 64, attn.heads, head_dim).transpose(0, 1)  # [H, 128, d]
            weights = []
            for h in range(attn.heads):
                design = torch.cat([per_head[h], torch.ones(128, 1)], dim=1)
                weights.append(torch.linalg.lstsq(design, target[:, None]).solution[:head_dim, 0])
            w = torch.cat(weights)
            scores = per_head @ w.view(attn.heads, head_dim, 1)
            attn.to_k.weight[:, 0] = w * 20 / scores.std()
            attn.to_v.weight[:, 0] = 0
    unet.set_attn_processor(stock)
    return unet, latents, text, regions


def test_recorded_unet_call_recovers_the_region(unet_setup):
    unet, latents, text, regions = unet_setup
    recorder = SubjectAttentionRecorder(SIZE)
    recorder.set_batch([0, 1], [{"Bob": [SUBJECT]}, {"Alice": [SUBJECT]}])
    # batched CFG: [uncond; cond], only the conditional half is recorded
    cfg_latents = torch.cat([latents, latents])
    cfg_text = torch.cat([torch.zeros_like(text), text])
    with torch.no_grad():
        expected = [unet(cfg_latents, t, encoder_hidden_states=cfg_text).sample for t in (500, 400)]
        replaced = install_subject_recorder(unet, recorder)
        try:
            got = [unet(cfg_latents, t, encoder_hidden_states=cfg_text).sample for t in (500, 400)]
        finally:
            remove_subject_recorder(unet, replaced)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))  # the stock output
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())  # restored
    assert recorder.calls == {(0, "Bob"): 10, (1, "Alice"): 10}  # 5 layers at 1/16, 2 steps
    masks = recorder.masks([("Bob",), ("Alice",)])
    for level in (8, 16, 32, 64):
        grid = level_grid(SIZE, level)
        for frame, character in ((0, "Bob"), (1, "Alice")):
            score = iou(masks.mask(frame, character, grid), resize_mask(regions[frame], grid))
            assert score >= 0.9, (level, frame, character, score)


def test_recorder_refuses_foreign_processors(unet_setup):
    unet = unet_setup[0]
    stock = dict(unet.attn_processors)
    name = next(n for n in stock if ".attn2." in n)
    unet.set_attn_processor({**stock, name: QueryCapture()})
    try:
        with pytest.raises(ValueError, match="runs QueryCapture, not a stock processor"):
            install_subject_recorder(unet, SubjectAttentionRecorder(SIZE))
    finally:
        unet.set_attn_processor(stock)
