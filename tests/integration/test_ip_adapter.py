"""Reference images per character (IP-Adapter) composed with consistent attention, on tiny offline
SD1.5 / SDXL models with random IP-Adapter weights (storydiff/ip_adapter.py)."""

import json

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from PIL import Image

from storydiff.consistency.bank import IdBank
from storydiff.consistency.config import ConsistencyConfig, InvalidSetting
from storydiff.consistency.processors import BoundProcessor, ConsistentAttnProcessor
from storydiff.families.flux import FluxMaskedIPAdapterProcessor
from storydiff.families.tiny_models import (
    build_tiny_pipeline,
    save_tiny_image_encoder,
    tiny_clip_vision_model,
    write_tiny_ip_adapter,
)
from storydiff.models.ip_adapter import ReferenceImages, encode_reference, load_ip_adapter
from storydiff.models.loading import ModelLoadError
from storydiff.pipeline import StoryDiffusionPipeline
from storydiff.runs.lockstep import LockstepDenoiser
from storydiff.runs.plan import RunPlan
from storydiff.runs.settings import RunSettings

STORY = """\
[Bob] a man with red hair
[Alice] a woman in a yellow dress
---
[Bob] walks in the park
[Alice] waters the flowers
[Bob] and [Alice] have dinner
[NC] a quiet street
[Bob] waves goodbye
"""
BOB_SOLO, ALICE_SOLO, BOTH, NOBODY = [0, 4], [1], [2], [3]
NO_SKIP = {"warmup_steps": 0, "skip_prob_early": 0.0, "skip_prob_late": 0.0}
RUN = {"num_inference_steps": 2, "height": 32, "width": 32, "seed": 3, "style": "none", "progress": False}
BANK = {"id_frames": 1}
MODELS = ["tiny-sd15", "tiny-sdxl"]


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (40, 40, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return save_tiny_image_encoder(tmp_path_factory.mktemp("ip") / "image_encoder")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """weights(model, variant) -> the path of random IP-Adapter weights for that tiny model."""
    folder, made = tmp_path_factory.mktemp("weights"), {}

    def make(model: str, variant: str = "plain", suffix: str = ".safetensors"):
        if (model, variant, suffix) not in made:
            denoiser = story_pipeline(model).family.denoiser
            path = folder / f"{model}-{variant}{suffix}"
            made[model, variant, suffix] = write_tiny_ip_adapter(
                path, denoiser, tiny_clip_vision_model(), variant=variant
            )
        return made[model, variant, suffix]

    return make


def story_pipeline(model: str, rate: float = 0.5) -> StoryDiffusionPipeline:
    return StoryDiffusionPipeline(
        build_tiny_pipeline(model, progress_bar=False), ConsistencyConfig(rate=rate, seed=1, **NO_SKIP)
    )


@pytest.fixture(scope="module", params=MODELS)
def loaded(request, weights, encoder_dir):
    """A story pipeline with the plain adapter loaded through StoryDiffusionPipeline.load_ip_adapter."""
    sp = story_pipeline(request.param)
    sp.load_ip_adapter(weights(request.param), image_encoder=encoder_dir, scale=1.0)
    yield sp
    sp.close()


def run_latents(sp: StoryDiffusionPipeline, story: str = STORY, **kwargs):
    """(result, final latents in story order): the latents each frame's image was decoded from."""
    seen = {}
    decode = sp.family.decode

    def recording(latent, height, width):
        image = decode(latent, height, width)
        seen[id(image)] = latent.clone()
        return image

    sp.family.decode = recording
    try:
        result = sp(story, **{**RUN, **kwargs})
    finally:
        del sp.family.decode
        for name in ("Bob", "Alice"):  # a stored bank would be read, not written, by the next story
            if sp.state.bank.has(name):
                sp.state.bank.clear(name)
    return result, torch.stack([seen[id(image)] for image in result.images])


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() > 1e-2


# -- a frame reads its own characters' images -------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["lockstep", "stored"])
def test_a_frame_depends_on_its_own_characters_images_only(loaded, schedule):
    """Changing Alice's image changes Alice's frames (the identity frame writing her bank too) and the
    frame showing both, and leaves Bob's solo frames — identity and bank-reading alike — and the [NC]
    frame bit-identical."""
    settings = {**BANK, "bank_schedule": schedule}
    _, first = run_latents(loaded, reference_images={"Bob": picture(0), "Alice": picture(1)}, **settings)
    _, second = run_latents(loaded, reference_images={"Bob": picture(0), "Alice": picture(2)}, **settings)
    for frame in BOB_SOLO + NOBODY:
        assert torch.equal(first[frame], second[frame]), frame
    for frame in ALICE_SOLO + BOTH:
        assert differs(first[frame], second[frame]), frame


def test_window_mode_frames_read_their_own_characters_images(weights, encoder_dir):
    """Window mode shares the conditioning path: Bob's image moves Bob's frames only, although his
    frames share chunks (chunk_size 2) and windows with Alice's."""
    sp = story_pipeline("tiny-sd15")
    sp.config.window = 1
    sp.load_ip_adapter(weights("tiny-sd15"), image_encoder=encoder_dir)
    window = {"mode": "window", "chunk_size": 2}
    _, first = run_latents(sp, reference_images={"Bob": picture(0)}, **window)
    _, second = run_latents(sp, reference_images={"Bob": picture(5)}, **window)
    for frame in BOB_SOLO + BOTH:
        assert differs(first[frame], second[frame]), frame
    # frame 1 (Alice) borrows tokens from its neighbours, which show Bob: consistency carries his
    # image's influence there; the [NC] frame takes no part in consistency and reads no image
    assert torch.equal(first[3], second[3])
    sp.close()


@pytest.mark.parametrize("model", MODELS)
def test_no_images_and_rate_zero_with_an_adapter_is_the_stock_story(model, weights, encoder_dir):
    """An adapter loaded but no reference images: every mask is zero, so the frames are those of the same
    story on the same model without any adapter (consistency at rate 0 too: plain attention)."""
    stock_sp = story_pipeline(model, rate=0.0)
    result, stock = run_latents(stock_sp, **BANK)
    stock_sp.close()
    assert result.metadata["ip_adapter"] is None and result.metadata["reference_images"] == {}
    sp = story_pipeline(model, rate=0.0)
    sp.load_ip_adapter(weights(model), image_encoder=encoder_dir)
    _, ours = run_latents(sp, **BANK)
    # the images must be able to matter at all, or equality would prove nothing
    _, with_image = run_latents(sp, reference_images={"Bob": picture(0)}, **BANK)
    # diffusers' unload_ip_adapter rebuilds every other processor (ours too) without arguments
    sp.pipe.unload_ip_adapter()
    _, unloaded = run_latents(sp, **BANK)
    sp.close()
    assert torch.equal(ours, stock)
    assert differs(with_image[0], stock[0])
    assert torch.equal(unloaded, stock)


# -- the variants and the encoding ------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["plain", "plus"])
def test_plain_and_plus_adapters_encode_as_diffusers_does(variant, weights, encoder_dir, tmp_path):
    """plain reads CLIP's image embedding (negative: zeros), plus (and plus-face, the same layout) the
    penultimate hidden states (negative: those of a black image), computed here from the encoder itself;
    the .bin layout loads too. Then a story run records the variant and the image moves its frame."""
    sp = story_pipeline("tiny-sd15")
    meta = sp.load_ip_adapter(weights("tiny-sd15", variant, ".bin"), image_encoder=encoder_dir, scale=0.7)
    assert meta["variant"] == variant and meta["scale"] == pytest.approx(0.7)
    pipe = sp.pipe
    pixels = pipe.feature_extractor(picture(0), return_tensors="pt").pixel_values
    with torch.no_grad():
        if variant == "plain":
            expected = pipe.image_encoder(pixels).image_embeds[0]
            expected_negative = torch.zeros_like(expected)
        else:
            expected = pipe.image_encoder(pixels, output_hidden_states=True).hidden_states[-2][0]
            black = torch.zeros_like(pixels)
            expected_negative = pipe.image_encoder(black, output_hidden_states=True).hidden_states[-2][0]
    positive, negative = encode_reference(pipe, picture(0), torch.device("cpu"))
    assert torch.equal(positive, expected) and torch.equal(negative, expected_negative)

    result, first = run_latents(sp, reference_images={"Alice": picture(1)}, out_dir=tmp_path / "a", **BANK)
    _, second = run_latents(sp, reference_images={"Alice": picture(2)}, **BANK)
    assert differs(first[1], second[1]) and torch.equal(first[0], second[0])
    recorded = json.loads((tmp_path / "a" / "metadata.json").read_text())["ip_adapter"]
    assert recorded == result.metadata["ip_adapter"] and recorded["variant"] == variant
    sp.close()


def test_metadata_records_the_adapter_and_each_image(loaded, tmp_path):
    path = tmp_path / "alice.png"
    picture(1).save(path)
    result, _ = run_latents(
        loaded,
        reference_images={"Bob": picture(0), "Alice": str(path)},
        out_dir=tmp_path / "run",
        save_banks=True,
        **BANK,
    )
    meta = json.loads((tmp_path / "run" / "metadata.json").read_text())
    adapter = meta["ip_adapter"]
    assert adapter["variant"] == "plain" and adapter["scale"] == 1.0
    assert adapter["weights"].endswith("-plain.safetensors") and adapter["image_encoder"].endswith(
        "image_encoder"
    )
    images = meta["reference_images"]
    assert images["Alice"]["path"] == str(path.resolve()) and "path" not in images["Bob"]
    # the hash is of the pixels: the same image as an object or a file hashes alike
    same, _ = run_latents(loaded, reference_images={"Alice": picture(1)}, **BANK)
    assert same.metadata["reference_images"]["Alice"]["sha256"] == images["Alice"]["sha256"]
    assert images["Bob"]["sha256"] != images["Alice"]["sha256"]
    assert result.metadata["reference_images"] == images
    bank = IdBank()  # a saved bank records the image its identity frames were made with
    assert bank.load(tmp_path / "run" / "banks" / "Alice.safetensors") == "Alice"
    assert bank.metadata("Alice")["reference_image"] == images["Alice"]["sha256"]


def test_a_resume_must_be_given_the_same_images(weights, encoder_dir, tmp_path):
    """A lockstep run's checkpoints carry the images' hashes: resuming with another image of Alice is
    refused; with the same images (one as a file now) it finishes with the frames of the interrupted run."""
    sp = story_pipeline("tiny-sd15")
    sp.load_ip_adapter(weights("tiny-sd15"), image_encoder=encoder_dir)
    out, seen = tmp_path / "run", []

    def interrupted(latent, height, width):  # every step is checkpointed by the time frames decode
        seen.append(latent.clone())
        raise KeyboardInterrupt

    settings = {**RUN, **BANK, "checkpoint_every": 1, "out_dir": out}
    sp.family.decode = interrupted
    with pytest.raises(KeyboardInterrupt):
        sp(STORY, reference_images={"Bob": picture(0), "Alice": picture(1)}, **settings)
    del sp.family.decode
    with pytest.raises(ValueError, match="differs in: reference_images"):
        sp(STORY, reference_images={"Bob": picture(0), "Alice": picture(2)}, resume=True, **settings)
    picture(1).save(tmp_path / "alice.png")
    images = {"Bob": picture(0), "Alice": tmp_path / "alice.png"}
    _, latents = run_latents(sp, reference_images=images, resume=True, **settings)
    assert torch.equal(latents[0], seen[0])  # frame 0 decodes first (Bob's identity frame)
    sp.close()


# -- installation order, removal ------------------------------------------------------------------------


def test_both_install_orders_give_the_same_frames_and_remove_keeps_the_adapter(weights, encoder_dir):
    """(a) diffusers' own pipe.load_ip_adapter, then consistent attention; (b) consistent attention, then
    load_ip_adapter, which rebuilds our processors without arguments: identical frames. Removing
    consistency afterwards restores the self-attention processors and keeps the IP-Adapter ones."""
    path = weights("tiny-sd15")
    images = {"Bob": picture(0), "Alice": picture(1)}

    def diffusers_load(pipe):
        pipe.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)

    first = build_tiny_pipeline("tiny-sd15", progress_bar=False)
    first.register_modules(image_encoder=tiny_clip_vision_model())
    diffusers_load(first)
    sp_a = StoryDiffusionPipeline(first, ConsistencyConfig(rate=0.5, seed=1, **NO_SKIP))
    result_a, a = run_latents(sp_a, reference_images=images, **BANK)

    second = build_tiny_pipeline("tiny-sd15", progress_bar=False)
    before = dict(second.unet.attn_processors)
    sp_b = StoryDiffusionPipeline(second, ConsistencyConfig(rate=0.5, seed=1, **NO_SKIP))
    second.register_modules(image_encoder=tiny_clip_vision_model())
    diffusers_load(second)
    processors = second.unet.attn_processors
    assert all(
        isinstance(p, ConsistentAttnProcessor)
        for n, p in processors.items()
        if n.startswith("up_blocks.") and n.endswith("attn1.processor")
    )
    _, b = run_latents(sp_b, reference_images=images, **BANK)
    assert torch.equal(a, b)
    assert result_a.metadata["ip_adapter"]["weights"] is None  # loaded with diffusers' own call

    sp_b.close()
    after = second.unet.attn_processors
    for name, processor in after.items():
        if name.startswith("up_blocks.") and name.endswith("attn1.processor"):  # where consistency was
            assert processor is before[name] and isinstance(processor, AttnProcessor2_0), name
        elif name.endswith("attn1.processor"):  # rebuilt by load_ip_adapter
            assert type(processor) is AttnProcessor2_0, name
        else:
            assert isinstance(processor, IPAdapterAttnProcessor2_0), name
    assert not any(hasattr(m, "_storydiff_binding") for m in second.unet.modules())
    # the plain diffusers pipeline with its adapter still works, as if consistency had never been there
    sp_a.close()
    call = {"prompt": "a man", "num_inference_steps": 2, "height": 32, "width": 32, "output_type": "latent"}
    ours = second(ip_adapter_image=picture(0), generator=torch.Generator().manual_seed(0), **call).images
    theirs = first(ip_adapter_image=picture(0), generator=torch.Generator().manual_seed(0), **call).images
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
def test_dit_processors_survive_a_rebuild_without_arguments(model):
    """FLUX's load_ip_adapter rebuilds its single-stream processors as diffusers always does, class():
    ours then read their binding (FLUX's position embedder for rope="shift" included): same frames."""
    rope = {"rope": "shift"} if model == "tiny-flux" else {}
    sp = StoryDiffusionPipeline(
        build_tiny_pipeline(model, progress_bar=False), ConsistencyConfig(rate=0.5, seed=1, **NO_SKIP, **rope)
    )
    _, before = run_latents(sp, **BANK)
    denoiser = sp.family.denoiser
    denoiser.set_attn_processor({name: type(p)() for name, p in denoiser.attn_processors.items()})
    rebuilt = [p for p in denoiser.attn_processors.values() if isinstance(p, BoundProcessor)]
    assert rebuilt and all(p._binding is None for p in rebuilt)
    _, after = run_latents(sp, **BANK)
    assert torch.equal(before, after)
    sp.close()


