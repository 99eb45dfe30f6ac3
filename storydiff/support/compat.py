"""The private diffusers and transformers details this project relies on, in one place.

diffusers keeps a few things we need behind underscore names (the device a pipeline runs on, SDXL's
micro-conditioning ids, SVD's image embedding). Every use goes through here, so a diffusers release that
renames one breaks one small module, not the pipeline, the long-story loop and the video stage. Tested with
the diffusers range stated in ``setup.py``.
"""

from __future__ import annotations

import logging
import re

import torch
import transformers


class _TorchvisionFallbackFilter(logging.Filter):
    """Drops transformers 5's one "`XImageProcessor` requires torchvision (not installed); falling back to
    `XImageProcessorPil`" line, and nothing else."""

    FALLBACK = re.compile(
        r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+Pil`"
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.FALLBACK.match(record.getMessage())


def _resolve_image_processors_quietly(*names: str) -> None:
    """Resolve the image processor classes diffusers' pipelines import (CLIP's, SigLIP's) once, quietly.

    Without torchvision (no CPU build on our machines) transformers 5 falls back to the PIL class on the
    first ``from transformers import CLIPImageProcessor`` and logs a warning, so every ``import storydiff``
    path that reaches a diffusers pipeline printed it. The fallback is cached on the module, so diffusers'
    own import later finds it without a word; the fallback is what we use anyway
    (``clip_image_processor_class``).
    """
    from transformers.utils import import_utils, is_torchvision_available

    if is_torchvision_available():
        return
    quiet = _TorchvisionFallbackFilter()
    import_utils.logger.addFilter(quiet)
    try:
        for name in names:
            getattr(transformers, name, None)
    finally:
        import_utils.logger.removeFilter(quiet)


_resolve_image_processors_quietly("CLIPImageProcessor", "SiglipImageProcessor")


def execution_device(pipe) -> torch.device:
    """The device a diffusers pipeline runs its models on (respects model CPU offload)."""
    return pipe._execution_device


def sdxl_time_ids(pipe, height: int, width: int, dtype: torch.dtype, pooled_dim: int) -> torch.Tensor:
    """SDXL's (1, 6) micro-conditioning ids for an uncropped ``height`` x ``width`` image, as its pipeline
    computes them for a plain text-to-image call (``pooled_dim``: the pooled text embedding's width, used
    when the pipeline has no second text encoder)."""
    encoder_2 = pipe.text_encoder_2
    projection = encoder_2.config.projection_dim if encoder_2 is not None else pooled_dim
    return pipe._get_add_time_ids(
        (height, width), (0, 0), (height, width), dtype=dtype, text_encoder_projection_dim=projection
    )


def svd_image_embedding(pipe, image) -> torch.Tensor:
    """(1, 1, C) CLIP image embedding exactly as Stable Video Diffusion conditions on it (its own resize
    to 224² and CLIP normalisation), without classifier-free guidance doubling."""
    return pipe._encode_image(
        image, execution_device(pipe), num_videos_per_prompt=1, do_classifier_free_guidance=False
    )


def progress_bar_config(pipe) -> dict:
    """A copy of the keyword arguments a diffusers pipeline passes to its tqdm bars: set with the public
    ``set_progress_bar_config``, which replaces them all, but readable only from a private attribute."""
    return dict(getattr(pipe, "_progress_bar_config", {}))


def clip_image_processor_class() -> type:
    """CLIP's PIL-based image processor class.

    transformers 5 splits CLIP preprocessing into a torchvision backend and a PIL one; the default class
    warns and falls back when torchvision is missing (there is no CPU build of torchvision on our
    machines). transformers 4 only has the PIL-based ``CLIPImageProcessor``.
    """
    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype keyword: ``dtype`` where diffusers has it (it deprecated ``torch_dtype``
    and warns on every load), ``torch_dtype`` on older releases."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def flux_qkv_projections(attn, hidden_states, encoder_hidden_states=None):
    """FLUX attention's q, k, v (and the text stream's, or None) as its own processor computes them,
    fused projections included."""
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    return _get_qkv_projections(attn, hidden_states, encoder_hidden_states)


# -- FLUX: latent packing and position ids (static helpers of FluxPipeline) -------------------------------


def flux_pack(pipe, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents → (B, h/2 · w/2, 4C) packed 2x2 patches, as FluxPipeline packs its noise."""
    batch, channels, height, width = latents.shape
    return pipe._pack_latents(latents, batch, channels, height, width)


def flux_unpack(pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Packed latents of a ``height`` x ``width`` (pixels) image → (B, C, h, w)."""
    return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)


def flux_image_ids(pipe, rows: int, cols: int, device, dtype: torch.dtype) -> torch.Tensor:
    """(rows·cols, 3) RoPE ids (0, row, col) of the packed image tokens."""
    return pipe._prepare_latent_image_ids(1, rows, cols, device, dtype)


def flux_shift(scheduler, image_tokens: int) -> float:
    """The flow-matching sigma shift ``mu`` FLUX (and dynamic-shift SD3) derive from the image's token
    count and the scheduler's config."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = scheduler.config
    return calculate_shift(
        image_tokens,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
