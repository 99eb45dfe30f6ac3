"""The image and text encoders a story evaluation measures with: CLIP (image and text) and DINOv2 (image).

Each loads from a local folder or a hub id (``from_pretrained``), or is built in memory with random
weights (``"tiny"``) so tests and offline machines can run the whole evaluation. Tiny encoders test the
plumbing only: their similarities mean nothing. A model that cannot be loaded is a one-line
``ModelLoadError`` (a ``ValueError``) naming the command-line option it came from.

Encoders run in float32 whatever the device: the similarities they feed are compared across runs in the
third decimal, and these models are small next to the diffusion models that made the frames.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import transformers.utils.logging as transformers_logging
from PIL import Image
from transformers import (
    AutoImageProcessor,
    CLIPConfig,
    CLIPModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    Dinov2Config,
    Dinov2Model,
)

from ..families.tiny_models import tiny_clip_text_config, tiny_clip_tokenizer
from ..models.loading import ModelLoadError, from_pretrained
from ..support.compat import clip_image_processor_class
from ..support.progress import Progress, progress_bar

__all__ = ["TINY", "ClipEncoder", "DinoEncoder", "build_tiny_encoders", "load_clip", "load_dino"]

#: The name that asks for a random in-memory encoder instead of a checkpoint.
TINY = "tiny"
# DINOv2's preprocessing normalises with ImageNet statistics (facebook/dinov2-* preprocessor configs).
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_TINY_IMAGE_SIZE = 32
ImageLike = Image.Image | str | os.PathLike


def _rgb(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as opened:
        return opened.convert("RGB")


def _pooled(output) -> torch.Tensor:
    # get_image_features / get_text_features return a tensor in transformers 4 and an output whose
    # pooler_output holds the projected embedding in transformers 5.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class _ImageEncoder:
    """Batched, gradient-free image embedding shared by both encoders; subclasses say how one batch runs."""

    name = ""

    def __init__(self, model: torch.nn.Module, image_processor, *, source: str) -> None:
        self.model = model.eval().requires_grad_(False).to(dtype=torch.float32)
        self.image_processor = image_processor
        self.source = source

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device):
        self.model.to(device)
        return self

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_images(
        self, images: Sequence[ImageLike], *, batch_size: int = 16, progress: Progress = False
    ) -> torch.Tensor:
        """(N, D) float32 CPU embeddings of ``images`` (PIL images or files), ``batch_size`` at a time.

        Files are opened one batch at a time, so a long story never holds all its frames in memory.
        """

        def run(batch: Sequence[ImageLike]) -> torch.Tensor:
            pixels = self.image_processor(images=[_rgb(image) for image in batch], return_tensors="pt")
            return self._embed(pixels["pixel_values"].to(self.device, torch.float32))

        return _batched(run, images, batch_size, progress, f"{self.name} images")


def _batched(fn: Callable, items: Sequence, batch_size: int, progress: Progress, desc: str) -> torch.Tensor:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # one batch is done at once: a bar (or a line per batch) only says something when there are several
    bar = progress_bar(len(items), desc, "frame", progress if len(items) > batch_size else False)
    parts = []
    try:
        with torch.no_grad():
            for start in range(0, len(items), batch_size):
                batch = items[start : start + batch_size]
                parts.append(fn(batch).float().cpu())
                bar.update(len(batch))
    finally:
        bar.close()
    return torch.cat(parts) if parts else torch.empty(0, 0)


class ClipEncoder(_ImageEncoder):
    """CLIP's image and text towers with their preprocessing: both embed into one joint space (CLIP-I and
    CLIP-T). Texts longer than the tokenizer's context (77 tokens) are cut there, as CLIP was trained."""

    name = "clip"

    def __init__(self, model: CLIPModel, image_processor, tokenizer, *, source: str) -> None:
        super().__init__(model, image_processor, source=source)
        self.tokenizer = tokenizer

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=pixel_values))

    def encode_texts(self, texts: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
        """(N, D) float32 CPU text embeddings of ``texts``."""
        context = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)

        def run(batch: Sequence[str]) -> torch.Tensor:
            tokens = self.tokenizer(
                list(batch), padding=True, truncation=True, max_length=context, return_tensors="pt"
            )
            return _pooled(self.model.get_text_features(**tokens.to(self.device)))

        return _batched(run, texts, batch_size, False, "clip texts")


