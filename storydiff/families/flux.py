"""The FLUX.1 family (``FluxPipeline``, ``FluxTransformer2DModel``).

* Consistency: the single-stream blocks by default, where FLUX consistency work shares image tokens
  ("double" adds the double-stream ones). Text and image form one joint sequence: only image tokens are
  offered to other frames, and only image queries read them (``FluxConsistentProcessor``). RoPE: borrowed
  keys carry their source frame's rotation unless ``ConsistencyConfig.rope`` moves them (``rope.py``).
* Step: 2x2-packed latents; flow-matching sigmas shifted by the image's token count; guidance is an
  embedding (FLUX-dev is guidance-distilled), so the batch is just the frames (no CFG halves); text and
  image position ids for RoPE. FLUX's "true CFG" (a second pass with a negative prompt) is not carried over.
* Reference images: diffusers' FLUX IP-Adapter on the double-stream blocks, its processors swapped for
  masked ones (``FluxMaskedIPAdapterProcessor``, same weights); single files hold the transformer only.
* Offline models: ``tiny-flux``, ``random-flux`` (``tiny_models.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

from ..consistency.install import Host
from ..consistency.rope import RotaryProcessor, Rotation, shift_ids
from ..support.compat import flux_image_ids, flux_pack, flux_qkv_projections, flux_shift, flux_unpack
from .base import TransformerFamily, observe_subjects, phrase_columns, text_length
from .reserved import FLUX


class FluxFamily(TransformerFamily):
    name = "flux"
    title = "FLUX.1"
    pipelines = (FluxPipeline,)
    denoiser_class = FluxTransformer2DModel
    reserved = FLUX
    records_subject_masks = True
    single_file = "transformer"
    ip_encoder_argument = "image_encoder_pretrained_model_name_or_path"

    @classmethod
    def host(cls, denoiser) -> Host:
        def single(name: str) -> bool:
            return name.startswith("single_transformer_blocks.")

        def level(name: str) -> int | None:
            # one token grid: the VAE's 8x and the 2x2 latent packing
            return 16 if name.endswith(".attn.processor") else None

        presets = {
            "default": single,
            "single": single,
            "double": lambda name: name.startswith("transformer_blocks."),
            "all": lambda name: True,
        }
        # the transformer's own position embedder: rope="shift" rotates borrowed keys by its offset ids
        options = {"pos_embed": denoiser.pos_embed}
        return Host(
            cls.name,
            denoiser,
            presets,
            level,
            lambda name: FluxConsistentProcessor,
            rope=True,
            options=options,
        )

    @property
    def multiple(self) -> int:  # the VAE's factor times the 2x2 packing (the transformer's patch is 1)
        return self.pipe.vae_scale_factor * 2

    supports_reference_images = True  # on the double-stream blocks (models/ip_adapter.py)

    def uses_cfg_batch(self, guidance_scale: float) -> bool:
        return False  # guidance is an input of the transformer, not a second batch half

    def image_mask_size(self, height: int, width: int) -> tuple[int, ...]:
        return ()  # FluxMaskedIPAdapterProcessor: one number per frame and image

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

    def subject_token_columns(self, prompt: str, phrase: str) -> list[int]:
        """Columns of ``phrase`` among the joint sequence's text tokens: the T5 tokens (``tokenizer_2``)
        that ``encode`` feeds as ``encoder_hidden_states``, no BOS, truncated to the sequence length it
        pads to (CLIP only gives the pooled vector, which has no columns)."""
        if not phrase:
            return []
        return phrase_columns(
            self.pipe.tokenizer_2, prompt, phrase, text_length(self.pipe, 512, "tokenizer_2")
        )

    def record_subjects(self, state, recorder) -> Callable[[], None]:
        return observe_subjects(state, recorder)

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

    def check_adapter_layers(self, ip_processors: tuple[type, ...]) -> None:
        """The IP-Adapter's processors must still be on the double-stream blocks (consistency installed
        there after loading the adapter replaces them)."""
        processors = self.denoiser.attn_processors
        double = [name for name in processors if name.startswith("transformer_blocks.")]
        if not all(isinstance(processors[name], ip_processors) for name in double):
            raise ValueError(
                "consistent attention replaced the IP-Adapter on FLUX's double-stream blocks; with an "
                "IP-Adapter use consistency on the single-stream blocks (layers='single', the default)"
            )

    def prepare_reference_images(self, ip_processors: tuple[type, ...]) -> None:
        """Swap diffusers' IP-Adapter processors (no masks) for the masked ones, same weights."""
        processors = dict(self.denoiser.attn_processors)
        swapped = False
        for name, processor in processors.items():
            if type(processor) in ip_processors:
                processors[name], swapped = FluxMaskedIPAdapterProcessor.replacing(processor), True
        if swapped:
            self.denoiser.set_attn_processor(processors)

    @torch.no_grad()
    def encode_reference(self, image, device):
        """No CFG batch: the image embedding, and zeros as the unused negative."""
        (embeds,) = self.pipe.prepare_ip_adapter_image_embeds([image], None, device, 1)  # (1, 1, *embed)
        return embeds[0, 0], torch.zeros_like(embeds[0, 0])


