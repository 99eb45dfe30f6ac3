"""The SD3 / SD3.5 family (``StableDiffusion3Pipeline``, ``SD3Transformer2DModel``).

* Consistency: every joint block and SD3.5's image-only ``attn2`` — one token grid, no levels to choose
  between. Joint attention puts image tokens first, the text stream's after (``SD3ConsistentProcessor``);
  no RoPE.
* Step: flow matching; CFG as one [uncond; cond] batch; three text encoders, pooled projections. SD3's
  skip-layer guidance is not carried over. Single files hold the transformer only. No IP-Adapter.
* Offline model: ``tiny-sd3`` (``tiny_models.py``).
"""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from ..consistency.install import Host
from ..consistency.processors import BoundProcessor, ConsistentAttnProcessor, head_projections
from ..support.compat import flux_shift
from .base import TransformerFamily, guide, observe_subjects, phrase_columns, text_length
from .reserved import SD3


class SD3Family(TransformerFamily):
    name = "sd3"
    title = "SD3/SD3.5"
    pipelines = (StableDiffusion3Pipeline,)
    denoiser_class = SD3Transformer2DModel
    reserved = SD3
    records_subject_masks = True
    single_file = "transformer"

    def subject_token_columns(self, prompt: str, phrase: str) -> list[int]:
        """Columns of ``phrase`` among the joint sequence's text tokens: SD3's text is CLIP's 77 tokens
        (CLIP-L and CLIP-G side by side, one BPE: the same positions) then T5's; the CLIP-L positions, BOS
        at 0, are where the phrase sits from the prompt's first token."""
        if not phrase:
            return []
        tokenizer = self.pipe.tokenizer
        return phrase_columns(tokenizer, prompt, phrase, tokenizer.model_max_length)

    def record_subjects(self, state, recorder):
        return observe_subjects(state, recorder)

    @classmethod
    def host(cls, denoiser) -> Host:
        patch = denoiser.config.patch_size

        def level(name: str) -> int | None:
            return 8 * patch if name.endswith((".attn.processor", ".attn2.processor")) else None

        def processor(name: str) -> type:
            # SD3.5's attn2 is image-only self-attention: the UNet processor's math applies as it is
            return ConsistentAttnProcessor if name.endswith(".attn2.processor") else SD3ConsistentProcessor

        presets = {"default": lambda name: True, "all": lambda name: True}
        return Host(cls.name, denoiser, presets, level, processor)

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


class SD3ConsistentProcessor(BoundProcessor):
    """For SD3/SD3.5 joint attention (``JointAttnProcessor2_0``'s math): image tokens first, the text
    stream's appended; with no text stream (SD3.5's dual ``attn2``) the whole sequence is image."""

    @torch.compiler.disable  # see ConsistentAttnProcessor: the state's bookkeeping stays eager
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ):
        binding = self.binding(attn)
        if attention_mask is not None:
            raise ValueError(f"{binding.layer.name}: consistent attention does not take an attention_mask")
        batch, image = hidden_states.shape[0], hidden_states.shape[1]
        query, key, value = head_projections(attn, hidden_states)
        head_dim = key.shape[-1]
        if encoder_hidden_states is not None:
            context = [
                proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
                for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            ]
            if attn.norm_added_q is not None:
                context[0] = attn.norm_added_q(context[0])
            if attn.norm_added_k is not None:
                context[1] = attn.norm_added_k(context[1])
            query = torch.cat([query, context[0]], dim=2)
            key = torch.cat([key, context[1]], dim=2)
            value = torch.cat([value, context[2]], dim=2)

        out = binding.state.attend(binding.layer, query, key, value, image=(0, image))
        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :image], hidden_states[:, image:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states
