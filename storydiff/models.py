"""Pipelines to run Consistent Self-Attention on: tiny offline ones for tests, real ones from disk or the hub.

``tiny-sdxl`` and ``tiny-sd15`` are built entirely in code with seeded random weights, because nothing can be
downloaded on the CPU machines. They keep the real block structure (which levels have attention, how many
transformer layers, two text encoders for SDXL, a VAE that downsamples by 8) at tiny widths, since our
attention processors pick layers by UNet level and token count; only the widths are shrunk.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

# Reserved model names, built offline with random weights. tiny-*: tiny widths (tests, demos).
# random-sdxl: the real SDXL UNet (2.6 B parameters, for memory and speed measurements on a GPU).
TINY_MODELS = ("tiny-sdxl", "tiny-sd15")
RESERVED_MODELS = (*TINY_MODELS, "random-sdxl")

__all__ = ["RESERVED_MODELS", "TINY_MODELS", "ModelLoadError", "build_tiny_pipeline", "load_pipeline"]

# CLIP's context length: prompt-truncation behaviour must match the real models.
_MAX_TOKENS = 77
# Latent side length; the pipelines' default image size is sample_size × vae_scale_factor = 128.
_SAMPLE_SIZE = 16


class ModelLoadError(RuntimeError):
    """A model name or path could not be loaded as a diffusers pipeline."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte → printable-character table used by byte-level BPE (same order as CLIP's vocab)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _tiny_clip_vocab() -> dict[str, int]:
    """CLIP's vocabulary without merges: every byte, as a word-inner and a word-final (``</w>``) token.

    With no merges, BPE splits each word into single bytes and suffixes the last one with ``</w>``, so these
    514 entries tokenize any text (punctuation, digits, non-ASCII) without falling back to ``unk``. The
    special tokens come last, as in the real vocabulary.
    """
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}


def _tiny_tokenizer() -> CLIPTokenizer:
    # transformers 5's CLIPTokenizer takes the vocabulary and merges directly, so nothing touches disk or hub.
    return CLIPTokenizer(vocab=_tiny_clip_vocab(), merges=[], model_max_length=_MAX_TOKENS)


def _text_config(
    tokenizer: CLIPTokenizer, hidden: int, *, act: str, projection_dim: int, layers: int = 2
) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=projection_dim,
        # Two layers by default: SDXL reads the penultimate hidden state, which should differ from the
        # embeddings in the tiny models' tests.
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=_MAX_TOKENS,
        hidden_act=act,
        # The pooled output is taken at the first eos token, so the ids must be the tokenizer's own.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _ddim_scheduler() -> DDIMScheduler:
    # StoryDiffusion's default sampler, with the SD/SDXL training noise schedule.
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def _tiny_vae(scaling_factor: float) -> AutoencoderKL:
    # Four blocks → three downsamplings → vae_scale_factor 8, as in every real SD/SDXL VAE.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=_SAMPLE_SIZE * 8,
        scaling_factor=scaling_factor,
    )


def _build_tiny_sdxl(device: torch.device) -> StableDiffusionXLPipeline:
    tokenizer, tokenizer_2 = _tiny_tokenizer(), _tiny_tokenizer()
    # Real SDXL: CLIP-L (768, quick_gelu) + OpenCLIP bigG (1280, gelu, projected pooled output); the UNet's
    # cross-attention width is their concatenation. Unequal tiny widths keep a swapped order detectable.
    hidden_1, hidden_2 = 32, 64
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden_1, act="quick_gelu", projection_dim=hidden_1))
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(tokenizer_2, hidden_2, act="gelu", projection_dim=hidden_2)
    )
    time_embed_dim = 8  # per micro-conditioning scalar; SDXL has 6 (original size, crop, target size)
    unet = UNet2DConditionModel(
        sample_size=_SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        # diffusers' legacy name: this is the number of heads (real SDXL: 5, 10, 20 heads of dim 64).
        attention_head_dim=(2, 4, 4),
        # Real SDXL: (1, 2, 10); the deepest level keeps more layers than the middle one.
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=hidden_1 + hidden_2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + hidden_2,
        norm_num_groups=8,
    )
    vae = _tiny_vae(scaling_factor=0.13025)
    return _sdxl_pipeline(unet, text_encoder, text_encoder_2, vae, (tokenizer, tokenizer_2))


def _sdxl_pipeline(unet, text_encoder, text_encoder_2, vae, tokenizers) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        scheduler=_ddim_scheduler(),
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
        # The watermark would depend on an optional package being installed and alter outputs.
        add_watermarker=False,
    )


def _build_tiny_sd15(device: torch.device) -> StableDiffusionPipeline:
    tokenizer = _tiny_tokenizer()
    hidden = 32  # real SD1.5: CLIP-L, 768
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden, act="quick_gelu", projection_dim=hidden))
    unet = UNet2DConditionModel(
        sample_size=_SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        # Number of heads, constant across levels as in real SD1.5 (8 heads, dims 40/80/160).
        attention_head_dim=2,
        cross_attention_dim=hidden,
        norm_num_groups=8,
    )
    return StableDiffusionPipeline(
        vae=_tiny_vae(scaling_factor=0.18215),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (architecture only; weights stay random).
# "attention_head_dim" is diffusers' legacy name for the number of heads: 320/5 = 640/10 = 1280/20 = 64.
SDXL_UNET_CONFIG = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}