class DinoEncoder(_ImageEncoder):
    """DINOv2's image embedding: the class token after the final layer norm (``pooler_output``), the
    feature the papers' DINO score compares."""

    name = "dino"

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).pooler_output


@contextmanager
def _no_loading_bars() -> Iterator[None]:
    """transformers draws a "Loading weights" bar per checkpoint, on stderr even when loading fails; the
    evaluation's own output (and its one-line errors) should stand alone. The setting is restored after."""
    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def _checkpoint(cls, source: str, what: str, hint: str):
    """``cls.from_pretrained(source)``, refusing a checkpoint that lacks weights of ``cls``: transformers
    would fill them with random values and only warn, and the scores would silently mean nothing."""
    with _no_loading_bars():
        model, info = from_pretrained(cls, source, what, hint, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ModelLoadError(
            f"cannot load {what} {source!r}: {len(missing)} of its weights are missing from the checkpoint "
            f"(e.g. {missing[0]}), so it is not a {cls.__name__} ({hint})"
        )
    return model


def load_clip(source: str, device: str | torch.device = "cpu") -> ClipEncoder:
    """CLIP from a folder or hub id (``CLIPModel`` + tokenizer + image processor), or ``"tiny"``."""
    if source == TINY:
        return build_tiny_encoders()[0].to(device)
    hint = "give a CLIP folder or hub id with tokenizer and image processor, or 'tiny' for random weights"
    model = _checkpoint(CLIPModel, source, "--clip model", hint)
    tokenizer = from_pretrained(CLIPTokenizer, source, "--clip tokenizer", hint)
    processor = from_pretrained(clip_image_processor_class(), source, "--clip image processor", hint)
    return ClipEncoder(model, processor, tokenizer, source=source).to(device)


def load_dino(source: str, device: str | torch.device = "cpu") -> DinoEncoder:
    """DINOv2 from a folder or hub id (``Dinov2Model`` + image processor), or ``"tiny"``."""
    if source == TINY:
        return build_tiny_encoders()[1].to(device)
    hint = "give a DINOv2 folder or hub id with its image processor, or 'tiny' for random weights"
    model = _checkpoint(Dinov2Model, source, "--dino model", hint)
    processor = from_pretrained(AutoImageProcessor, source, "--dino image processor", hint)
    return DinoEncoder(model, processor, source=source).to(device)


def _tiny_processor(**normalisation):
    """Resize the shorter side, centre-crop, normalise (CLIP's statistics unless ``normalisation`` gives
    others): what CLIP's and DINOv2's processors both do, at the tiny models' size."""
    side = {"shortest_edge": _TINY_IMAGE_SIZE}
    crop = {"height": _TINY_IMAGE_SIZE, "width": _TINY_IMAGE_SIZE}
    return clip_image_processor_class()(size=side, crop_size=crop, **normalisation)


def build_tiny_encoders(seed: int = 0) -> tuple[ClipEncoder, DinoEncoder]:
    """A tiny random CLIP and DINOv2, built in memory and offline; the same seed gives the same weights.

    For tests and offline runs of the evaluation: their numbers mean nothing. As in
    ``tiny_models.tiny_clip_vision_model``, wider initial weights and small patches make the embeddings
    depend on the image (at the default scale every image gets nearly the same one).
    """
    tokenizer = tiny_clip_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=_TINY_IMAGE_SIZE,
        patch_size=4,
        initializer_factor=4.0,
    )
    text = tiny_clip_text_config(tokenizer, 32, act="quick_gelu", projection_dim=16)
    clip_config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    dino_config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=2,
        image_size=_TINY_IMAGE_SIZE,
        patch_size=4,
        initializer_range=0.2,
    )
    # A private RNG stream: building the encoders must not disturb the caller's global torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip_model, dino_model = CLIPModel(clip_config), Dinov2Model(dino_config)
    clip = ClipEncoder(clip_model, _tiny_processor(), tokenizer, source=TINY)
    dino = DinoEncoder(
        dino_model, _tiny_processor(image_mean=_IMAGENET_MEAN, image_std=_IMAGENET_STD), source=TINY
    )
    return clip, dino
