"""The scheduler and FreeU a run asks for (``sampler.py``), and the official preset's settings."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from storydiff.consistency.config import InvalidSetting
from storydiff.families.flux import FluxFamily
from storydiff.families.registry import family_of
from storydiff.families.tiny_models import build_tiny_pipeline
from storydiff.models.sampler import freeu_factors, run_sampler
from storydiff.runs.settings import PRESETS, RunSettings

OFFICIAL_FREEU = (0.6, 0.4, 1.1, 1.2)


@pytest.fixture(scope="module")
def pipe():
    pipe = build_tiny_pipeline("tiny-sd15", seed=0, dtype=torch.float32, progress_bar=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # a model's own, not DDIM
    return pipe


def test_ddim_and_freeu_for_the_run_then_restored(pipe):
    own = pipe.scheduler
    with run_sampler(family_of(pipe), "ddim", OFFICIAL_FREEU):
        assert type(pipe.scheduler) is DDIMScheduler
        for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type"):
            assert pipe.scheduler.config[key] == own.config[key]
        for block in pipe.unet.up_blocks:  # FreeU acts in every up block
            assert (block.s1, block.s2, block.b1, block.b2) == OFFICIAL_FREEU
    assert pipe.scheduler is own and freeu_factors(pipe.unet) is None


def test_model_scheduler_and_no_freeu_leave_the_pipeline_as_it_is(pipe):
    own = pipe.scheduler
    pipe.enable_freeu(0.9, 0.2, 1.4, 1.6)  # the user's own FreeU
    try:
        with run_sampler(family_of(pipe), "model", None):
            assert pipe.scheduler is own and freeu_factors(pipe.unet) == (0.9, 0.2, 1.4, 1.6)
        with run_sampler(family_of(pipe), "model", OFFICIAL_FREEU):
            assert freeu_factors(pipe.unet) == OFFICIAL_FREEU
        assert freeu_factors(pipe.unet) == (0.9, 0.2, 1.4, 1.6)
    finally:
        pipe.disable_freeu()


def test_restored_after_an_error(pipe):
    own = pipe.scheduler
    with pytest.raises(RuntimeError, match="boom"), run_sampler(family_of(pipe), "ddim", OFFICIAL_FREEU):
        raise RuntimeError("boom")
    assert pipe.scheduler is own and freeu_factors(pipe.unet) is None


@pytest.mark.parametrize(
    ("scheduler", "freeu", "field"), [("ddim", None, "scheduler"), ("model", OFFICIAL_FREEU, "freeu")]
)
def test_transformers_refuse_unet_sampler_settings(scheduler, freeu, field):
    with pytest.raises(InvalidSetting) as info, run_sampler(FluxFamily(None), scheduler, freeu):
        pass
    message = str(info.value)
    assert info.value.field == field and "applies to UNet models" in message and "a flux model" in message


def test_official_preset_values():
    settings = RunSettings.from_preset("official")
    assert (settings.scheduler, settings.freeu) == ("ddim", OFFICIAL_FREEU)
    assert (settings.height, settings.width, settings.guidance_scale) == (768, 768, 5.0)
    assert (settings.num_inference_steps, settings.id_frames, settings.style) == (35, 1, "japanese anime")
    assert settings.layout == "official"
    # what is given wins; window mode drops the preset's bank-mode settings
    assert RunSettings.from_preset("official", num_inference_steps=3, freeu=None).freeu is None
    assert RunSettings.from_preset("official", mode="window").id_frames is None
    assert set(PRESETS) == {"official"}
    with pytest.raises(InvalidSetting, match="preset must be one of official, got 'offical'"):
        RunSettings.from_preset("offical")


def test_settings_round_trip_and_checks():
    settings = RunSettings.from_preset("official", captions="hash", caption_style="overlay")
    assert RunSettings.from_dict(settings.to_dict()) == settings
    # metadata written before captions had a choice: text after '#' only, as those runs did
    old = settings.to_dict()
    del old["captions"]
    assert RunSettings.from_dict(old).captions == "hash"
    for field, value, message in [
        ("scheduler", "euler", "must be one of model, ddim"),
        ("freeu", (0.6, 0.4, 1.1), "must be four numbers s1, s2, b1, b2"),
        ("freeu", (0.6, 0.4, 1.1, float("nan")), "must be four numbers"),
        ("captions", "all", "must be one of line, hash, none"),
        ("caption_style", "bubble", "must be one of band, overlay"),
    ]:
        with pytest.raises(InvalidSetting) as info:
            RunSettings(**{field: value})
        assert info.value.field == field and message in str(info.value)


def test_a_preset_story_runs_with_ddim_and_freeu_and_leaves_the_pipeline_as_it_was(pipe):
    from storydiff.pipeline import StoryDiffusionPipeline

    seen = []

    def spy(module, args):  # what the UNet runs with, at every denoiser call of the story
        seen.append((type(pipe.scheduler).__name__, freeu_factors(module)))

    own = pipe.scheduler
    sp = StoryDiffusionPipeline(pipe)
    hook = pipe.unet.register_forward_pre_hook(spy)
    try:
        settings = RunSettings.from_preset("official", num_inference_steps=2, height=32, width=32)
        result = sp("[Bob] a man\n---\n[Bob] sits\n[Bob] runs\n", settings, progress=False)
    finally:
        hook.remove()
        sp.close()
    assert seen and set(seen) == {("DDIMScheduler", OFFICIAL_FREEU)}
    assert result.metadata["settings"]["scheduler"] == "ddim"
    assert tuple(result.metadata["settings"]["freeu"]) == OFFICIAL_FREEU
    assert pipe.scheduler is own and freeu_factors(pipe.unet) is None