def _build_random_sdxl(device: torch.device) -> StableDiffusionXLPipeline:
    """The real SDXL UNet (random weights) with one-layer text encoders of SDXL's widths and a tiny VAE.

    For memory and speed measurements of the UNet without a download: the UNet, its activations and the
    consistent-attention banks have their real sizes; text encoding and VAE decoding are nearly free.
    """
    tokenizer, tokenizer_2 = _tiny_tokenizer(), _tiny_tokenizer()
    with torch.device(device):  # build the 2.6 B parameters where they will run
        text_encoder = CLIPTextModel(
            _text_config(tokenizer, 768, act="quick_gelu", projection_dim=768, layers=1)
        )
        text_encoder_2 = CLIPTextModelWithProjection(
            _text_config(tokenizer_2, 1280, act="gelu", projection_dim=1280, layers=1)
        )
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
        vae = _tiny_vae(scaling_factor=0.13025)
    return _sdxl_pipeline(unet, text_encoder, text_encoder_2, vae, (tokenizer, tokenizer_2))


_TINY_BUILDERS = {
    "tiny-sdxl": _build_tiny_sdxl,
    "tiny-sd15": _build_tiny_sd15,
    "random-sdxl": _build_random_sdxl,
}


def build_tiny_pipeline(
    name: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    progress_bar: bool = True,
    device: str | torch.device = "cpu",
) -> DiffusionPipeline:
    """Build ``tiny-sdxl`` or ``tiny-sd15`` offline with random weights; the same seed gives the same weights.

    Weights are initialised in float32 and then cast, so a seed names the same model in every dtype.
    ``progress_bar=False`` silences this pipeline's progress bar (global logging is left alone).
    """
    if name not in _TINY_BUILDERS:
        raise ValueError(f"unknown reserved model {name!r}; choose from {RESERVED_MODELS}")
    # A private RNG stream: seeding must not disturb the caller's global torch RNG.
    device = torch.device(device)
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        pipe = _TINY_BUILDERS[name](device)
    return finish_random_pipeline(pipe, dtype, progress_bar)


def finish_random_pipeline(
    pipe: DiffusionPipeline, dtype: torch.dtype, progress_bar: bool
) -> DiffusionPipeline:
    """Cast a pipeline built in float32 (so a seed names the same weights in every dtype) to ``dtype``."""
    if dtype != torch.float32:
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                # Not ModelMixin.to: in diffusers 0.42 it warns about modules to keep in float32 even when
                # there are none, as for these models.
                torch.nn.Module.to(component, dtype=dtype)
    if not progress_bar:
        pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_text_to_image(pipe: Any, model: str) -> None:
    unet = getattr(pipe, "unet", None)
    text_encoder = getattr(pipe, "text_encoder", None)
    if not isinstance(unet, UNet2DConditionModel) or text_encoder is None:
        got = type(pipe).__name__
        raise ValueError(
            f"{model!r} is not a UNet2DConditionModel text-to-image pipeline (got {got}): Consistent "
            "Self-Attention needs a pipeline with a `unet` (UNet2DConditionModel) and a `text_encoder`, "
            "such as Stable Diffusion 1.x/2.x or SDXL"
        )


def looks_like_local_path(model: str) -> bool:
    # Hub ids are "name" or "org/name" and never start like this, so these can only mean a local path.
    return model.startswith(("/", ".", "~")) or os.path.isabs(model) or os.path.exists(model)


def load_pipeline(
    model: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    progress_bar: bool = True,
) -> DiffusionPipeline:
    """Load a UNet text-to-image pipeline (tiny name, local path or hub id) and move it to ``device``.

    ``dtype`` defaults to float16 on CUDA and float32 elsewhere. ``seed`` only matters for the tiny models
    (their random weights). Raises ``ModelLoadError`` when loading fails and ``ValueError`` when the loaded
    pipeline has no ``UNet2DConditionModel`` or no text encoder.
    """
    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    if model in RESERVED_MODELS:
        pipe = build_tiny_pipeline(model, seed=seed, dtype=dtype, progress_bar=progress_bar, device=device)
    else:
        offline_hint = f"(for offline use, the built-in random-weight models {', '.join(TINY_MODELS)} exist)"
        if looks_like_local_path(model) and not os.path.exists(os.path.expanduser(model)):
            # Caught here so that a mistyped path never turns into a hub request.
            raise ModelLoadError(f"cannot load model {model!r}: local path does not exist {offline_hint}")
        try:
            pipe = DiffusionPipeline.from_pretrained(os.path.expanduser(model), torch_dtype=dtype)
        except Exception as exc:
            raise ModelLoadError(
                f"cannot load model {model!r} as a diffusers pipeline: {type(exc).__name__}: {exc} "
                f"{offline_hint}"
            ) from exc
        _check_text_to_image(pipe, model)
        if not progress_bar:
            pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
