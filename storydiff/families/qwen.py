"""The Qwen-Image family (``QwenImagePipeline``, ``QwenImageTransformer2DModel``).

* Consistency: every double-stream block by default (the transformer has no other kind). Text and image
  streams are projected apart and joined for attention; our processor (``QwenConsistentProcessor``) keeps
  the host's own math — projections, q/k norms, multi-axis RoPE on each stream — and joins them image first,
  so each frame's text padding ends its sequence: the op's ``key_lengths`` keep padded text keys out
  (prompts of different lengths share a batch). Only image tokens are offered to other frames and only
  image queries read them; text rows attend to their own frame. When a call borrows nothing (consistency
  off, warm-up, a skipped layer, rate 0) the processor is diffusers' own, bit for bit.
* Automatic subject masks: the processor hands the joint q, k to the state's observer on every call, those
  that borrow nothing included (``observe_subjects``); a character's description is found among the text
  keys through the chat template the pipeline wraps prompts in (``subject_token_columns``).
* RoPE: image tokens sit at (frame 0, h, w) in every frame of a story, like FLUX's; ``ConsistencyConfig.rope``
  moves borrowed keys to frame 1 ("shift", where Qwen-Image-Edit puts its extra images) or unrotates them
  ("none"); Qwen's rotation is a complex product per channel pair, which ``rope.rotate`` computes with
  (cos, sin) = (Re, Im).
* Step: 2x2-packed latents of a video VAE (one frame), flow-matching sigmas shifted by the image's token
  count, and true CFG as two transformer calls per step (cond, then uncond) with Qwen's norm rescale, the
  state told which pass runs. No IP-Adapter, no single files, no DDIM/FreeU.
* Offline model: ``tiny-qwen-image`` (``tiny_models.py``: a 2-layer Qwen2.5-VL text encoder and a
  byte-level tokenizer built in memory).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    apply_rotary_emb_qwen,
)

from ..consistency.install import Host
from ..consistency.rope import RotaryProcessor, Rotation
from ..consistency.state import ConsistencyState, LayerInfo
from ..support.compat import flux_pack, flux_shift, flux_unpack
from .base import TransformerFamily, observe_subjects, video_vae_decode

TINY = ("tiny-qwen-image",)


class QwenImageFamily(TransformerFamily):
    name = "qwen-image"
    title = "Qwen-Image"
    pipelines = (QwenImagePipeline,)
    denoiser_class = QwenImageTransformer2DModel
    reserved = TINY
    cfg_passes = 2  # true CFG: the transformer runs once for the prompts, once for the negatives
    records_subject_masks = True

    @classmethod
    def host(cls, denoiser) -> Host:
        def level(name: str) -> int | None:
            # one token grid: the VAE's 8x and the 2x2 packing (a key for ConsistencyConfig.level_rates)
            return 16 if name.endswith(".attn.processor") else None

        presets = {"default": lambda name: True, "all": lambda name: True}
        options = {"pos_embed": denoiser.pos_embed}
        return Host(
            cls.name,
            denoiser,
            presets,
            level,
            lambda name: QwenConsistentProcessor,
            rope=True,
            options=options,
        )

    @property
    def multiple(self) -> int:  # the VAE's factor times the 2x2 packing
        return self.pipe.vae_scale_factor * 2

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        scale = self.pipe.vae_scale_factor * 2
        return 2 * (height // scale), 2 * (width // scale)

    def noise_shape(self, height: int, width: int) -> tuple[int, ...]:
        return (1, self.denoiser.config.in_channels // 4, *self._grid(height, width))  # one video frame

    def initial_latents(self, noise: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return flux_pack(self.pipe, noise[:, 0])

    def set_timesteps(self, scheduler, steps: int, height: int, width: int) -> torch.Tensor:
        grid_h, grid_w = self._grid(height, width)
        sigmas = np.linspace(1.0, 1 / steps, steps)  # the stock pipeline's, in float64 as numpy makes them
        mu = flux_shift(scheduler, (grid_h // 2) * (grid_w // 2))
        scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        return scheduler.timesteps

    def encode(self, prompts, negatives, cfg, height, width):
        """The image grid for RoPE, then (embeddings, padding mask or None) per CFG group: [uncond, cond]
        under CFG (the negatives, the prompts), else just the prompts'."""
        grid_h, grid_w = self._grid(height, width)
        shapes = [[(1, grid_h // 2, grid_w // 2)]] * len(prompts)
        texts = [negatives, prompts] if cfg else [prompts]
        return shapes, *(self.pipe.encode_prompt(prompt=text, device=self.device) for text in texts)

    def subject_token_columns(self, prompt: str, phrase: str) -> list[int]:
        """Columns of ``phrase`` among the text keys the transformer gets for ``prompt``.

        ``encode_prompt`` wraps the prompt in the pipeline's chat template, tokenizes it (truncated to
        ``tokenizer_max_length`` plus the template's head), runs the text encoder and drops the first
        ``prompt_template_encode_start_idx`` outputs (the system prompt); ``encode`` keeps the rest, padding
        only at the end. So a column is a token's position in the templated ids minus that head.

        Not ``phrase_columns``: Qwen's byte-level BPE folds the space before a word into the word's token
        (" girl", not "girl"), so the description tokenized alone is not a run of the prompt's ids. The
        tokens are found by where they sit in the text instead (the tokenizer's offsets): every token
        overlapping the description's characters, at its first place in the prompt. [] when the prompt
        does not hold the description or truncation cut it off (the caller warns)."""
        if not phrase:
            return []
        pipe = self.pipe
        tokenizer = pipe.tokenizer
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"automatic subject masks on {self.title} need a tokenizer that reports token offsets "
                f"(a tokenizers-backed one), got {type(tokenizer).__name__}"
            )
        found = prompt.find(phrase)
        if found < 0:
            return []
        head, _ = pipe.prompt_template_encode.split("{}", 1)
        start = len(head) + found
        stop = start + len(phrase)
        dropped = pipe.prompt_template_encode_start_idx
        encoded = tokenizer(
            pipe.prompt_template_encode.format(prompt),
            max_length=pipe.tokenizer_max_length + dropped,  # as _get_qwen_prompt_embeds truncates
            truncation=True,
            return_offsets_mapping=True,
        )
        return [
            position - dropped
            for position, (first, last) in enumerate(encoded["offset_mapping"])
            if position >= dropped and first < stop and last > start and last > first
        ]

    def record_subjects(self, state, recorder) -> Callable[[], None]:
        """The recorder as the state's observer (``observe_subjects``): ``QwenConsistentProcessor`` hands it
        every call's joint q, k (image first, text keys after it, padding cut by ``key_lengths``); the
        negatives' pass of true CFG is skipped by the observer (``state.current_pass``)."""
        return observe_subjects(state, recorder)

    def predict(self, scheduler, latents, t, conditioning, guidance_scale, cfg):
        shapes, *groups = conditioning
        timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000

        def run(group: int) -> torch.Tensor:
            embeds, mask = groups[group]
            return self.denoiser(
                hidden_states=latents,
                timestep=timestep,
                guidance=None,
                encoder_hidden_states_mask=mask,
                encoder_hidden_states=embeds,
                img_shapes=shapes,
                return_dict=False,
            )[0]

        if not cfg:
            return run(0)
        cond, uncond = self.pass_outputs(run)  # the prompts' pass, then the negatives'
        combined = uncond + guidance_scale * (cond - uncond)
        # Qwen-Image's rescale: the guided prediction keeps the conditional one's norm per token
        cond_norm = torch.norm(cond, dim=-1, keepdim=True)
        return combined * (cond_norm / torch.norm(combined, dim=-1, keepdim=True))

    def decode(self, latent: torch.Tensor, height: int, width: int):
        latents = flux_unpack(self.pipe, latent[None].to(self.device), height, width)  # (1, C, 1, h, w)
        image = video_vae_decode(self.pipe.vae, latents)[:, :, 0]
        return self.pipe.image_processor.postprocess(image, output_type="pil")[0]


def _complex_rotation(freqs: torch.Tensor) -> Rotation:
    """Qwen's complex rotation rows (..., D/2) as (cos, sin) over interleaved channel pairs (..., D)."""
    return freqs.real.repeat_interleave(2, dim=-1).float(), freqs.imag.repeat_interleave(2, dim=-1).float()


class QwenConsistentProcessor(RotaryProcessor):
    """For ``QwenDoubleStreamAttnProcessor2_0``'s attention modules: the same math, image tokens first.

    ``pos_embed`` (an option of the binding): the transformer's ``QwenEmbedRope``, which gives rope="shift"
    its rotation to frame 1."""

    def __init__(
        self, state: ConsistencyState | None = None, layer: LayerInfo | None = None, pos_embed=None
    ) -> None:
        super().__init__(state, layer, pos_embed)
        self._stock = QwenDoubleStreamAttnProcessor2_0()

    def shift_rotation(self, pos_embed) -> Rotation:
        """Frame axis +1, height and width +0."""
        frame_pairs = pos_embed.axes_dim[0] // 2
        freqs = torch.ones(sum(pos_embed.axes_dim) // 2, dtype=pos_embed.pos_freqs.dtype)
        freqs[:frame_pairs] = pos_embed.pos_freqs[1, :frame_pairs].cpu()
        return tuple(x[None] for x in _complex_rotation(freqs))

    @torch.compiler.disable  # see ConsistentAttnProcessor: the state's bookkeeping stays eager
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        binding = self.binding(attn)
        state, layer = binding.state, binding.layer
        if attention_mask is not None or encoder_hidden_states is None:
            raise ValueError(
                f"{layer.name}: consistent attention takes the text stream and no attention_mask"
            )
        image = hidden_states.shape[1]
        key_lengths = None
        if encoder_hidden_states_mask is not None:  # image first: each frame's keys end with its text
            key_lengths = image + encoder_hidden_states_mask.sum(dim=1)
        if not state.borrows(layer):  # nothing to borrow in this call: the host's own math, bit for bit
            if state.observer is not None:
                # what state.attend would show it: automatic masks need these calls too (warm-up and
                # step 0 of a story borrow nothing, and their maps would stay empty), and the output
                # stays the stock processor's
                q, k, _, _ = self.joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
                state.observer(state, layer, q, k, (0, image), key_lengths)
            return self._stock(
                attn,
                hidden_states,
                encoder_hidden_states,
                encoder_hidden_states_mask,
                attention_mask,
                image_rotary_emb,
            )
        q, k, v, rotation = self.joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        reposition = self.reposition(binding, rotation)
        out = state.attend(layer, q, k, v, image=(0, image), reposition=reposition, key_lengths=key_lengths)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        img_out = attn.to_out[0](out[:, :image].contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        return img_out, attn.to_add_out(out[:, image:].contiguous())

    @staticmethod
    def joint_qkv(
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Rotation | None]:
        """The host's projections, q/k norms and RoPE of both streams, joined image first: (B, H, N, D)
        q, k, v and the image tokens' rotation (None without RoPE)."""
        head_dim = attn.inner_dim // attn.heads
        img = [
            proj(hidden_states).unflatten(-1, (-1, head_dim)) for proj in (attn.to_q, attn.to_k, attn.to_v)
        ]
        txt = [
            proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
            for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        ]
        if attn.norm_q is not None:
            img[0] = attn.norm_q(img[0])
        if attn.norm_k is not None:
            img[1] = attn.norm_k(img[1])
        if attn.norm_added_q is not None:
            txt[0] = attn.norm_added_q(txt[0])
        if attn.norm_added_k is not None:
            txt[1] = attn.norm_added_k(txt[1])
        rotation = None
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img[0], img[1] = (apply_rotary_emb_qwen(x, img_freqs, use_real=False) for x in img[:2])
            txt[0], txt[1] = (apply_rotary_emb_qwen(x, txt_freqs, use_real=False) for x in txt[:2])
            rotation = _complex_rotation(img_freqs)  # rows of the image tokens, which come first below
        # image first, then text: a frame's text padding ends its sequence
        q, k, v = (torch.cat([i, t], dim=1).transpose(1, 2) for i, t in zip(img, txt, strict=True))
        return q, k, v, rotation
