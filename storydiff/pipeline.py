"""``StoryDiffusionPipeline``: a story in, consistent frames and comic pages out.

It composes an existing diffusers text-to-image pipeline (SDXL, SD1.5, SD2.x, FLUX.1, SD3/SD3.5,
PixArt-Σ; ``families.py`` says how each takes a step) and drives the
consistent-attention state around its calls. Two modes (``RunSettings.mode``):

* bank (as the official code): for each character, its identity frames (its first solo frames) are
  denoised together and every consistent layer banks their sampled K/V per step; then every other frame
  attends to its own tokens plus the banks of the characters it shows, ``read_batch_size`` frames per
  denoiser call, whatever characters they show.
* window (long stories, ``longstory/``): every frame draws tokens from story neighbours; all frames advance
  step by step in chunks, with checkpoints and resume.

Either mode can take a reference image per character (UNet models and FLUX, through an IP-Adapter:
``ip_adapter.py``): each frame is conditioned on the images of the characters it shows.

Each frame is saved as soon as it is done; then the comic pages and the metadata.
"""

from __future__ import annotations

import copy
import hashlib
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .consistency.bank import signature_differences
from .consistency.config import ConsistencyConfig, InvalidSetting
from .consistency.modes import JointMode
from .families.attach import apply_consistent_attention, remove_consistent_attention, replaced_layers
from .families.base import SUPPORTED
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
from .pages.output import StoryOutput, read_metadata
from .pages.story import Story, load_story, parse_story, story_source
from .pages.styles import apply_style
from .runs.checkpoint import checkpoint_name
from .runs.distributed import (
    Partition,
    bank_owners,
    current_partition,
    gather_to_leader,
    leader_first,
    share_banks,
)
from .runs.lockstep import LockstepDenoiser, run_lockstep
from .runs.settings import DISTRIBUTED_BANK_SHARING, RunSettings
from .runs.window_run import denoise_long_story
from .support.progress import Progress, progress_bar


@dataclass
class StoryResult:
    images: list[Image.Image]  # one per frame, story order
    captions: list[str | None]
    pages: list[Image.Image]
    metadata: dict
    out_dir: Path | None = None
    bank_bytes: dict[str, int] = field(default_factory=dict)
    # story indices of ``images``; None: every frame in story order (ranks other than 0 of a distributed
    # run hold only the frames they made, and no pages)
    frame_indices: list[int] | None = None


@dataclass
class _Run:
    """One story run as both modes take it: what to make, where it goes, what it must match."""

    story: Story
    styled: list[tuple[str, str]]  # each frame's (styled prompt, negative prompt)
    settings: RunSettings
    images: dict[int, Image.Image]  # filled as frames finish (this rank's)
    output: StoryOutput | None
    resume: bool
    progress: Progress
    partition: Partition
    references: ReferenceImages | None = None  # the characters' encoded reference images (ip_adapter.py)
    summary: dict = field(default_factory=dict)  # what checkpoints must match besides the settings


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