class FluxConsistentProcessor(RotaryProcessor):
    """For ``FluxAttention``: double-stream blocks (text tokens, then image tokens, concatenated before
    RoPE) and single-stream blocks (text already inside ``hidden_states``: its length comes from the
    state, which the transformer's forward pre-hook sets from ``encoder_hidden_states``).

    ``pos_embed`` (an option of the binding): the transformer's ``FluxPosEmbed``, which gives rope="shift"
    its offset rotation."""

    def shift_rotation(self, pos_embed) -> Rotation:
        """The rotation by rope="shift"'s position ids (``shift_ids``), from the host's own embedder."""
        return pos_embed(shift_ids(len(pos_embed.axes_dim)))

    @torch.compiler.disable  # see ConsistentAttnProcessor: the state's bookkeeping stays eager
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        from diffusers.models.embeddings import apply_rotary_emb

        binding = self.binding(attn)
        state, layer = binding.state, binding.layer
        if attention_mask is not None:
            raise ValueError(f"{layer.name}: consistent attention does not take an attention_mask")
        query, key, value, encoder_query, encoder_key, encoder_value = flux_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))  # B N H D
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:  # double-stream block: [text; image]
            encoder_query, encoder_key, encoder_value = (
                x.unflatten(-1, (-1, attn.head_dim)) for x in (encoder_query, encoder_key, encoder_value)
            )
            encoder_query, encoder_key = attn.norm_added_q(encoder_query), attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
            text = encoder_hidden_states.shape[1]
        else:
            text = state.text_tokens
            if text is None:
                raise RuntimeError(
                    f"{layer.name}: the text length of this single-stream block is unknown; run the "
                    "transformer with encoder_hidden_states (its forward hook records the length)"
                )
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        tokens = query.shape[1]
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, H, N, D) views
        reposition = self.reposition(binding, image_rotary_emb)
        out = state.attend(layer, q, k, v, image=(text, tokens), reposition=reposition)
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]],
                dim=1,
            )
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


class FluxMaskedIPAdapterProcessor(FluxIPAdapterAttnProcessor):
    """diffusers' FLUX IP-Adapter processor (double-stream blocks) with per-image masks, as the UNet's
    ``IPAdapterAttnProcessor2_0`` has: ``ip_hidden_states`` (B, slots, tokens, C) and ``ip_adapter_masks``
    (B, slots), so each frame adds ``scale · mask · attention`` per slot, and an empty slot exactly zero.

    diffusers' own processor attends to every image's tokens at once, with no masks; this one runs it for
    the text and image attention (no images given) and adds the image attention per slot, from the same
    query it uses: the image tokens' normalised query before RoPE (``to_q`` again: one extra projection)."""

    @classmethod
    def replacing(cls, processor) -> FluxMaskedIPAdapterProcessor:
        """This class with ``processor``'s weights, scales, device and dtype."""
        weight = processor.to_k_ip[0].weight
        masked = cls(
            hidden_size=processor.hidden_size,
            cross_attention_dim=processor.cross_attention_dim,
            num_tokens=[4] * len(processor.to_k_ip),  # unused: the projection decides the token count
            scale=list(processor.scale),
            device=weight.device,
            dtype=weight.dtype,
        )
        masked.load_state_dict(processor.state_dict())
        return masked

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        ip_hidden_states: list[torch.Tensor] | None = None,
        ip_adapter_masks: list[torch.Tensor] | None = None,
    ):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        outputs = super().__call__(
            attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, []
        )
        if encoder_hidden_states is None:
            return outputs
        if ip_hidden_states is None or ip_adapter_masks is None:
            raise ValueError(f"{type(self).__name__} needs ip_hidden_states and ip_adapter_masks")
        hidden, context, ip_output = outputs  # ip_output: zeros (no images given above)
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1)))
        batch = hidden_states.shape[0]
        for images, masks, scale, to_k, to_v in zip(
            ip_hidden_states, ip_adapter_masks, self.scale, self.to_k_ip, self.to_v_ip, strict=True
        ):
            for slot in range(images.shape[1]):
                key = to_k(images[:, slot]).view(batch, -1, attn.heads, attn.head_dim)
                value = to_v(images[:, slot]).view(batch, -1, attn.heads, attn.head_dim)
                out = dispatch_attention_fn(
                    query, key, value, backend=self._attention_backend, parallel_config=self._parallel_config
                )
                out = out.reshape(batch, -1, attn.heads * attn.head_dim).to(query.dtype)
                ip_output = ip_output + scale * (out * masks[:, slot, None, None].to(out.dtype))
        return hidden, context, ip_output
