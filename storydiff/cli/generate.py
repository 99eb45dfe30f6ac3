"""``storydiff generate``: a story file in; frames, comic pages and metadata out.

Everything a user types is checked before any model loads or any folder is created: the story, the
settings (``RunSettings`` and ``ConsistencyConfig`` own the rules; errors name this command's flags), the
output folder, the banks to load. ``--resume DIR`` reruns exactly the settings stored in ``DIR``'s metadata
and refuses flags that would change them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NamedTuple

from ..config import LAYER_PRESETS, ROPE_POLICIES
from .common import DTYPES, fail

# Settings fields (RunSettings, ConsistencyConfig) and the flags that set them, for error messages.
FLAGS = {
    "mode": "--mode",
    "style": "--style",
    "negative_prompt": "--negative",
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance",
    "height": "--height",
    "width": "--width",
    "seed": "--seed",
    "scheduler": "--scheduler",
    "freeu": "--freeu",
    "layout": "--layout",
    "font": "--font",
    "captions": "--captions",
    "caption_style": "--caption-style",
    "preset": "--preset",
    "id_frames": "--id-frames",
    "read_batch_size": "--read-batch",
    "bank_schedule": "--bank-schedule",
    "save_banks": "--save-banks",
    "chunk_size": "--chunk-size",
    "checkpoint_every": "--checkpoint-every",
    "bank_sharing": "--dist-bank",
    "rate": "--rate",
    "level_rates": "--level-rate",
    "warmup_steps": "--warmup-steps",
    "window": "--window",
    "tile": "--tile",
    "layers": "--layers",
    "rope": "--rope",
    "load_bank": "--load-bank",
    "reference_images": "--ref",
    "ip_scale": "--ip-scale",
}
# Settings a preset chooses (settings.PRESETS) whose flag has the field's name.
PRESET_FIELDS = ("scheduler", "freeu", "layout", "style")
# Flags that describe the run itself: stored in the metadata, so --resume refuses them.
RUN_FLAGS = (
    "model",
    "config",
    "lora",
    "ip_adapter",
    "image_encoder",
    "ip_scale",
    "ref",
    "story",
    "characters",
    "out",
    "overwrite",
    "mode",
    "style",
    "negative",
    "steps",
    "guidance",
    "height",
    "width",
    "seed",
    "preset",
    "scheduler",
    "freeu",
    "layout",
    "font",
    "captions",
    "caption_style",
    "id_frames",
    "read_batch",
    "bank_schedule",
    "save_banks",
    "chunk_size",
    "checkpoint_every",
    "dist_bank",
    "rate",
    "level_rate",
    "warmup_steps",
    "window",
    "tile",
    "layers",
    "rope",
    "no_skip",
    "load_bank",
)


class Job(NamedTuple):
    """What one `generate` runs, from the flags or from the metadata of the run it resumes."""

    model: str
    out: str
    story: Any  # story.Story
    settings: Any  # settings.RunSettings
    config: Any  # config.ConsistencyConfig
    banks: dict  # character -> (bank file, its header)
    files: dict  # StoryDiffusionPipeline.from_pretrained's model_config and loras
    ip: dict  # {"adapter": {"weights", "image_encoder", "scale"} or None, "references": {name: image path}}


def register(subparsers, parents: list) -> None:
    from ..settings import BANK_DEFAULTS, WINDOW_DEFAULTS, RunSettings

    d = RunSettings()
    gen = subparsers.add_parser(
        "generate",
        parents=parents,
        help="generate a consistent story: frames, comic pages and metadata",
        description="Story file: character lines `[Name] description`, a `---` line, then one frame per "
        "line with [Name] tags ([NC]: no character) and an optional `#caption`. Models: a diffusers path "
        "or hub id of SD1.x/2.x, SDXL, FLUX.1, SD3/SD3.5 or PixArt-Σ, or tiny-sdxl / tiny-sd15 / tiny-flux / "
        "tiny-sd3 / tiny-pixart (random weights, offline, for smoke tests).",
    )
    model = gen.add_argument_group("model")
    model.add_argument(
        "--model",
        help="diffusers model path or hub id (SD1.x/2.x, SDXL, FLUX.1, SD3/SD3.5, PixArt-Σ); offline random "
        "weights: tiny-sdxl, tiny-sd15, random-sdxl, tiny-flux, tiny-sd3, tiny-pixart, random-flux (GPU)",
    )
    model.add_argument(
        "--config",
        default=None,
        metavar="DIR",
        help="with --model FILE.safetensors: a local diffusers folder of the same architecture (e.g. the "
        "base model's) whose configs describe the file (offline, diffusers cannot fetch them)",
    )
    model.add_argument(
        "--lora",
        action="append",
        default=None,
        metavar="PATH[:SCALE]",
        help="a LoRA file (or diffusers LoRA folder) applied with weight SCALE (default 1); repeatable",
    )
    model.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    model.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="default: float16 on CUDA (random-flux: bfloat16), float32 on CPU",
    )
    story = gen.add_argument_group("story and output")
    story.add_argument("--story", help="story file (UTF-8 text)")
    story.add_argument("--characters", default=None, help="character file (instead of a block in --story)")
    story.add_argument("--out", help="output folder")
    story.add_argument(
        "--overwrite", action="store_true", default=None, help="replace an earlier run in --out"
    )
    story.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue an interrupted run (window mode, lockstep banks) with its stored settings",
    )
    look = gen.add_argument_group("images")
    look.add_argument(
        "--preset",
        choices=("official",),
        default=None,
        help="official: the official StoryDiffusion app's settings — DDIM + FreeU(0.6, 0.4, 1.1, 1.2), "
        "768x768, guidance 5, 35 steps, 1 identity frame, style 'Japanese Anime', its comic layout; "
        "UNet models; the flags you give override them",
    )
    look.add_argument(
        "--style", default=None, help=f"style template (storydiff/styles.py), or 'none' (default: {d.style})"
    )
    look.add_argument("--negative", default=None, help="extra negative prompt")
    look.add_argument(
        "--steps", type=int, default=None, help=f"denoising steps (default: {d.num_inference_steps})"
    )
    look.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=f"classifier-free guidance scale; <= 1 turns it off (default: {d.guidance_scale})",
    )
    look.add_argument(
        "--scheduler",
        choices=("model", "ddim"),
        default=None,
        help=f"UNet models: the model's own scheduler, or DDIM from its config (default: {d.scheduler})",
    )
    look.add_argument(
        "--freeu",
        type=_freeu,
        default=None,
        metavar="S1,S2,B1,B2",
        help="UNet models: FreeU with these factors (official: 0.6,0.4,1.1,1.2), or 'off' (default: off)",
    )
    look.add_argument(
        "--height", type=int, default=None, help="image height in pixels (default: the model's size)"
    )
    look.add_argument(
        "--width", type=int, default=None, help="image width in pixels (default: the model's size)"
    )
    look.add_argument(
        "--seed", type=int, default=None, help=f"seed; frame i starts from seed + i (default: {d.seed})"
    )
    pages = gen.add_argument_group("comic pages")
    pages.add_argument(
        "--layout",
        choices=("grid", "classic", "official"),
        default=None,
        help=f"comic page layout: grid, classic, or official (the official app's classic comic: rows of "
        f"panels and stacked half panels, arranged by --seed) (default: {d.layout})",
    )
    pages.add_argument(
        "--captions",
        choices=("line", "hash", "none"),
        default=None,
        help="panel captions: line = the text after '#', else the frame line without its tags (as the "
        "official app); hash = only text after '#'; none (default: line)",
    )
    pages.add_argument(
        "--caption-style",
        choices=("band", "overlay"),
        default=None,
        help="captions in a white band, or in a semi-transparent box over the panel's bottom (default: "
        "the layout's: overlay for official, band otherwise)",
    )
    pages.add_argument(
        "--font",
        default=None,
        metavar="PATH",
        help="caption font file (default: DejaVu Sans, or an installed font covering the caption's script)",
    )
    ref = gen.add_argument_group("reference images (IP-Adapter; SD1.x/2.x, SDXL, FLUX.1)")
    ref.add_argument(
        "--ip-adapter",
        default=None,
        metavar="PATH",
        help="IP-Adapter weights in diffusers' format (a local file, or a folder holding one): plain, plus, "
        "plus-face",
    )
    ref.add_argument(
        "--image-encoder",
        default=None,
        metavar="DIR",
        help="the adapter's CLIP vision encoder folder (default: image_encoder/ beside the weights)",
    )
    ref.add_argument(
        "--ip-scale", type=float, default=None, help="how strongly the images steer the frames (default: 1.0)"
    )
    ref.add_argument(
        "--ref",
        action="append",
        default=None,
        metavar="NAME=IMAGE",
        help="a reference image of character NAME: every frame showing NAME is conditioned on it; repeatable",
    )
    csa = gen.add_argument_group("consistency")
    csa.add_argument(
        "--mode",
        choices=("bank", "window"),
        default=None,
        help="bank: identity frames write a bank the others read (official); window: long stories, "
        f"neighbours within --window, chunked denoising with checkpoints (default: {d.mode})",
    )
    csa.add_argument(
        "--rate", type=float, default=None, help="share of tokens each frame offers, 0..1 (default: 0.5)"
    )
    csa.add_argument(
        "--level-rate",
        action="append",
        default=None,
        metavar="LEVEL=RATE",
        help="per-level rate, LEVEL in 8, 16, 32, 64 (official sa32 = 32, sa64 = 16); repeatable",
    )
    csa.add_argument(
        "--layers",
        choices=LAYER_PRESETS,
        default=None,
        help="attention layers that get consistency: default = the model family's choice (UNets: up "
        "blocks, as the official code; FLUX: single-stream blocks; SD3, PixArt: all); all; up, up+mid "
        "(UNets); single, double (FLUX)",
    )
    csa.add_argument(
        "--rope",
        choices=ROPE_POLICIES,
        default=None,
        help="FLUX: where borrowed tokens sit under RoPE: source = their own frame's position (default), "
        "shift = off the reader's grid (position ids (1, h, w), as FLUX Kontext marks reference images), "
        "none = no rotation",
    )
    csa.add_argument(
        "--warmup-steps", type=int, default=None, help="first steps without consistency (default: 1)"
    )
    csa.add_argument(
        "--no-skip", action="store_true", default=None, help="disable the random layer-skip schedule"
    )
    bank = gen.add_argument_group("bank mode")
    bank.add_argument(
        "--id-frames",
        type=int,
        default=None,
        help=f"bank mode: identity frames per character (default: {BANK_DEFAULTS['id_frames']})",
    )
    bank.add_argument(
        "--read-batch",
        type=int,
        default=None,
        help=f"bank mode: frames per denoiser call after the identities (default: "
        f"{BANK_DEFAULTS['read_batch_size']})",
    )
    bank.add_argument(
        "--bank-schedule",
        choices=("lockstep", "stored"),
        default=None,
        help="bank mode: lockstep keeps one denoising step's bank alive at a time (frames identical); "
        "stored keeps every step's bank, needed by --save-banks / --load-bank (default: lockstep unless "
        "banks are saved or loaded)",
    )
    bank.add_argument(
        "--save-banks",
        action="store_true",
        default=None,
        help="bank mode: write each character's bank (safetensors) into OUT/banks",
    )
    bank.add_argument(
        "--load-bank",
        action="append",
        default=None,
        metavar="[NAME=]PATH",
        help="bank mode: reuse a character's bank from an earlier run (--save-banks); repeatable",
    )
    window = gen.add_argument_group("window mode")
    window.add_argument(
        "--window", type=int, default=None, help="neighbours within W frames (default: 2 in window mode)"
    )
    window.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help=f"window mode: frames per denoiser call (default: {WINDOW_DEFAULTS['chunk_size']})",
    )
    window.add_argument(
        "--tile", type=int, default=None, help="window mode: the paper's tiled form, tile size"
    )
    window.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="window mode and lockstep bank schedule: write a checkpoint every N steps (for --resume)",
    )
    dist = gen.add_argument_group("several processes (torchrun)")
    dist.add_argument(
        "--dist-backend",
        choices=("gloo", "nccl"),
        default=None,
        help="under torchrun: the torch.distributed backend (default: nccl on CUDA, gloo otherwise)",
    )
    dist.add_argument(
        "--dist-bank",
        choices=("recompute", "broadcast"),
        default=None,
        help="bank mode under torchrun: the characters' identity frames are dealt over the ranks and each "
        "step's bank broadcast (broadcast, default), or every rank denoises every identity frame itself "
        "(recompute, no traffic); same frames",
    )
    dist.add_argument(
        "--dist-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="under torchrun: how long a rank waits for the others before failing with an error "
        "(default: 600)",
    )
    gen.set_defaults(run=run)


def _freeu(text: str) -> tuple[float, ...] | str:
    if text.strip().lower() == "off":
        return "off"
    try:
        factors = tuple(float(part) for part in text.split(","))
    except ValueError:
        factors = ()
    if len(factors) != 4:
        raise argparse.ArgumentTypeError(f"expected four numbers S1,S2,B1,B2 or 'off', got {text!r}")
    return factors


def _parse_level_rates(items: list[str]) -> dict[int, float]:
    rates = {}
    for item in items:
        level, _, rate = item.partition("=")
        try:
            rates[int(level)] = float(rate)
        except ValueError:
            raise ValueError(f"--level-rate expects LEVEL=RATE such as 32=0.5, got {item!r}") from None
    return rates


def _given(args: argparse.Namespace, names) -> list[str]:
    return [name for name in names if getattr(args, name) is not None]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _from_resume(args: argparse.Namespace) -> Job:
    """The job of the run being resumed, as its metadata stores it."""
    from ..config import ConsistencyConfig
    from ..distributed import current_partition
    from ..output import check_output_folder, read_metadata
    from ..pipeline import check_resume_world
    from ..settings import RunSettings
    from ..story import parse_story

    conflicts = _given(args, RUN_FLAGS)
    if conflicts:
        flags = ", ".join(_flag(name) for name in conflicts)
        raise ValueError(
            f"--resume continues the run stored in {args.resume} with its own settings; drop {flags} "
            "(or start a new run in another folder)"
        )
    check_output_folder(args.resume, resume=True)
    meta = read_metadata(args.resume)
    try:
        settings = RunSettings.from_dict(meta["settings"])
        config = ConsistencyConfig.from_dict(meta["consistency"])
        story = parse_story(meta["story_text"])
        model = meta["model"]
        files = {"model_config": meta.get("model_config"), "loras": [tuple(x) for x in meta.get("loras", [])]}
        adapter = meta.get("ip_adapter")
        references = {name: record.get("path") for name, record in meta.get("reference_images", {}).items()}
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{args.resume}: metadata.json lacks what a resume needs ({exc})") from None
    if adapter is not None and adapter.get("weights") is None:
        raise ValueError(
            f"{args.resume} was made with an IP-Adapter loaded from Python; resume it from Python"
        )
    unknown = sorted(name for name, path in references.items() if path is None)
    if unknown:
        raise ValueError(
            f"{args.resume}: the reference images of {', '.join(map(repr, unknown))} were given as pictures, "
            "not files; resume the run from Python with the same images"
        )
    ip = {"adapter": adapter and {k: adapter[k] for k in ("weights", "image_encoder", "scale")}}
    ip["references"] = references
    check_resume_world(args.resume, current_partition())  # before any model loads
    return Job(model, args.resume, story, settings, config, {}, files, ip)


def _from_flags(args: argparse.Namespace) -> Job:
    """The job of a new run, from the flags."""
    from ..config import ConsistencyConfig
    from ..output import check_output_folder
    from ..settings import RunSettings
    from ..story import load_story

    missing = [_flag(name) for name in ("model", "story", "out") if getattr(args, name) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (or --resume DIR)")
    characters = None
    if args.characters is not None:
        try:
            characters = Path(args.characters).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read --characters {args.characters}: {exc}") from None
    banks = _bank_headers(args.load_bank or ())
    story = load_story(
        args.story, characters, known={name: meta["description"] for name, (_, meta) in banks.items()}
    )
    given = {
        "mode": args.mode,
        "style": args.style,
        "negative_prompt": args.negative,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "height": args.height,
        "width": args.width,
        "seed": args.seed,
        "scheduler": args.scheduler,
        "freeu": args.freeu,
        "layout": args.layout,
        "font": args.font,
        "captions": args.captions,
        "caption_style": args.caption_style,
        "id_frames": args.id_frames,
        "read_batch_size": args.read_batch,
        "bank_schedule": args.bank_schedule,
        "save_banks": args.save_banks,
        "chunk_size": args.chunk_size,
        "checkpoint_every": args.checkpoint_every,
        "bank_sharing": args.dist_bank,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if given.get("freeu") == "off":
        given["freeu"] = None  # given, so it overrides a preset's factors
    base = RunSettings.from_preset(args.preset, **given) if args.preset else RunSettings().replace(**given)
    settings = base.resolved(banks_loaded=bool(banks))
    consistency = {
        "rate": args.rate,
        "level_rates": _parse_level_rates(args.level_rate) if args.level_rate else None,
        "warmup_steps": args.warmup_steps,
        "window": args.window if args.window is not None else (2 if settings.mode == "window" else None),
        "tile": args.tile,
        "layers": args.layers,
        "rope": args.rope,
    }
    if args.no_skip:
        consistency.update(skip_prob_early=0.0, skip_prob_late=0.0)
    config = ConsistencyConfig(seed=settings.seed, **{k: v for k, v in consistency.items() if v is not None})
    files = _model_files(args)
    ip = _reference_images(args, story)
    check_output_folder(args.out, overwrite=bool(args.overwrite))
    return Job(args.model, args.out, story, settings, config, banks, files, ip)


def _reference_images(args: argparse.Namespace, story) -> dict:
    """--ip-adapter, --image-encoder, --ip-scale and --ref, checked before any model loads (the images are
    read here, so an unreadable one fails at once)."""
    from ..ip_adapter import read_reference_image

    if args.ip_adapter is None:
        given = [
            flag
            for flag, value in (
                ("--ref", args.ref),
                ("--image-encoder", args.image_encoder),
                ("--ip-scale", args.ip_scale),
            )
            if value is not None
        ]
        if given:
            raise ValueError(f"{', '.join(given)} need(s) an IP-Adapter: add --ip-adapter PATH")
        return {"adapter": None, "references": {}}
    if not Path(args.ip_adapter).expanduser().exists():
        raise ValueError(f"--ip-adapter {args.ip_adapter}: no such file or folder")
    if args.image_encoder is not None and not Path(args.image_encoder).expanduser().is_dir():
        raise ValueError(f"--image-encoder {args.image_encoder}: no such folder")
    references = {}
    for item in args.ref or ():
        name, equals, path = item.partition("=")
        if not equals or not name or not path:
            raise ValueError(f"--ref expects NAME=IMAGE, e.g. Bob=bob.png, got {item!r}")
        if name in references:
            raise ValueError(f"--ref: two images for {name!r}")
        if name not in story.characters or not story.appears(name):
            raise ValueError(f"--ref {item}: {name!r} is in no frame of the story")
        read_reference_image(name, path)
        references[name] = path
    scale = 1.0 if args.ip_scale is None else args.ip_scale
    adapter = {"weights": args.ip_adapter, "image_encoder": args.image_encoder, "scale": scale}
    return {"adapter": adapter, "references": references}


def _model_files(args: argparse.Namespace) -> dict:
    """--config and --lora, checked before any model loads: {"model_config": DIR, "loras": [(PATH, SCALE)]}
    (``StoryDiffusionPipeline.from_pretrained``'s keywords)."""
    import os

    from ..model_files import is_single_file, parse_lora

    if args.config is not None:
        if not is_single_file(args.model):
            raise ValueError(
                f"--config applies to single-file checkpoints (--model FILE.safetensors); {args.model!r} is "
                "a folder, hub id or reserved name, which carries its own configs"
            )
        if not os.path.isdir(os.path.expanduser(args.config)):
            raise ValueError(f"--config {args.config}: no such folder (expected a local diffusers folder)")
    loras = [parse_lora(text) for text in args.lora or ()]
    for path, _ in loras:
        if not os.path.exists(os.path.expanduser(path)):
            raise ValueError(f"--lora {path}: no such file or folder")
    return {"model_config": args.config, "loras": loras}


def _bank_headers(items) -> dict[str, tuple[str, dict]]:
    """--load-bank [NAME=]PATH items → {character: (path, header)}, each file checked to be a bank."""
    from ..bank import read_bank_header

    banks = {}
    for item in items:
        name, _, path = item.rpartition("=")
        try:
            header = read_bank_header(path)
        except ValueError as exc:
            raise ValueError(f"--load-bank: {exc}") from None
        name = name or header["character"]
        if name in banks:
            raise ValueError(f"--load-bank: two banks for {name!r}")
        banks[name] = (path, header)
    return banks


def run(args: argparse.Namespace) -> int:
    from ..distributed import launched_by_torchrun

    if not launched_by_torchrun():
        return _run(args)
    # under torchrun: every rank runs the same command on its share of the frames (distributed.py)
    import torch.distributed as dist

    from ..distributed import init_from_environment
    from .common import resolve_device

    if not args.dist_timeout > 0:
        return fail(f"--dist-timeout must be a number of seconds > 0, got {args.dist_timeout}")
    try:
        init_from_environment(args.dist_backend, resolve_device(args.device), args.dist_timeout)
    except (RuntimeError, ValueError) as exc:
        return fail(f"cannot join the torchrun process group: {exc}")
    try:
        return _run(args)
    finally:
        dist.destroy_process_group()


def _run(args: argparse.Namespace) -> int:
    from ..config import InvalidSetting
    from ..distributed import communicate, current_partition
    from ..loading import ModelLoadError
    from ..pipeline import check_run

    partition = current_partition()
    try:
        job = (_from_resume if args.resume else _from_flags)(args)
        resume = bool(args.resume)
        banked = set(job.banks)
        check_run(
            job.story,
            job.settings,
            job.config,
            banked=banked,
            loaded=bool(banked),
            out_dir=job.out,
            resume=resume,
        )
    except InvalidSetting as exc:
        return fail(_setting_error(exc, args))
    except (OSError, ValueError) as exc:
        return fail(str(exc))
    try:
        if partition.distributed:  # every rank checked the folder before any rank writes into it
            import torch.distributed as dist

            communicate(partition, "the start barrier", dist.barrier)
        return _generate(args, job)
    except KeyboardInterrupt:
        lockstep = job.settings.steps_in_lockstep
        hint = f"; continue it with: storydiff generate --resume {job.out}" if lockstep else ""
        where = Path(job.out) / "frames"
        print(f"interrupted: the frames finished so far are in {where}{hint}", file=sys.stderr)
        return 130
    except InvalidSetting as exc:
        return fail(_setting_error(exc, args))
    except (ModelLoadError, ValueError, OSError, RuntimeError) as exc:
        return fail(str(exc))


def _setting_error(exc, args: argparse.Namespace) -> str:
    """An InvalidSetting as the flag that sets it would say it; a value the preset chose says so."""
    flag = FLAGS.get(exc.field, exc.field)
    came_from_preset = getattr(args, "preset", None) and getattr(args, exc.field, None) is None
    if came_from_preset and exc.field in PRESET_FIELDS:
        return f"{flag} {exc.problem} (set by --preset {args.preset}; give {flag} to override it)"
    return f"{flag} {exc.problem}"


def _generate(args, job: Job) -> int:
    from ..distributed import current_partition
    from ..pipeline import StoryDiffusionPipeline
    from ..progress import default_progress
    from .common import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    pipeline = StoryDiffusionPipeline.from_pretrained(
        job.model, job.config, device=device, dtype=resolve_dtype(args.dtype), **job.files
    )
    say = print if current_partition().leader else (lambda *a, **k: None)  # one voice for N ranks
    if job.ip["adapter"] is not None:
        adapter = job.ip["adapter"]
        loaded = pipeline.load_ip_adapter(
            adapter["weights"], image_encoder=adapter["image_encoder"], scale=adapter["scale"]
        )
        say(f"IP-Adapter ({loaded['variant']}) loaded from {adapter['weights']}, scale {adapter['scale']}")
    for name, (path, _) in job.banks.items():
        pipeline.load_bank(path, name)
        say(f"loaded the bank of {name!r} from {path}")
    progress = default_progress()
    # diffusers' own per-call bar only on a terminal; ours prints a line per frame otherwise
    pipeline.pipe.set_progress_bar_config(leave=False, disable=progress != "bar")
    result = pipeline(
        job.story,
        job.settings,
        out_dir=job.out,
        overwrite=bool(args.overwrite),
        resume=bool(args.resume),
        progress=progress,
        reference_images=job.ip["references"],
    )
    for name, size in result.bank_bytes.items():
        say(f"identity bank of {name!r}: {size / 2**20:.1f} MiB")
    if result.bank_bytes:
        peak = result.metadata["bank_peak_bytes"] / 2**20
        say(f"banks alive at once: at most {peak:.1f} MiB ({job.settings.bank_schedule} schedule)")
    say(f"{len(result.images)} frames and {len(result.pages)} page(s) written to {result.out_dir}")
    return 0
