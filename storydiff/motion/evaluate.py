"""Is the predictor worth having? Cosine similarity to the true intermediate embeddings, next to the
linear-interpolation baseline's, on clips of videos the model never trained on."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from .baselines import linear_interpolation
from .data import ClipDataset
from .model import SemanticMotionPredictor

__all__ = ["evaluate"]


def _stack(dataset: ClipDataset, indices: range) -> tuple[Tensor, Tensor, Tensor]:
    starts, mids, ends = zip(*(dataset[i] for i in indices), strict=True)
    return torch.stack(starts), torch.stack(mids), torch.stack(ends)


@torch.no_grad()
def evaluate(model: SemanticMotionPredictor, dataset: ClipDataset, *, batch_size: int = 256) -> dict:
    """Mean cosine similarity and MSE of predicted vs true intermediate embeddings, model and baseline.

    Cosine is taken per (clip, frame, token) over the embedding channels, then averaged. Returns a dict:
    ``clips``, ``videos``, ``cosine_predictor``, ``cosine_interpolation``, ``cosine_gain`` (predictor −
    interpolation; positive means the predictor is useful), ``mse_predictor``, ``mse_interpolation`` and
    ``cosine_predictor_per_frame`` / ``cosine_interpolation_per_frame`` (lists of L values).
    """
    if len(dataset) == 0:
        raise ValueError("dataset has no clips to evaluate")
    if dataset.num_frames != model.config.num_frames:
        raise ValueError(
            f"dataset clips have {dataset.num_frames} intermediate frames, the model predicts "
            f"{model.config.num_frames}"
        )
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    totals = {"cos_p": 0.0, "cos_i": 0.0, "mse_p": 0.0, "mse_i": 0.0}
    per_frame_p = torch.zeros(dataset.num_frames, dtype=torch.float64)
    per_frame_i = torch.zeros(dataset.num_frames, dtype=torch.float64)
    count = 0
    for first in range(0, len(dataset), batch_size):
        start, target, end = _stack(dataset, range(first, min(first + batch_size, len(dataset))))
        start, end = start.to(param.device, param.dtype), end.to(param.device, param.dtype)
        target = target.to(param.device, torch.float32)
        pred = model(start, end).float()
        interp = linear_interpolation(start, end, dataset.num_frames).float()
        cos_p = F.cosine_similarity(pred, target, dim=-1)  # [B, L, T]
        cos_i = F.cosine_similarity(interp, target, dim=-1)
        totals["cos_p"] += cos_p.sum().item()
        totals["cos_i"] += cos_i.sum().item()
        totals["mse_p"] += (pred - target).pow(2).mean(-1).sum().item()
        totals["mse_i"] += (interp - target).pow(2).mean(-1).sum().item()
        per_frame_p += cos_p.sum(dim=(0, 2)).double().cpu()
        per_frame_i += cos_i.sum(dim=(0, 2)).double().cpu()
        count += cos_p.numel()
    model.train(was_training)
    per_clip_frame = count / dataset.num_frames
    result = {
        "clips": len(dataset),
        "videos": dataset.num_videos,
        "cosine_predictor": totals["cos_p"] / count,
        "cosine_interpolation": totals["cos_i"] / count,
        "mse_predictor": totals["mse_p"] / count,
        "mse_interpolation": totals["mse_i"] / count,
        "cosine_predictor_per_frame": (per_frame_p / per_clip_frame).tolist(),
        "cosine_interpolation_per_frame": (per_frame_i / per_clip_frame).tolist(),
    }
    result["cosine_gain"] = result["cosine_predictor"] - result["cosine_interpolation"]
    return result
