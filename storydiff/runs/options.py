"""The one table of a story run's options: every ``storydiff generate`` flag, what it sets, where it lives.

Each ``Option`` is declared once, in ``OPTIONS``; everything else is derived from the table:

* the ``generate`` parser (``cli/generate_flags.py``: its groups, flags, choices and help);
* the flags ``--resume`` refuses (``RUN_FLAGS``: the ones a run's metadata stores, and --out, --overwrite);
* the errors for a setting given in a mode it does not apply to (``check_modes``: ``RunSettings`` raises
  them for its fields, the CLI and ``eval-suite`` for every flag before anything loads);
* the mode defaults ``RunSettings.resolved`` fills in (``mode_defaults``; window mode's ``window`` is
  ``ConsistencyConfig.resolved``'s, named here);
* the keys of an ``eval-suite`` configuration (``SUITE_OPTIONS``: the same flags, ``KEY=VALUE``);
* the flag that errors name for a field (``flag_for``).

Values are checked by their owners (``check``): ``RunSettings`` (``runs/settings.py``), ``ConsistencyConfig``
(``consistency/config.py``), or the command itself (``cli/generate.py``). The default of an owned option is
its owner's dataclass default (``settings.default_of``), never written twice.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from dataclasses import field as _field
from typing import Any

from ..consistency.config import (
    ATTN_PRECISIONS,
    LAYER_PRESETS,
    ROPE_POLICIES,
    WINDOW_MODE_WINDOW,
    InvalidSetting,
)
from ..models.sampler import SCHEDULERS
from ..pages.comic import CAPTION_STYLES, LAYOUTS
from ..pages.story import CAPTION_SOURCES

MODES = ("bank", "window")  # RunSettings.mode
BANK_SCHEDULES = ("lockstep", "stored")
BANK_SHARING = ("recompute", "broadcast")
DTYPES = ("float16", "bfloat16", "float32")
OWNERS = ("settings", "consistency", "cli")  # RunSettings, ConsistencyConfig, the command only

#: the groups of ``storydiff generate --help``, in order
GROUPS = (
    "model",
    "story and output",
    "images",
    "video (Wan 2.x)",
    "comic pages",
    "reference images (IP-Adapter; SD1.x/2.x, SDXL, FLUX.1)",
    "consistency",
    "bank mode",
    "window mode",
    "several processes (torchrun)",
)


class _Owner:
    def __repr__(self) -> str:
        return "OWNER"


#: ``Option.default`` of an owned option: its owner's dataclass default (``settings.default_of``)
OWNER = _Owner()


def parse_freeu(text: str) -> tuple[float, ...] | str:
    """``--freeu``: four numbers S1,S2,B1,B2, or "off" (given, so it overrides a preset's factors)."""
    if text.strip().lower() == "off":
        return "off"
    try:
        factors = tuple(float(part) for part in text.split(","))
    except ValueError:
        factors = ()
    if len(factors) != 4:
        raise ValueError(f"expected four numbers S1,S2,B1,B2 or 'off', got {text!r}")
    return factors


def parse_level_rates(items: Iterable[str]) -> dict[int, float]:
    """``--level-rate`` items LEVEL=RATE → {level: rate}; ValueError naming the first bad one."""
    rates = {}
    for item in items:
        level, _, rate = item.partition("=")
        try:
            rates[int(level)] = float(rate)
        except ValueError:
            raise ValueError(f"--level-rate expects LEVEL=RATE such as 32=0.5, got {item!r}") from None
    return rates


def _freeu_fields(value) -> dict:
    return {"freeu": None if value == "off" else value}


def _level_rate_fields(items) -> dict:
    return {"level_rates": parse_level_rates(items)}


def _no_skip_fields(on) -> dict:
    return {"skip_prob_early": 0.0, "skip_prob_late": 0.0} if on else {}


@dataclass(frozen=True)
class Option:
    """One option of a story run.

    Attributes:
        name: argparse's dest (the flag without ``--``, ``_`` for ``-``); ``flag`` and the eval-suite
            ``key`` follow from it.
        group: its group in ``storydiff generate --help`` (``GROUPS``).
        help: help text; ``{default}`` stands for its default, ``{bank}`` / ``{window}`` for a mode's.
        owner: "settings" (a ``RunSettings`` field), "consistency" (a ``ConsistencyConfig`` field) or "cli"
            (the command's own: model files, story, output, devices, reference images, processes).
        field: the owner's field it sets, which is also the name an ``InvalidSetting`` about it carries
            (default: ``name``; None: it sets no single field — ``to_fields`` says what).
        parse: text → value (argparse's ``type``; the eval-suite's too); None: the text itself.
        choices, action ("store", "store_true": a switch, "append": repeatable), metavar: as argparse's.
        default: ``OWNER`` for an owned option (the owner's dataclass default); else the value the command
            uses when it is not given.
        mode_defaults: the value a mode fills in when it is not given (``RunSettings.resolved``,
            ``ConsistencyConfig.resolved``): {"bank": 2}.
        modes: the modes it applies to; given in another one it is an error (``check_modes``).
        mode_problem: that error's words (default: "does not apply in <mode> mode").
        to_fields: value → the owner's fields, where it is not {field: value}.
        metadata: where a run's ``metadata.json`` keeps it (default for owned options: "settings.<field>"
            or "consistency.<field>"); None: nowhere.
        on_resume: "refuse" (``--resume`` refuses it: the run's own metadata says what it is) or "allow";
            default: "refuse" when ``metadata`` keeps it.
        suite: an ``eval-suite`` configuration may give it (it changes the frames; the seed is the suite's).
        check: where its value is checked (default: the owner's class).
    """

    name: str
    group: str
    help: str
    owner: str = "settings"
    field: str | None = ""
    parse: Callable[[str], Any] | None = None
    choices: tuple | None = None
    action: str = "store"
    metavar: str | None = None
    default: Any = OWNER
    mode_defaults: Mapping[str, Any] = _field(default_factory=dict)
    modes: tuple[str, ...] = MODES
    mode_problem: str = ""
    to_fields: Callable[[Any], dict] | None = None
    metadata: str | None = ""
    on_resume: str = ""
    suite: bool = False
    check: str = ""

    def __post_init__(self) -> None:
        derived = {}
        if self.field == "":
            derived["field"] = self.name
        field_name = derived.get("field", self.field)
        if self.metadata == "":
            block = {"settings": "settings", "consistency": "consistency"}.get(self.owner)
            derived["metadata"] = f"{block}.{field_name}" if block and field_name else None
        if self.on_resume == "":
            derived["on_resume"] = "refuse" if derived.get("metadata", self.metadata) else "allow"
        if self.check == "":
            derived["check"] = {"settings": "RunSettings", "consistency": "ConsistencyConfig"}.get(
                self.owner, "cli/generate.py"
            )
        for key, value in derived.items():
            object.__setattr__(self, key, value)
        if self.owner not in OWNERS or self.group not in GROUPS or self.on_resume not in ("refuse", "allow"):
            raise ValueError(f"option {self.name}: owner, group or on_resume is not one of the known ones")
        if not set(self.modes) <= set(MODES) or not set(self.mode_defaults) <= set(self.modes):
            raise ValueError(f"option {self.name}: modes and mode defaults must be of {MODES}")

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def key(self) -> str:
        """Its key in an eval-suite configuration: the flag without ``--``."""
        return self.flag[2:]

    @property
    def refused_on_resume(self) -> bool:
        return self.on_resume == "refuse"

    def applies(self, mode: str) -> bool:
        return mode in self.modes

    def problem_in(self, mode: str) -> str:
        """What is wrong with giving it in ``mode`` (where it does not apply)."""
        return self.mode_problem or f"does not apply in {mode} mode"

    def fields(self, value: Any) -> dict[str, Any]:
        """The owner's fields that ``value`` (given) sets."""
        if self.to_fields is not None:
            return self.to_fields(value)
        return {self.field: value} if self.field else {}


_IMAGES, _PAGES = "images", "comic pages"
_REF = "reference images (IP-Adapter; SD1.x/2.x, SDXL, FLUX.1)"
_DIST = "several processes (torchrun)"

OPTIONS: tuple[Option, ...] = (
    # -- model
    Option(
        "model",
        "model",
        "diffusers model path or hub id (SD1.x/2.x, SDXL, FLUX.1, SD3/SD3.5, PixArt-Σ, Qwen-Image, Wan 2.x "
        "text to video); offline random weights: tiny-sdxl, tiny-sd15, random-sdxl, tiny-flux, tiny-sd3, "
        "tiny-pixart, tiny-qwen-image, tiny-wan, tiny-wan2.2, random-flux (GPU)",
        owner="cli",
        field=None,
        default=None,
        metadata="model",
    ),
    Option(
        "config",
        "model",
        "with --model FILE.safetensors: a local diffusers folder of the same architecture (e.g. the "
        "base model's) whose configs describe the file (offline, diffusers cannot fetch them)",
        owner="cli",
        field=None,
        metavar="DIR",
        default=None,
        metadata="model_config",
    ),
    Option(
        "lora",
        "model",
        "a LoRA file (or diffusers LoRA folder) applied with weight SCALE (default 1); repeatable",
        owner="cli",
        field=None,
        action="append",
        metavar="PATH[:SCALE]",
        default=None,
        metadata="loras",
    ),
    Option("device", "model", "default: cuda if available, else cpu", owner="cli", field=None, default=None),
    Option(
        "dtype",
        "model",
        "default: float16 on CUDA (random-flux: bfloat16), float32 on CPU",
        owner="cli",
        field=None,
        choices=DTYPES,
        default=None,
    ),
    # -- story and output
    Option(
        "story",
        "story and output",
        "story file (UTF-8 text)",
        owner="cli",
        field=None,
        default=None,
        metadata="story_text",
    ),
    Option(
        "characters",
        "story and output",
        "character file (instead of a block in --story)",
        owner="cli",
        field=None,
        default=None,
        metadata="story_text",
    ),
    # the run's folder: --resume DIR names it
    Option(
        "out", "story and output", "output folder", owner="cli", field=None, default=None, on_resume="refuse"
    ),
    # a resume continues the run, never replaces it
    Option(
        "overwrite",
        "story and output",
        "replace an earlier run in --out",
        owner="cli",
        field=None,
        action="store_true",
        default=False,
        on_resume="refuse",
    ),
    Option(
        "resume",
        "story and output",
        "continue an interrupted run (window mode, lockstep banks) with its stored settings",
        owner="cli",
        field=None,
        metavar="DIR",
        default=None,
    ),
    # -- images
    Option(
        "preset",
        _IMAGES,
        "official: the official StoryDiffusion app's settings — DDIM + FreeU(0.6, 0.4, 1.1, 1.2), "
        "768x768, guidance 5, 35 steps, 1 identity frame, style 'Japanese Anime', its comic layout; "
        "UNet models; the flags you give override them",
        field=None,
        to_fields=lambda name: {},  # RunSettings.from_preset chooses the settings it names
        choices=("official",),
        default=None,
        metadata="settings",
        check="RunSettings.from_preset",
    ),
    Option(
        "style",
        _IMAGES,
        "style template (storydiff/styles.py), or 'none' (default: {default})",
        suite=True,
    ),
    Option("negative", _IMAGES, "extra negative prompt", field="negative_prompt", suite=True),
    Option(
        "steps",
        _IMAGES,
        "denoising steps (default: {default})",
        field="num_inference_steps",
        parse=int,
        suite=True,
    ),
    Option(
        "guidance",
        _IMAGES,
        "classifier-free guidance scale; <= 1 turns it off (default: {default})",
        field="guidance_scale",
        parse=float,
        suite=True,
    ),
    Option(
        "scheduler",
        _IMAGES,
        "UNet models: the model's own scheduler, or DDIM from its config (default: {default})",
        choices=SCHEDULERS,
    ),
    Option(
        "freeu",
        _IMAGES,
        "UNet models: FreeU with these factors (official: 0.6,0.4,1.1,1.2), or 'off' (default: off)",
        parse=parse_freeu,
        metavar="S1,S2,B1,B2",
        to_fields=_freeu_fields,
    ),
    Option("height", _IMAGES, "image height in pixels (default: the model's size)", parse=int, suite=True),
    Option("width", _IMAGES, "image width in pixels (default: the model's size)", parse=int, suite=True),
    Option("seed", _IMAGES, "seed; frame i starts from seed + i (default: {default})", parse=int),
    # -- comic pages
    Option(
        "layout",
        _PAGES,
        "comic page layout: grid, classic, or official (the official app's classic comic: rows of "
        "panels and stacked half panels, arranged by --seed) (default: {default})",
        choices=LAYOUTS,
    ),
    Option(
        "captions",
        _PAGES,
        "panel captions: line = the text after '#', else the frame line without its tags (as the "
        "official app); hash = only text after '#'; none (default: {default})",
        choices=CAPTION_SOURCES,
    ),
    Option(
        "caption_style",
        _PAGES,
        "captions in a white band, or in a semi-transparent box over the panel's bottom (default: "
        "the layout's: overlay for official, band otherwise)",
        choices=CAPTION_STYLES,
    ),
    Option(
        "font",
        _PAGES,
        "caption font file (default: DejaVu Sans, or an installed font covering the caption's script)",
        metavar="PATH",
    ),
    # -- reference images
    Option(
        "ip_adapter",
        _REF,
        "IP-Adapter weights in diffusers' format (a local file, or a folder holding one): plain, plus, "
        "plus-face",
        owner="cli",
        field=None,
        metavar="PATH",
        default=None,
        metadata="ip_adapter.weights",
    ),
    Option(
        "image_encoder",
        _REF,
        "the adapter's CLIP vision encoder folder (default: image_encoder/ beside the weights)",
        owner="cli",
        field=None,
        metavar="DIR",
        default=None,
        metadata="ip_adapter.image_encoder",
    ),
    Option(
        "ip_scale",
        _REF,
        "how strongly the images steer the frames (default: {default})",
        owner="cli",
        parse=float,
        default=1.0,
        metadata="ip_adapter.scale",
    ),
    Option(
        "ref",
        _REF,
        "a reference image of character NAME: every frame showing NAME is conditioned on it; repeatable",
        owner="cli",
        field="reference_images",
        action="append",
        metavar="NAME=IMAGE",
        default=None,
        metadata="reference_images",
    ),
    # -- consistency
    Option(
        "mode",
        "consistency",
        "bank: identity frames write a bank the others read (official); window: long stories, "
        "neighbours within --window, chunked denoising with checkpoints (default: {default})",
        choices=MODES,
        suite=True,
    ),
    Option(
        "rate",
        "consistency",
        "share of tokens each frame offers, 0..1 (default: the model's — 0.5 for images, 0.1 for Wan "
        "video: its shots have tens of thousands of tokens)",
        owner="consistency",
        parse=float,
        suite=True,
    ),
    Option(
        "level_rate",
        "consistency",
        "per-level rate, LEVEL in 8, 16, 32, 64 (official sa32 = 32, sa64 = 16); repeatable",
        owner="consistency",
        field="level_rates",
        action="append",
        metavar="LEVEL=RATE",
        to_fields=_level_rate_fields,
        suite=True,
    ),
    Option(
        "layers",
        "consistency",
        "attention layers that get consistency: default = the model family's choice (UNets: up "
        "blocks, as the official code; FLUX: single-stream blocks; SD3, PixArt: all); all; up, up+mid "
        "(UNets); single, double (FLUX)",
        owner="consistency",
        choices=LAYER_PRESETS,
        suite=True,
    ),
    Option(
        "rope",
        "consistency",
        "FLUX: where borrowed tokens sit under RoPE: source = their own frame's position (default), "
        "shift = off the reader's grid (position ids (1, h, w), as FLUX Kontext marks reference images), "
        "none = no rotation",
        owner="consistency",
        choices=ROPE_POLICIES,
        suite=True,
    ),
    Option(
        "attn_precision",
        "consistency",
        "arithmetic of the consistent attention calls: native = the model's dtype (default); int8 = 8-bit "
        "Q·Kᵀ (smoothed per-row int8 codes, exact integer products; P·V in the model's dtype): forward "
        "only, not with --tile, GPUs of compute capability 8.0+ (any CPU); calls that borrow nothing stay "
        "native",
        owner="consistency",
        choices=ATTN_PRECISIONS,
        # in the consistency block only when int8: a native run's block is the one written before the
        # setting existed (ConsistencyConfig.to_dict), so there is no key to name for every run
        metadata="consistency",
        suite=True,
    ),
    Option(
        "warmup_steps",
        "consistency",
        "first steps without consistency (default: {default})",
        owner="consistency",
        parse=int,
        suite=True,
    ),
    Option(
        "no_skip",
        "consistency",
        "disable the random layer-skip schedule",
        owner="consistency",
        field=None,
        action="store_true",
        to_fields=_no_skip_fields,
        default=False,
        metadata="consistency.skip_prob_early, consistency.skip_prob_late",
        suite=True,
    ),
    # -- bank mode
    Option(
        "subject_masks",
        "consistency",
        "a folder of subject masks in `storydiff eval --mask-dir`'s layout (mask_NNN.png per frame showing "
        "characters): each frame offers only tokens inside its characters' mask (default: off, whole "
        "frames, as the official code); `auto`: found during the run from cross-attention on each "
        "character's description (every model family, both modes; step 0 unmasked); `off`: whole frames; "
        "kept in the output folder's masks/",
        owner="cli",
        field=None,
        metavar="off|auto|DIR",
        default=None,
        metadata="subject_masks",
        suite=True,
    ),
    Option(
        "background_share",
        "consistency",
        "with --subject-masks: the share of each frame's offered tokens drawn outside its characters' masks "
        "(0..1; default: 0, the subject only)",
        owner="cli",
        field=None,
        parse=float,
        default=None,
        metadata="subject_masks",
        suite=True,
    ),
    Option(
        "bounded",
        "consistency",
        "with --subject-masks: each character's tokens attend only to the same character's borrowed tokens "
        "(banks, window neighbours), background tokens only to background ones (bounded attention; "
        "default: off, as the official code)",
        owner="cli",
        field=None,
        action="store_true",
        default=False,
        metadata="subject_masks",
        suite=True,
    ),
    Option(
        "id_frames",
        "bank mode",
        "bank mode: identity frames per character (default: {bank})",
        parse=int,
        modes=("bank",),
        mode_defaults={"bank": 2},
        suite=True,
    ),
    Option(
        "read_batch",
        "bank mode",
        "bank mode: frames per denoiser call after the identities (default: {bank})",
        field="read_batch_size",
        parse=int,
        modes=("bank",),
        mode_defaults={"bank": 4},
        suite=True,
    ),
    Option(
        "bank_schedule",
        "bank mode",
        "bank mode: lockstep keeps one denoising step's bank alive at a time (frames identical); "
        "stored keeps every step's bank, needed by --save-banks / --load-bank (default: lockstep unless "
        "banks are saved or loaded)",
        choices=BANK_SCHEDULES,
        modes=("bank",),
        suite=True,
    ),
    Option(
        "save_banks",
        "bank mode",
        "bank mode: write each character's bank (safetensors) into OUT/banks",
        action="store_true",
        modes=("bank",),
        mode_problem="does not apply in window mode (it keeps no identity bank)",
    ),
    Option(
        "load_bank",
        "bank mode",
        "bank mode: reuse a character's bank from an earlier run (--save-banks); repeatable",
        owner="cli",
        action="append",
        metavar="[NAME=]PATH",
        default=None,
        modes=("bank",),
        mode_problem="applies to bank mode only (window mode keeps no identity bank)",
        metadata="loaded_banks",
        check="check_run",
    ),
    # -- window mode
    Option(
        "window",
        "window mode",
        "neighbours within W frames (default: {window} in window mode)",
        owner="consistency",
        parse=int,
        mode_defaults={"window": WINDOW_MODE_WINDOW},
        suite=True,
    ),
    Option(
        "shot_frames",
        "video (Wan 2.x)",
        "video models: frames of each shot (a story line is a shot), of the form 4k+1 (default: the "
        "model's, 81 for Wan)",
        parse=int,
        suite=True,
    ),
    Option(
        "fps",
        "video (Wan 2.x)",
        "video models: frames per second of the shot and story files (default: 16, Wan's)",
        parse=float,
        suite=True,
    ),
    Option(
        "chunk_size",
        "window mode",
        "window mode: frames per denoiser call (default: {window})",
        parse=int,
        modes=("window",),
        mode_defaults={"window": 8},
        suite=True,
    ),
    Option(
        "tile",
        "window mode",
        "window mode: the paper's tiled form, tile size",
        owner="consistency",
        parse=int,
        modes=("window",),
        mode_problem="applies to window mode only",
        suite=True,
    ),
    Option(
        "checkpoint_every",
        "window mode",
        "window mode and lockstep bank schedule: write a checkpoint every N steps (for --resume)",
        parse=int,
    ),
    # -- several processes
    Option(
        "dist_backend",
        _DIST,
        "under torchrun: the torch.distributed backend (default: nccl on CUDA, gloo otherwise)",
        owner="cli",
        field=None,
        choices=("gloo", "nccl"),
        default=None,
    ),
    Option(
        "dist_bank",
        _DIST,
        "bank mode under torchrun: the characters' identity frames are dealt over the ranks and each "
        "step's bank broadcast (broadcast, default), or every rank denoises every identity frame itself "
        "(recompute, no traffic); same frames",
        field="bank_sharing",
        choices=BANK_SHARING,
        modes=("bank",),
    ),
    Option(
        "dist_timeout",
        _DIST,
        "under torchrun: how long a rank waits for the others before failing with an error "
        "(default: {default:g})",
        owner="cli",
        field=None,
        parse=float,
        metavar="SECONDS",
        default=600.0,
    ),
)

_BY_NAME = {option.name: option for option in OPTIONS}
_BY_FIELD = {option.field: option for option in OPTIONS if option.field}

#: what ``--resume`` refuses: everything the run it continues already says
RUN_FLAGS = tuple(option.name for option in OPTIONS if option.refused_on_resume)
#: what an eval-suite configuration may give
SUITE_OPTIONS = tuple(option for option in OPTIONS if option.suite)


def option(name: str) -> Option:
    """The option of this name (argparse's dest); KeyError if there is none."""
    return _BY_NAME[name]


def option_for_field(name: str) -> Option | None:
    """The option that sets owner field ``name`` (an ``InvalidSetting``'s field; ``level_rates[32]`` is
    ``level_rates``'s), or None."""
    return _BY_FIELD.get(re.sub(r"\[.*\]$", "", name))


def flag_for(name: str) -> str:
    """The flag that sets field ``name``, for error messages (``level_rates[32]``: ``--level-rate [32]``);
    ``name`` itself when no flag does."""
    found = option_for_field(name)
    index = name[len(found.field) :] if found else ""
    return f"{found.flag} {index}" if index else found.flag if found else name


def mode_defaults(mode: str, owner: str = "settings") -> dict[str, Any]:
    """{field: value} that ``mode`` fills in for ``owner``'s options not given."""
    return {
        option.field: option.mode_defaults[mode]
        for option in OPTIONS
        if option.owner == owner and mode in option.mode_defaults
    }


def restricted(owner: str | None = None) -> tuple[Option, ...]:
    """The options that apply to one mode only (of ``owner``, or all)."""
    return tuple(o for o in OPTIONS if set(o.modes) != set(MODES) and owner in (None, o.owner))


def applies(name: str, mode: str) -> bool:
    """Whether the option (by name or field) applies in ``mode``; a name no option has: True."""
    found = _BY_NAME.get(name) or option_for_field(name)
    return found is None or found.applies(mode)


def check_modes(mode: str, given: Iterable[str]) -> None:
    """InvalidSetting (field, problem) for the first of ``given`` (option names or fields) that does not
    apply in ``mode``."""
    for name in given:
        found = _BY_NAME.get(name) or option_for_field(name)
        if found is not None and not found.applies(mode):
            raise InvalidSetting(found.field or found.name, found.problem_in(mode))


def split_fields(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Given option values (by option name; None: not given) → (RunSettings fields, ConsistencyConfig
    fields) they set. ValueError for a value its option cannot turn into fields (``--level-rate 16:0.5``)."""
    owned: dict[str, dict[str, Any]] = {"settings": {}, "consistency": {}}
    for name, value in values.items():
        found = _BY_NAME[name]
        if value is not None and found.owner in owned:
            owned[found.owner].update(found.fields(value))
    return owned["settings"], owned["consistency"]