def test_a_rebuilt_processor_outside_an_installation_says_so():
    attn = build_tiny_pipeline("tiny-sd15", progress_bar=False).unet.up_blocks[1].attentions[0]
    attn = attn.transformer_blocks[0].attn1
    with pytest.raises(RuntimeError, match="apply_consistent_attention"):
        ConsistentAttnProcessor()(attn, torch.zeros(1, 4, attn.query_dim))


# -- chunks ----------------------------------------------------------------------------------------------


def test_a_frame_does_not_depend_on_the_frames_sharing_its_chunk(weights, encoder_dir):
    """Frame 0 (Bob) denoised next to a frame showing two characters (two image slots) or next to a frame
    with none (one slot, masked out): bit-identical (same batch size, so only the slots differ)."""
    pipe = build_tiny_pipeline("tiny-sdxl", progress_bar=False)
    load_ip_adapter(pipe, weights("tiny-sdxl"), image_encoder=encoder_dir)
    characters = [("Bob",), ("Bob", "Alice"), ()]
    refs = ReferenceImages.encode(
        pipe, {"Bob": picture(0), "Alice": picture(1)}, characters, torch.device("cpu")
    )
    embeds, masks = refs.chunk([0, 1], True, (4, 4))
    assert masks[0].shape == (4, 2, 4, 4) and embeds[0].shape[:2] == (4, 2)  # [uncond; cond] rows, 2 slots
    assert masks[0][:, 1].tolist() == [[[0.0] * 4] * 4, [[1.0] * 4] * 4] * 2  # Bob has no second slot

    def frame_zero(chunk):
        settings = RunSettings(num_inference_steps=2, guidance_scale=5.0, height=32, width=32)
        plan = RunPlan.from_prompts(["a man", "a man and a woman", "a street"], settings)
        denoiser = LockstepDenoiser(pipe, plan, references=refs)
        for step in range(2):
            denoiser.step(chunk, step)
        return denoiser.latents[0]

    assert torch.equal(frame_zero([0, 1]), frame_zero([0, 2]))


