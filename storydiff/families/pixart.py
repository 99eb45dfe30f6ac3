"""The PixArt-Σ family (``PixArtSigmaPipeline``, ``PixArtTransformer2DModel``).

* Consistency: every ``attn1``, image-only self-attention as in a UNet (``ConsistentAttnProcessor``).
* Step: T5 with its attention mask; CFG as one [uncond; cond] batch; learned sigma (the first half of the
  output). Resolution binning is not carried over (the size asked for is the size generated). No
  IP-Adapter, no single files.
* Offline model: ``tiny-pixart`` (``tiny_models.py``).
"""

from __future__ import annotations

import torch
from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel

from ..consistency.cross_attention_masks import install_subject_recorder, remove_subject_recorder
from ..consistency.install import Host
from ..consistency.processors import ConsistentAttnProcessor
from .base import TransformerFamily, guide, phrase_columns, text_length
from .reserved import PIXART


class PixArtFamily(TransformerFamily):
    name = "pixart"
    title = "PixArt-Σ"
    pipelines = (PixArtSigmaPipeline,)
    denoiser_class = PixArtTransformer2DModel
    reserved = PIXART
    records_subject_masks = True

    @classmethod
    def host(cls, denoiser) -> Host:
        patch = denoiser.config.patch_size

        def level(name: str) -> int | None:
            return 8 * patch if name.endswith(".attn1.processor") else None

        presets = {"default": lambda name: True, "all": lambda name: True}
        return Host(cls.name, denoiser, presets, level, lambda name: ConsistentAttnProcessor)

    @property
    def default_size(self) -> int:
        return self.denoiser.config.sample_size * self.pipe.vae_scale_factor

    def subject_token_columns(self, prompt: str, phrase: str) -> list[int]:
        """Columns of ``phrase`` among the cross-attention keys: the T5 tokens ``encode`` feeds, no BOS,
        truncated to the length it pads to (300, or the tokenizer's)."""
        if not phrase:
            return []
        return phrase_columns(self.pipe.tokenizer, prompt, phrase, text_length(self.pipe, 300, "tokenizer"))

    def record_subjects(self, state, recorder):
        """The recorder's processor on every block's cross-attention ``attn2`` (the T5 padding mask kept:
        the probability is normalised over the keys PixArt's softmax sees)."""
        replaced = install_subject_recorder(self.denoiser, recorder)
        return lambda: remove_subject_recorder(self.denoiser, replaced)

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
