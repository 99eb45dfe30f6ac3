"""``storydiff generate``: a story file in; frames, comic pages and metadata out.

Everything a user types is checked before any model loads or any folder is created: the story, the
settings (``RunSettings`` and ``ConsistencyConfig`` own the rules; errors name this command's flags), the
output folder, the banks to load. ``--resume DIR`` reruns exactly the settings stored in ``DIR``'s metadata
and refuses flags that would change them.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path
from typing import Any, NamedTuple

from .common import fail
from .generate_flags import RUN_FLAGS, add_parser


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
    masks: str | None = None  # a folder of subject masks (--subject-masks; a resumed run's masks/)
    bounded: bool = False  # --bounded
    background_share: float = 0.0  # --background-share


def register(subparsers, parents: list) -> None:
    add_parser(subparsers, parents).set_defaults(run=run)


def _given(args: argparse.Namespace, names) -> list[str]:
    return [name for name in names if getattr(args, name) is not None]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _from_resume(args: argparse.Namespace) -> Job:
    """The job of the run being resumed, as its metadata stores it."""
    from ..consistency.config import ConsistencyConfig
    from ..pages.output import check_output_folder
    from ..pages.record import check_resume_world, read_record
    from ..pages.story import parse_story
    from ..runs.distributed import current_partition
    from ..runs.settings import RunSettings

    conflicts = _given(args, RUN_FLAGS)
    if conflicts:
        flags = ", ".join(_flag(name) for name in conflicts)
        raise ValueError(
            f"--resume continues the run stored in {args.resume} with its own settings; drop {flags} "
            "(or start a new run in another folder)"
        )
    check_output_folder(args.resume, resume=True)
    needs = ("model", "story_text", "settings", "consistency")
    record = read_record(args.resume, need=needs, purpose="a resume")
    try:
        settings = RunSettings.from_dict(record.settings)
        config = ConsistencyConfig.from_dict(record.consistency)
        adapter = record.ip_adapter
        adapter = None if adapter is None else {k: adapter[k] for k in ("weights", "image_encoder", "scale")}
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{record.source}: metadata.json lacks what a resume needs ({exc})") from None
    story = parse_story(record.story_text)
    files = {"model_config": record.model_config, "loras": list(record.loras)}
    references = record.reference_paths
    if adapter is not None and adapter["weights"] is None:
        raise ValueError(
            f"{args.resume} was made with an IP-Adapter loaded from Python; resume it from Python"
        )
    unknown = sorted(name for name, path in references.items() if path is None)
    if unknown:
        raise ValueError(
            f"{args.resume}: the reference images of {', '.join(map(repr, unknown))} were given as pictures, "
            "not files; resume the run from Python with the same images"
        )
    ip = {"adapter": adapter, "references": references}
    partition = current_partition()
    check_resume_world(args.resume, partition.world)  # before any model loads
    _warn_no_checkpoint(args.resume, settings, partition)
    masks = None
    if (record.subject_masks or {}).get("source") == "auto":  # found again: the checkpoint keeps the maps
        masks = "auto"
    elif record.subject_masks is not None:
        if record.subject_masks.get("source") == "python":
            raise ValueError(
                f"{args.resume} was made with subject masks given from Python; resume it from Python"
            )
        masks = str(Path(args.resume) / "masks")  # the masks the run kept
    bounded = bool(record.subject_masks and record.subject_masks.get("bounded"))
    share = (record.subject_masks or {}).get("background_share", 0.0)
    return Job(record.model, args.resume, story, settings, config, {}, files, ip, masks, bounded, share)


def _warn_no_checkpoint(folder: str, settings, partition) -> None:
    """A resume that cannot continue (no checkpoint: deleted, or the run stopped before its first)
    starts the run again from its first step; say so rather than do it quietly."""
    from ..runs.checkpoint import checkpoint_name

    if settings.steps_in_lockstep and not (Path(folder) / checkpoint_name(partition)).is_file():
        warnings.warn(
            f"--resume {folder}: no {checkpoint_name(partition)} there; the run starts again from its first "
            "step",
            stacklevel=2,
        )


def _check_auto_masks(model: str) -> None:
    """--subject-masks auto, refused before any model loads where it cannot run: models whose family the
    name already tells (reserved names) and that record no masks. Other names are checked by the library
    once loaded, still before the output folder is made."""
    from ..families.base import auto_masks_refused
    from ..families.registry import family_of_reserved

    family = family_of_reserved(model)
    if family is not None and not family.records_subject_masks:
        raise ValueError(auto_masks_refused(family.title))


def _from_flags(args: argparse.Namespace) -> Job:
    """The job of a new run, from the flags."""
    from ..pages.output import check_output_folder
    from ..pages.story import load_story
    from ..runs.options import OPTIONS
    from ..runs.settings import from_options

    missing = [_flag(name) for name in ("model", "story", "out") if getattr(args, name) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (or --resume DIR)")
    # the settings first: the option table says which flag sets what, and in which mode it applies
    values = {option.name: getattr(args, option.name) for option in OPTIONS}
    settings, config = from_options(values, banks_loaded=bool(args.load_bank))
    characters = None
    if args.characters is not None:
        try:
            characters = Path(args.characters).read_text(encoding="utf-8-sig")  # a BOM is no text
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read --characters {args.characters}: {exc}") from None
    banks = _bank_headers(args.load_bank or ())
    try:
        story = load_story(
            args.story, characters, known={name: meta["description"] for name, (_, meta) in banks.items()}
        )
    except ValueError as exc:  # a line of the characters file is that file's, not the story's
        prefix, text = f"{args.story}: ", str(exc)
        if characters is None or not text.startswith(prefix + "characters line"):
            raise
        text = text[len(prefix) :].replace("characters line", "line", 1)
        raise ValueError(f"--characters {args.characters}: {text}") from None
    from ..runs.settings import MAX_SEED

    _warn_ignored(args, settings, config)

    last = settings.seed + len(story.frames) - 1  # frame i starts from seed + i
    if last > MAX_SEED:
        raise ValueError(
            f"--seed {settings.seed} is too large for {len(story.frames)} frames: frame i uses seed + i, and "
            f"seeds are 64-bit (at most {MAX_SEED - len(story.frames) + 1})"
        )
    for name, (path, header) in banks.items():
        told, banked = story.characters[name].description, header.get("description")
        if banked is not None and told != banked:
            warnings.warn(
                f"--load-bank {path}: the story describes {name!r} as {told!r}, the bank was made for "
                f"{banked!r}; the frames are prompted with the story's description",
                stacklevel=2,
            )
    files = _model_files(args)
    ip = _reference_images(args, story)
    if args.subject_masks == "off":  # the default said out loud (a folder called off: ./off)
        args.subject_masks = None
    auto = args.subject_masks == "auto"  # a folder called auto: ./auto
    if args.subject_masks is not None and not auto and not Path(args.subject_masks).is_dir():
        raise ValueError(f"--subject-masks {args.subject_masks}: no such folder")
    if auto:
        _check_auto_masks(args.model)
    if args.bounded and args.subject_masks is None:
        raise ValueError("--bounded needs --subject-masks DIR (which tokens are which character's)")
    if args.bounded and banks:
        raise ValueError(
            "--bounded needs banks written in this run: --load-bank banks carry no token characters"
        )
    check_output_folder(args.out, overwrite=bool(args.overwrite))
    share = 0.0 if args.background_share is None else args.background_share
    if args.background_share is not None and args.subject_masks is None:
        raise ValueError("--background-share applies with --subject-masks")
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"--background-share must be a number in [0, 1], got {share}")
    masks = args.subject_masks
    return Job(
        args.model, args.out, story, settings, config, banks, files, ip, masks, bool(args.bounded), share
    )


def _warn_ignored(args: argparse.Namespace, settings, config) -> None:
    """Flags a new run accepts but that change nothing in it, each said once."""
    if config.warmup_steps >= settings.num_inference_steps:
        warnings.warn(
            f"--warmup-steps {config.warmup_steps} >= --steps {settings.num_inference_steps}: no step uses "
            "consistency (the frames are those of --rate 0)",
            stacklevel=2,
        )
    if args.caption_style is not None and settings.captions == "none":
        warnings.warn("--caption-style with --captions none: there are no captions to style", stacklevel=2)


def _reference_images(args: argparse.Namespace, story) -> dict:
    """--ip-adapter, --image-encoder, --ip-scale and --ref, checked before any model loads (the images are
    read here, so an unreadable one fails at once)."""
    from ..models.ip_adapter import read_reference_image
    from ..runs.options import option

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
        if not story.appears(name):
            raise ValueError(f"--ref {item}: {name!r} is in no frame of the story")
        read_reference_image(name, path)
        references[name] = path
    scale = option("ip_scale").default if args.ip_scale is None else args.ip_scale
    if not math.isfinite(scale):
        raise ValueError(f"--ip-scale must be a finite number, got {args.ip_scale}")
    if not references:
        warnings.warn(
            "--ip-adapter without --ref NAME=IMAGE: no frame gets a reference image (the adapter is loaded "
            "and masked out everywhere)",
            stacklevel=2,
        )
    adapter = {"weights": args.ip_adapter, "image_encoder": args.image_encoder, "scale": scale}
    return {"adapter": adapter, "references": references}


def _model_files(args: argparse.Namespace) -> dict:
    """--config and --lora, checked before any model loads: {"model_config": DIR, "loras": [(PATH, SCALE)]}
    (``StoryDiffusionPipeline.from_pretrained``'s keywords)."""
    import os

    from ..models.model_files import is_single_file, parse_lora

    if args.config is not None:
        if not is_single_file(args.model):
            raise ValueError(
                f"--config applies to single-file checkpoints (--model FILE.safetensors); {args.model!r} is "
                "a folder, hub id or reserved name, which carries its own configs"
            )
        if not os.path.isdir(os.path.expanduser(args.config)):
            raise ValueError(f"--config {args.config}: no such folder (expected a local diffusers folder)")
    loras = [parse_lora(text) for text in args.lora or ()]
    for text, (path, _) in zip(args.lora or (), loras, strict=True):
        if os.path.exists(os.path.expanduser(path)):
            continue
        head, colon, tail = text.rpartition(":")
        if colon and head and os.path.exists(os.path.expanduser(head)):  # FILE:abc, a scale that is not one
            raise ValueError(f"--lora {text}: the scale {tail!r} is not a number (expected PATH[:SCALE])")
        raise ValueError(f"--lora {path}: no such file or folder")
    return {"model_config": args.config, "loras": loras}


def _bank_headers(items) -> dict[str, tuple[str, dict]]:
    """--load-bank [NAME=]PATH items → {character: (path, header)}, each file checked to be a bank."""
    from ..consistency.bank import read_bank_header

    banks = {}
    for item in items:
        name, _, path = item.rpartition("=")
        try:
            header = read_bank_header(path)
        except ValueError as exc:
            raise ValueError(f"--load-bank: {exc}") from None
        recorded = header["character"]
        if name and name != recorded:
            raise ValueError(
                f"--load-bank {item}: the file is the bank of {recorded!r}, not {name!r} (a bank holds one "
                f"character's identity); give --load-bank {recorded}={path} or another bank"
            )
        name = name or recorded
        if name in banks:
            raise ValueError(f"--load-bank: two banks for {name!r}")
        banks[name] = (path, header)
    return banks


def run(args: argparse.Namespace) -> int:
    from ..runs.distributed import launched_by_torchrun
    from ..runs.options import option
    from .common import check_environment

    default_timeout = option("dist_timeout").default

    try:
        check_environment()
    except ValueError as exc:
        return fail(str(exc))
    if not args.dist_timeout > 0:
        return fail(f"--dist-timeout must be a number of seconds > 0, got {args.dist_timeout}")
    if not launched_by_torchrun():
        given = [
            flag
            for flag, value in (
                ("--dist-backend", args.dist_backend is not None),
                ("--dist-timeout", args.dist_timeout != default_timeout),
            )
            if value
        ]
        if given:
            warnings.warn(f"{', '.join(given)} apply only under torchrun: ignored", stacklevel=1)
        return _run(args)
    # under torchrun: every rank runs the same command on its share of the frames (distributed.py)
    import torch.distributed as dist

    from ..runs.distributed import init_from_environment
    from .common import resolve_device

    try:
        init_from_environment(args.dist_backend, resolve_device(args.device), args.dist_timeout)
    except (RuntimeError, ValueError) as exc:
        return fail(f"cannot join the torchrun process group: {exc}")
    try:
        return _run(args)
    finally:
        dist.destroy_process_group()


def _run(args: argparse.Namespace) -> int:
    from ..consistency.config import InvalidSetting
    from ..models.loading import ModelLoadError
    from ..runs.distributed import communicate, current_partition
    from ..runs.plan import check_run

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
    except (ModelLoadError, ValueError, OSError) as exc:
        return fail(str(exc))
    except RuntimeError as exc:
        if not _exchange_failed(exc):
            raise  # a bug or an out-of-memory: storydiff's "unexpected" line, --debug shows where
        print(f"error: {exc}", file=sys.stderr)  # not an input error: another rank stopped
        return 1


def _exchange_failed(exc: RuntimeError) -> bool:
    """Whether ``exc`` is a torchrun rank's report that the run stopped elsewhere (runs/distributed.py)."""
    text = str(exc)
    return text.startswith("rank ") and ("could not start the run" in text or "failed — another rank" in text)


def _setting_error(exc, args: argparse.Namespace) -> str:
    """An InvalidSetting as the flag that sets it would say it; a value the preset chose says so."""
    from ..runs.options import flag_for, option_for_field
    from ..runs.settings import PRESETS

    found, flag = option_for_field(exc.field), flag_for(exc.field)
    problem = exc.problem.replace("must be None or ", "must be ")  # None is Python's; a flag is left out
    preset = getattr(args, "preset", None)
    chosen = found is not None and exc.field in PRESETS.get(preset, {}) and getattr(args, found.name) is None
    if chosen:  # the preset chose the value, no flag gave it
        return f"{flag} {problem} (set by --preset {preset}; give {flag} to override it)"
    return f"{flag} {problem}"


def _unused_negative(family, settings) -> str | None:
    """Why --negative would change nothing on this model (None: it is used): a negative prompt acts only
    through classifier-free guidance, which FLUX (guidance-distilled) never runs and --guidance 1 or below
    turns off. Refused rather than recorded as if applied."""
    if not settings.negative_prompt or family.uses_cfg_batch(settings.guidance_scale):
        return None
    if family.uses_cfg_batch(max(settings.guidance_scale, 2.0)):
        return (
            "--negative needs classifier-free guidance, which --guidance "
            f"{settings.guidance_scale:g} turns off (use --guidance above 1, or drop --negative)"
        )
    return (
        f"--negative has no effect on {family.name} models: their guidance is distilled into the model (no "
        "classifier-free guidance, so no negative prompt); drop --negative"
    )


def _generate(args, job: Job) -> int:
    from ..pipeline import StoryDiffusionPipeline
    from ..runs.distributed import current_partition
    from ..support.progress import default_progress
    from .common import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    pipeline = StoryDiffusionPipeline.from_pretrained(
        job.model, job.config, device=device, dtype=resolve_dtype(args.dtype), **job.files
    )
    say = print if current_partition().leader else (lambda *a, **k: None)  # one voice for N ranks
    problem = None if args.resume else _unused_negative(pipeline.family, job.settings)
    if problem:
        return fail(problem)
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
        subject_masks=job.masks,
        bounded=job.bounded,
        background_share=job.background_share,
    )
    for name, size in result.bank_bytes.items():
        say(f"identity bank of {name!r}: {size / 2**20:.1f} MiB")
    if result.bank_bytes:
        peak = result.metadata["bank_peak_bytes"] / 2**20
        say(f"banks alive at once: at most {peak:.1f} MiB ({job.settings.bank_schedule} schedule)")
    if pipeline.family.video:
        say(
            f"{len(result.images)} shots (frames, GIF/MP4), the story video and {len(result.pages)} "
            f"storyboard page(s) written to {result.out_dir}"
        )
    else:
        say(f"{len(result.images)} frames and {len(result.pages)} page(s) written to {result.out_dir}")
    return 0
