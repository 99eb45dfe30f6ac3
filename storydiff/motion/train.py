"""Training the Semantic Motion Predictor on videos: MSE on the intermediate-frame embeddings.

``train_motion`` encodes every frame once (cached on disk), then runs AdamW with a cosine schedule and
linear warm-up on (start, intermediate, end) clips. The batch order is a pure function of (seed, step)
and checkpoints carry optimizer, scheduler and RNG state, so a resumed run continues exactly where the
interrupted one stopped (on the CPU the final weights are bit-identical to an uninterrupted run's).

Output folder::

    train_config.json        settings that a resume must match
    embedding_cache/         per-video embeddings (unless cache_dir points elsewhere)
    checkpoint-<step>/       config.json + diffusion_pytorch_model.safetensors + training_state.pt
    model/                   final weights (SemanticMotionPredictor.from_pretrained(out_dir / "model"))
    eval.json                held-out (and train) cosine similarity: predictor vs linear interpolation
    loss.png                 training loss curve
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..support.atomic import atomic_path, write_json
from .checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from .data import ClipDataset, MotionData, build_datasets
from .defaults import DEFAULT_MODEL
from .encoder import ImageEncoder, build_tiny_encoder
from .evaluate import evaluate
from .model import SemanticMotionPredictor

__all__ = ["TrainPlan", "TrainResult", "train_motion"]

# Forward and backward passes timed for TrainPlan.seconds_per_step (after one untimed), and the fewest
# steps left for which they are run: at most 15 % extra work, and a rounding error next to a real run.
_TIMED_STEPS = 2
_MIN_STEPS_TO_TIME = 20

# Settings that change what a run computes: resuming with any of them changed would not continue the
# same run, so it is refused.
_RESUME_KEYS = (
    "data_dir", "encoder", "tokens", "num_frames", "stride", "holdout", "seed", "steps", "batch_size",
    "lr", "weight_decay", "warmup_steps", "max_grad_norm", "model",
)  # fmt: skip


@dataclass
class TrainResult:
    """What ``train_motion`` produced. ``eval`` is ``evaluate`` on the held-out videos."""

    out_dir: Path
    model_dir: Path
    steps: int
    losses: list[float]
    eval: dict[str, Any]
    resumed_from: int | None
    seconds: float

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else math.nan


@dataclass(frozen=True)
class TrainPlan:
    """What a run is about to do, known before its first step (``train_motion``'s ``on_plan``).

    Videos, frames and clips count the usable videos of each side of the split; every frame is embedded
    as ``tokens`` x ``embed_dim``. ``seconds_per_step`` is measured on ``timed_steps`` forward and
    backward passes just before training; it leaves out the optimizer update, checkpoints and the final
    evaluation, so the estimate is a lower bound. Runs with fewer than 20 steps left are not timed
    (``timed_steps`` 0, ``seconds_per_step`` None): the timing would add more than it tells.
    """

    train_videos: int
    train_frames: int
    train_clips: int
    heldout_videos: int
    heldout_frames: int
    heldout_clips: int
    tokens: int
    embed_dim: int
    steps: int
    start_step: int
    batch_size: int
    seconds_per_step: float | None
    timed_steps: int

    @property
    def epochs(self) -> float:
        """Passes over the training clips that ``steps`` make."""
        return self.steps * self.batch_size / self.train_clips

    @property
    def estimated_seconds(self) -> float | None:
        """Seconds for the steps left to run, at ``seconds_per_step``."""
        if self.seconds_per_step is None:
            return None
        return (self.steps - self.start_step) * self.seconds_per_step


class _BatchOrder:
    """Clip indices of each step: a seeded permutation per epoch, so step k's batch never depends on
    how many steps this process has run (what makes resuming exact)."""

    def __init__(self, num_clips: int, batch_size: int, seed: int) -> None:
        self.num_clips, self.batch_size, self.seed = num_clips, batch_size, seed
        self.per_epoch = num_clips // batch_size  # the ragged tail is dropped: every batch is full-size
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> Tensor:
        epoch, position = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_clips, generator=gen)
        return self._perm[position * self.batch_size : (position + 1) * self.batch_size]


def _collate(dataset: ClipDataset, indices: Tensor, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    starts, mids, ends = zip(*(dataset[i] for i in indices.tolist()), strict=True)
    return tuple(torch.stack(x).to(device, non_blocking=True) for x in (starts, mids, ends))


def _loss(model: SemanticMotionPredictor, batch: tuple[Tensor, Tensor, Tensor], amp: bool) -> Tensor:
    start, target, end = batch
    with torch.autocast(device_type=start.device.type, dtype=torch.bfloat16, enabled=amp):
        pred = model(start, end)
    return F.mse_loss(pred.float(), target)  # fp32 loss even under autocast


def _seconds_per_step(
    model: SemanticMotionPredictor, dataset: ClipDataset, order: _BatchOrder, step: int, amp: bool, timed: int
) -> float:
    """Median seconds of a forward and backward pass on the run's next batches, measured before it starts.

    The first pass is not timed: it pays one-time costs (allocations, kernel selection). Weights are never
    updated, gradients are cleared and the RNG state (dropout) is restored, so the run itself is unchanged.
    """
    rng = _rng_state()
    device = next(model.parameters()).device
    times = []
    for k in range(timed + 1):
        batch = _collate(dataset, order.indices(step + k), device)
        began = time.perf_counter()
        _loss(model, batch, amp).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - began)
    model.zero_grad(set_to_none=True)
    _set_rng_state(rng)
    return statistics.median(times[1:])


def _resolve_encoder(encoder: ImageEncoder | str, device: torch.device) -> ImageEncoder:
    if isinstance(encoder, ImageEncoder):
        return encoder
    if encoder == "tiny":
        return build_tiny_encoder()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return ImageEncoder.from_pretrained(encoder, device=device, dtype=dtype)


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_final_model(model: SemanticMotionPredictor, out_dir: Path) -> Path:
    final = out_dir / "model"
    with atomic_path(final) as tmp:  # replaces the model of an earlier run only once this one is complete
        model.save_pretrained(tmp, safe_serialization=True)
    return final


def _plot_losses(losses: Sequence[float], heldout: dict[str, Any], path: Path) -> None:
    _loss_figure(losses, heldout).savefig(path)


def _loss_figure(losses: Sequence[float], heldout: dict[str, Any]) -> Any:
    """loss.png as a Figure: lines for the per-step train loss and its EMA (0.95), then horizontal lines at
    the held-out MSE of linear interpolation and of the final predictor (log y)."""
    # Figure + Agg canvas directly: no pyplot, so no global backend switch and no GUI.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title("Semantic Motion Predictor training: MSE of the intermediate-frame embeddings")
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.6, alpha=0.4, label="train MSE (per step)")
    smooth, ema = [], losses[0] if losses else 0.0
    for value in losses:
        ema = 0.95 * ema + 0.05 * value
        smooth.append(ema)
    ax.plot(steps, smooth, lw=1.5, label="train MSE (EMA 0.95)")
    ax.axhline(heldout["mse_interpolation"], color="gray", ls="--", label="held-out: linear interpolation")
    ax.axhline(heldout["mse_predictor"], color="C3", ls=":", label="held-out: final predictor")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE on intermediate embeddings")
    # outside the axes: inside, it covers the held-out lines at the right end of the curve
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig


def _load_for_resume(checkpoint: Path, run: dict[str, Any]) -> tuple[SemanticMotionPredictor, dict[str, Any]]:
    model, state = load_checkpoint(checkpoint)
    changed = [k for k in _RESUME_KEYS if state["run"].get(k) != run[k]]
    if changed:
        details = "; ".join(f"{k}: {state['run'].get(k)!r} → {run[k]!r}" for k in changed)
        raise ValueError(f"cannot resume {checkpoint}: settings differ from the checkpoint's ({details})")
    return model, state


def _write_report(
    model: SemanticMotionPredictor, data: MotionData, losses: list[float], out: Path
) -> dict[str, Any]:
    """eval.json (held-out and, to show over-fitting, up to 64 training videos) and loss.png."""
    heldout = evaluate(model, data.heldout)
    train_subset = ClipDataset(data.train.embeddings[:64], data.train.num_frames, stride=data.train.stride)
    report = {
        "heldout": heldout,
        "train": evaluate(model, train_subset),
        "steps": len(losses),
        "final_loss": losses[-1] if losses else None,
        "heldout_videos": [str(s.path) for s in data.heldout_sources],
        "train_videos": len(data.train_sources),
    }
    write_json(out / "eval.json", report)
    if losses:
        _plot_losses(losses, heldout, out / "loss.png")
    return heldout


def _plan(
    data: MotionData, batch_size: int, steps: int, start_step: int, seconds: float | None, timed: int
) -> TrainPlan:
    tokens, embed_dim = data.train[0][0].shape
    return TrainPlan(
        train_videos=data.train.num_videos,
        train_frames=sum(e.shape[0] for e in data.train.embeddings),
        train_clips=len(data.train),
        heldout_videos=data.heldout.num_videos,
        heldout_frames=sum(e.shape[0] for e in data.heldout.embeddings),
        heldout_clips=len(data.heldout),
        tokens=tokens,
        embed_dim=embed_dim,
        steps=steps,
        start_step=start_step,
        batch_size=batch_size,
        seconds_per_step=seconds,
        timed_steps=timed,
    )


def train_motion(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    encoder: ImageEncoder | str = "tiny",
    tokens: bool = False,
    num_frames: int = 14,
    stride: int = 1,
    steps: int = 1000,
    epochs: int | None = None,
    batch_size: int = 32,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    warmup_steps: int | None = None,
    max_grad_norm: float = 1.0,
    mixed_precision: bool | None = None,
    seed: int = 0,
    checkpoint_every: int = 500,
    keep_checkpoints: int = 3,
    resume: bool = False,
    holdout: float = 0.15,
    cache_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    model_config: dict[str, Any] | None = None,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
    on_plan: Callable[[TrainPlan], None] | None = None,
) -> TrainResult:
    """Train a ``SemanticMotionPredictor`` on the videos in ``data_dir``; write everything to ``out_dir``.

    Args:
        data_dir: videos (see ``storydiff.motion.video_sources``); some are held out for evaluation.
        out_dir: output folder (layout in this module's docstring).
        encoder: an ``ImageEncoder``, ``"tiny"`` (random, offline) or a CLIP vision checkpoint path / id.
        tokens: train on the encoder's token sequence (T = patches + 1) instead of pooled embeds (T = 1).
        num_frames: L, intermediate frames per clip.
        stride: frame step inside a clip.
        steps: optimizer steps; ``epochs`` (passes over the training clips), when given, replaces it.
        batch_size: clips per step (capped at the number of training clips).
        lr, weight_decay: AdamW.
        warmup_steps: linear warm-up before the cosine decay; default 5 % of the steps.
        max_grad_norm: gradient-norm clip.
        mixed_precision: bf16 autocast; default on for CUDA. Never used on the CPU.
        seed: model init, batch order, dropout and the held-out split.
        checkpoint_every: steps between checkpoints (the last step is always saved).
        keep_checkpoints: newest checkpoints to keep.
        resume: continue from the newest checkpoint in ``out_dir`` (same settings required); without
            one, start fresh.
        holdout: fraction of videos held out (at least one).
        cache_dir: embedding cache; default ``out_dir/embedding_cache``.
        device: default CUDA when available.
        model_config: overrides of the model's config (``hidden_dim``, ``num_layers``, ``num_heads``,
            ``dropout``, ``mlp_ratio``); ``embed_dim``, ``num_frames`` and ``max_tokens`` follow the data.
        progress: tqdm progress bar.
        callback: called as ``callback(step, loss)`` after every step (and after its checkpoint).
        on_plan: called once with the ``TrainPlan`` (data summary, steps, measured seconds per step)
            just before the first step; timing it runs a few extra forward and backward passes.

    Raises:
        FileNotFoundError, NotADirectoryError, ValueError: bad data folder or settings.
        ModelLoadError: ``encoder`` names a checkpoint that cannot be loaded.
        FileExistsError: ``out_dir`` holds checkpoints and ``resume`` is False.
    """
    began = time.perf_counter()
    out = Path(out_dir)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if steps < 1 and epochs is None:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    latest = latest_checkpoint(out)
    if latest is not None and not resume:
        raise FileExistsError(
            f"{out} already holds checkpoints (latest: {latest.name}); continue that run with --resume, "
            "or choose another output folder"
        )
    amp = dev.type == "cuda" if mixed_precision is None else mixed_precision and dev.type == "cuda"

    image_encoder = _resolve_encoder(encoder, dev)
    data = build_datasets(
        data_dir,
        image_encoder,
        num_frames=num_frames,
        cache_dir=cache_dir if cache_dir is not None else out / "embedding_cache",
        tokens=tokens,
        stride=stride,
        holdout=holdout,
        seed=seed,
    )
    if len(data.train) < batch_size:
        warnings.warn(
            f"batch_size {batch_size} > {len(data.train)} training clips; using {len(data.train)}",
            stacklevel=2,
        )
        batch_size = len(data.train)
    order = _BatchOrder(len(data.train), batch_size, seed)
    if epochs is not None:
        steps = epochs * order.per_epoch
    warmup = round(0.05 * steps) if warmup_steps is None else warmup_steps

    sample_start = data.train[0][0]
    config = {
        **DEFAULT_MODEL,
        **(model_config or {}),
        "embed_dim": sample_start.shape[-1],
        "num_frames": num_frames,
        "max_tokens": sample_start.shape[0],
    }
    run = {
        "data_dir": str(Path(data_dir).resolve()),
        "encoder": image_encoder.identity,
        "tokens": tokens,
        "num_frames": num_frames,
        "stride": stride,
        "holdout": holdout,
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "warmup_steps": warmup,
        "max_grad_norm": max_grad_norm,
        "model": config,
    }

    torch.manual_seed(seed)
    model = SemanticMotionPredictor(**config)
    start_step, losses, state = 0, [], None
    if latest is not None:
        model, state = _load_for_resume(latest, run)
        start_step, losses = state["step"], list(state["losses"])
    model.to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "train_config.json", {**run, "device": str(dev), "bf16": amp})
    model.train()
    if on_plan is not None:
        timed = _TIMED_STEPS if steps - start_step >= _MIN_STEPS_TO_TIME else 0
        seconds = _seconds_per_step(model, data.train, order, start_step, amp, timed) if timed else None
        on_plan(_plan(data, batch_size, steps, start_step, seconds, timed))
    with tqdm(total=steps, initial=start_step, disable=not progress, desc="train-motion", unit="step") as bar:
        for step in range(start_step, steps):
            loss = _loss(model, _collate(data.train, order.indices(step), dev), amp)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4g}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if done % checkpoint_every == 0 or done == steps:
                train_state = {
                    "step": done,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": _rng_state(),
                    "losses": losses,
                    "run": run,
                }
                save_checkpoint(out, done, model, train_state, keep_last=keep_checkpoints)
            if callback is not None:
                callback(done, losses[-1])

    model_dir = _save_final_model(model, out)
    heldout = _write_report(model, data, losses, out)
    return TrainResult(
        out_dir=out,
        model_dir=model_dir,
        steps=steps,
        losses=losses,
        eval=heldout,
        resumed_from=start_step if latest is not None else None,
        seconds=time.perf_counter() - began,
    )
