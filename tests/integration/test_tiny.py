"""The offline tiny pipelines and ``load_pipeline``'s error paths (CPU, a few seconds)."""

from __future__ import annotations

import re
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from storydiff.families.reserved import TINY_TEXT_TO_IMAGE as TINY_MODELS
from storydiff.families.tiny_models import build_tiny_pipeline
from storydiff.models.loading import ModelLoadError, load_pipeline
from storydiff.support.compat import dtype_kwargs

SIZE = 128
PROMPTS = ['A man, wearing a hat! (smiling) at 42°; "quoted" text: café?', "a dog"]


@pytest.fixture(scope="module", params=TINY_MODELS)
def pipe(request: pytest.FixtureRequest) -> DiffusionPipeline:
    return build_tiny_pipeline(request.param, progress_bar=False)


def _run(pipe: DiffusionPipeline, *, guidance: float, seeds: tuple[int, ...] = (0, 1), **kw: Any) -> Any:
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(
        PROMPTS[: len(seeds)],
        num_inference_steps=2,
        guidance_scale=guidance,
        height=SIZE,
        width=SIZE,
        generator=generators,
        **kw,
    ).images


def test_structure(pipe: DiffusionPipeline) -> None:
    expected = StableDiffusionXLPipeline if "XL" in type(pipe).__name__ else StableDiffusionPipeline
    assert isinstance(pipe, expected)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == SIZE
    # The processors recognise UNet levels, so self-attention must exist in several up blocks.
    matches = (re.match(r"up_blocks\.(\d+)\..*\.attn1\.", key) for key in pipe.unet.attn_processors)
    up_levels = {int(m.group(1)) for m in matches if m}
    assert len(up_levels) >= 2, up_levels
    if isinstance(pipe, StableDiffusionXLPipeline):
        widths = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
        assert pipe.unet.config.cross_attention_dim == widths
        assert up_levels == {0, 1}
        assert pipe.config.force_zeros_for_empty_prompt
    else:
        assert pipe.safety_checker is None and pipe.feature_extractor is None
        assert up_levels == {1, 2, 3}


def test_tokenizer_covers_prompts(pipe: DiffusionPipeline) -> None:
    tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
    for tok in tokenizers:
        assert tok.model_max_length == 77
        assert len(tok) <= pipe.text_encoder.config.vocab_size
        ids = tok(PROMPTS[0]).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        # Every character is in the vocabulary: only the final token may be the (unk = eos) token.
        assert tok.unk_token_id not in ids[1:-1]
        decoded = tok.decode(ids, skip_special_tokens=True)
        assert decoded.replace(" ", "") == PROMPTS[0].lower().replace(" ", "")


@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["cfg", "no-cfg"])
def test_run_pil(pipe: DiffusionPipeline, guidance: float) -> None:
    images = _run(pipe, guidance=guidance)
    assert len(images) == 2
    assert all(isinstance(im, Image.Image) and im.size == (SIZE, SIZE) for im in images)


def test_same_seed_same_output(pipe: DiffusionPipeline) -> None:
    first = _run(pipe, guidance=5.0, output_type="pt")
    again = _run(pipe, guidance=5.0, output_type="pt")
    other = _run(pipe, guidance=5.0, seeds=(2, 3), output_type="pt")
    assert first.shape == (2, 3, SIZE, SIZE)
    assert torch.isfinite(first).all()
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_weights_follow_seed(name: str) -> None:
    state_before = torch.random.get_rng_state()
    a, b, c = (build_tiny_pipeline(name, seed=s) for s in (0, 0, 1))
    # Building must not consume the caller's global RNG.
    assert torch.equal(torch.random.get_rng_state(), state_before)
    for module in ("unet", "vae", "text_encoder"):
        sa, sb, sc = (getattr(p, module).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), module
        assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point()), module


def test_dtype_and_load_pipeline_tiny() -> None:
    pipe = load_pipeline("tiny-sd15", dtype=torch.bfloat16, progress_bar=False)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    fp32 = build_tiny_pipeline("tiny-sd15")
    # Weights are drawn in float32 and then cast, so a seed names the same model in every dtype.
    torch.testing.assert_close(pipe.unet.conv_in.weight, fp32.unet.conv_in.weight.to(torch.bfloat16))
    assert load_pipeline("tiny-sdxl").unet.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown reserved model"):
        build_tiny_pipeline("tiny-sd9")


def test_load_pipeline_missing_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_hub(*args: object, **kwargs: object) -> None:
        raise AssertionError("a missing local path must not reach from_pretrained")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", no_hub)
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError, match=r"no-such-model.*tiny-sdxl, tiny-sd15"):
        load_pipeline(missing)


def test_load_pipeline_wraps_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("no model_index.json")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", broken)
    with pytest.raises(ModelLoadError, match=r"'org/some-model'.*no model_index\.json.*tiny-sdxl") as info:
        load_pipeline("org/some-model")
    assert isinstance(info.value.__cause__, OSError)
    # An existing folder that is not a pipeline goes through from_pretrained and is wrapped the same way.
    with pytest.raises(ModelLoadError, match="no model_index"):
        load_pipeline(str(tmp_path))


@pytest.mark.parametrize(
    ("make", "got"),
    [
        (lambda: torch.nn.Linear(2, 2), "Linear"),
        (lambda: types.SimpleNamespace(unet=torch.nn.Linear(2, 2), text_encoder=object()), "SimpleNamespace"),
        (lambda: types.SimpleNamespace(unet=build_tiny_pipeline("tiny-sd15").unet), "SimpleNamespace"),
    ],
    ids=["not-a-pipeline", "wrong-unet", "no-text-encoder"],
)
def test_load_pipeline_rejects_other_kinds(
    make: Callable[[], object], got: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = make()
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", lambda *a, **k: loaded)
    with pytest.raises(ModelLoadError, match=rf"'org/flux-like' cannot tell stories: .*; got {got}$"):
        load_pipeline("org/flux-like")


def test_load_pipeline_default_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}
    tiny = build_tiny_pipeline("tiny-sd15")

    def fake(model: str, **kwargs: object) -> DiffusionPipeline:
        seen.update(kwargs, model=model)
        return tiny

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", fake)
    assert load_pipeline("org/sd15") is tiny
    assert seen == {"model": "org/sd15", **dtype_kwargs(torch.float32)}
