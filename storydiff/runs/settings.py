"""``RunSettings``: everything one story run is asked to do, validated once, written to and read from
its metadata.

The story pipeline, the CLI and ``--resume`` share this one object: the pipeline takes it (or keyword
overrides of it), ``to_dict`` is the ``settings`` block of ``metadata.json``, ``from_dict`` reads that
block back, so a resumed run runs exactly the settings that were written. Invalid values raise
``InvalidSetting`` naming the field, which the CLI turns into its flag's name.

Settings that only one mode uses default to None ("not given") and are filled in by ``resolved()``; giving
one in the other mode is an error, never silently ignored. Which mode a setting applies to, and the default
a mode fills in, are declared in the option table (``options.py``), as are the flags that set them;
``from_options`` makes a run's settings from option values, for the CLI and ``eval-suite`` alike.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..consistency.config import ConsistencyConfig, InvalidSetting
from ..models.sampler import SCHEDULERS
from ..pages.comic import CAPTION_STYLES, LAYOUTS
from ..pages.fonts import check_font
from ..pages.story import CAPTION_SOURCES
from ..pages.styles import DEFAULT_STYLE, get_style
from .options import (
    BANK_SCHEDULES,
    BANK_SHARING,
    MODES,
    OWNER,
    Option,
    applies,
    check_modes,
    mode_defaults,
    restricted,
    split_fields,
)

# bank mode over several processes: the faster one measured (README "Several GPUs")
DISTRIBUTED_BANK_SHARING = "broadcast"

#: ``--preset official``: the official StoryDiffusion app's settings (its low-VRAM SDXL app, the one its
#: README recommends): DDIM + FreeU(s1 0.6, s2 0.4, b1 1.1, b2 1.2), 768², guidance 5, 35 steps, one identity
#: frame, its default style, its classic comic layout. Given settings override a preset's values.
PRESETS: dict[str, dict[str, Any]] = {
    "official": {
        "style": "japanese anime",
        "height": 768,
        "width": 768,
        "guidance_scale": 5.0,
        "num_inference_steps": 35,
        "id_frames": 1,
        "scheduler": "ddim",
        "freeu": (0.6, 0.4, 1.1, 1.2),
        "layout": "official",
    }
}

# Defaults of the mode-specific settings, applied by ``resolved`` (declared in the option table).
BANK_DEFAULTS = mode_defaults("bank")
WINDOW_DEFAULTS = mode_defaults("window")
# the settings that apply in one mode only (the option table's ``modes``)
_ONE_MODE = tuple(option.field for option in restricted("settings") if option.field)


def _count(name: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidSetting(name, f"must be a whole number >= 1, got {value!r}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


MAX_SEED = 2**64 - 1  # torch generators take 64-bit seeds; frame i uses seed + i


@dataclass(frozen=True)
class RunSettings:
    """One story run's settings (defaults follow the official StoryDiffusion app where it has them).

    Attributes:
        mode: "bank" (identity frames write a bank every other frame reads, as the official code) or
            "window" (long stories: story neighbours, chunked lockstep denoising, checkpoints).
        style: style template name (``styles.py``); negative_prompt: extra negative prompt for every frame.
        num_inference_steps, guidance_scale: the sampler's; guidance <= 1 turns classifier-free guidance off.
        height, width: image size in pixels, multiples of 8; None: the model's default size.
        seed: frame i starts from the noise of seed + i.
        scheduler: "model" (the pipeline's own) or "ddim" (DDIM from its config, as the official app);
            freeu: FreeU factors (s1, s2, b1, b2) for the run, None: the pipeline's as it is. UNets only
            (``sampler.py``).
        layout: comic page layout, "grid", "classic" or "official" (the official app's classic comic,
            arranged by ``seed``); font: a TrueType/OpenType file for captions (default: DejaVu Sans, or an
            installed font that covers the caption's script).
        captions: where panel captions come from: "line" (the text after ``#``, else the line itself
            without its tags, as the official app), "hash" (only text after ``#``), "none".
        caption_style: "band" (a white band) or "overlay" (a semi-transparent box over the panel's
            bottom); None: the layout's own (grid and classic: band, official: overlay).
        id_frames, read_batch_size, save_banks: bank mode only — identity frames per character, frames per
            denoiser call after them, write each character's bank next to the frames.
        bank_schedule: bank mode only. "lockstep": at every step the identity frames write that step's
            bank, every other frame reads it, and it is freed, so one step's bank is alive at a time;
            "stored": each character's identity frames run all their steps first and keep every step's
            bank (needed to save or load banks). Same frames either way. Default: lockstep unless banks
            are saved or loaded.
        shot_frames, fps: video models (Wan) only — video frames per shot (4k+1; None: the model's) and
            the frame rate of the files written (None: 16, Wan's).
        chunk_size: window mode only — frames per denoiser call.
        checkpoint_every: window mode or the lockstep bank schedule — write a checkpoint every N steps.
        bank_sharing: bank mode over several processes (torchrun) only. "broadcast" (the default there):
            the characters are dealt over the ranks, each rank denoises its characters' identity frames
            and broadcasts their bank each step (lockstep) or whole (stored); "recompute": every rank
            denoises every identity frame itself, no traffic. Same frames either way (README "Several
            GPUs" compares the two).
    """

    mode: str = "bank"
    style: str = DEFAULT_STYLE
    negative_prompt: str = ""
    num_inference_steps: int = 30
    guidance_scale: float = 5.0
    height: int | None = None
    width: int | None = None
    seed: int = 0
    scheduler: str = "model"
    freeu: tuple[float, float, float, float] | None = None
    layout: str = "grid"
    font: str | None = None
    captions: str = "line"
    caption_style: str | None = None
    id_frames: int | None = None
    read_batch_size: int | None = None
    bank_schedule: str | None = None
    save_banks: bool = False
    shot_frames: int | None = None
    fps: float | None = None
    chunk_size: int | None = None
    checkpoint_every: int | None = None
    bank_sharing: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidSetting("mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        try:
            get_style(self.style)
        except ValueError as exc:  # "unknown style 'x'; available styles: ..."
            raise InvalidSetting("style", f"names an {exc}") from None
        if not isinstance(self.negative_prompt, str):
            raise InvalidSetting("negative_prompt", f"must be text, got {self.negative_prompt!r}")
        _count("num_inference_steps", self.num_inference_steps)
        guidance = self.guidance_scale
        if not _finite(guidance):
            raise InvalidSetting("guidance_scale", f"must be a finite number, got {guidance!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8
            ):
                raise InvalidSetting(name, f"must be a positive multiple of 8 (pixels), got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise InvalidSetting("seed", f"must be a whole number from 0 to 2**64 - 1, got {self.seed!r}")
        if self.scheduler not in SCHEDULERS:
            choices = ", ".join(SCHEDULERS)
            raise InvalidSetting("scheduler", f"must be one of {choices}, got {self.scheduler!r}")
        if self.freeu is not None:
            factors = self.freeu
            numbers = isinstance(factors, (list, tuple)) and len(factors) == 4
            if not numbers or not all(_finite(value) for value in factors):
                raise InvalidSetting("freeu", f"must be four numbers s1, s2, b1, b2, got {factors!r}")
            object.__setattr__(self, "freeu", tuple(float(value) for value in factors))  # JSON gives lists
        if self.captions not in CAPTION_SOURCES:
            choices = ", ".join(CAPTION_SOURCES)
            raise InvalidSetting("captions", f"must be one of {choices}, got {self.captions!r}")
        if self.caption_style is not None and self.caption_style not in CAPTION_STYLES:
            choices = ", ".join(CAPTION_STYLES)
            raise InvalidSetting("caption_style", f"must be one of {choices}, got {self.caption_style!r}")
        if self.layout not in LAYOUTS:
            raise InvalidSetting("layout", f"must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.font is not None:
            try:
                check_font(self.font)
            except ValueError as exc:
                raise InvalidSetting("font", f"must name a font file Pillow can use: {exc}") from None
        for name in ("id_frames", "read_batch_size", "chunk_size", "checkpoint_every", "shot_frames"):
            _count(name, getattr(self, name), optional=True)
        if self.fps is not None and not (_finite(self.fps) and self.fps > 0):
            raise InvalidSetting("fps", f"must be a positive number of frames per second, got {self.fps!r}")
        if not isinstance(self.save_banks, bool):
            raise InvalidSetting("save_banks", f"must be True or False, got {self.save_banks!r}")
        if self.bank_sharing is not None and self.bank_sharing not in BANK_SHARING:
            choices = ", ".join(BANK_SHARING)
            raise InvalidSetting("bank_sharing", f"must be one of {choices}, got {self.bank_sharing!r}")
        # given (not None; not False for a switch; counts were checked >= 1) in a mode it does not apply to
        check_modes(self.mode, [name for name in _ONE_MODE if getattr(self, name) not in (None, False)])
        if self.bank_schedule is not None and self.bank_schedule not in BANK_SCHEDULES:
            choices = ", ".join(BANK_SCHEDULES)
            raise InvalidSetting("bank_schedule", f"must be one of {choices}, got {self.bank_schedule!r}")
        if self.bank_schedule == "lockstep" and self.save_banks:
            raise InvalidSetting(
                "save_banks", "needs the stored bank schedule: a lockstep run never holds a whole bank"
            )
        if self.mode == "bank" and self.bank_schedule == "stored" and self.checkpoint_every is not None:
            raise InvalidSetting("checkpoint_every", "applies to window mode and the lockstep bank schedule")

    def replace(self, **changes: Any) -> RunSettings:
        """A copy with ``changes`` (validated); TypeError naming an unknown setting."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            names = ", ".join(f.name for f in dataclasses.fields(self))
            raise TypeError(f"unknown setting(s) {', '.join(unknown)}; settings are: {names}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str, **given: Any) -> RunSettings:
        """The settings of preset ``name`` (``PRESETS``) with ``given`` overriding them. A preset's bank-mode
        settings are left out when ``given`` chooses window mode."""
        if name not in PRESETS:
            raise InvalidSetting("preset", f"must be one of {', '.join(PRESETS)}, got {name!r}")
        mode = given.get("mode", cls.mode)
        values = {key: value for key, value in PRESETS[name].items() if applies(key, mode)}
        return cls().replace(**{**values, **given})

    def resolved(self, *, banks_loaded: bool = False) -> RunSettings:
        """The mode's defaults filled in for its settings that were not given (``banks_loaded``: the run
        reads banks from files, which only the stored schedule can)."""
        defaults = dict(BANK_DEFAULTS if self.mode == "bank" else WINDOW_DEFAULTS)
        if self.mode == "bank":
            defaults["bank_schedule"] = "stored" if self.save_banks or banks_loaded else "lockstep"
        if self.mode == "bank" and self.checkpoint_every is not None:
            defaults["bank_schedule"] = "lockstep"  # the stored schedule has no checkpoints
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    @property
    def steps_in_lockstep(self) -> bool:
        """All frames advance one step at a time (window mode, lockstep bank schedule): checkpoints and
        resume work at step boundaries."""
        return self.mode == "window" or self.bank_schedule == "lockstep"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSettings:
        """Settings as written by ``to_dict`` (a run's metadata); ValueError for keys it does not know."""
        if "captions" not in data:  # written before captions had a choice: only text after '#' then
            data = {**data, "captions": "hash"}
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown settings {unknown}: written by another version of storydiff?")
        return cls(**data)


def default_of(option: Option) -> Any:
    """An option's default: its owner's dataclass default (``RunSettings``, ``ConsistencyConfig``) for an
    owned option, else the table's (``option.default``)."""
    if option.default is not OWNER:
        return option.default
    owner = {"settings": RunSettings, "consistency": ConsistencyConfig}[option.owner]
    found = {f.name: f for f in dataclasses.fields(owner)}[option.field]
    return found.default if found.default is not dataclasses.MISSING else found.default_factory()


def from_options(
    values: Mapping[str, Any], *, base: RunSettings | None = None, banks_loaded: bool = False
) -> tuple[RunSettings, ConsistencyConfig]:
    """A run's resolved settings and consistency configuration from option values (by option name, None:
    not given, as argparse leaves them; ``options.OPTIONS``) over ``base`` (default: ``RunSettings()``),
    made the one way ``storydiff generate`` and ``eval-suite`` both make them: an option given in a mode it
    does not apply to is refused first, then ``--preset`` chooses settings the given ones override, the
    mode fills in its defaults (``RunSettings.resolved``, ``ConsistencyConfig.resolved``), and the
    configuration takes the run's seed. InvalidSetting (naming the field) or ValueError."""
    given = {name: value for name, value in values.items() if value is not None}
    base = base or RunSettings()
    mode = given.get("mode", base.mode)
    if mode in MODES:  # else RunSettings names the mode itself
        check_modes(mode, given)
    run, consistency = split_fields(given)
    preset = given.get("preset")
    start = RunSettings.from_preset(preset, **run) if preset else base.replace(**run)
    settings = start.resolved(banks_loaded=banks_loaded)
    return settings, consistency_for(settings, consistency)


def consistency_for(settings: RunSettings, fields: Mapping[str, Any]) -> ConsistencyConfig:
    """The consistency configuration of a run with (resolved) ``settings``: the ``ConsistencyConfig``
    fields given, the run's seed, and the mode's defaults (``ConsistencyConfig.resolved``)."""
    return ConsistencyConfig(seed=settings.seed, **fields).resolved(settings.mode)
