"""``StoryDiffusionPipeline``: a story in, consistent frames and comic pages out.

It composes an existing diffusers text-to-image pipeline (SDXL, SD1.5, SD2.x, FLUX.1, SD3/SD3.5,
PixArt-Σ; ``families/`` says how each takes a step) and drives the consistent-attention state around its
calls. A thin facade: load (``from_pretrained``), check and plan (``runs/plan.py``), run one of the two modes
(``RunSettings.mode``: bank, ``runs/bank_run.py``, as the official code; window, ``runs/window_run.py``, for
long stories), write (frames as soon as each is done, then the comic pages and the metadata).

Either mode can take a reference image per character (UNet models and FLUX, through an IP-Adapter:
``models/ip_adapter.py``): each frame is conditioned on the images of the characters it shows.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import platform
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .consistency.bank import signature_differences
from .consistency.config import ConsistencyConfig, InvalidSetting
from .consistency.cross_attention_masks import AutoSubjectMasks, SubjectAttentionRecorder
from .consistency.subject_masks import SubjectMasks
from .families.attach import apply_consistent_attention, remove_consistent_attention, replaced_layers
from .families.base import SUPPORTED, auto_masks_refused
from .families.registry import family_of
from .models.ip_adapter import (
    ReferenceImages,
    adapter_metadata,
    check_reference_images,
    read_reference_image,
)
from .models.ip_adapter import load_ip_adapter as load_ip_adapter_into
from .models.sampler import run_sampler
from .pages.comic import make_pages
from .pages.output import StoryOutput
from .pages.record import StoryRecord, check_resume_world
from .pages.story import Story, load_story, parse_story, story_source
from .pages.storyboard import storyboard_pages
from .pages.styles import apply_style
from .runs.bank_run import bank_signature, run_bank
from .runs.checkpoint import checkpoint_name
from .runs.distributed import (
    Partition,
    current_partition,
    gather_to_all,
    gather_to_leader,
    leader_first,
)
from .runs.plan import RunPlan, StoryRun, check_run
from .runs.settings import DISTRIBUTED_BANK_SHARING, RunSettings
from .runs.window_run import run_story_window
from .support.progress import Progress

#: ``subject_masks=AUTO`` (``--subject-masks auto``): masks found from cross-attention during the run
AUTO = "auto"


@dataclass
class StoryResult:
    # one per frame, story order; a video story's: each shot's frames (a list of images per shot)
    images: list[Image.Image] | list[list[Image.Image]]
    captions: list[str | None]
    pages: list[Image.Image]
    metadata: dict
    out_dir: Path | None = None
    bank_bytes: dict[str, int] = field(default_factory=dict)
    # story indices of ``images``; None: every frame in story order (ranks other than 0 of a distributed
    # run hold only the frames they made, and no pages)
    frame_indices: list[int] | None = None


def _versions() -> dict:
    import diffusers

    from csa_kernels import __version__

    return {
        "storydiff": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }


def as_story(story: Story | str | Path, known: dict[str, str] | None = None) -> Story:
    """A ``Story`` from a ``Story``, story text, or the path of a story file; ``known``: descriptions of
    characters the text may use without defining them (loaded banks)."""
    if isinstance(story, Story):
        return story
    if isinstance(story, Path) or (isinstance(story, str) and "\n" not in story and Path(story).is_file()):
        return load_story(story, known=known)
    if isinstance(story, str):
        return parse_story(story, known=known)
    raise TypeError(f"story must be a Story, story text or a path, got {type(story).__name__}")


class StoryDiffusionPipeline:
    """Consistent story generation on top of a diffusers text-to-image pipeline (UNet or transformer).

    Args:
        pipe: e.g. ``StableDiffusionXLPipeline``, ``StableDiffusionPipeline``, ``FluxPipeline``,
            ``StableDiffusion3Pipeline`` or ``PixArtSigmaPipeline`` (``loading.load_pipeline``).
        config: consistent-attention settings; installing them happens here and lasts until :meth:`close`.
    """

    def __init__(
        self, pipe, config: ConsistencyConfig | None = None, *, model_name: str | None = None
    ) -> None:
        self.pipe = pipe
        self.config = config or ConsistencyConfig()
        self.model_name = model_name or type(pipe).__name__
        self.family = family_of(pipe)  # how this pipeline's model family takes a step
        self.state = apply_consistent_attention(pipe, self.config)
        self.config = self.state.config  # the family's default rate filled in
        self.loaded_banks: dict[str, dict] = {}  # character -> {"path", "sha256"} of banks read from disk
        # how the model was loaded, beyond its name (from_pretrained): recorded so a resume loads the same
        self.model_files: dict = {"model_config": None, "loras": []}

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        config: ConsistencyConfig | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        model_config: str | Path | None = None,
        loras: Sequence[tuple[str, float]] = (),
    ) -> StoryDiffusionPipeline:
        """Load ``model`` (``loading.load_pipeline``: a reserved tiny name, a diffusers folder, a hub id, or
        a single ``.safetensors`` checkpoint with ``model_config``, a local diffusers folder of its
        architecture) with ``loras`` ((path, scale) pairs) applied, and install consistent attention."""
        from .models.loading import load_pipeline

        seed = config.seed if config else 0
        pipe = load_pipeline(model, device=device, dtype=dtype, seed=seed, config=model_config, loras=loras)
        sp = cls(pipe, config, model_name=str(model))
        sp.model_files = {
            "model_config": str(model_config) if model_config is not None else None,
            "loras": [[str(path), float(scale)] for path, scale in loras],
        }
        return sp

    def close(self) -> None:
        """Restore the pipeline's original attention processors."""
        remove_consistent_attention(self.pipe)

    def load_ip_adapter(
        self, weights: str | Path, *, image_encoder: str | Path | None = None, scale: float = 1.0
    ) -> dict:
        """Load an IP-Adapter so stories can take ``reference_images`` (SD1.x/2.x, SDXL, FLUX.1).

        ``weights``: a local file in diffusers' IP-Adapter format (``image_proj`` and ``ip_adapter``
        parts; plain, plus, plus-face or full-face; FLUX: the plain one, as diffusers loads it), or a folder
        holding one; ``image_encoder``: a local CLIP vision model folder (default: the pipeline's, else
        ``image_encoder/`` next to the weights); ``scale``: the adapter's weight. Returns what a run's
        metadata records about the adapter. Calling diffusers' ``pipe.load_ip_adapter`` yourself, before or
        after making this object, works too.
        """
        if not self.family.supports_reference_images:
            raise ValueError(f"{SUPPORTED}, not {self.family.name} models")
        return load_ip_adapter_into(self.pipe, weights, image_encoder=image_encoder, scale=scale)

    def load_bank(self, path: str | Path, character: str | None = None) -> str:
        """Reuse a character written by an earlier story (see ``save_banks``); returns its name.

        The bank must come from a model of this architecture (ValueError saying what differs otherwise);
        its steps and guidance are checked against the run that reads it. A story may then tag the
        character without defining it: the bank carries its description.
        """
        name = self.state.bank.load(path, character=character, expected=self.state.host)
        self.loaded_banks[name] = {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}
        return name

    def run_signature(self, settings: RunSettings) -> dict:
        """What a bank written by this run records, and what a bank read by it must match."""
        return bank_signature(self.family, self.state, settings)

    @property
    def default_size(self) -> int:
        """The model's native image side in pixels (what ``height``/``width`` None mean)."""
        return self.family.default_size

    # ------------------------------------------------------------------------------------------------
    def __call__(
        self,
        story: Story | str | Path,
        settings: RunSettings | None = None,
        *,
        out_dir: str | Path | None = None,
        overwrite: bool = False,
        resume: bool = False,
        progress: Progress = True,
        reference_images: Mapping[str, Image.Image | str | Path] | None = None,
        keyframes: Sequence[Image.Image | tuple[Image.Image, Image.Image | None]] | None = None,
        subject_masks: SubjectMasks | Mapping[int, Mapping[str, Any]] | str | Path | None = None,
        bounded: bool = False,
        background_share: float = 0.0,
        **overrides: Any,
    ) -> StoryResult:
        """Generate every frame of ``story`` (a ``Story``, story text, or a path to a story file).

        ``settings`` (``RunSettings``) says how; keyword arguments override its fields, e.g.
        ``pipe(story, num_inference_steps=30, mode="window")``. With ``out_dir`` every frame is written as
        soon as it is done, then comic pages and ``metadata.json``; ``resume=True`` continues an
        interrupted window-mode run there from its last checkpoint. ``progress``: True or "bar" (tqdm),
        "lines" (a plain line per frame or step, for logs), False.

        ``reference_images``: character name -> a PIL image or an image file, after :meth:`load_ip_adapter`
        (SD1.x/2.x, SDXL, FLUX.1): every frame is conditioned on the images of the characters it shows,
        identity frames and the frames reading their bank alike; each image is encoded once.

        Video models (Wan 2.x): each frame of the story is a shot of ``shot_frames`` video frames; the
        result's ``images`` are the shots' frames, ``out_dir`` gets each shot's frames and video, the
        joined story video and storyboard pages. Image-to-video models take ``keyframes``: per shot the
        image it starts on, or (first, last) for a clip that also ends on a given image.

        ``subject_masks``: each frame offers only tokens inside its characters' masks
        (``consistency/subject_masks.py``): a folder in ``storydiff eval --mask-dir``'s layout, a mapping
        frame -> character -> mask, or ``SubjectMasks``; written to ``out_dir/masks/``. None: whole frames.
        ``"auto"`` (every family; both modes, over ranks, resumed): found during the run from the
        cross-attention on each character's description (``cross_attention_masks.AutoSubjectMasks``:
        step 0 unmasked, then each frame's masks from its maps up to the step before); the final masks are
        written to ``out_dir/masks/`` and recorded as ``{"source": "auto", ...}``; checkpoints keep the
        maps, so a resumed run continues them.
        ``bounded`` (with subject masks; not the tiled window form): each character's tokens attend only to
        the same character's borrowed tokens (bank, or window neighbours), background tokens only to
        background ones (StoryBooth's bounded attention). ``background_share``: the share of each frame's
        offered tokens drawn outside its masks (default 0).

        Frame i starts from noise seeded with ``seed + i``, so a frame's image does not depend on how the
        frames are batched. Errors in the story or the settings are raised before anything is written.
        """
        known = {name: self.state.bank.metadata(name).get("description") for name in self.loaded_banks}
        story = as_story(story, {name: text for name, text in known.items() if text})
        settings = (
            (settings or RunSettings()).replace(**overrides).resolved(banks_loaded=bool(self.loaded_banks))
        )
        side = self.default_size
        settings = settings.replace(height=settings.height or side, width=settings.width or side)
        if self.family.video:  # the clip length and frame rate the run uses, recorded as such
            shot_frames = settings.shot_frames or self.family.default_shot_frames
            settings = settings.replace(shot_frames=shot_frames, fps=self.family.fps(settings))
        # the scheduler and FreeU asked for hold for this run (timesteps, bank signatures), undone after
        auto = isinstance(subject_masks, str) and subject_masks == AUTO
        with run_sampler(self.family, settings.scheduler, settings.freeu):
            if auto:
                columns = self._auto_columns(story, settings, resume)
                masks, mask_record = None, {"source": AUTO}
            else:
                columns = None
                masks, mask_record = self._subject_masks(story, settings, subject_masks)
            if bounded:
                self._check_bounded(story, settings, masks, auto=auto)
                mask_record["bounded"] = True
            if background_share:
                if mask_record is None:
                    raise ValueError("background_share applies with subject masks (--subject-masks)")
                mask_record["background_share"] = background_share
            self.state.set_subject_masks(  # the state checks the share: a number in [0, 1]
                masks, background_share=background_share, bounded=bounded and not auto
            )
            try:
                return self._run_story(
                    story,
                    settings,
                    out_dir,
                    overwrite,
                    resume,
                    progress,
                    reference_images,
                    keyframes,
                    mask_record,
                    columns,
                    bounded,
                )
            finally:
                self.state.set_subject_masks(None)

    def _run_story(
        self,
        story: Story,
        settings: RunSettings,
        out_dir,
        overwrite,
        resume,
        progress,
        reference_images,
        keyframes,
        mask_record,
        columns=None,
        bounded=False,
    ) -> StoryResult:
        self.family.check_size(settings.height, settings.width)
        self.family.check_settings(settings)
        self.config.check_device(self.family.device)  # int8 on a pre-Ampere GPU: before any folder exists
        self._check_steps(settings)
        masks = self.state.subject_masks  # set by __call__ for this run
        keyframes = self._check_keyframes(story, keyframes)
        config = self.config.resolved(settings.mode)  # window mode's default window filled in
        # characters of this story with a bank already (loaded, or written by an earlier story)
        banked = set()
        if settings.mode == "bank":
            banked = {c for c in story.characters if self.state.bank.has(c) and story.appears(c)}
        identity = check_run(
            story,
            settings,
            config,
            banked=banked,
            loaded=bool(self.loaded_banks),
            out_dir=out_dir,
            resume=resume,
        )
        if settings.mode == "bank":
            self._check_loaded_banks(story, settings)
        replaced = replaced_layers(self.pipe)
        if replaced:
            raise ValueError(
                f"{len(replaced)} consistent-attention layer(s) have other processors now (e.g. "
                f"{replaced[0]}), as an IP-Adapter loaded afterwards puts on FLUX's double-stream blocks: "
                "with an IP-Adapter use consistency on the single-stream blocks (layers='single')"
            )
        reference_images = reference_images or {}
        check_reference_images(self.pipe, reference_images, story.appears)
        reference = {name: read_reference_image(name, image) for name, image in reference_images.items()}
        adapter = adapter_metadata(self.pipe) if self.family.supports_reference_images else None

        partition = current_partition()
        self._check_partition(partition, settings, out_dir, resume)
        if settings.mode == "bank" and partition.distributed and settings.bank_sharing is None:
            settings = settings.replace(bank_sharing=DISTRIBUTED_BANK_SHARING)
        if not partition.leader:
            progress = False
        styled = [
            apply_style(story.prompt(frame), settings.style, settings.negative_prompt)
            for frame in story.frames
        ]
        plan = RunPlan(
            settings,
            tuple(p for p, _ in styled),
            tuple(n for _, n in styled),
            story=story,
            identity=identity,
            partition=partition,
            model=self.model_name,
            extras={
                **self._reference_summary(reference, adapter),
                **_keyframe_summary(keyframes),
                # what the masks are, not where they came from (a resume reads them from masks/)
                **({} if masks is None else {"subject_masks": _without(mask_record, "source")}),
                **({} if columns is None else {"subject_masks": mask_record}),
            },
            keyframes=keyframes,
        )
        record = StoryRecord(
            model=self.model_name,
            story_text=story_source(story),
            settings=settings.to_dict(),
            consistency=config.to_dict(),
            frame_seeds=plan.seeds,
            prompts=list(plan.prompts),
            negative_prompts=list(plan.negatives),
            captions=story.panel_captions(settings.captions),
            model_config=self.model_files["model_config"],
            loras=list(self.model_files["loras"]),
            characters={c.name: c.description for c in story.characters.values()},
            frame_characters=[list(f.characters) for f in story.frames],
            identity_frames=identity,
            loaded_banks={name: self.loaded_banks[name] for name in banked if name in self.loaded_banks},
            ip_adapter=adapter,
            reference_images={name: image for name, (_, image) in reference.items()},
            subject_masks=mask_record,
            world_size=partition.world,
            versions=_versions(),
        )
        metadata = record.to_dict()  # StoryResult.metadata: the record as written, plus the run's results
        output = None
        if out_dir is not None:

            def prepare() -> StoryOutput:  # rank 0 checks and prepares the folder; the others then join it
                prepared = StoryOutput(out_dir, overwrite=overwrite, resume=resume)
                prepared.start(record)
                if masks is not None:  # the masks the run used, in --mask-dir's layout (resume, eval)
                    masks.save(prepared.root)
                return prepared

            output = leader_first(partition, prepare)
            if not partition.leader:
                output = StoryOutput(out_dir, resume=resume, follower=True)
        start = time.perf_counter()
        self.state.bank.reset_peak()
        installed, self.state.config = self.state.config, config  # this run's, as recorded
        auto, remove_recorder = None, None
        try:
            run = StoryRun(plan, self.family, self.state, output, resume, progress)
            masked = masks is not None or columns is not None  # subject masks, given or automatic
            run.references = self._encode_references(story, reference, adapter, masked=masked)
            if columns is not None:  # automatic masks: recorded from this run's cross-attention
                recorder = SubjectAttentionRecorder((settings.height, settings.width))
                frame_characters = [f.characters for f in story.frames]
                # window mode over ranks: every rank steps together and reads other ranks' frames
                share = None
                if partition.distributed and settings.mode == "window":
                    share = functools.partial(gather_to_all, partition)
                auto = AutoSubjectMasks(
                    self.state, recorder, frame_characters, columns, bounded=bounded, share=share
                )
                remove_recorder = self.family.record_subjects(self.state, recorder)
                run.step_hook = auto
            if settings.mode == "bank":
                signature = self.run_signature(settings)  # the same for every character's bank
                metadata.update(run_bank(run, lambda name: self._bank_metadata(plan, name, signature)))
            else:
                metadata.update(run_story_window(run))
            own = dict(run.images)
            images = gather_to_leader(partition, run.images)  # pages and metadata need every frame
            if output is not None:  # every rank's frames are on disk now: the checkpoints are done with
                output.root.joinpath(checkpoint_name(partition)).unlink(missing_ok=True)
            if auto is not None:  # the masks each frame ended with: kept, recorded, as given ones are
                found = auto.from_latest(gather_to_all(partition, auto.latest()))  # every rank's frames
                mask_record = {**mask_record, "sha256": found.digest()}
                metadata["subject_masks"] = mask_record
                if output is not None and partition.leader:
                    found.save(output.root)
        except BaseException as exc:
            if output is not None:
                output.fail(exc)
            raise
        finally:
            if remove_recorder is not None:
                remove_recorder()
            self.state.end()
            self.state.config = installed
        bank = self.state.bank
        bank_bytes = {name: bank.written_bytes(name) for name in story.characters if bank.has(name)}
        memory = {"bank_bytes": bank_bytes, "bank_peak_bytes": bank.peak_bytes}
        metadata.update(memory, seconds=round(time.perf_counter() - start, 2))
        if settings.mode == "bank" and settings.bank_schedule == "lockstep":
            # nothing of a lockstep bank outlives its step: the characters are not banked for a next story
            # (which writes them again), rather than banked with nothing in them
            for name in identity:
                bank.clear(name)
        if not partition.leader:  # this rank's frames only; rank 0 writes pages and metadata
            indices = sorted(own)
            captions = [story.panel_caption(story.frames[i], settings.captions) for i in indices]
            root = output.root if output else None
            return StoryResult([own[i] for i in indices], captions, [], metadata, root, frame_indices=indices)

        ordered = [images[f.index] for f in story.frames]
        captions = story.panel_captions(settings.captions)
        if self.family.video:
            pages = storyboard_pages(
                ordered, captions, caption_style=settings.caption_style, font=settings.font
            )
        else:
            pages = make_pages(
                ordered,
                captions,
                settings.layout,
                seed=settings.seed,
                caption_style=settings.caption_style,
                font=settings.font,
            )
        if output is not None:
            if self.family.video:
                output.save_story_video(ordered, self.family.fps(settings))
            output.save_pages(pages)
            extra = {} if auto is None else {"subject_masks": mask_record}
            output.finish(**memory, **extra, seconds=metadata["seconds"], pages=len(pages))
        return StoryResult(ordered, captions, pages, metadata, output.root if output else None, bank_bytes)

    def _subject_masks(
        self, story: Story, settings: RunSettings, given
    ) -> tuple[SubjectMasks | None, dict | None]:
        """``given`` (a folder, a mapping or SubjectMasks) as this story's masks, and what metadata records of
        them; (None, None) when not given."""
        if given is None:
            return None, None
        characters = [frame.characters for frame in story.frames]
        size = (settings.height, settings.width)
        if isinstance(given, SubjectMasks):
            if given.frame_characters != [tuple(c) for c in characters] or given.size != size:
                raise ValueError("subject_masks were made for another story or image size")
            masks, source = given, "python"
        elif isinstance(given, (str, Path)):
            masks, source = SubjectMasks.from_folder(given, characters, size), str(given)
        else:
            masks, source = SubjectMasks.from_mapping(given, characters, size), "python"
        return masks, {"source": source, "sha256": masks.digest()}

    def _auto_columns(self, story: Story, settings: RunSettings, resume: bool) -> list[dict[str, list[int]]]:
        """``subject_masks="auto"``: checked (before anything is written), and each frame's subject token
        columns per character — where the character's description (what its [Name] tag became) sits in the
        frame's styled prompt as the family's tokenizer gives it (``Family.subject_token_columns``; other
        families refuse in one line). A description truncated away gets no columns there, with a warning.

        Both modes, both bank schedules, over several ranks and resumed (lockstep checkpoints keep the
        maps: ``AutoSubjectMasks.state_dict``)."""
        if not self.family.records_subject_masks:
            raise ValueError(auto_masks_refused(self.family.title))
        # a processor the recorder cannot record through is refused now, before the output folder exists:
        # recording is installed and removed once here (the run installs it again for real)
        self.family.record_subjects(self.state, SubjectAttentionRecorder((settings.height, settings.width)))()
        columns = []
        for frame in story.frames:
            prompt, _ = apply_style(story.prompt(frame), settings.style, settings.negative_prompt)
            found = {}
            for name in frame.characters:
                description = story.characters[name].description
                cols = self.family.subject_token_columns(prompt, description)
                if not cols:
                    warnings.warn(
                        f"frame {frame.index} ({name}): its description is not among the prompt's tokens "
                        "(truncated?): no automatic mask there (its whole frame is offered)",
                        stacklevel=3,
                    )
                found[name] = cols
            columns.append(found)
        return columns

    def _check_bounded(
        self, story: Story, settings: RunSettings, masks: SubjectMasks | None, *, auto: bool = False
    ) -> None:
        """Bounded attention needs masks (given or automatic), banks written in this run (their tokens'
        characters) and not the tiled window form; with one character it only keeps the background apart:
        said, not refused."""
        if masks is None and not auto:
            raise ValueError("bounded attention needs subject masks (--subject-masks DIR)")
        if self.config.tile is not None:
            raise InvalidSetting(
                "tile", "the tiled form averages tiles over whole frames: no bounded attention"
            )
        if self.loaded_banks:
            raise ValueError(
                "bounded attention needs banks written in this run: loaded banks carry no token characters"
            )
        if len(story.characters) < 2:
            warnings.warn(
                "bounded attention with one character only keeps background tokens from reading its bank",
                stacklevel=3,
            )

    def _check_steps(self, settings: RunSettings) -> None:
        """More steps than the scheduler takes (DDIM, DDPM, LCM refuse more than their training timesteps;
        Euler, PNDM and flow matching take any number): refused before anything is written, tried on a copy
        of the scheduler this run uses."""
        scheduler = copy.deepcopy(self.pipe.scheduler)
        steps, limit = settings.num_inference_steps, scheduler.config.get("num_train_timesteps")
        if limit is None or steps <= limit:
            return
        try:
            self.family.set_timesteps(scheduler, steps, settings.height, settings.width)
        except ValueError:
            raise InvalidSetting(
                "num_inference_steps",
                f"{steps} is more than this model's scheduler ({type(scheduler).__name__}) takes: at most "
                f"{limit}, the timesteps it was trained with",
            ) from None

    def _check_keyframes(self, story: Story, keyframes) -> tuple | None:
        """Per shot (first image, last image or None) for image-to-video models; refused elsewhere."""
        if not self.family.needs_keyframes:
            if keyframes is not None:
                raise ValueError(f"keyframes are for image-to-video models, not {self.family.title} models")
            return None
        if keyframes is None:
            raise ValueError(
                f"{self.family.title} models animate given images: pass keyframes (one per shot), or use "
                "`storydiff video --model MODEL --story-dir DIR` on a generated image story"
            )
        if len(keyframes) != len(story.frames):
            raise ValueError(f"keyframes: one per shot ({len(story.frames)}), got {len(keyframes)}")
        pairs = [key if isinstance(key, tuple) else (key, None) for key in keyframes]
        for index, (first, last) in enumerate(pairs):
            if not isinstance(first, Image.Image) or not (last is None or isinstance(last, Image.Image)):
                raise ValueError(f"keyframes[{index}]: expected a PIL image or (first, last) images")
        pairs = tuple(
            (first.convert("RGB"), None if last is None else last.convert("RGB")) for first, last in pairs
        )
        self.family.check_keyframes(pairs)
        return pairs

    def _encode_references(
        self, story: Story, reference: dict, adapter: dict | None, *, masked: bool = False
    ) -> ReferenceImages | None:
        """Each character's reference image encoded once; None without images (with an adapter loaded,
        LockstepDenoiser then masks every image out). ``masked`` (the run has subject masks, given or
        automatic): each image applies inside its character's subject mask, read from the state at every
        denoiser call — automatic masks are swapped into it step by step (``ReferenceImages``)."""
        if adapter is None or not reference:
            return None
        pictures = {name: image for name, (image, _) in reference.items()}
        frame_characters = [f.characters for f in story.frames]
        state = self.state
        source = (lambda: state.subject_masks) if masked else None
        return ReferenceImages.encode(
            self.pipe, pictures, frame_characters, self.family.device, subject_masks=source
        )

    @staticmethod
    def _reference_summary(reference: dict, adapter: dict | None) -> dict:
        """What a checkpoint must match besides the settings: the adapter and the images' contents."""
        if adapter is None:
            return {}
        weights = adapter["weights"] and Path(adapter["weights"]).name
        return {
            "ip_adapter": {"weights": weights, "variant": adapter["variant"], "scale": adapter["scale"]},
            "reference_images": {name: record["sha256"] for name, (_, record) in reference.items()},
        }

    def _bank_metadata(self, plan: RunPlan, name: str, signature: dict) -> dict:
        """What character ``name``'s bank records: its description, the model, the reference image it was
        made with, and the run's ``signature`` (``run_signature``)."""
        shown = plan.extras.get("reference_images", {})  # character -> its reference image's sha256
        return {
            "description": plan.story.characters[name].description,
            "model": self.model_name,
            **({"reference_image": shown[name]} if name in shown else {}),
            **signature,
        }

    def _check_partition(self, partition: Partition, settings: RunSettings, out_dir, resume: bool) -> None:
        """What a run split over processes needs (and a resume of one), checked on every rank before
        anything is written."""
        if not partition.distributed and settings.bank_sharing == "broadcast":
            raise InvalidSetting("bank_sharing", "applies to runs over several processes (torchrun)")
        if partition.distributed and settings.mode == "window" and self.config.tile is not None:
            raise InvalidSetting("tile", "runs in one process only (a tile spans frames of one batch)")
        if resume and out_dir is not None:
            check_resume_world(out_dir, partition.world)

    def _check_loaded_banks(self, story: Story, settings: RunSettings) -> None:
        expected = self.run_signature(settings)
        for name in story.characters:
            if not self.state.bank.has(name):
                continue
            differences = signature_differences(self.state.bank.metadata(name), expected)
            if differences:
                raise ValueError(
                    f"the bank of {name!r} does not fit this run: {'; '.join(differences)}; banks are per "
                    "denoising step: read them with the steps, scheduler and guidance they were written with"
                )


def _without(record: dict, key: str) -> dict:
    return {k: v for k, v in record.items() if k != key}


def _keyframe_summary(keyframes) -> dict:
    """What a checkpoint of an image-to-video run must match: the keyframes' pixels."""
    if keyframes is None:
        return {}
    digest = [[image_sha256(image) if image is not None else None for image in pair] for pair in keyframes]
    return {"keyframes": digest}


def image_sha256(image: Image.Image) -> str:
    return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