# -- errors ----------------------------------------------------------------------------------------------


def test_reference_image_errors(loaded, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(InvalidSetting, match="'Carol', who is in no frame"):
        loaded(STORY, reference_images={"Carol": picture(0)}, out_dir=out, **RUN, **BANK)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(InvalidSetting, match=r"of 'Bob': cannot read .*broken\.png as an image"):
        loaded(STORY, reference_images={"Bob": broken}, out_dir=out, **RUN, **BANK)
    with pytest.raises(InvalidSetting, match=r"cannot read .*missing\.png"):
        loaded(STORY, reference_images={"Bob": tmp_path / "missing.png"}, out_dir=out, **RUN, **BANK)
    assert not out.exists()  # checked before anything is written


def test_reference_images_need_an_adapter_and_a_supported_family(tmp_path, weights):
    sp = story_pipeline("tiny-sd15")
    with pytest.raises(InvalidSetting, match="need an IP-Adapter"):
        sp(STORY, reference_images={"Bob": picture(0)}, **RUN, **BANK)
    sp.close()
    sd3 = StoryDiffusionPipeline(build_tiny_pipeline("tiny-sd3", progress_bar=False))
    supported = r"UNet models \(SD1.x/2.x, SDXL\) and FLUX.1 only, not "
    with pytest.raises(InvalidSetting, match=supported + "StableDiffusion3Pipeline"):
        sd3(STORY, reference_images={"Bob": picture(0)}, **RUN, **BANK)
    with pytest.raises(ValueError, match=supported + "sd3 models"):
        sd3.load_ip_adapter(weights("tiny-sd15"))
    sd3.close()


def test_load_ip_adapter_errors(weights, encoder_dir, tmp_path):
    sp = story_pipeline("tiny-sd15")
    with pytest.raises(ModelLoadError, match="no such file"):
        sp.load_ip_adapter(tmp_path / "nope.safetensors", image_encoder=encoder_dir)
    with pytest.raises(ModelLoadError, match=r"no image encoder .* or put one at"):
        sp.load_ip_adapter(weights("tiny-sd15"))
    with pytest.raises(ModelLoadError, match=r"not a folder with a config\.json"):
        sp.load_ip_adapter(weights("tiny-sd15"), image_encoder=tmp_path)
    with pytest.raises(InvalidSetting, match="ip_scale must be a finite number"):
        sp.load_ip_adapter(weights("tiny-sd15"), image_encoder=encoder_dir, scale=float("nan"))
    # SDXL's adapter does not fit SD1.5's UNet: one error naming the file
    with pytest.raises(ModelLoadError, match=r"tiny-sdxl-plain\.safetensors does not load into"):
        sp.load_ip_adapter(weights("tiny-sdxl"), image_encoder=encoder_dir)
    sp.close()


# -- FLUX ------------------------------------------------------------------------------------------------


def test_flux_masked_processor_is_diffusers_processor_per_image(weights, encoder_dir):
    """One image with mask 1: exactly diffusers' FluxIPAdapterAttnProcessor; a masked-out slot adds exactly
    nothing; mask 0 everywhere: the image output is zero."""
    pipe = build_tiny_pipeline("tiny-flux", progress_bar=False)
    load_ip_adapter(pipe, weights("tiny-flux"), image_encoder=encoder_dir)
    attn = pipe.transformer.transformer_blocks[0].attn
    theirs = attn.processor
    assert type(theirs).__name__ == "FluxIPAdapterAttnProcessor"
    ours = FluxMaskedIPAdapterProcessor.replacing(theirs)
    gen = torch.Generator().manual_seed(0)
    dim, cross = pipe.transformer.inner_dim, pipe.transformer.config.joint_attention_dim
    hidden, context = torch.randn(2, 16, dim, generator=gen), torch.randn(2, 5, dim, generator=gen)
    image, other = torch.randn(2, 1, 4, cross, generator=gen), torch.randn(2, 1, 4, cross, generator=gen)
    with torch.no_grad():
        expected = theirs(attn, hidden, context, ip_hidden_states=[image])
        one = ours(attn, hidden, context, ip_hidden_states=[image], ip_adapter_masks=[torch.ones(2, 1)])
        two_slots = torch.cat([image, other], dim=1)
        masks = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        first = ours(attn, hidden, context, ip_hidden_states=[two_slots], ip_adapter_masks=[masks])
        none = ours(attn, hidden, context, ip_hidden_states=[image], ip_adapter_masks=[torch.zeros(2, 1)])
    assert all(torch.equal(a, b) for a, b in zip(expected, one, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(expected, first, strict=True))
    assert expected[2].abs().max() > 1e-3 and torch.equal(none[2], torch.zeros_like(none[2]))


def test_flux_frames_follow_their_own_characters_images(weights, encoder_dir):
    """FLUX (consistency on the single-stream blocks, the IP-Adapter on the double-stream ones, loaded
    after consistency): an adapter with no images gives the frames of no adapter at all; Alice's image
    moves Alice's frames only."""
    stock_sp = story_pipeline("tiny-flux")
    _, stock = run_latents(stock_sp, **BANK)
    stock_sp.close()
    sp = story_pipeline("tiny-flux")
    sp.load_ip_adapter(weights("tiny-flux"), image_encoder=encoder_dir)
    _, no_images = run_latents(sp, **BANK)
    _, first = run_latents(sp, reference_images={"Bob": picture(0), "Alice": picture(1)}, **BANK)
    _, second = run_latents(sp, reference_images={"Bob": picture(0), "Alice": picture(2)}, **BANK)
    sp.close()
    assert torch.equal(no_images, stock)
    for frame in BOB_SOLO + NOBODY:
        assert torch.equal(first[frame], second[frame]), frame
    for frame in ALICE_SOLO + BOTH:
        assert differs(first[frame], second[frame]), frame
    assert differs(first[0], stock[0])


def test_flux_consistency_and_the_adapter_cannot_share_double_stream_blocks(weights, encoder_dir):
    double = ConsistencyConfig(rate=0.5, seed=1, layers="double", **NO_SKIP)
    sp = StoryDiffusionPipeline(build_tiny_pipeline("tiny-flux", progress_bar=False), double)
    sp.load_ip_adapter(weights("tiny-flux"), image_encoder=encoder_dir)  # takes the double-stream blocks
    with pytest.raises(ValueError, match=r"consistent-attention layer.*layers='single'"):
        sp(STORY, **RUN, **BANK)
    sp.close()
    pipe = build_tiny_pipeline("tiny-flux", progress_bar=False)
    load_ip_adapter(pipe, weights("tiny-flux"), image_encoder=encoder_dir)
    sp = StoryDiffusionPipeline(pipe, double)  # consistency takes them back: the adapter is gone
    with pytest.raises(ValueError, match="replaced the IP-Adapter on FLUX's double-stream blocks"):
        sp(STORY, reference_images={"Bob": picture(0)}, **RUN, **BANK)
    sp.close()
