"""Per-frame image embeddings in Stable Video Diffusion's spatial cross-attention.

SVD hands its UNet one CLIP image embedding per video and repeats it for every frame. The processor here
swaps that, in the *spatial* cross-attention layers only, for one embedding per frame read from an explicit
``PerFrameEmbeddingState``; the temporal blocks keep SVD's own embedding (the first frame's, as in stock SVD).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel
from torch import Tensor


class PerFrameEmbeddingState:
    """The per-frame image embeddings that the spatial cross-attention layers use during one SVD call.

    Set with ``set(embeddings)`` before the call and cleared afterwards; while empty, the processors run the
    stock computation. ``calls`` counts the layer calls that substituted embeddings, so tests can tell that
    the embeddings really reached the UNet.
    """

    def __init__(self) -> None:
        self.embeddings: Tensor | None = None
        self.calls = 0

    def set(self, embeddings: Tensor) -> None:
        """``embeddings``: (B, F, T, C) — video, frame, token, channel — or (F, T, C) for one video."""
        if embeddings.ndim == 3:
            embeddings = embeddings.unsqueeze(0)
        if embeddings.ndim != 4:
            raise ValueError(
                f"per-frame embeddings must be (B, F, T, C) or (F, T, C), got shape {tuple(embeddings.shape)}"
            )
        self.embeddings = embeddings
        self.calls = 0

    def clear(self) -> None:
        self.embeddings = None

    def conditioning(self, encoder_hidden_states: Tensor) -> Tensor:
        """Replace the conditional half of SVD's (repeated) image embedding with the per-frame embeddings.

        ``encoder_hidden_states`` is what the UNet gives a spatial cross-attention layer: (B·F, 1, C) without
        classifier-free guidance, or (2·B·F, 1, C) as [uncond; cond] with it, where SVD's uncond embedding
        is all zeros. The uncond half is kept as SVD made it, so guidance still pushes away from "no image".
        """
        assert self.embeddings is not None
        b, f, t, c = self.embeddings.shape
        n = b * f
        if encoder_hidden_states.shape[-1] != c:
            raise ValueError(
                f"per-frame embeddings have {c} channels but the UNet's cross-attention receives "
                f"{encoder_hidden_states.shape[-1]}; they must come from the pipeline's own image encoder"
            )
        cond = self.embeddings.reshape(n, t, c).to(encoder_hidden_states.device, encoder_hidden_states.dtype)
        if encoder_hidden_states.shape[0] == n:
            return cond
        if encoder_hidden_states.shape[0] == 2 * n:
            uncond = encoder_hidden_states[:n]
            if uncond.shape[1] != t:
                if uncond.shape[1] != 1:
                    raise ValueError(
                        f"cannot pair {uncond.shape[1]} unconditional tokens with {t} per-frame tokens"
                    )
                # One key/value token repeated T times gives the same attention output as the single token
                # (T equal logits → weights 1/T), so the uncond half keeps SVD's meaning in a batch of T.
                uncond = uncond.expand(n, t, c)
            return torch.cat([uncond, cond])
        raise ValueError(
            f"the UNet's cross-attention batch is {encoder_hidden_states.shape[0]}, but the per-frame "
            f"embeddings are for {b} video(s) × {f} frames = {n} (or {2 * n} with classifier-free guidance); "
            "num_frames and the embeddings must agree"
        )


class PerFrameCrossAttnProcessor:
    """Spatial cross-attention processor of SVD that conditions each frame on its own image embedding.

    Wraps the layer's original processor and changes only its ``encoder_hidden_states``, so with per-frame
    embeddings all equal to SVD's own embedding it computes exactly what the original computes.
    """

    def __init__(self, state: PerFrameEmbeddingState, processor: Any | None = None) -> None:
        self.state = state
        self.processor = processor if processor is not None else AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
    ) -> Tensor:
        if self.state.embeddings is not None and encoder_hidden_states is not None:
            encoder_hidden_states = self.state.conditioning(encoder_hidden_states)
            self.state.calls += 1
        # temb only when given: some processors (not SVD's) have no such parameter.
        extra = {"temb": temb} if temb is not None else {}
        return self.processor(
            attn,
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            **extra,
        )


def spatial_cross_attention_layers(unet: torch.nn.Module) -> list[str]:
    """Processor names of the spatial cross-attention layers of an SVD UNet.

    Read from the model's structure rather than matched by name: every ``TransformerSpatioTemporalModel``
    holds its spatial blocks in ``transformer_blocks`` (per-frame tokens, (B·F, H·W, C)) and its temporal
    blocks in ``temporal_transformer_blocks`` (per-position frames, (B·H·W, F, C)); only the spatial blocks'
    ``attn2`` sees one embedding per frame.
    """
    names = [
        f"{name}.transformer_blocks.{i}.attn2.processor"
        for name, module in unet.named_modules()
        if isinstance(module, TransformerSpatioTemporalModel)
        for i, block in enumerate(module.transformer_blocks)
        if getattr(block, "attn2", None) is not None
    ]
    if not names:
        raise ValueError(
            f"{type(unet).__name__} has no spatial cross-attention layers; expected Stable Video Diffusion's "
            "UNetSpatioTemporalConditionModel"
        )
    return names


@contextmanager
def per_frame_conditioning(unet: torch.nn.Module, state: PerFrameEmbeddingState) -> Iterator[list[str]]:
    """Install ``PerFrameCrossAttnProcessor`` on the spatial cross-attention layers for the ``with`` body.

    The original processors (the same objects) are restored and the state cleared on exit, also on error.
    Yields the names of the layers that were swapped.
    """
    original = unet.attn_processors
    names = spatial_cross_attention_layers(unet)
    swapped = {name: PerFrameCrossAttnProcessor(state, original[name]) for name in names}
    # set_attn_processor pops entries from the dict it is given, so it always gets a copy.
    unet.set_attn_processor({**original, **swapped})
    try:
        yield names
    finally:
        unet.set_attn_processor(dict(original))
        state.clear()
