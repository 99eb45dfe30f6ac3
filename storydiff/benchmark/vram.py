"""VRAM profiler: device memory over time and peak memory vs story length, per consistency mode.

A one-character story of L frames (identity frames + L - id read frames) is generated once per mode and
length while a ``MemorySampler`` records memory. Modes:

    official_a     official variant A: full hidden-state bank, dense-mask identity attention
    official_b     official variant B: sampled hidden-state bank, per-frame loop
                   (both from consistency/official.py, with the official warm-up and layer-skip schedule)
    ours           our processors, stored bank schedule: every step's sampled K/V bank on the GPU, read
                   frames batched
    ours_offload   ours with the stored bank in pinned CPU memory, prefetched layer by layer
    ours_lockstep  ours with the lockstep bank schedule: one step's bank alive at a time (same frames)
    window         long-story mode: neighbours within 2 frames, chunks of 4 frames per denoiser call
    window_unchunked  the same consistency with the whole story in one denoiser batch (for contrast)

Every mode but the official ones runs on every story family (UNets, FLUX, SD3, PixArt: ``families.py``).
The official code has UNet processors only (no DiT variant), so ``official_a`` / ``official_b`` need a
pipeline with a ``unet``.

Video families (Wan 2.x) run the same modes with shots as story frames (``shot_frames`` video frames
each): the story lengths are shot counts. ``build_random_wan`` builds Wan 2.1's real transformer (1.3B or
14B) and VAE with random weights on the GPU, with a one-layer text encoder of UMT5-XXL's width.

Without NVML (no GPU) the sampler falls back to host RSS, which only shows that the plumbing works.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
from tqdm.auto import tqdm
from transformers import UMT5Config, UMT5EncoderModel

from ..consistency.config import ConsistencyConfig
from ..consistency.official import install_official
from ..families.registry import family_named, family_of
from ..families.tiny_models import default_dtype
from ..families.tiny_text import tiny_t5_tokenizer
from ..pipeline import StoryDiffusionPipeline
from .dit_suite import WAN_1_3B_CONFIG, WAN_14B_CONFIG
from .memory import MemorySampler, plot_memory_timeline, plot_peak_vs_length

MODES = ("official_a", "official_b", "ours", "ours_offload", "ours_lockstep", "window", "window_unchunked")
OFFICIAL_MODES = ("official_a", "official_b")
WINDOW, CHUNK = 2, 4


RANDOM_WAN = {"random-wan": WAN_1_3B_CONFIG, "random-wan14b": WAN_14B_CONFIG}


def build_random_wan(model: str, device: torch.device, dtype: torch.dtype):
    """A ``WanPipeline`` with Wan 2.1's real transformer (``RANDOM_WAN[model]``: 1.3B, 2.8 GB in bf16; 14B,
    28.6 GB) and VAE (``AutoencoderKLWan``'s defaults are Wan 2.1's: 16 latent channels, 8x in space, 4x
    in time) with random weights, created on ``device`` in ``dtype`` directly, and a one-layer UMT5 text
    encoder of the real width (4096) over the real 512 text tokens: the transformer, its activations, the
    VAE and the banks have their real sizes; the text encoder (5.7 B parameters in Wan) does not."""
    family = family_named("wan")

    tokenizer = tiny_t5_tokenizer(512)
    text = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=RANDOM_WAN[model]["text_dim"],
        d_kv=8,
        d_ff=37,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
    )
    with torch.device(device), default_dtype(dtype):
        transformer = family.denoiser_class(**RANDOM_WAN[model])
        vae = AutoencoderKLWan()
        text_encoder = UMT5EncoderModel(text)
    scheduler = UniPCMultistepScheduler(  # Wan's: flow matching through UniPC, shift 3 at 480p
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    pipe = family.pipelines[0](
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def story_text(frames: int) -> str:
    lines = ["[Hero] a young explorer with a red scarf and a leather backpack", "---"]
    return "\n".join(lines + [f"[Hero] scene {i} of the long journey" for i in range(frames)]) + "\n"


def has_official(pipe) -> bool:
    """Whether the official modes can run on ``pipe``: its family has the official variants (UNets)."""
    return family_of(pipe).official_variants


def _run_official(pipe, variant: str, frames: int, call: dict, id_frames: int, sampler: MemorySampler) -> int:
    """Generate the story the official way; returns its bank bytes (all kept until the end)."""
    state, restore = install_official(pipe.unet, variant)
    prompts = [f"a young explorer with a red scarf, scene {i} of the long journey" for i in range(frames)]
    try:
        sampler.mark("write")
        state.begin_write(id_frames)
        pipe(prompts[:id_frames], callback_on_step_end=state.step_callback, **call)
        sampler.mark("read")
        for prompt in prompts[id_frames:]:  # the official code reads one frame at a time
            state.begin_read(1)
            pipe([prompt], callback_on_step_end=state.step_callback, **call)
        return state.bank_bytes()
    finally:
        restore()
        state.bank.clear()


def _run_ours(
    pipe, mode: str, frames: int, call: dict, id_frames: int, read_batch: int, sampler, consistency: dict
) -> int:
    """Generate the story with our processors; returns the most identity-bank bytes alive at once."""
    window = mode.startswith("window")
    config = ConsistencyConfig(
        offload_bank=mode == "ours_offload", window=WINDOW if window else None, **consistency
    )
    story = StoryDiffusionPipeline(pipe, config)
    if window:
        extra = {"mode": "window", "chunk_size": CHUNK if mode == "window" else frames}
    else:
        schedule = "lockstep" if mode == "ours_lockstep" else "stored"
        extra = {"id_frames": id_frames, "read_batch_size": read_batch, "bank_schedule": schedule}
    try:
        sampler.mark(mode)
        return story(story_text(frames), progress=False, **call, **extra).metadata["bank_peak_bytes"]
    finally:
        story.close()


def profile_story_lengths(
    pipe,
    *,
    lengths: list[int],
    modes: list[str],
    steps: int,
    height: int | None,
    width: int | None,
    id_frames: int,
    read_batch: int,
    device: torch.device,
    interval_s: float = 0.02,
    shot_frames: int | None = None,
    rate: float | None = None,
) -> tuple[list[dict], dict[str, MemorySampler]]:
    """Rows (mode, frames, peak bytes, ...) and, per mode, the sampler of its longest story.

    ``shot_frames``: a video model's frames per shot (None: the model's); ``rate``: our modes' sampling
    rate (None: ``ConsistencyConfig``'s default)."""
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; choose from {MODES}")
    official = [m for m in modes if m in OFFICIAL_MODES]
    if official and not has_official(pipe):
        others = ", ".join(m for m in MODES if m not in OFFICIAL_MODES)
        raise ValueError(
            f"{', '.join(official)}: the official code has UNet processors only, and "
            f"{type(pipe).__name__} has no UNet; choose from {others}"
        )
    too_short = [n for n in lengths if n < id_frames]
    if too_short:
        raise ValueError(f"story lengths {too_short} are shorter than id_frames={id_frames}")
    pipe.set_progress_bar_config(disable=True)
    rows, timelines = [], {}
    bar = tqdm(total=len(modes) * len(lengths), desc="profile-vram", unit="story")
    for mode in modes:
        for frames in sorted(lengths):
            bar.set_postfix_str(f"{mode} L={frames}")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            call = {"num_inference_steps": steps, "height": height, "width": width, "guidance_scale": 5.0}
            if shot_frames is not None:
                call["shot_frames"] = shot_frames
            start = time.perf_counter()
            status, bank_peak = "ok", None
            with MemorySampler(device, interval_s=interval_s) as sampler:
                try:
                    if mode.startswith("official"):
                        bank_peak = _run_official(pipe, mode[-1], frames, call, id_frames, sampler)
                    else:
                        consistency = {} if rate is None else {"rate": rate}
                        bank_peak = _run_ours(
                            pipe, mode, frames, call, id_frames, read_batch, sampler, consistency
                        )
                except torch.OutOfMemoryError:  # a finding, not a failure: record it and go on
                    status = "out of memory"
            rows.append(
                {
                    "mode": mode,
                    "frames": frames,
                    "status": status,
                    "peak_bytes": sampler.peak_bytes if status == "ok" else None,
                    "torch_peak_bytes": sampler.torch_peak_bytes,
                    "bank_peak_bytes": bank_peak,  # most identity-bank bytes alive at once
                    "source": sampler.source,
                    "seconds": round(time.perf_counter() - start, 2),
                    "steps": steps,
                    "id_frames": id_frames,
                    "read_batch": read_batch,
                    "shot_frames": shot_frames,
                }
            )
            timelines[mode] = sampler  # the longest story of each mode ends up here
            bar.update()
    bar.close()
    return rows, timelines


def timeline_rows(timelines: dict[str, MemorySampler]) -> dict[str, list]:
    """JSON-friendly samples: {mode: [[t, used_bytes, torch_allocated], ...]}."""
    return {
        mode: [[s.t, s.used_bytes, s.torch_allocated] for s in sampler.samples]
        for mode, sampler in timelines.items()
    }


def save_plots(rows: list[dict], timelines: dict[str, MemorySampler], stem: Path) -> list[Path]:
    longest = max((row["frames"] for row in rows), default=0)
    source = next((row["source"] for row in rows), "")
    what = "host memory (RSS)" if source == "host-rss" else "device memory"
    title = f"{what} over time: each mode's longest story ({longest} frames)"
    return [
        plot_memory_timeline(timelines, stem.with_name(stem.name + "_timeline.png"), title),
        plot_peak_vs_length(rows, stem.with_name(stem.name + "_peak.png")),
    ]