def check_run(
    story: Story,
    settings: RunSettings,
    config: ConsistencyConfig,
    *,
    banked: set[str] = frozenset(),
    loaded: bool = False,
    out_dir: str | Path | None = None,
    resume: bool = False,
) -> dict[str, list[int]]:
    """Check that ``story`` can run with these (resolved) settings before any model is involved; returns
    the identity frames each character without a bank (``banked``: loaded from files when ``loaded``, or
    kept from an earlier story) writes (bank mode; else {})."""
    if settings.mode == "window" and config.window is None and config.tile is None:
        raise InvalidSetting("window", "is needed in window mode: ConsistencyConfig(window=W), e.g. 2")
    if settings.mode == "bank" and config.tile is not None:
        raise InvalidSetting("tile", "applies to window mode only")
    if (settings.checkpoint_every or resume) and out_dir is None:
        raise ValueError("checkpoints and resume need an output folder (out_dir)")
    if resume and not settings.steps_in_lockstep:
        raise ValueError(
            "only window-mode and lockstep bank runs can be resumed (stored banks keep no checkpoints)"
        )
    if loaded and settings.mode != "bank":
        raise InvalidSetting("load_bank", "applies to bank mode only (window mode keeps no identity bank)")
    if loaded and settings.bank_schedule == "lockstep":
        raise InvalidSetting("bank_schedule", "lockstep cannot read banks loaded from files; use stored")
    unused = sorted(name for name in banked if not story.appears(name)) if loaded else []
    if unused:
        raise InvalidSetting(
            "load_bank", f"loads {', '.join(map(repr, unused))}, who is in no frame of the story"
        )
    if settings.mode != "bank":
        return {}
    return story.identity_frames(settings.id_frames, names=[c for c in story.characters if c not in banked])


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
        scheduler = copy.deepcopy(self.pipe.scheduler)
        side = self.default_size  # FLUX's sigmas shift with the image size
        height, width = settings.height or side, settings.width or side
        timesteps = self.family.set_timesteps(scheduler, settings.num_inference_steps, height, width)
        return {
            **self.state.host,
            "num_inference_steps": settings.num_inference_steps,
            "timesteps": [round(float(t), 4) for t in timesteps],
            "cfg_groups": 2 if self.family.uses_cfg_batch(settings.guidance_scale) else 1,
        }

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
        # the scheduler and FreeU asked for hold for this run (timesteps, bank signatures), undone after
        with run_sampler(self.family, settings.scheduler, settings.freeu):
            return self._run_story(story, settings, out_dir, overwrite, resume, progress, reference_images)

    def _run_story(
        self, story: Story, settings: RunSettings, out_dir, overwrite, resume, progress, reference_images
    ) -> StoryResult:
        self.family.check_size(settings.height, settings.width)
        # characters of this story with a bank already (loaded, or written by an earlier story)
        banked = set()
        if settings.mode == "bank":
            banked = {c for c in story.characters if self.state.bank.has(c) and story.appears(c)}
        identity = check_run(
            story,
            settings,
            self.config,
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
        metadata = {
            "model": self.model_name,
            "story_text": story_source(story),
            "settings": settings.to_dict(),
            "consistency": self.config.to_dict(),
            "frame_seeds": [settings.seed + f.index for f in story.frames],
            "prompts": [p for p, _ in styled],
            "negative_prompts": [n for _, n in styled],
            "captions": story.panel_captions(settings.captions),
            **self.model_files,
            "characters": {c.name: c.description for c in story.characters.values()},
            "frame_characters": [list(f.characters) for f in story.frames],
            "identity_frames": identity,
            "loaded_banks": {name: self.loaded_banks[name] for name in banked if name in self.loaded_banks},
            "ip_adapter": adapter,
            "reference_images": {name: record for name, (_, record) in reference.items()},
            "world_size": partition.world,
            "versions": _versions(),
        }
        output = None
        if out_dir is not None:

            def prepare() -> StoryOutput:  # rank 0 checks and prepares the folder; the others then join it
                prepared = StoryOutput(out_dir, overwrite=overwrite, resume=resume)
                prepared.start(metadata)
                return prepared

            output = leader_first(partition, prepare)
            if not partition.leader:
                output = StoryOutput(out_dir, resume=resume, follower=True)
        images: dict[int, Image.Image] = {}
        start = time.perf_counter()
        self.state.bank.reset_peak()
        try:
            run = _Run(story, styled, settings, images, output, resume, progress, partition)
            run.references, run.summary = self._reference_inputs(story, reference, adapter)
            if settings.mode == "bank":
                metadata.update(self._run_bank(run, identity))
            else:
                metadata.update(self._run_window(run))
            own = dict(images)
            images = gather_to_leader(partition, images)  # pages and metadata need every frame
            if output is not None:  # every rank's frames are on disk now: the checkpoints are done with
                output.root.joinpath(checkpoint_name(partition)).unlink(missing_ok=True)
        except BaseException as exc:
            if output is not None:
                output.fail(exc)
            raise
        finally:
            self.state.end()
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
        pages = make_pages(
            ordered,
            captions,
            settings.layout,
            seed=settings.seed,
            caption_style=settings.caption_style,
            font=settings.font,
        )
        if output is not None:
            output.save_pages(pages)
            output.finish(**memory, seconds=metadata["seconds"], pages=len(pages))
        return StoryResult(ordered, captions, pages, metadata, output.root if output else None, bank_bytes)

    def _reference_inputs(
        self, story: Story, reference: dict, adapter: dict | None
    ) -> tuple[ReferenceImages | None, dict]:
        """The run's ``references`` (each character's image encoded once; None without images: with an
        adapter loaded, LockstepDenoiser then masks every image out) and what their checkpoints must match
        besides the settings: the adapter and the images' contents."""
        if adapter is None:
            return None, {}
        references = None
        if reference:
            pictures = {name: image for name, (image, _) in reference.items()}
            frame_characters = [f.characters for f in story.frames]
            references = ReferenceImages.encode(self.pipe, pictures, frame_characters, self.family.device)
        weights = adapter["weights"] and Path(adapter["weights"]).name
        summary = {
            "ip_adapter": {"weights": weights, "variant": adapter["variant"], "scale": adapter["scale"]},
            "reference_images": {name: record["sha256"] for name, (_, record) in reference.items()},
        }
        return references, summary

    def _run_bank(self, run: _Run, identity: dict[str, list[int]]) -> dict:
        """Identity frames write each character's bank, every other frame reads the banks of the
        characters it shows; both in chunks through one step-synchronous denoiser, so a chunk's frames
        are the same whatever the schedule: "stored" runs each chunk through all steps in turn (every
        step's bank kept), "lockstep" advances all chunks one step at a time (one step's bank alive).

        Over several ranks each reads its contiguous share of the read batches — the single-process
        batches, so every frame is bit-identical to it — and each character's bank is written by the rank
        its identity frames were dealt to and broadcast ("broadcast"), or by every rank ("recompute", no
        traffic). Returns the traffic."""
        story, styled, settings, images, output = run.story, run.styled, run.settings, run.images, run.output
        resume, progress, partition, references = run.resume, run.progress, run.partition, run.references
        identity_set = {i for frames in identity.values() for i in frames}
        read_frames = [f.index for f in story.frames if f.index not in identity_set]
        size = settings.read_batch_size
        reads = [read_frames[i : i + size] for i in range(0, len(read_frames), size)]
        first, last = partition.block(len(reads))
        reads = reads[first:last]
        denoiser = self._denoiser(story, styled, settings, references)
        steps = settings.num_inference_steps
        owners = bank_owners(partition, list(identity), settings.bank_sharing)
        owned = {i for name, frames in identity.items() if owners[name] == partition.rank for i in frames}
        # "broadcast": a rank denoises only the identity frames of its characters and receives the other banks
        broadcast = partition.distributed and settings.bank_sharing == "broadcast"
        writing = {
            name: frames
            for name, frames in identity.items()
            if owners[name] == partition.rank or not broadcast
        }

        def write(name: str, frames: list[int], step: int) -> None:
            self.state.begin(JointMode(len(frames), writing=name), step=step)
            denoiser.step(frames, step)

        def read(frames: list[int], step: int) -> None:
            self.state.begin_read([story.frames[i].characters for i in frames], step=step)
            denoiser.step(frames, step)

        def finish(frames: list[int]) -> None:
            for i in frames:
                if i in identity_set and i not in owned:  # recomputed here, another rank's to decode
                    continue
                images[i] = self.family.decode(denoiser.latents[i], settings.height, settings.width)
                if output is not None:
                    output.save_frame(i, images[i])

        shown = run.summary.get("reference_images", {})  # character -> its reference image's sha256
        for name in identity:
            # also on resume: a lockstep run's bank holds one step, written again at the next step
            self.state.bank.start(name)
            self.state.bank.set_metadata(
                name,
                description=story.characters[name].description,
                model=self.model_name,
                **({"reference_image": shown[name]} if name in shown else {}),  # what the bank was made with
                **self.run_signature(settings),
            )
        received = 0
        if settings.bank_schedule == "stored":
            made = sum(map(len, writing.values())) + sum(map(len, reads))  # the frames this rank denoises
            bar = progress_bar(made, "story frames", "frame", progress)
            for name, frames in writing.items():
                bar.set_postfix_str(f"identity of {name}")
                for step in range(steps):
                    write(name, frames, step)
                finish(frames)
                bar.update(len(frames))
            if broadcast:
                received = share_banks(partition, self.state.bank, owners)
            if settings.save_banks and output is not None and partition.leader:
                for name in identity:
                    self.state.bank.save(name, output.bank_path(name))
            bar.set_postfix_str("story frames")
            for frames in reads:
                for step in range(steps):
                    read(frames, step)
                finish(frames)
                bar.update(len(frames))
            bar.close()
            return {"bank_bytes_received": received} if broadcast else {}

        def one_step(step: int) -> None:
            nonlocal received
            for name, frames in writing.items():
                write(name, frames, step)
            if broadcast:
                received += share_banks(partition, self.state.bank, owners, step)
            for frames in reads:
                read(frames, step)
            self.state.bank.drop_step(step, identity)  # read by everyone: free it

        run_lockstep(
            denoiser,
            one_step,
            num_inference_steps=steps,
            checkpoint_path=output.root / checkpoint_name(partition) if output is not None else None,
            checkpoint_every=settings.checkpoint_every,
            summary={
                "model": self.model_name,
                "story": story_source(story),
                "settings": settings.to_dict(),
                "consistency": self.config.to_dict(),
                **({"world_size": partition.world, "rank": partition.rank} if partition.distributed else {}),
                **run.summary,
            },
            resume=resume,
            progress=progress,
        )
        finish(sorted(identity_set) + [i for frames in reads for i in frames])
        return {"bank_bytes_received": received} if broadcast else {}

    def _denoiser(self, story: Story, styled, settings: RunSettings, references=None) -> LockstepDenoiser:
        return LockstepDenoiser(
            self.pipe,
            prompts=[p for p, _ in styled],
            negatives=[n for _, n in styled],
            seeds=[settings.seed + f.index for f in story.frames],
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            height=settings.height,
            width=settings.width,
            references=references,
        )

    def _run_window(self, run: _Run) -> dict:
        """Window mode; returns {"halo_bytes_sent": this rank's traffic} on several ranks, else {}."""
        story, styled, settings, images, output = run.story, run.styled, run.settings, run.images, run.output
        partition = run.partition
        stats: dict = {}
        latents = denoise_long_story(
            self.pipe,
            self.state,
            prompts=[p for p, _ in styled],
            negatives=[n for _, n in styled],
            active=[bool(f.characters) for f in story.frames],
            seeds=[settings.seed + f.index for f in story.frames],
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            height=settings.height,
            width=settings.width,
            chunk_size=settings.chunk_size,
            checkpoint_path=output.root / checkpoint_name(partition) if output is not None else None,
            checkpoint_every=settings.checkpoint_every,
            resume=run.resume,
            run_summary={"model": self.model_name, **run.summary},
            references=run.references,
            progress=run.progress,
            partition=partition,
            stats=stats,
        )
        start, stop = partition.block(len(story.frames))
        bar = progress_bar(stop - start, "decoding frames", "frame", run.progress)
        for index in range(start, stop):
            images[index] = self.family.decode(latents[index], settings.height, settings.width)
            if output is not None:
                output.save_frame(index, images[index])
            bar.update()
        bar.close()
        return stats

    def _check_partition(self, partition: Partition, settings: RunSettings, out_dir, resume: bool) -> None:
        """What a run split over processes needs (and a resume of one), checked on every rank before
        anything is written."""
        if not partition.distributed and settings.bank_sharing == "broadcast":
            raise InvalidSetting("bank_sharing", "applies to runs over several processes (torchrun)")
        if partition.distributed and settings.mode == "window" and self.config.tile is not None:
            raise InvalidSetting("tile", "runs in one process only (a tile spans frames of one batch)")
        if resume and out_dir is not None:
            check_resume_world(out_dir, partition)

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


def check_resume_world(out_dir: str | Path, partition: Partition) -> None:
    """A run resumes with as many processes as made it: each rank's checkpoint holds its own frames."""
    stored = read_metadata(out_dir).get("world_size", 1)
    if stored != partition.world:
        raise ValueError(
            f"{out_dir} was generated by {stored} process(es); resume it with the same number "
            f"(torchrun --nproc_per_node {stored}), not {partition.world}"
        )


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
