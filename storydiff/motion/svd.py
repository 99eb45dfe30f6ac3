"""Stable Video Diffusion pipelines for transition videos: a tiny offline one, real ones from disk or hub.

``tiny-svd`` is built entirely in code with seeded random weights, because nothing can be downloaded on the
CPU machines. It keeps the parts of real SVD that our per-frame conditioning depends on — spatio-temporal
transformer blocks whose spatial cross-attention reads one CLIP image embedding per frame, a CLIP vision
encoder fed 224² images whose projected ``image_embeds`` width equals the UNet's cross-attention width, a VAE
that downsamples by 8 and SVD's EDM-style Euler scheduler — at tiny widths.
"""

from __future__ import annotations

import os

import torch
from diffusers import (
    AutoencoderKLTemporalDecoder,
    EulerDiscreteScheduler,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
)
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from ..models import finish_random_pipeline, looks_like_local_path

try:
    # transformers 5: the PIL/numpy backend; the default class would warn that torchvision is missing
    # (there is no CPU build of torchvision on our machines) and then fall back to this one anyway.
    from transformers import CLIPImageProcessorPil as _CLIPImageProcessor
except ImportError:  # transformers 4.x, where CLIPImageProcessor already is the PIL/numpy implementation
    from transformers import CLIPImageProcessor as _CLIPImageProcessor

__all__ = ["TINY_SVD", "SVDLoadError", "build_tiny_svd_pipeline", "load_svd_pipeline"]

TINY_SVD = "tiny-svd"

# Real SVD: OpenCLIP ViT-H/14 image embeds of width 1024 = the UNet's cross-attention width.
_EMBED_DIM = 32
# Real SVD's VAE downsamples by 8; so does the tiny one (four blocks), so a 64² video has 8² latents. 32 is
# the narrowest width: the temporal VAE hard-codes GroupNorm with 32 groups.
_VAE_CHANNELS = (32, 32, 32, 32)
# SVD always resizes the conditioning image to 224² for CLIP (pipeline._encode_image), so the tiny vision
# tower must accept 224² too; 32-pixel patches keep it at 49 tokens.
_CLIP_IMAGE_SIZE, _CLIP_PATCH = 224, 32
# Default video side: sample_size latents × 8.
_SAMPLE_SIZE = 8


class SVDLoadError(RuntimeError):
    """A model name or path could not be loaded as a Stable Video Diffusion pipeline."""


def _svd_scheduler() -> EulerDiscreteScheduler:
    # The scheduler config shipped with stabilityai/stable-video-diffusion-img2vid(-xt): v-prediction on
    # continuous (EDM) timesteps with Karras sigmas between 0.002 and 700.
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        interpolation_type="linear",
        use_karras_sigmas=True,
        sigma_min=0.002,
        sigma_max=700.0,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
    )


def _build_tiny_svd() -> StableVideoDiffusionPipeline:
    time_embed_dim = 8  # per added time id; SVD has three (fps, motion bucket, noise augmentation)
    unet = UNetSpatioTemporalConditionModel(
        sample_size=_SAMPLE_SIZE,
        in_channels=8,  # noisy latents + the conditioning image's latents, concatenated on channels
        out_channels=4,
        # Real SVD: three cross-attention levels, then a plain one; two levels keep both kinds here.
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=_EMBED_DIM,
        num_attention_heads=(2, 4),
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=3 * time_embed_dim,
        num_frames=8,
    )
    vae = AutoencoderKLTemporalDecoder(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(_VAE_CHANNELS),
        block_out_channels=_VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=4,
        sample_size=_SAMPLE_SIZE * 8,
    )
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            projection_dim=_EMBED_DIM,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=_CLIP_IMAGE_SIZE,
            patch_size=_CLIP_PATCH,
        )
    )
    feature_extractor = _CLIPImageProcessor(crop_size=_CLIP_IMAGE_SIZE, size=_CLIP_IMAGE_SIZE)
    return StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=_svd_scheduler(),
        feature_extractor=feature_extractor,
    )


def build_tiny_svd_pipeline(
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress_bar: bool = True,
) -> StableVideoDiffusionPipeline:
    """Build ``tiny-svd`` offline with random weights; the same seed gives the same weights.

    Runs a few denoising steps of a 64×64, 8-frame video on a CPU in about a second. Weights are initialised
    in float32 on the CPU and then cast and moved, so a seed names the same model on every device and dtype.
    """
    # A private RNG stream: building the model must not disturb the caller's global torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _build_tiny_svd()
    return finish_random_pipeline(pipe, dtype, progress_bar).to(torch.device(device))


def load_svd_pipeline(
    model: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    seed: int = 0,
    progress_bar: bool = True,
) -> StableVideoDiffusionPipeline:
    """Load Stable Video Diffusion: ``"tiny-svd"`` (offline, random weights), a local folder or a hub id.

    ``dtype`` defaults to float16 on CUDA and float32 elsewhere; ``seed`` only matters for ``tiny-svd``.
    Raises ``SVDLoadError`` naming the model when it cannot be loaded as a ``StableVideoDiffusionPipeline``.
    """
    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    if model == TINY_SVD:
        return build_tiny_svd_pipeline(seed, dtype=dtype, device=device, progress_bar=progress_bar)
    hint = f"(for offline use, the built-in random-weight model {TINY_SVD!r} exists)"
    path = os.path.expanduser(model)
    if looks_like_local_path(model) and not os.path.exists(path):
        # Caught here so that a mistyped path never turns into a hub request.
        raise SVDLoadError(f"cannot load SVD model {model!r}: local path does not exist {hint}")
    try:
        pipe = StableVideoDiffusionPipeline.from_pretrained(path, torch_dtype=dtype)
    except Exception as exc:
        raise SVDLoadError(
            f"cannot load SVD model {model!r} as a StableVideoDiffusionPipeline: {type(exc).__name__}: {exc} "
            f"{hint}"
        ) from exc
    if not progress_bar:
        pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
