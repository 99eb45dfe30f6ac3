"""RunSettings: validation naming the field, mode-specific settings, and the metadata round trip."""

import pytest

from storydiff.consistency.config import ConsistencyConfig, InvalidSetting
from storydiff.runs.settings import BANK_DEFAULTS, WINDOW_DEFAULTS, RunSettings


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"mode": "tiles"}, "mode"),
        ({"style": "no-such-style"}, "style"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 2.5}, "num_inference_steps"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"height": 100}, "height"),
        ({"width": -64}, "width"),
        ({"seed": -1}, "seed"),
        ({"layout": "manga"}, "layout"),
        ({"id_frames": 0}, "id_frames"),
        ({"read_batch_size": True}, "read_batch_size"),
        ({"mode": "window", "id_frames": 2}, "id_frames"),
        ({"mode": "window", "read_batch_size": 2}, "read_batch_size"),
        ({"mode": "window", "save_banks": True}, "save_banks"),
        ({"chunk_size": 4}, "chunk_size"),
        ({"bank_schedule": "stored", "checkpoint_every": 2}, "checkpoint_every"),
        ({"bank_schedule": "sometimes"}, "bank_schedule"),
        ({"mode": "window", "bank_schedule": "lockstep"}, "bank_schedule"),
        ({"bank_schedule": "lockstep", "save_banks": True}, "save_banks"),
        ({"mode": "window", "checkpoint_every": 0}, "checkpoint_every"),
    ],
)
def test_invalid_settings_name_the_field(changes, field):
    with pytest.raises(InvalidSetting) as info:
        RunSettings(**changes)
    assert info.value.field == field and str(info.value).startswith(field)


def test_mode_defaults_are_filled_only_for_the_mode():
    bank = RunSettings().resolved()
    assert (bank.id_frames, bank.read_batch_size) == (
        BANK_DEFAULTS["id_frames"],
        BANK_DEFAULTS["read_batch_size"],
    )
    assert bank.chunk_size is None and bank.checkpoint_every is None
    window = RunSettings(mode="window").resolved()
    assert window.chunk_size == WINDOW_DEFAULTS["chunk_size"] and window.id_frames is None
    assert RunSettings(id_frames=3).resolved().id_frames == 3  # a given value is kept
    # bank schedule: lockstep unless banks are saved or loaded; checkpoints need lockstep
    assert bank.bank_schedule == "lockstep"
    assert RunSettings(save_banks=True).resolved().bank_schedule == "stored"
    assert RunSettings().resolved(banks_loaded=True).bank_schedule == "stored"
    assert RunSettings(checkpoint_every=2).resolved(banks_loaded=True).bank_schedule == "lockstep"
    assert RunSettings(mode="window").resolved().bank_schedule is None


def test_metadata_round_trip_is_exact():
    settings = RunSettings(
        mode="window",
        style="photographic",
        negative_prompt="blurry",
        num_inference_steps=7,
        height=64,
        seed=3,
    ).resolved()
    assert RunSettings.from_dict(settings.to_dict()) == settings
    config = ConsistencyConfig(rate=0.3, level_rates={16: 0.7}, window=2, seed=3)
    assert ConsistencyConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown settings"):
        RunSettings.from_dict({**settings.to_dict(), "frobnicate": 1})


def test_replace_rejects_unknown_names():
    with pytest.raises(TypeError, match=r"unknown setting.*steps"):
        RunSettings().replace(steps=3)
    assert RunSettings().replace(num_inference_steps=3).num_inference_steps == 3
