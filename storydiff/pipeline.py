"""``StoryDiffusionPipeline``: a story in, consistent frames and comic pages out.

It composes an existing diffusers text-to-image pipeline (SDXL, SD1.5, SD2.x) and drives the
consistent-attention state around its calls:

1. write: for each character, its identity frames (its first solo frames) are denoised together in
   "write" mode; they attend to each other and every consistent layer banks their sampled K/V per step;
2. read: every other frame attends to its own tokens plus the banks of the characters it shows. Frames
   go through the UNet ``read_batch_size`` at a time, whatever characters they show.

Each frame is saved as soon as its batch finishes; then the comic pages and the metadata.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from .attention import apply_consistent_attention, remove_consistent_attention
from .comic import make_pages
from .config import ConsistencyConfig
from .longstory import CHECKPOINT, decode_frame, denoise_long_story
from .output import StoryOutput
from .story import Story, load_story, parse_story, story_source
from .styles import DEFAULT_STYLE, apply_style


@dataclass
class StoryResult:
    images: list[Image.Image]  # one per frame, story order
    captions: list[str | None]
    pages: list[Image.Image]
    metadata: dict
    out_dir: Path | None = None
    bank_bytes: dict[str, int] = field(default_factory=dict)


def _versions() -> dict:
    import diffusers

    from . import __version__

    return {
        "storydiff": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }


class StoryDiffusionPipeline:
    """Consistent story generation on top of a diffusers UNet text-to-image pipeline.

    Args:
        pipe: e.g. ``StableDiffusionXLPipeline`` or ``StableDiffusionPipeline`` (``models.load_pipeline``).
        config: consistent-attention settings; installing them happens here and lasts until :meth:`close`.
    """

    def __init__(self, pipe, config: ConsistencyConfig | None = None) -> None:
        self.pipe = pipe
        self.config = config or ConsistencyConfig()
        self.state = apply_consistent_attention(pipe, self.config)

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        config: ConsistencyConfig | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> StoryDiffusionPipeline:
        from .loading import load_pipeline

        pipe = load_pipeline(model, device=device, dtype=dtype, seed=config.seed if config else 0)
        instance = cls(pipe, config)
        instance.model_name = model
        return instance

    def close(self) -> None:
        """Restore the pipeline's original attention processors."""
        remove_consistent_attention(self.pipe)

    def load_bank(self, path: str | Path, character: str | None = None) -> str:
        """Reuse a character written by an earlier story (see ``save_banks``); returns its name."""
        return self.state.bank.load(path, character=character)

    # ------------------------------------------------------------------------------------------------
    def __call__(
        self,
        story: Story | str | Path,
        *,
        out_dir: str | Path | None = None,
        overwrite: bool = False,
        mode: str = "bank",
        style: str = DEFAULT_STYLE,
        negative_prompt: str = "",
        id_frames: int = 2,
        num_inference_steps: int = 30,
        guidance_scale: float = 5.0,
        height: int | None = None,
        width: int | None = None,
        seed: int = 0,
        read_batch_size: int = 4,
        chunk_size: int = 8,
        checkpoint_every: int | None = None,
        resume: bool = False,
        layout: str = "grid",
        save_banks: bool = False,
        progress: bool = True,
    ) -> StoryResult:
        """Generate every frame of ``story`` (a ``Story``, story text, or a path to a story file).

        Modes:
            "bank" (default, as the official code): each character's first ``id_frames`` solo frames are
                denoised together and write its identity bank; the other frames read the banks of the
                characters they show, ``read_batch_size`` frames per UNet call.
            "window" (long stories, see longstory.py): every frame draws tokens from story neighbours within
                ``config.window`` frames; all frames advance step by step, ``chunk_size`` frames per UNet
                call, so memory does not grow with the story; ``checkpoint_every`` steps a checkpoint is
                written to ``out_dir`` and ``resume=True`` continues from it.

        Frame i starts from noise seeded with ``seed + i``, so a frame's image does not depend on how the
        frames are batched. Errors in the story or the arguments are raised before anything is written.
        """
        story = self._as_story(story)
        if mode not in ("bank", "window"):
            raise ValueError(f"mode must be 'bank' or 'window', got {mode!r}")
        counts = {
            "num_inference_steps": num_inference_steps,
            "read_batch_size": read_batch_size,
            "id_frames": id_frames,
            "chunk_size": chunk_size,
        }
        for name, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
            raise ValueError(f"checkpoint_every must be None or an int >= 1, got {checkpoint_every!r}")
        if mode == "window" and self.config.window is None and self.config.tile is None:
            raise ValueError("mode='window' needs ConsistencyConfig(window=W) (or tile=T); e.g. window=2")
        if (checkpoint_every or resume) and (mode != "window" or out_dir is None):
            raise ValueError("checkpoints and resume need mode='window' and an out_dir")
        apply_style("", style)  # unknown style → ValueError now, not after the first frames
        make_pages([], [], layout)  # unknown layout → ValueError now
        identity: dict[str, list[int]] = {}
        cfg_groups = 2 if guidance_scale > 1 else 1
        if mode == "bank":
            to_write = [c for c in story.characters if not self.state.bank.has(c)]
            identity = story.identity_frames(id_frames, names=to_write)
            self._check_loaded_banks(story, num_inference_steps, cfg_groups)

        styled = [apply_style(story.prompt(frame), style, negative_prompt) for frame in story.frames]
        output = StoryOutput(out_dir, overwrite=overwrite, resume=resume) if out_dir is not None else None
        metadata = {
            "model": getattr(self, "model_name", type(self.pipe).__name__),
            "mode": mode,
            "story_text": story_source(story),
            "seed": seed,
            "frame_seeds": [seed + f.index for f in story.frames],
            "style": style,
            "negative_prompt": negative_prompt,
            "prompts": [p for p, _ in styled],
            "negative_prompts": [n for _, n in styled],
            "captions": [f.caption for f in story.frames],
            "characters": {c.name: c.description for c in story.characters.values()},
            "frame_characters": [list(f.characters) for f in story.frames],
            "identity_frames": identity,
            "settings": {
                **counts,
                "guidance_scale": guidance_scale,
                "height": height,
                "width": width,
                "layout": layout,
                "checkpoint_every": checkpoint_every,
            },
            "consistency": self.config.to_dict(),
            "versions": _versions(),
        }
        if output is not None:
            output.start(metadata)
        images: dict[int, Image.Image] = {}
        call = {
            "steps": num_inference_steps,
            "guidance": guidance_scale,
            "height": height,
            "width": width,
            "seed": seed,
        }
        start = time.perf_counter()
        try:
            if mode == "bank":
                self._run_bank(
                    story,
                    identity,
                    styled,
                    call,
                    images,
                    output,
                    read_batch_size,
                    save_banks,
                    cfg_groups,
                    progress,
                )
            else:
                self._run_window(
                    story,
                    styled,
                    call,
                    images,
                    output,
                    chunk_size,
                    checkpoint_every,
                    resume,
                    metadata["model"],
                    progress,
                )
        except BaseException as exc:
            if output is not None:
                output.fail(exc)
            raise
        finally:
            self.state.end()

        ordered = [images[f.index] for f in story.frames]
        captions = [f.caption for f in story.frames]
        pages = make_pages(ordered, captions, layout)
        bank_bytes = {
            name: self.state.bank.nbytes(name) for name in story.characters if self.state.bank.has(name)
        }
        metadata.update(bank_bytes=bank_bytes, seconds=round(time.perf_counter() - start, 2))
        if output is not None:
            output.save_pages(pages)
            output.finish(bank_bytes=bank_bytes, seconds=metadata["seconds"], pages=len(pages))
        return StoryResult(ordered, captions, pages, metadata, output.root if output else None, bank_bytes)

    def _run_bank(
        self, story, identity, styled, call, images, output, read_batch_size, save_banks, cfg_groups, progress
    ) -> None:
        identity_set = {i for frames in identity.values() for i in frames}
        read_frames = [f.index for f in story.frames if f.index not in identity_set]
        bar = tqdm(total=len(story.frames), desc="story frames", unit="frame", disable=not progress)
        try:
            for name, frames in identity.items():
                bar.set_postfix_str(f"identity of {name}")
                self.state.begin_write(name, len(frames))
                self._generate(frames, styled, call, images, output, bar)
                description = story.characters[name].description
                self.state.bank.set_metadata(
                    name, num_inference_steps=call["steps"], cfg_groups=cfg_groups, description=description
                )
                if save_banks and output is not None:
                    self.state.bank.save(name, output.bank_path(name))
            for first in range(0, len(read_frames), read_batch_size):
                batch = read_frames[first : first + read_batch_size]
                bar.set_postfix_str("story frames")
                self.state.begin_read([story.frames[i].characters for i in batch])
                self._generate(batch, styled, call, images, output, bar)
        finally:
            bar.close()

    def _run_window(
        self, story, styled, call, images, output, chunk_size, checkpoint_every, resume, model, progress
    ) -> None:
        latents = denoise_long_story(
            self.pipe,
            self.state,
            prompts=[p for p, _ in styled],
            negatives=[n for _, n in styled],
            active=[bool(f.characters) for f in story.frames],
            seeds=[call["seed"] + f.index for f in story.frames],
            num_inference_steps=call["steps"],
            guidance_scale=call["guidance"],
            height=call["height"],
            width=call["width"],
            chunk_size=chunk_size,
            checkpoint_path=output.root / CHECKPOINT if output is not None else None,
            checkpoint_every=checkpoint_every,
            resume=resume,
            run_summary={"model": model},
            progress=progress,
        )
        for frame in tqdm(story.frames, desc="decoding frames", unit="frame", disable=not progress):
            images[frame.index] = decode_frame(self.pipe, latents[frame.index])
            if output is not None:
                output.save_frame(frame.index, images[frame.index])
        if output is not None:
            output.root.joinpath(CHECKPOINT).unlink(missing_ok=True)  # the frames are the result now

    # ------------------------------------------------------------------------------------------------
    def _generate(self, frames, styled, call, images, output, bar) -> None:
        # One CPU generator per frame: the same frame gets the same starting noise in any batch, any device.
        generators = [torch.Generator().manual_seed(call["seed"] + i) for i in frames]
        result = self.pipe(
            prompt=[styled[i][0] for i in frames],
            negative_prompt=[styled[i][1] for i in frames],
            num_inference_steps=call["steps"],
            guidance_scale=call["guidance"],
            height=call["height"],
            width=call["width"],
            generator=generators,
            callback_on_step_end=self.state.step_callback,
            output_type="pil",
        )
        for i, image in zip(frames, result.images, strict=True):
            images[i] = image
            if output is not None:
                output.save_frame(i, image)
            bar.update()

    @staticmethod
    def _as_story(story: Story | str | Path) -> Story:
        if isinstance(story, Story):
            return story
        if isinstance(story, Path) or (
            isinstance(story, str) and "\n" not in story and Path(story).is_file()
        ):
            return load_story(story)
        if isinstance(story, str):
            return parse_story(story)
        raise TypeError(f"story must be a Story, story text or a path, got {type(story).__name__}")

    def _check_loaded_banks(self, story: Story, steps: int, cfg_groups: int) -> None:
        for name in story.characters:
            if not self.state.bank.has(name):
                continue
            meta = self.state.bank.metadata(name)
            if meta.get("num_inference_steps") not in (None, steps):
                raise ValueError(
                    f"bank of {name!r} was written with {meta['num_inference_steps']} steps; this story uses "
                    f"{steps}: banks are per denoising step, use the same num_inference_steps"
                )
            if meta.get("cfg_groups") not in (None, cfg_groups):
                raise ValueError(
                    f"bank of {name!r} was written with {meta['cfg_groups']} CFG group(s), this story needs "
                    f"{cfg_groups}: use the same classifier-free guidance setting (guidance_scale > 1 or not)"
                )
