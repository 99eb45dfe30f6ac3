"""The Semantic Motion Predictor (StoryDiffusion's video stage), written from the paper's description.

Given image embeddings of a start and an end frame, it predicts the embeddings of the L frames between
them. The paper's recipe: linearly interpolate the two embeddings to L frames, then let a transformer
turn that straight line into a plausible motion in semantic space. The official code and weights were
never released; this is our reading:

- ``num_frames`` (L) counts the **intermediate** frames only; start and end are inputs, not outputs.
  Intermediate frame i sits at t_i = (i + 1) / (L + 1).
- The transformer sees the whole clip as one sequence of (L + 2)·T tokens: start, the L interpolated
  frames, end — so the endpoints condition every prediction through self-attention. Frame i has a learned
  frame-position embedding (0 = start, L + 1 = end) and token j a learned token-position embedding.
- The output is interpolation + a predicted residual, and the residual's output projection starts at
  zero: an untrained model *is* linear interpolation, and training can only start from the baseline.

Shapes are static and there is no data-dependent control flow, so ``torch.compile(fullgraph=True)``
traces the whole forward (see ``compiled.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

from .baselines import linear_interpolation

__all__ = ["SemanticMotionPredictor"]


class SemanticMotionPredictor(ModelMixin, ConfigMixin):
    """Predicts (B, L, T, C) intermediate-frame embeddings from (B, T, C) start and end embeddings.

    Args:
        embed_dim: C, the embedding width (1024 for OpenCLIP ViT-H/14 ``image_embeds``).
        num_frames: L ≥ 1, intermediate frames to predict (endpoints excluded).
        hidden_dim: transformer width (the paper reports 1024).
        num_layers: transformer layers (the paper reports about 8).
        num_heads: attention heads; must divide ``hidden_dim``.
        dropout: dropout inside the transformer layers (training only).
        max_tokens: upper bound on T, the tokens per frame (1 for pooled embeddings, 257 for ViT-H/14's
            full hidden-state sequence at 224²); sizes the token-position table.
        mlp_ratio: feed-forward width as a multiple of ``hidden_dim``.
    """

    @register_to_config
    def __init__(
        self,
        embed_dim: int = 1024,
        num_frames: int = 14,
        hidden_dim: int = 1024,
        num_layers: int = 8,
        num_heads: int = 16,
        dropout: float = 0.0,
        max_tokens: int = 257,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("embed_dim", embed_dim),
            ("num_frames", num_frames),
            ("hidden_dim", hidden_dim),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("max_tokens", max_tokens),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by num_heads ({num_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio}")

        # Normalizing the inputs makes the transformer indifferent to the encoder's embedding scale (CLIP
        # image embeds are unnormalized); the magnitude still reaches the output through the interpolation.
        self.in_norm = nn.LayerNorm(embed_dim)
        self.in_proj = nn.Linear(embed_dim, hidden_dim)
        self.frame_pos = nn.Parameter(torch.randn(num_frames + 2, hidden_dim) * 0.02)
        self.token_pos = nn.Parameter(torch.randn(max_tokens, hidden_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model=hidden_dim,
            nhead=num_heads,
            dim_feedforward=round(mlp_ratio * hidden_dim),
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # Pre-norm layers leave the residual stream unnormalized, hence the final norm. Nested tensors only
        # help padded batches, which we never have (and they are unavailable with norm_first anyway).
        self.transformer = nn.TransformerEncoder(
            layer, num_layers=num_layers, norm=nn.LayerNorm(hidden_dim), enable_nested_tensor=False
        )
        self.out_proj = nn.Linear(hidden_dim, embed_dim)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def _check_inputs(self, start: Tensor, end: Tensor) -> None:
        # Shape checks only: shapes are static under torch.compile, so these fold away at trace time.
        for name, x in (("start", start), ("end", end)):
            if x.dim() != 3:
                raise ValueError(f"{name} must be 3-D (batch, tokens, embed_dim), got shape {tuple(x.shape)}")
        if start.shape != end.shape:
            raise ValueError(
                f"start and end must have the same shape, got {tuple(start.shape)} and {tuple(end.shape)}"
            )
        if start.shape[-1] != self.config.embed_dim:
            raise ValueError(
                f"start/end embedding dim is {start.shape[-1]} but the model's embed_dim is "
                f"{self.config.embed_dim}"
            )
        if start.shape[1] > self.config.max_tokens:
            raise ValueError(
                f"start/end have {start.shape[1]} tokens per frame, more than max_tokens="
                f"{self.config.max_tokens}"
            )

    def forward(self, start: Tensor, end: Tensor) -> Tensor:
        """Predict the intermediate-frame embeddings.

        Args:
            start: (B, T, C) embedding of the first frame.
            end: (B, T, C) embedding of the last frame, same shape and dtype.

        Returns:
            (B, L, T, C): linear interpolation plus the predicted residual, L = ``config.num_frames``.
        """
        self._check_inputs(start, end)
        batch, tokens, _ = start.shape
        frames = self.config.num_frames
        interpolated = linear_interpolation(start, end, frames)
        clip = torch.cat([start.unsqueeze(1), interpolated, end.unsqueeze(1)], dim=1)  # [B, L+2, T, C]
        h = self.in_proj(self.in_norm(clip))
        # Token positions are added even when T = 1: then they are one learned offset, which is harmless and
        # keeps a single code path.
        h = h + self.frame_pos[:, None, :] + self.token_pos[:tokens][None, :, :]
        h = self.transformer(h.reshape(batch, (frames + 2) * tokens, -1))
        h = h.view(batch, frames + 2, tokens, -1)[:, 1:-1]  # only the intermediate frames are predicted
        return interpolated + self.out_proj(h)


def load_predictor(path: str, device: str | torch.device = "cpu") -> SemanticMotionPredictor:
    """A predictor saved with ``save_pretrained`` (a local folder), in float32 on ``device``.

    Raises ``ModelLoadError`` naming the folder when it is missing or not a predictor.
    """
    from ..models.loading import from_pretrained

    # The predictor is small; float32 keeps its output close to how it was trained. Local folders only:
    # there are no published weights to fetch.
    if not Path(path).expanduser().is_dir():
        from ..models.loading import ModelLoadError

        raise ModelLoadError(f"cannot load motion predictor {path!r}: no such folder")
    return from_pretrained(SemanticMotionPredictor, str(path), "motion predictor").to(device)
