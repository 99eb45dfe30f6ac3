"""Subject masks together with IP-Adapter reference images (issue #24): automatic masks record through an
IP-Adapter's cross-attention without changing its output (over the text keys its text softmax sees), and each
character's reference image acts inside that character's subject mask (given or automatic) instead of the
whole frame; FLUX (its adapter on the double-stream blocks) records automatic masks as before."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor2_0,
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
)
from PIL import Image

from storydiff import ConsistencyConfig, StoryDiffusionPipeline
from storydiff.consistency.cross_attention_masks import (
    IPAdapterRecordingProcessor,
    SubjectAttentionRecorder,
    install_subject_recorder,
    remove_subject_recorder,
)
from storydiff.consistency.subject_masks import SubjectMasks, resize_mask
from storydiff.families.tiny_models import (
    build_tiny_pipeline,
    save_tiny_image_encoder,
    tiny_clip_vision_model,
    write_tiny_ip_adapter,
)
from storydiff.models.ip_adapter import ReferenceImages
from storydiff.runs.lockstep import LockstepDenoiser

STORY = """\
[Bob] a man with red hair
[Alice] a woman in a yellow dress
---
[Bob] walks in the park
[Alice] waters the flowers
[Bob] and [Alice] have dinner
[NC] a quiet street
"""
FRAME_CHARACTERS = [("Bob",), ("Alice",), ("Bob", "Alice"), ()]
SIDE = 32
GRID = (SIDE // 8, SIDE // 8)  # the UNet's IP-Adapter mask size: the latent grid
NO_SKIP = {"warmup_steps": 0, "skip_prob_early": 0.0, "skip_prob_late": 0.0}
RUN = {"num_inference_steps": 2, "height": SIDE, "width": SIDE, "seed": 3, "style": "none", "progress": False}
BANK = {"id_frames": 1}


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (40, 40, 3), dtype=np.uint8))


REFERENCES = {"Bob": picture(0), "Alice": picture(1)}


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return save_tiny_image_encoder(tmp_path_factory.mktemp("ip") / "image_encoder")


def adapted(model: str, encoder_dir, folder) -> StoryDiffusionPipeline:
    """A story pipeline on ``model`` with a random plain IP-Adapter loaded."""
    sp = StoryDiffusionPipeline(
        build_tiny_pipeline(model, progress_bar=False), ConsistencyConfig(rate=0.5, seed=1, **NO_SKIP)
    )
    weights = write_tiny_ip_adapter(
        folder / f"{model}.safetensors", sp.family.denoiser, tiny_clip_vision_model()
    )
    sp.load_ip_adapter(weights, image_encoder=encoder_dir)
    return sp


@pytest.fixture(scope="module")
def unets(encoder_dir, tmp_path_factory):
    """model -> a story pipeline with an adapter, built on first use."""
    folder, made = tmp_path_factory.mktemp("weights"), {}

    def get(model: str) -> StoryDiffusionPipeline:
        if model not in made:
            made[model] = adapted(model, encoder_dir, folder)
        return made[model]

    yield get
    for sp in made.values():
        sp.close()


@pytest.fixture
def sd15(unets):
    return unets("tiny-sd15")


def clear_banks(sp: StoryDiffusionPipeline) -> None:
    for name in ("Bob", "Alice"):  # a stored bank would be read, not written, by the next story
        if sp.state.bank.has(name):
            sp.state.bank.clear(name)


def spy_ip_masks(monkeypatch, sp: StoryDiffusionPipeline) -> list[tuple]:
    """Per denoiser call: (frames, step, the ip_adapter_masks its first IP-Adapter layer received, the
    state's subject masks then). Taken inside the adapter's processor: what it applies, after every hook."""
    calls: list[tuple] = []
    where: dict = {}
    real_step = LockstepDenoiser.step

    def step(self, frames, step):
        where["call"] = (tuple(frames), step)
        where["seen"] = False
        return real_step(self, frames, step)

    real_call = IPAdapterAttnProcessor2_0.__call__

    @functools.wraps(real_call)
    def call(self, attn, hidden_states, *args, **kwargs):
        if not where["seen"]:
            where["seen"] = True
            masks = kwargs.get("ip_adapter_masks")
            calls.append((*where["call"], masks[0].clone(), sp.state.subject_masks))
        return real_call(self, attn, hidden_states, *args, **kwargs)

    monkeypatch.setattr(LockstepDenoiser, "step", step)
    monkeypatch.setattr(IPAdapterAttnProcessor2_0, "__call__", call)
    return calls


def cond_rows(mask: torch.Tensor) -> torch.Tensor:
    """The conditional half of a [uncond; cond] mask batch (the two halves are equal)."""
    uncond, cond = mask.chunk(2)
    assert torch.equal(uncond, cond)
    return cond


# -- recording through an IP-Adapter processor --------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:You have passed a tensor as `encoder_hidden_states`:FutureWarning")
@pytest.mark.parametrize("cls", [IPAdapterAttnProcessor2_0, IPAdapterAttnProcessor])
@pytest.mark.parametrize("form", ["tuple", "tensor"])
def test_recording_wrapper_keeps_the_output_and_records_the_text_softmax(cls, form):
    """Through diffusers' Attention.forward (which passes on only the kwargs a processor names): the output
    is the adapter's own, bit for bit, masks included; the recorded map is the text softmax's probability
    on the subject columns (normalised over the text keys only, mean over heads), not one normalised over
    text and image keys."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    dim, cross, heads, text, images = 32, 16, 2, 7, 4
    attn = Attention(query_dim=dim, cross_attention_dim=cross, heads=heads, dim_head=dim // heads).eval()
    adapter = cls(hidden_size=dim, cross_attention_dim=cross, num_tokens=(images,), scale=0.8).eval()
    for layer in (*adapter.to_k_ip, *adapter.to_v_ip):
        torch.nn.init.normal_(layer.weight, std=2.0, generator=gen)
    recorder = SubjectAttentionRecorder((64, 64))  # level 16: a 4x4 grid, 16 image tokens
    tokens = recorder.grid[0] * recorder.grid[1]
    subjects = [{"Bob": (1, 2)}, {"Bob": (4,), "Alice": (5, 6)}]
    recorder.set_batch([0, 1], subjects)
    hidden = torch.randn(2, tokens, dim, generator=gen)
    prompt = torch.randn(2, text, cross, generator=gen)
    image = torch.randn(2, 1, images, cross, generator=gen)
    if form == "tuple":  # frame 0 reads the image, frame 1 does not
        masks = torch.tensor([1.0, 0.0]).view(2, 1, 1, 1).expand(2, 1, 4, 4).contiguous()
        states, kwargs = (prompt, [image]), {"ip_adapter_masks": [masks]}
    else:  # the deprecated form: the image tokens after the text, no masks
        states, kwargs = torch.cat([prompt, image[:, 0]], dim=1), {}
    with torch.no_grad():
        attn.set_processor(adapter)
        expected = attn(hidden, encoder_hidden_states=states, **kwargs)
        unmasked = attn(hidden, encoder_hidden_states=states)
        attn.set_processor(IPAdapterRecordingProcessor(recorder, adapter))
        got = attn(hidden, encoder_hidden_states=states, **kwargs)
    assert torch.equal(got, expected)
    if form == "tuple":  # the masks matter here: a wrapper whose signature dropped them would differ
        assert not torch.equal(unmasked, expected)

    with torch.no_grad():
        q = attn.to_q(hidden).view(2, tokens, heads, -1).transpose(1, 2).double()
        k_text = attn.to_k(prompt).view(2, text, heads, -1).transpose(1, 2).double()
        k_image = adapter.to_k_ip[0](image[:, 0]).view(2, images, heads, -1).transpose(1, 2).double()
    scores = q @ k_text.transpose(-1, -2) * (dim // heads) ** -0.5
    both = torch.cat([scores, q @ k_image.transpose(-1, -2) * (dim // heads) ** -0.5], dim=-1)
    for row, per_character in enumerate(subjects):
        for character, cols in per_character.items():
            want = scores.softmax(-1)[row][..., list(cols)].sum(-1).mean(0)
            wrong = both.softmax(-1)[row][..., list(cols)].sum(-1).mean(0)
            got_map = recorder.sums[row, character] / recorder.calls[row, character]
            assert recorder.calls[row, character] == 1
            torch.testing.assert_close(got_map, want, rtol=1e-5, atol=1e-6)
            assert (got_map - wrong).abs().max() > 1e-3


def test_install_wraps_ip_adapter_processors_and_restores_them(sd15):
    """On a UNet with an adapter: every attn2 gets its own wrapper around its own processor; removing puts
    the very same processors back; installing over a left-over wrapper records once, not twice."""
    unet = sd15.pipe.unet
    before = dict(unet.attn_processors)
    adapters = {n: p for n, p in before.items() if ".attn2." in n}
    assert adapters and all(isinstance(p, IPAdapterAttnProcessor2_0) for p in adapters.values())
    recorder = SubjectAttentionRecorder((SIDE, SIDE))
    replaced = install_subject_recorder(unet, recorder)
    now = unet.attn_processors
    assert all(
        isinstance(now[n], IPAdapterRecordingProcessor) and now[n].processor is adapters[n] for n in adapters
    )
    again = install_subject_recorder(unet, recorder)  # over the wrappers
    assert all(again[n] is adapters[n] for n in adapters)
    assert all(unet.attn_processors[n].processor is adapters[n] for n in adapters)
    remove_subject_recorder(unet, replaced)
    assert all(unet.attn_processors[n] is p for n, p in before.items())


def test_unrecordable_processor_is_refused_before_the_output_folder(tmp_path):
    """A processor the recorder cannot record through is refused in one line, and nothing is written."""

    class Custom(AttnProcessor2_0):
        """Someone's own cross-attention: the recorder cannot know what it computes."""

    sp = StoryDiffusionPipeline(
        build_tiny_pipeline("tiny-sd15", progress_bar=False), ConsistencyConfig(rate=0.5, seed=1, **NO_SKIP)
    )
    processors = sp.pipe.unet.attn_processors
    sp.pipe.unet.set_attn_processor({n: Custom() if ".attn2." in n else p for n, p in processors.items()})
    with pytest.raises(ValueError, match=r"attn2.* runs Custom, not a stock processor nor an IP-Adapter's"):
        sp(STORY, subject_masks="auto", out_dir=tmp_path / "out", **RUN, **BANK)
    assert not (tmp_path / "out").exists()
    sp.close()


# -- reference images inside subject masks ------------------------------------------------------------------


def expected_region(masks: SubjectMasks | None, frame: int, name: str) -> torch.Tensor:
    """A slot's IP-Adapter mask: its character's subject mask at the latent grid; whole frame without one
    (or where it is empty)."""
    if masks is None:
        return torch.ones(GRID)
    region = masks.mask(frame, name, GRID)
    return region.float() if region.any() else torch.ones(GRID)


def test_given_masks_place_each_image_in_its_characters_region(sd15, monkeypatch):
    """Bob left, Alice right in the shared frame: the masks the adapter applies there are those halves at
    the latent grid; Bob's solo frame its top half; Alice's empty mask the whole frame; [NC] nothing. Without
    subject masks every slot is the whole frame, as before."""
    half = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    half[:, : SIDE // 2] = True
    top = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    top[: SIDE // 2] = True
    given = {
        0: {"Bob": top},
        1: {"Alice": torch.zeros(SIDE, SIDE, dtype=torch.bool)},
        2: {"Bob": half, "Alice": ~half},
    }
    calls = spy_ip_masks(monkeypatch, sd15)
    try:
        with pytest.warns(UserWarning):  # Alice's empty mask: her frame draws from the whole frame
            sd15(STORY, subject_masks=given, reference_images=REFERENCES, **RUN, **BANK)
        masked = list(calls)
        calls.clear()
        sd15(STORY, reference_images=REFERENCES, **RUN, **BANK)
    finally:
        clear_banks(sd15)
    frames_seen = set()
    for frames, _, mask, state_masks in masked:
        cond = cond_rows(mask)
        for row, frame in enumerate(frames):
            frames_seen.add(frame)
            shown = FRAME_CHARACTERS[frame]
            for slot in range(cond.shape[1]):
                if slot >= len(shown):
                    assert torch.equal(cond[row, slot], torch.zeros(GRID)), (frame, slot)
                    continue
                assert torch.equal(cond[row, slot], expected_region(state_masks, frame, shown[slot])), frame
    assert frames_seen == {0, 1, 2, 3}
    shared = next(cond_rows(m)[f.index(2)] for f, _, m, _ in masked if 2 in f)
    assert torch.equal(shared[0], resize_mask(half, GRID).float()) and shared[0, :, :2].all()
    assert torch.equal(shared[1], resize_mask(~half, GRID).float()) and not shared[1, :, :2].any()
    for frames, _, mask, _ in calls:  # no subject masks: whole frames, as today
        cond = cond_rows(mask)
        for row, frame in enumerate(frames):
            slots = len(FRAME_CHARACTERS[frame])
            assert cond[row, :slots].eq(1).all() and cond[row, slots:].eq(0).all()


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_auto_masks_with_reference_images_end_to_end(unets, model, monkeypatch, tmp_path):
    """Automatic masks on a UNet with an IP-Adapter and reference images: runs, keeps masks/; step 0's IP
    masks are whole frames, every later call's follow the state's masks of that call (built at every call
    although the chunk's text conditioning is cached); the same seed gives the same frames."""
    sp = unets(model)
    calls = spy_ip_masks(monkeypatch, sp)
    try:
        first = sp(
            STORY, subject_masks="auto", reference_images=REFERENCES, out_dir=tmp_path / "a", **RUN, **BANK
        )
        seen = list(calls)
        again = sp(STORY, subject_masks="auto", reference_images=REFERENCES, **RUN, **BANK)
    finally:
        clear_banks(sp)
    assert (tmp_path / "a" / "masks" / "mask_002_Bob.png").is_file()
    assert [a.tobytes() for a in first.images] == [b.tobytes() for b in again.images]
    assert all(
        isinstance(p, IPAdapterAttnProcessor2_0)
        for n, p in sp.pipe.unet.attn_processors.items()
        if ".attn2." in n
    )
    partial = 0
    for frames, step, mask, state_masks in seen:
        cond = cond_rows(mask)
        assert (state_masks is None) == (step == 0)
        for row, frame in enumerate(frames):
            for slot, name in enumerate(FRAME_CHARACTERS[frame]):
                want = expected_region(state_masks, frame, name)
                assert torch.equal(cond[row, slot], want), (frame, step, name)
                partial += bool(not want.all())
    assert {step for _, step, _, _ in seen} == {0, 1}
    assert partial  # some image was confined to less than its frame


# -- the masks' source, on its own ---------------------------------------------------------------------------


def test_chunk_masks_follow_the_source_at_each_call():
    """chunk() reads the source each time: whole frames while it gives None, then each slot's region (the
    [uncond; cond] halves alike); without a source, whole frames always."""
    embeds = {name: (torch.full((3,), i + 1.0), torch.zeros(3)) for i, name in enumerate(("Bob", "Alice"))}
    left = torch.zeros(8, 8, dtype=torch.bool)
    left[:, :4] = True
    current: dict = {"masks": None}
    refs = ReferenceImages(embeds, FRAME_CHARACTERS, torch.zeros(3), subject_masks=lambda: current["masks"])
    plain = ReferenceImages(embeds, FRAME_CHARACTERS, torch.zeros(3))
    _, (whole,) = plain.chunk([2, 0], True, (2, 2))
    assert torch.equal(refs.chunk([2, 0], True, (2, 2))[1][0], whole)
    current["masks"] = SubjectMasks(
        {0: {"Bob": ~left}, 2: {"Bob": left, "Alice": ~left}, 1: {"Alice": left}}, FRAME_CHARACTERS, (8, 8)
    )
    _, (mask,) = refs.chunk([2, 0], True, (2, 2))
    cond = mask.chunk(2)[1]
    assert torch.equal(cond[0, 0], torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert torch.equal(cond[0, 1], torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    assert torch.equal(cond[1, 0], torch.tensor([[0.0, 1.0], [0.0, 1.0]])) and not cond[1, 1].any()
    assert torch.equal(mask[:2], mask[2:])
    assert torch.equal(plain.chunk([2, 0], True, (2, 2))[1][0], whole)


# -- FLUX ------------------------------------------------------------------------------------------------


def test_flux_auto_masks_with_reference_images(encoder_dir, tmp_path):
    """FLUX records through its consistent single-stream processors (the adapter sits on the double-stream
    blocks): automatic masks with reference images run, keep masks/, repeat with the same seed, and the
    images still act (other frames than without them)."""
    sp = adapted("tiny-flux", encoder_dir, tmp_path)
    try:
        first = sp(
            STORY, subject_masks="auto", reference_images=REFERENCES, out_dir=tmp_path / "a", **RUN, **BANK
        )
        clear_banks(sp)
        again = sp(STORY, subject_masks="auto", reference_images=REFERENCES, **RUN, **BANK)
        clear_banks(sp)
        without = sp(STORY, subject_masks="auto", **RUN, **BANK)
    finally:
        sp.close()
    assert (tmp_path / "a" / "masks" / "mask_002_Alice.png").is_file()
    assert first.metadata["subject_masks"]["source"] == "auto"
    assert [a.tobytes() for a in first.images] == [b.tobytes() for b in again.images]
    assert first.images[0].tobytes() != without.images[0].tobytes()
    assert first.images[3].tobytes() == without.images[3].tobytes()  # [NC]: no image, no bank read
