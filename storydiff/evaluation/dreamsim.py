"""DreamSim (Fu et al. 2023): a perceptual image similarity tuned to human judgements, as an identity metric.

Optional: it needs the ``dreamsim`` package (``pip install dreamsim``) and its weights in a local folder,
which this module never downloads (``dreamsim()`` would, silently, into a folder that lacks them). The
default ensemble model is used (DINO ViT-B/16 + CLIP ViT-B/16 + OpenCLIP ViT-B/16 with DreamSim's LoRA).

DreamSim's distance between two images is 1 - the cosine of their embeddings (``model.embed``), so the
score reported, 1 - distance, is the cosine of the embeddings: the same pairwise statistics as CLIP-I and
DINO, and higher is more alike. Papers that print the distance itself report 1 - these numbers.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..models.loading import ModelLoadError
from ..support.progress import Progress
from .encoders import ImageLike, _batched, _rgb

__all__ = ["DREAMSIM_INSTALL", "DreamSimEncoder", "load_dreamsim"]

DREAMSIM_INSTALL = "pip install dreamsim"
# What dreamsim(cache_dir=...) checks before it would download: the three backbones, and the LoRA weights
# (one folder since dreamsim 0.2; one per backbone before).
_BACKBONES = ("dino_vitb16_pretrain.pth", "open_clip_vitb16_pretrain.pth.tar", "clip_vitb16_pretrain.pth.tar")
_LORA = "ensemble_lora"
_LORA_BEFORE_0_2 = ("dino_vitb16_lora", "clip_vitb16_lora", "open_clip_vitb16_lora")


def missing_weights(folder: Path) -> list[str]:
    """The names of DreamSim's weight files and folders that ``folder`` lacks (empty: all there)."""
    missing = [name for name in _BACKBONES if not (folder / name).is_file()]
    if not (folder / _LORA).is_dir() and not all((folder / name).is_dir() for name in _LORA_BEFORE_0_2):
        missing.append(_LORA)
    return missing


class DreamSimEncoder:
    """DreamSim's embedding of images (``model.embed`` after its own preprocessing: 224x224, values in
    [0, 1]); ``encode_images`` has the CLIP/DINO encoders' signature."""

    name = "dreamsim"

    def __init__(
        self, model: torch.nn.Module, preprocess, *, source: str, device: str | torch.device = "cpu"
    ):
        self.model, self.preprocess, self.source = model, preprocess, source
        self.device = torch.device(device)

    def encode_images(
        self, images: Sequence[ImageLike], *, batch_size: int = 16, progress: Progress = False
    ) -> torch.Tensor:
        """(N, D) float32 CPU embeddings; their pairwise cosines are 1 - DreamSim distance."""

        def run(batch: Sequence[ImageLike]) -> torch.Tensor:
            pixels = torch.cat([self.preprocess(_rgb(image)) for image in batch]).to(self.device)
            # embed() squeezes its features, so one image comes back as a vector: one row per image again
            return self.model.embed(pixels).reshape(len(batch), -1)

        return _batched(run, images, batch_size, progress, "dreamsim images")


def load_dreamsim(path: str | os.PathLike, device: str | torch.device = "cpu") -> DreamSimEncoder:
    """DreamSim's ensemble model from the weights in folder ``path``; ModelLoadError (one line naming
    ``--dreamsim``) when the package is not installed or the folder lacks the weights."""
    try:
        from dreamsim import dreamsim
    except ImportError as exc:
        reason = "not installed here" if exc.name == "dreamsim" else f"cannot be imported ({exc})"
        raise ModelLoadError(f"--dreamsim needs the dreamsim package, {reason}: {DREAMSIM_INSTALL}") from None
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(
            f"--dreamsim {path} is not a folder; give the folder that holds DreamSim's weights"
        )
    missing = missing_weights(folder)
    if missing:
        raise ModelLoadError(
            f"--dreamsim {path} lacks DreamSim's weights ({', '.join(missing)}); on a machine with a "
            "network, dreamsim.dreamsim(cache_dir=FOLDER) downloads them into FOLDER: copy that folder here"
        )
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using cached ..." on stdout
            model, preprocess = dreamsim(pretrained=True, device=str(device), cache_dir=str(folder))
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load DreamSim from --dreamsim {path} ({exc})") from None
    return DreamSimEncoder(model.eval(), preprocess, source=str(folder), device=device)
