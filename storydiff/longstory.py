"""Long stories: sliding-window consistency with memory-bounded, chunked denoising and resume.

The scheme (what ``storydiff generate --mode window`` runs):

* All frames advance together, one denoising step at a time; the UNet sees one chunk of ``chunk_size``
  consecutive frames at a time. The latents of the frames not in the UNet wait in host memory (64 KiB a
  frame at 1024²), their text conditioning is encoded again when their chunk comes, and every chunk has
  its own copy of the scheduler (schedulers keep per-step state). So GPU memory depends on the chunk size
  and the window, not on the story length.
* Consistency: in every consistent layer a frame that shows a character attends to its own tokens plus the
  sampled tokens (K/V, drawn per step, level and frame) of the frames within ``window`` of it that also
  show one ([NC] frames neither read nor offer tokens).
* Chunk boundaries: a chunk sees a neighbour outside it only if that neighbour's chunk was already computed
  at the current step; its sampled K/V wait in a cache that holds just the current step and just the frames
  some pending frame can still read (at most ``window`` frames per boundary). A neighbour not yet computed
  at this step is not seen at all: nothing from the previous step is kept, so no state crosses a step
  boundary and a checkpoint needs only latents and scheduler state. To keep the missing side from always
  being the same, the chunks are swept forward on even steps and backward on odd steps, so each boundary
  frame sees both sides on alternate steps.
* Key property (tested): with ``chunk_size >= frames`` there is one chunk per step and the computation is
  exactly the unchunked one.
* Resume: every ``checkpoint_every`` steps the latents, the schedulers, the step and the RNG state are
  written atomically to ``checkpoint.pt`` with a fingerprint of the run (prompts, seeds, settings, config,
  model); a resumed run checks the fingerprint and continues from the last checkpoint, producing the frames
  an uninterrupted run would. Frames are decoded and written one by one after the last step.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from .state import ConsistencyState

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "storydiff-longstory-v1"


def encode_chunk(pipe, prompts: list[str], negatives: list[str], cfg: bool, height: int, width: int):
    """UNet conditioning of a chunk's frames: (encoder_hidden_states, added_cond_kwargs or None), with the
    uncond half first under classifier-free guidance, exactly as the diffusers pipelines batch it."""
    from diffusers import StableDiffusionXLPipeline

    device = pipe._execution_device
    if not isinstance(pipe, StableDiffusionXLPipeline):
        cond, uncond = pipe.encode_prompt(prompts, device, 1, cfg, negatives)
        return (torch.cat([uncond, cond]) if cfg else cond), None
    cond, uncond, pooled, neg_pooled = pipe.encode_prompt(
        prompt=prompts,
        device=device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=cfg,
        negative_prompt=negatives,
    )
    proj = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else pooled.shape[-1]
    time_ids = pipe._get_add_time_ids(
        (height, width), (0, 0), (height, width), dtype=cond.dtype, text_encoder_projection_dim=proj
    ).to(device)
    if cfg:
        cond, pooled = torch.cat([uncond, cond]), torch.cat([neg_pooled, pooled])
    return cond, {"text_embeds": pooled, "time_ids": time_ids.repeat(len(pooled), 1)}


def fingerprint(**fields) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def save_checkpoint(path: Path, *, step: int, latents, schedulers, fingerprint_: str, summary: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "latents": latents,
            "schedulers": [{k: v for k, v in vars(s).items() if k != "_internal_dict"} for s in schedulers],
            "rng": torch.get_rng_state(),
            "fingerprint": fingerprint_,
            "summary": summary,
        },
        tmp,
    )
    os.replace(tmp, path)  # a kill during the write leaves the previous checkpoint intact


def load_checkpoint(path: Path, fingerprint_: str, summary: dict) -> dict:
    """Read and check a checkpoint; ValueError (never silently wrong frames) if corrupt or for another run."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)  # our own file: holds scheduler state
    except Exception as exc:
        raise ValueError(f"corrupt checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"corrupt checkpoint {path}: not a {CHECKPOINT_FORMAT} file")
    if data["fingerprint"] != fingerprint_:
        stored = data.get("summary", {})
        differing = sorted(k for k in set(stored) | set(summary) if stored.get(k) != summary.get(k))
        raise ValueError(
            f"checkpoint {path} was written for a different run (differs in: "
            f"{', '.join(differing) or 'prompts'}); resume with the same story, model and settings, "
            "or start a new output folder"
        )
    return data


def chunk_order(num_frames: int, chunk_size: int, step: int) -> list[tuple[int, int]]:
    """Chunks [start, stop) in sweep order: forward on even steps, backward on odd ones."""
    chunks = [(a, min(a + chunk_size, num_frames)) for a in range(0, num_frames, chunk_size)]
    return chunks if step % 2 == 0 else chunks[::-1]


def denoise_long_story(
    pipe,
    state: ConsistencyState,
    *,
    prompts: list[str],
    negatives: list[str],
    active: list[bool],
    seeds: list[int],
    num_inference_steps: int,
    guidance_scale: float,
    height: int | None,
    width: int | None,
    chunk_size: int,
    checkpoint_path: Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    run_summary: dict | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Denoise every frame; returns the final latents (host memory), frames in story order."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    device = pipe._execution_device
    unet = pipe.unet
    height = height or unet.config.sample_size * pipe.vae_scale_factor
    width = width or unet.config.sample_size * pipe.vae_scale_factor
    cfg = guidance_scale > 1
    num_frames = len(prompts)
    summary = {
        **(run_summary or {}),
        "prompts": prompts,
        "negatives": negatives,
        "seeds": seeds,
        "steps": num_inference_steps,
        "guidance": guidance_scale,
        "height": height,
        "width": width,
        "chunk_size": chunk_size,
        "consistency": state.config.to_dict(),
    }
    print_ = fingerprint(**summary)

    # Text conditioning is encoded per chunk when it is needed (a few ms against a UNet step) instead of
    # being kept for every frame: nothing the loop holds grows with the story but the latents.
    single_chunk = chunk_size >= num_frames
    kept = encode_chunk(pipe, prompts, negatives, cfg, height, width) if single_chunk else None
    pipe.scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = pipe.scheduler.timesteps
    chunks = chunk_order(num_frames, chunk_size, 0)
    schedulers = [copy.deepcopy(pipe.scheduler) for _ in chunks]  # per-chunk step state
    shape = (unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    dtype = unet.dtype
    # frame i's starting noise comes from seed i alone: independent of chunking and story length
    latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    latents = (latents * pipe.scheduler.init_noise_sigma).to(dtype)
    start_step = 0
    if resume and checkpoint_path is not None and checkpoint_path.exists():
        data = load_checkpoint(checkpoint_path, print_, summary)
        start_step, latents = data["step"], data["latents"]
        for scheduler, saved in zip(schedulers, data["schedulers"], strict=True):
            scheduler.__dict__.update(saved)
        torch.set_rng_state(data["rng"])

    state.begin_window(active)
    bar = tqdm(
        total=num_inference_steps, initial=start_step, desc="denoising (all frames)", disable=not progress
    )
    try:
        with torch.no_grad():
            for step in range(start_step, num_inference_steps):
                t = timesteps[step]
                state.set_step(step)
                for a, b in chunk_order(num_frames, chunk_size, step):
                    state.begin_chunk(a, b)
                    frames = slice(a, b)
                    lat = latents[frames].to(device)
                    model_in = torch.cat([lat, lat]) if cfg else lat
                    scheduler = schedulers[a // chunk_size]
                    model_in = scheduler.scale_model_input(model_in, t)
                    hidden, added = kept or encode_chunk(
                        pipe, prompts[frames], negatives[frames], cfg, height, width
                    )
                    noise = unet(
                        model_in, t, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False
                    )[0]
                    if cfg:
                        uncond, text = noise.chunk(2)
                        noise = uncond + guidance_scale * (text - uncond)
                    latents[frames] = scheduler.step(noise, t, lat, return_dict=False)[0].to(latents.device)
                    state.end_chunk()
                bar.update()
                done = step + 1
                if checkpoint_path is not None and checkpoint_every and done % checkpoint_every == 0:
                    save_checkpoint(
                        checkpoint_path,
                        step=done,
                        latents=latents,
                        schedulers=schedulers,
                        fingerprint_=print_,
                        summary=summary,
                    )
    finally:
        state.end()
        bar.close()
    return latents


def decode_frame(pipe, latent: torch.Tensor) -> Image.Image:
    """One frame's latent → PIL image, with SDXL's fp32 VAE upcast where its config asks for it."""
    vae = pipe.vae
    latent = latent[None].to(pipe._execution_device)
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    with torch.no_grad():
        if upcast:
            vae.to(torch.float32)
        image = vae.decode(latent.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        if upcast:
            vae.to(torch.float16)
    return pipe.image_processor.postprocess(image, output_type="pil")[0]
