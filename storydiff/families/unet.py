"""The UNet family: SD1.x/2.x and SDXL (``UNet2DConditionModel``).

* Consistency: the self-attention (``attn1``) of the up blocks by default — the official code's choice.
  Levels by block depth (VAE factor 8 × 2^depth); presets "default" = "up", "up+mid", "all". Image-only
  self-attention: ``ConsistentAttnProcessor`` (diffusers' ``AttnProcessor2_0`` math around the state's
  attention). No RoPE.
* Step: CFG as one [uncond; cond] batch; SDXL's pooled text and micro-conditioning ids. Setting
  ``cfg_passes = 2`` (tests only, e.g. on a subclass) runs it as two calls instead, cond then uncond, each
  on the frames with their half of the same conditioning: how Qwen-Image and Wan guide, on a model that
  runs offline.
* Reference images through diffusers' UNet IP-Adapter (masks per image); DDIM + FreeU apply (the official
  app's sampler); whole single-file checkpoints (UNet, VAE and text encoders).
* Offline models: ``tiny-sdxl``, ``tiny-sd15``, ``random-sdxl`` (``tiny_models.py``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import ClassVar

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

from ..consistency.cross_attention_masks import install_subject_recorder, remove_subject_recorder
from ..consistency.install import Host
from ..consistency.processors import ConsistentAttnProcessor
from ..support.compat import sdxl_time_ids
from .base import Family, guide, phrase_columns
from .reserved import TEXT_TO_IMAGE

_UNET_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^mid_block\.")


class UNetFamily(Family):
    name = "unet"
    title = "SD1.x/2.x, SDXL"
    pipelines = (StableDiffusionPipeline, StableDiffusionXLPipeline)
    denoiser_class = UNet2DConditionModel
    denoiser_attribute = "unet"
    reserved = TEXT_TO_IMAGE
    records_subject_masks = True
    supports_reference_images = True
    official_sampler = True
    official_variants = True
    single_file = "whole"
    #: the original checkpoints' key prefixes that tell SDXL from SD1.x/2.x (their text encoders), and the
    #: prefix of the UNet's weights
    single_file_layouts: ClassVar[dict[str, type]] = {
        "conditioner.embedders.": StableDiffusionXLPipeline,
        "cond_stage_model.": StableDiffusionPipeline,
    }
    single_file_unet_prefix = "model.diffusion_model."

    @classmethod
    def drives(cls, pipe) -> bool:
        if isinstance(pipe, cls.pipelines):
            return True
        # other UNet text-to-image pipelines with SD's encode_prompt
        return isinstance(getattr(pipe, "unet", None), UNet2DConditionModel) and hasattr(
            pipe, "encode_prompt"
        )

    @classmethod
    def host(cls, denoiser) -> Host:
        num_levels = len(denoiser.config.block_out_channels)

        def level(name: str) -> int | None:
            """Downsampling factor of a self-attention layer's block (VAE factor 8 × 2^depth)."""
            match = _UNET_BLOCK.match(name)
            if match is None or ".attn1." not in name:
                return None
            if name.startswith("mid_block."):
                depth = num_levels - 1
            elif match.group(1) == "down_blocks":
                depth = int(match.group(2))
            else:
                depth = num_levels - 1 - int(match.group(2))
            return 8 * 2**depth

        def up(name: str) -> bool:
            return name.startswith("up_blocks.")

        presets = {
            "default": up,
            "up": up,
            "up+mid": lambda name: name.startswith(("up_blocks.", "mid_block.")),
            "all": lambda name: True,
        }
        return Host(cls.name, denoiser, presets, level, lambda name: ConsistentAttnProcessor)

    @property
    def default_size(self) -> int:
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    def subject_token_columns(self, prompt: str, phrase: str) -> list[int]:
        """Columns of ``phrase`` among the cross-attention keys: CLIP's tokens of the prompt, BOS at 0,
        padded to the tokenizer's length (77). SDXL's second tokenizer is the same BPE over the same
        vocabulary (only its padding token differs), so it puts the phrase at the same positions: the
        first tokenizer's positions are those of the concatenated embeddings too."""
        if not phrase:
            return []
        tokenizer = self.pipe.tokenizer
        return phrase_columns(tokenizer, prompt, phrase, tokenizer.model_max_length)

    def record_subjects(self, state, recorder) -> Callable[[], None]:
        """The recorder's processor on every cross-attention (``attn2``, where the prompt's tokens are
        keys): ``SubjectRecordingProcessor`` on stock processors, an ``IPAdapterRecordingProcessor`` around
        each IP-Adapter processor (its output unchanged; recorded over the text keys, which its text softmax
        sees). Any other processor there is refused (ValueError): the pipeline tries this once before the
        output folder exists."""
        replaced = install_subject_recorder(self.pipe.unet, recorder)
        return lambda: remove_subject_recorder(self.pipe.unet, replaced)

    def encode(self, prompts: list[str], negatives: list[str], cfg: bool, height: int, width: int):
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
        """The latent grid, whose aspect ratio diffusers' mask downsampling reads."""
        return (height // self.pipe.vae_scale_factor, width // self.pipe.vae_scale_factor)

    def with_reference_images(self, conditioning, image_embeds: list, masks: list):
        """diffusers' UNet takes the image embeddings with the added conditions and the masks as a
        cross-attention kwarg."""
        hidden, added = conditioning
        return hidden, {**(added or {}), "image_embeds": image_embeds}, {"ip_adapter_masks": masks}

    def predict(self, scheduler, latents, t, conditioning, guidance_scale: float, cfg: bool) -> torch.Tensor:
        if cfg and self.cfg_passes == 2:
            model_in = scheduler.scale_model_input(latents, t)
            return self.guided_passes(
                lambda group: self._unet(model_in, t, cfg_half(conditioning, group)), guidance_scale
            )
        model_in = torch.cat([latents, latents]) if cfg else latents
        model_in = scheduler.scale_model_input(model_in, t)
        out = self._unet(model_in, t, conditioning)
        return guide(out, guidance_scale) if cfg else out

    def _unet(self, model_in: torch.Tensor, t, conditioning) -> torch.Tensor:
        hidden, added, *images = conditioning  # images: cross-attention kwargs of reference images
        return self.pipe.unet(
            model_in,
            t,
            encoder_hidden_states=hidden,
            added_cond_kwargs=added,
            cross_attention_kwargs=images[0] if images else None,
            return_dict=False,
        )[0]


def cfg_half(conditioning, group: int):
    """CFG group ``group``'s half of [uncond; cond] conditioning from ``UNetFamily.encode`` (and
    ``with_reference_images``): every tensor in it is stacked along its first dimension."""
    if isinstance(conditioning, torch.Tensor):
        return conditioning.chunk(2)[group]
    if isinstance(conditioning, dict):
        return {key: cfg_half(value, group) for key, value in conditioning.items()}
    if isinstance(conditioning, (list, tuple)):
        return type(conditioning)(cfg_half(value, group) for value in conditioning)
    return conditioning
