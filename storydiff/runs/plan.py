"""The run plan: what one story run does, built once from the story and its settings, and handed whole to
bank mode (``bank_run.py``), window mode (``window_run.py``), the lockstep loop and the distributed code.

The seed is recorded once (``RunSettings.seed``); every frame's starting-noise seed comes from it through
:func:`frame_seeds` alone, so the metadata, the denoiser and the checkpoints cannot disagree about them. The
plan also owns the one layout of a checkpoint's summary (what a resumed run must match), with the two
layouts written before 0.6 still accepted (``legacy_summaries``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..consistency.config import ConsistencyConfig, InvalidSetting
from ..consistency.state import ConsistencyState
from ..families.base import Family
from ..models.ip_adapter import ReferenceImages
from ..pages.output import StoryOutput
from ..pages.story import Story, story_source
from ..support.progress import Progress
from .checkpoint import checkpoint_name
from .distributed import Partition
from .settings import RunSettings


def frame_seeds(seed: int, num_frames: int) -> list[int]:
    """The starting-noise seed of each frame: frame i starts from ``seed + i``, so a frame's image does not
    depend on how frames are batched, chunked or split over processes."""
    return [seed + index for index in range(num_frames)]


@dataclass(frozen=True)
class Checkpointing:
    """Where a lockstep run writes its checkpoints, how often, and whether it continues from one."""

    path: Path | None = None
    every: int | None = None
    resume: bool = False


@dataclass(frozen=True)
class RunPlan:
    """One run: the frames (prompts, negatives, seeds, which take part in consistency), the resolved
    settings (size filled in), the identity frames of bank mode, the partition over ranks.

    ``story`` is None for runs of bare prompts (:meth:`from_prompts`: every frame active)."""

    settings: RunSettings
    prompts: tuple[str, ...]
    negatives: tuple[str, ...]
    story: Story | None = None
    identity: dict[str, list[int]] = field(default_factory=dict)  # bank mode: character -> identity frames
    partition: Partition = field(default_factory=Partition)
    model: str = ""
    # what a checkpoint must match besides the settings (the IP-Adapter, the reference images' contents)
    extras: dict = field(default_factory=dict)
    # bare prompts: which frames take part in consistency (None: all); a story's come from its frames
    active_frames: tuple[bool, ...] | None = None
    # image-to-video: per shot, the image it starts on and the one it ends on (None: free)
    keyframes: tuple[tuple[Image.Image, Image.Image | None], ...] | None = None

    @classmethod
    def from_prompts(
        cls,
        prompts: list[str],
        settings: RunSettings,
        *,
        negatives: list[str] | None = None,
        active: list[bool] | None = None,
        partition: Partition | None = None,
    ) -> RunPlan:
        """A plan for bare prompts (no story); ``active``: which frames take part in consistency (window
        mode; default all)."""
        negatives = [""] * len(prompts) if negatives is None else negatives
        for name, values in (("negatives", negatives), ("active", active)):
            if values is not None and len(values) != len(prompts):
                raise ValueError(f"{name}: one per prompt ({len(prompts)}), got {len(values)}")
        active = tuple(bool(a) for a in active) if active is not None else None
        return cls(
            settings,
            tuple(prompts),
            tuple(negatives),
            partition=partition or Partition(),
            active_frames=active,
        )

    @property
    def num_frames(self) -> int:
        return len(self.prompts)

    @property
    def seeds(self) -> list[int]:
        return frame_seeds(self.settings.seed, self.num_frames)

    @property
    def active(self) -> list[bool]:
        """Per frame: it shows a character, so it takes part in consistency (window mode)."""
        if self.story is not None:
            return [bool(frame.characters) for frame in self.story.frames]
        return list(self.active_frames) if self.active_frames is not None else [True] * self.num_frames

    def read_batches(self) -> list[list[int]]:
        """Bank mode: this rank's batches of frames that read banks — the single-process batches (every
        ``read_batch_size`` non-identity frames in story order), dealt to ranks in contiguous blocks, so a
        frame is computed with the same neighbours whatever the number of ranks."""
        written = {i for frames in self.identity.values() for i in frames}
        readers = [i for i in range(self.num_frames) if i not in written]
        size = self.settings.read_batch_size
        batches = [readers[i : i + size] for i in range(0, len(readers), size)]
        first, last = self.partition.block(len(batches))
        return batches[first:last]

    def checkpoint_summary(self, consistency: ConsistencyConfig) -> dict:
        """What a checkpoint of this run records and a resume must match (one layout for every mode)."""
        return {
            "model": self.model,
            "story": story_source(self.story) if self.story is not None else None,
            "settings": self.settings.to_dict(),
            "consistency": consistency.to_dict(),
            "prompts": list(self.prompts),
            "negatives": list(self.negatives),
            "seeds": self.seeds,
            **self._ranks(),
            **self.extras,
        }

    def legacy_summaries(self, consistency: ConsistencyConfig) -> list[dict]:
        """The summaries checkpoints written before 0.6 carry for this run (window mode and the lockstep
        bank schedule each had its own layout), so their runs still resume."""
        settings = self.settings
        if settings.mode == "window":
            return [
                {
                    "model": self.model,
                    **self.extras,
                    "prompts": list(self.prompts),
                    "negatives": list(self.negatives),
                    "seeds": self.seeds,
                    "steps": settings.num_inference_steps,
                    "guidance": settings.guidance_scale,
                    "height": settings.height,
                    "width": settings.width,
                    "chunk_size": settings.chunk_size,
                    "consistency": consistency.to_dict(),
                    **self._ranks(),
                }
            ]
        story = story_source(self.story) if self.story is not None else None
        return [
            {
                "model": self.model,
                "story": story,
                "settings": settings.to_dict(),
                "consistency": consistency.to_dict(),
                **self._ranks(),
                **self.extras,
            }
        ]

    def _ranks(self) -> dict:
        if not self.partition.distributed:
            return {}
        return {"world_size": self.partition.world, "rank": self.partition.rank}


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
    kept from an earlier story) writes (bank mode; else {}). ``config`` as the run uses it
    (``ConsistencyConfig.resolved``: window mode's window filled in)."""
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


@dataclass
class StoryRun:
    """One story run as bank and window mode take it: the plan, what runs it, where frames go."""

    plan: RunPlan
    family: Family
    state: ConsistencyState
    output: StoryOutput | None = None
    resume: bool = False
    progress: Progress = True
    references: ReferenceImages | None = None  # the characters' encoded reference images (ip_adapter.py)
    # wrapped around every denoiser call (LockstepDenoiser.step_hook): automatic subject masks; None: nothing
    step_hook: object | None = None
    # filled as frames finish (this rank's); a video family's: each shot's frames
    images: dict[int, Image.Image | list[Image.Image]] = field(default_factory=dict)

    @property
    def checkpointing(self) -> Checkpointing:
        settings, output = self.plan.settings, self.output
        path = output.root / checkpoint_name(self.plan.partition) if output is not None else None
        return Checkpointing(path, settings.checkpoint_every, self.resume)

    def finish(self, frame: int, latent) -> None:
        """Decode one frame (a video family's: one shot, its frames) and save it as soon as it is done."""
        settings = self.plan.settings
        self.images[frame] = self.family.decode(latent, settings.height, settings.width)
        if self.output is None:
            return
        if self.family.video:
            self.output.save_shot(frame, self.images[frame], self.family.fps(settings))
        else:
            self.output.save_frame(frame, self.images[frame])
