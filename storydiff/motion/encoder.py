"""Frozen CLIP image encoder that turns frames into the embeddings the motion predictor works on.

The paper uses OpenCLIP ViT-H/14 (``image_embeds`` of width 1024); any ``CLIPVisionModelWithProjection``
checkpoint works. ``build_tiny_encoder`` makes a tiny random one in code for tests and demos, since
nothing can be downloaded on our CPU machines.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from transformers import CLIPVisionModelWithProjection

from ..families.tiny_models import tiny_clip_vision_model
from ..models.loading import from_pretrained
from ..support.compat import clip_image_processor_class

__all__ = ["ImageEncoder", "build_tiny_encoder"]


def _default_processor(image_size: int):
    crop = {"height": image_size, "width": image_size}
    return clip_image_processor_class()(size={"shortest_edge": image_size}, crop_size=crop)


class ImageEncoder:
    """A frozen ``CLIPVisionModelWithProjection`` plus its image processor.

    ``identity`` names the exact encoder (checkpoint, config, dtype) so embedding caches built with one
    encoder are never read with another.
    """

    def __init__(self, model: CLIPVisionModelWithProjection, processor, *, identity: str) -> None:
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.identity = identity

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        subfolder: str | None = None,
    ) -> ImageEncoder:
        """Load a CLIP vision checkpoint (a local folder or a hub id) and its preprocessing.

        Folders without a ``preprocessor_config.json`` (IP-Adapter's ``image_encoder``, for one) get
        CLIP's standard preprocessing at the model's image size. Raises ``ModelLoadError`` (one line,
        naming ``path_or_id``) when the model cannot be loaded.
        """
        kwargs = {"subfolder": subfolder} if subfolder else {}
        hint = (
            "give a CLIP vision folder with config.json and weights, or 'tiny' for a random offline encoder"
        )
        model = from_pretrained(
            CLIPVisionModelWithProjection, str(path_or_id), "CLIP vision model", hint, **kwargs
        )
        try:
            processor = clip_image_processor_class().from_pretrained(str(path_or_id), **kwargs)
        except OSError:
            processor = _default_processor(model.config.image_size)
        # Cast after loading instead of passing the dtype kwarg, whose name changed between transformers 4
        # and 5 (torch_dtype → dtype).
        model = model.to(device=device, dtype=dtype)
        config_hash = hashlib.sha256(model.config.to_json_string().encode()).hexdigest()[:16]
        revision = getattr(model.config, "_commit_hash", None) or ""
        identity = f"clip:{path_or_id}:{subfolder or ''}:{revision}:{config_hash}:{dtype}"
        return cls(model, processor, identity=identity)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embed_dim(self) -> int:
        """C of ``encode``: the projected (pooled) image-embedding width."""
        return self.model.config.projection_dim

    @property
    def token_dim(self) -> int:
        """C' of ``encode_tokens``: the vision transformer's hidden width."""
        return self.model.config.hidden_size

    @property
    def num_tokens(self) -> int:
        """T of ``encode_tokens``: patches plus the class token."""
        return (self.model.config.image_size // self.model.config.patch_size) ** 2 + 1

    @torch.no_grad()
    def _run(self, images: Sequence[Image.Image], batch_size: int, tokens: bool) -> Tensor:
        if len(images) == 0:
            raise ValueError("images must not be empty")
        dtype = next(self.model.parameters()).dtype
        chunks = []
        for i in range(0, len(images), batch_size):
            batch = [im.convert("RGB") for im in images[i : i + batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            out = self.model(pixel_values=pixels.to(self.device, dtype))
            emb = out.last_hidden_state if tokens else out.image_embeds.unsqueeze(1)
            chunks.append(emb.float())
        return torch.cat(chunks)

    def encode(self, images: Sequence[Image.Image], *, batch_size: int = 64) -> Tensor:
        """(N, 1, C) float32 pooled ``image_embeds`` on the encoder's device (T = 1)."""
        return self._run(images, batch_size, tokens=False)

    def encode_tokens(self, images: Sequence[Image.Image], *, batch_size: int = 64) -> Tensor:
        """(N, T, C') float32 last hidden states (class token first) on the encoder's device."""
        return self._run(images, batch_size, tokens=True)


def build_tiny_encoder(embed_dim: int = 32, image_size: int = 32, seed: int = 0) -> ImageEncoder:
    """A tiny random CLIP vision encoder (``tiny_models.tiny_clip_vision_model``), built offline."""
    model = tiny_clip_vision_model(embed_dim, image_size, seed)
    # The weights are a function of the seed, config and library versions; hashing the weights themselves
    # (tiny) makes the cache key exact.
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.float().numpy().tobytes())
    identity = f"tiny-clip:{json.dumps({'embed_dim': embed_dim, 'image_size': image_size, 'seed': seed})}:"
    identity += digest.hexdigest()[:16]
    return ImageEncoder(model, _default_processor(image_size), identity=identity)
