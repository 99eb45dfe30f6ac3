"""How each model family takes one denoising step: starting noise, timesteps, conditioning, the denoiser
call with guidance, and decoding.

``LockstepDenoiser`` (lockstep.py) runs every story — bank mode (both schedules), window mode, checkpoints
and resume — through one of these, so those features work alike on every family. Each adapter follows its
diffusers pipeline's own ``__call__`` step for step (a story with consistency off gives the stock
pipeline's latents for the same prompts and seeds; tests check it for every family):

* unet (SD1.x/2.x, SDXL): CFG as [uncond; cond]; SDXL's pooled text and micro-conditioning ids.
* flux (FLUX.1): 2x2-packed latents; flow-matching sigmas shifted by the image's token count; guidance is
  an embedding (FLUX-dev is guidance-distilled), so the batch is just the frames (no CFG halves); text and
  image position ids for RoPE.
* sd3 (SD3/SD3.5): flow matching; CFG as [uncond; cond]; three text encoders, pooled projections.
* pixart (PixArt-Σ): T5 with its attention mask; CFG; learned sigma (the first half of the output).

Not carried over from the stock pipelines: FLUX's "true CFG" (a second pass with a negative prompt),
SD3's skip-layer guidance and PixArt's resolution binning (the size asked for is the size generated).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .compat import (
    execution_device,
    flux_image_ids,
    flux_pack,
    flux_shift,
    flux_unpack,
    sdxl_time_ids,
)
from .ip_adapter import SUPPORTED


class Family:
    """The UNet text-to-image pipelines; the base of the transformer families below."""

    name = "unet"
    #: what height and width must be multiples of (VAE factor, times patching for transformers)
    multiple = 8
    #: reference images (an IP-Adapter, ``ip_adapter.py``) can condition this family's frames
    supports_reference_images = True

    def __init__(self, pipe) -> None:
        self.pipe = pipe

    @property
    def device(self) -> torch.device:
        return execution_device(self.pipe)  # a property: model CPU offload may be enabled later

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def default_size(self) -> int:
        """The model's native image side in pixels."""
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    def uses_cfg_batch(self, guidance_scale: float) -> bool:
        """Whether guidance doubles the batch as [uncond frames; cond frames]."""
        return guidance_scale > 1

    def check_size(self, height: int, width: int) -> None:
        for name, value in (("height", height), ("width", width)):
            if value % self.multiple:
                raise ValueError(
                    f"{name} must be a multiple of {self.multiple} pixels for {self.name} models, got {value}"
                )

    # -- one story --------------------------------------------------------------------------------------
    def noise_shape(self, height: int, width: int) -> tuple[int, ...]:
        """One frame's starting noise, as the stock pipeline draws it for one image."""
        scale = self.pipe.vae_scale_factor
        return (self.denoiser.config.in_channels, height // scale, width // scale)

    def initial_latents(self, noise: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(frames, ...) latents the denoiser steps on, from (frames, *noise_shape) noise."""
        return noise * self.pipe.scheduler.init_noise_sigma

    def set_timesteps(self, scheduler, steps: int, height: int, width: int) -> torch.Tensor:
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler.timesteps

    def encode(self, prompts: list[str], negatives: list[str], cfg: bool, height: int, width: int):
        """Conditioning of some frames (the uncond half first under CFG), for ``predict``."""
        from diffusers import StableDiffusionXLPipeline

        pipe = self.pipe
        if not isinstance(pipe, StableDiffusionXLPipeline):
            cond, uncond = pipe.encode_prompt(prompts, self.device, 1, cfg, negatives)
            return (torch.cat([uncond, cond]) if cfg else cond), None
        cond, uncond, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompts,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=cfg,
            negative_prompt=negatives,
        )
        time_ids = sdxl_time_ids(pipe, height, width, cond.dtype, pooled.shape[-1]).to(self.device)
        if cfg:
            cond, pooled = torch.cat([uncond, cond]), torch.cat([neg_pooled, pooled])
        return cond, {"text_embeds": pooled, "time_ids": time_ids.repeat(len(pooled), 1)}

    def image_mask_size(self, height: int, width: int) -> tuple[int, ...]:
        """The shape of one frame's IP-Adapter mask per image (``ip_adapter.ReferenceImages.chunk``): the
        latent grid, whose aspect ratio diffusers' mask downsampling reads."""
        return (height // self.pipe.vae_scale_factor, width // self.pipe.vae_scale_factor)

    def with_reference_images(self, conditioning, image_embeds: list, masks: list):
        """``conditioning`` (from ``encode``) plus IP-Adapter inputs for the same frames: diffusers' UNet
        takes the image embeddings with the added conditions and the masks as a cross-attention kwarg."""
        hidden, added = conditioning
        return hidden, {**(added or {}), "image_embeds": image_embeds}, {"ip_adapter_masks": masks}

    def predict(self, scheduler, latents, t, conditioning, guidance_scale: float, cfg: bool) -> torch.Tensor:
        """The guided model output for ``latents`` (a batch of frames) at timestep ``t``."""
        model_in = torch.cat([latents, latents]) if cfg else latents
        model_in = scheduler.scale_model_input(model_in, t)
        hidden, added, *images = conditioning  # images: cross-attention kwargs of reference images
        out = self.pipe.unet(
            model_in,
            t,
            encoder_hidden_states=hidden,
            added_cond_kwargs=added,
            cross_attention_kwargs=images[0] if images else None,
            return_dict=False,
        )[0]
        return guide(out, guidance_scale) if cfg else out

    def decode(self, latent: torch.Tensor, height: int, width: int) -> Image.Image:
        """One frame's final latent → PIL image (SDXL's fp32 VAE upcast where its config asks for it)."""
        vae = self.pipe.vae
        latent = latent[None].to(self.device)
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        with torch.no_grad():
            if upcast:
                vae.to(torch.float32)
            image = vae.decode(self._to_vae(latent, height, width).to(vae.dtype), return_dict=False)[0]
            if upcast:
                vae.to(torch.float16)
        return self.pipe.image_processor.postprocess(image, output_type="pil")[0]

    def _to_vae(self, latent: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return latent / self.pipe.vae.config.scaling_factor


def guide(out: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance on an [uncond; cond] output."""
    uncond, cond = out.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def text_length(pipe, default: int, tokenizer: str) -> int:
    """The T5 sequence length the stock pipeline pads to, capped by its tokenizer's (tiny models: 77)."""
    return min(default, getattr(pipe, tokenizer).model_max_length)


class TransformerFamily(Family):
    """Diffusion transformers: the denoiser is ``pipe.transformer``, images are patched after the VAE."""

    supports_reference_images = False  # SD3's and PixArt's stories take no IP-Adapter (FLUX's do)

    def with_reference_images(self, conditioning, image_embeds, masks):
        raise ValueError(f"{SUPPORTED}, not {self.name} models")

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def multiple(self) -> int:
        return self.pipe.vae_scale_factor * self.denoiser.config.patch_size


class FluxFamily(TransformerFamily):
    name = "flux"

    @property
    def multiple(self) -> int:  # the VAE's factor times the 2x2 packing (the transformer's patch is 1)
        return self.pipe.vae_scale_factor * 2

    @property
    def default_size(self) -> int:
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    supports_reference_images = True  # on the double-stream blocks (ip_adapter.py)

    def uses_cfg_batch(self, guidance_scale: float) -> bool:
        return False  # guidance is an input of the transformer, not a second batch half

    def image_mask_size(self, height: int, width: int) -> tuple[int, ...]:
        return ()  # dit_processors.FluxMaskedIPAdapterProcessor: one number per frame and image

    def with_reference_images(self, conditioning, image_embeds, masks):
        """The transformer takes the image embeddings and our masked processors the masks as joint
        attention kwargs."""
        return *conditioning, {"ip_adapter_image_embeds": image_embeds, "ip_adapter_masks": masks}

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        scale = self.pipe.vae_scale_factor * 2
        return 2 * (height // scale), 2 * (width // scale)

    def noise_shape(self, height: int, width: int) -> tuple[int, ...]:
        return (self.denoiser.config.in_channels // 4, *self._grid(height, width))

    def initial_latents(self, noise: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return flux_pack(self.pipe, noise)

    def set_timesteps(self, scheduler, steps: int, height: int, width: int) -> torch.Tensor:
        grid_h, grid_w = self._grid(height, width)
        mu = flux_shift(scheduler, (grid_h // 2) * (grid_w // 2))
        if scheduler.config.get("use_flow_sigmas"):
            scheduler.set_timesteps(steps, device=self.device, mu=mu)
        else:  # the stock pipeline's sigmas, in float64 as numpy makes them
            sigmas = np.linspace(1.0, 1 / steps, steps)
            scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        return scheduler.timesteps

    def encode(self, prompts, negatives, cfg, height, width):
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.device,
            max_sequence_length=text_length(self.pipe, 512, "tokenizer_2"),
        )
        grid_h, grid_w = self._grid(height, width)
        image_ids = flux_image_ids(self.pipe, grid_h // 2, grid_w // 2, self.device, embeds.dtype)
        return embeds, pooled, text_ids, image_ids

    def predict(self, scheduler, latents, t, conditioning, guidance_scale, cfg):
        embeds, pooled, text_ids, image_ids, *images = conditioning  # images: with_reference_images'
        batch = latents.shape[0]
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full([batch], guidance_scale, device=latents.device, dtype=torch.float32)
        timestep = t.expand(batch).to(latents.dtype)
        return self.denoiser(
            hidden_states=latents,
            timestep=timestep / 1000,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            # a copy: the transformer pops the embeddings out of the dict it is given
            joint_attention_kwargs=dict(images[0]) if images else None,
            return_dict=False,
        )[0]

    def _to_vae(self, latent, height, width):
        config = self.pipe.vae.config
        return flux_unpack(self.pipe, latent, height, width) / config.scaling_factor + config.shift_factor


class SD3Family(TransformerFamily):
    name = "sd3"

    @property
    def default_size(self) -> int:
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    def initial_latents(self, noise, height, width):
        return noise  # flow matching starts from unit noise

    def set_timesteps(self, scheduler, steps, height, width):
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting"):
            patch, scale = self.denoiser.config.patch_size, self.pipe.vae_scale_factor
            kwargs["mu"] = flux_shift(scheduler, (height // scale // patch) * (width // scale // patch))
        scheduler.set_timesteps(steps, device=self.device, **kwargs)
        return scheduler.timesteps

    def encode(self, prompts, negatives, cfg, height, width):
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=cfg,
            negative_prompt=negatives,
            max_sequence_length=text_length(self.pipe, 256, "tokenizer_3"),
        )
        if cfg:
            embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
        return embeds, pooled

    def predict(self, scheduler, latents, t, conditioning, guidance_scale, cfg):
        embeds, pooled = conditioning
        model_in = torch.cat([latents, latents]) if cfg else latents
        out = self.denoiser(
            hidden_states=model_in,
            timestep=t.expand(model_in.shape[0]),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        return guide(out, guidance_scale) if cfg else out

    def _to_vae(self, latent, height, width):
        config = self.pipe.vae.config
        return latent / config.scaling_factor + config.shift_factor


class PixArtFamily(TransformerFamily):
    name = "pixart"

    @property
    def default_size(self) -> int:
        return self.denoiser.config.sample_size * self.pipe.vae_scale_factor

    def encode(self, prompts, negatives, cfg, height, width):
        embeds, mask, negative, negative_mask = self.pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=cfg,
            negative_prompt=negatives,
            device=self.device,
            max_sequence_length=text_length(self.pipe, 300, "tokenizer"),
        )
        if cfg:
            embeds, mask = torch.cat([negative, embeds]), torch.cat([negative_mask, mask])
        return embeds, mask

    def predict(self, scheduler, latents, t, conditioning, guidance_scale, cfg):
        embeds, mask = conditioning
        model_in = torch.cat([latents, latents]) if cfg else latents
        model_in = scheduler.scale_model_input(model_in, t)
        timestep = (t[None] if t.ndim == 0 else t).to(model_in.device).expand(model_in.shape[0])
        out = self.denoiser(
            model_in,
            encoder_hidden_states=embeds,
            encoder_attention_mask=mask,
            timestep=timestep,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )[0]
        if cfg:
            out = guide(out, guidance_scale)
        if self.denoiser.config.out_channels // 2 == latents.shape[1]:
            out = out.chunk(2, dim=1)[0]  # learned sigma: the noise prediction is the first half
        return out


def family_of(pipe) -> Family:
    """The step adapter for a diffusers text-to-image pipeline (ValueError for one we cannot drive)."""
    from diffusers import (
        FluxPipeline,
        PixArtSigmaPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    families = {
        StableDiffusionXLPipeline: Family,
        StableDiffusionPipeline: Family,
        FluxPipeline: FluxFamily,
        StableDiffusion3Pipeline: SD3Family,
        PixArtSigmaPipeline: PixArtFamily,
    }
    for cls, family in families.items():
        if isinstance(pipe, cls):
            return family(pipe)
    if isinstance(getattr(pipe, "unet", None), UNet2DConditionModel) and hasattr(pipe, "encode_prompt"):
        return Family(pipe)  # other UNet text-to-image pipelines with SD's encode_prompt
    raise ValueError(
        "stories run on StableDiffusionPipeline (SD1.x/2.x), StableDiffusionXLPipeline, FluxPipeline, "
        f"StableDiffusion3Pipeline and PixArtSigmaPipeline; got {type(pipe).__name__}"
    )
