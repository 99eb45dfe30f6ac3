"""Consistent attention inside diffusion transformers' joint text+image attention (FLUX, SD3).

Each processor keeps its host processor's own math — projections (fused ones too), q/k norms, RoPE, how
text and image streams are concatenated and split, output projections — and replaces only the attention
call with ``ConsistencyState.attend``, telling it where the image tokens sit in the joint sequence: only
they are offered to other frames, and only their queries read other frames' tokens. Text queries attend to
their own frame only, so prompts never leak between frames.

On FLUX, borrowed keys carry the RoPE rotation of their source frame's position (every frame has the same
positions) unless ``ConsistencyConfig.rope`` moves them (``rope.py``).
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

from .attention import BoundProcessor, head_projections
from .compat import flux_qkv_projections
from .rope import Rotation, reposition_for, shift_ids
from .state import ConsistencyState, LayerInfo


class FluxConsistentProcessor(BoundProcessor):
    """For ``FluxAttention``: double-stream blocks (text tokens, then image tokens, concatenated before
    RoPE) and single-stream blocks (text already inside ``hidden_states``: its length comes from the
    state, which the transformer's forward pre-hook sets from ``encoder_hidden_states``).

    ``pos_embed`` (an option of the binding): the transformer's ``FluxPosEmbed``, which gives rope="shift"
    its offset rotation."""

    def __init__(
        self, state: ConsistencyState | None = None, layer: LayerInfo | None = None, pos_embed=None
    ) -> None:
        super().__init__(state, layer, **({} if pos_embed is None else {"pos_embed": pos_embed}))
        self._shift: dict[torch.device, Rotation] = {}  # computed once per device

    def shift_rotation(self, pos_embed, layer: LayerInfo, device: torch.device) -> Rotation:
        """(cos, sin), (1, D): the rotation by rope="shift"'s position ids, from the host's own embedder."""
        if device not in self._shift:
            if pos_embed is None:
                raise RuntimeError(f"{layer.name}: rope='shift' needs the transformer's pos_embed")
            cos, sin = pos_embed(shift_ids(len(pos_embed.axes_dim)))
            self._shift[device] = (cos.to(device), sin.to(device))
        return self._shift[device]

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
        pos_embed = binding.options.get("pos_embed")

        def shift(device: torch.device) -> Rotation:
            return self.shift_rotation(pos_embed, layer, device)

        reposition = reposition_for(state.config.rope, image_rotary_emb, shift)
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
