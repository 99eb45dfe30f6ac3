"""Transition videos between story frames: Stable Video Diffusion conditioned on one embedding per frame.

Stable Video Diffusion (SVD) conditions every frame of a clip on the same CLIP image embedding of its input
image: the pipeline hands the UNet one embedding per video, (B, 1, C), and the UNet repeats it for each frame
before the spatial transformer blocks see it as (B·F, 1, C). StoryDiffusion's video stage instead conditions
frame i on its own embedding — the start frame's, the end frame's, and in between those predicted by the
Semantic Motion Predictor (or a linear interpolation) — so the clip is steered from one story frame towards
the next. We do that by swapping the processors of SVD's *spatial* cross-attention layers for
``PerFrameCrossAttnProcessor``, which reads the per-frame embeddings from an explicit
``PerFrameEmbeddingState`` and otherwise runs the layer's own processor unchanged.

The temporal blocks keep SVD's own embedding: SVD feeds them the first frame's embedding at every position
(``TransformerSpatioTemporalModel``), which here is the start image's, exactly as in stock SVD.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from ..families.svd import SVDPipeline
from ..pages.video_io import write_video
from ..support.compat import svd_image_embedding
from .baselines import linear_interpolation
from .conditioning import PerFrameEmbeddingState, per_frame_conditioning

__all__ = ["ImageInput", "TransitionResult", "TransitionVideoPipeline", "check_predictor"]

ImageInput = Image.Image | str | os.PathLike


@dataclass
class TransitionResult:
    """One transition clip: its frames, the (F, T, C) per-frame embeddings that conditioned it, its files."""

    frames: list[Image.Image]
    embeddings: Tensor
    gif_path: Path | None = None
    mp4_path: Path | None = None


def check_predictor(predictor: torch.nn.Module, num_frames: int, embed_dim: int) -> None:
    """Raise ``ValueError`` unless the predictor makes ``num_frames - 2`` embeddings of width ``embed_dim``.

    The predictor's ``config.num_frames`` counts the intermediate frames only (endpoints excluded), and its
    ``config.embed_dim`` must be the width of the video model's image embeddings.
    """
    config = getattr(predictor, "config", None)
    if config is None:
        return  # a plain module: its output shape is checked after the call
    want, have = num_frames - 2, getattr(config, "num_frames", None)
    if have is not None and have != want:
        raise ValueError(
            f"the motion predictor predicts {have} intermediate frames, but a {num_frames}-frame video needs "
            f"{want} (num_frames - 2); use num_frames={have + 2} or a predictor trained for {want}"
        )
    dim = getattr(config, "embed_dim", None)
    if dim is not None and dim != embed_dim:
        raise ValueError(
            f"the motion predictor works on {dim}-dim embeddings, but this video model's image encoder makes "
            f"{embed_dim}-dim ones; the predictor must be trained on the same image encoder"
        )


def _load_image(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    with Image.open(path) as im:
        return im.convert("RGB")


class TransitionVideoPipeline:
    """A clip from one image to another: SVD conditioned on the start image and on per-frame embeddings.

    Frame 0 is conditioned on the start image's CLIP embedding, the last frame on the end image's, and the
    frames between on the ``predictor``'s output (a ``SemanticMotionPredictor``, or any module mapping
    (B, T, C) start and end embeddings to (B, L, T, C)) or, without one, on the linear interpolation of the
    two. Embeddings come from SVD's own image encoder, the encoder the predictor is trained on (OpenCLIP
    ViT-H/14 image embeds, 1024-dim, in real SVD). The predictor is put in eval mode.
    """

    def __init__(
        self,
        svd_pipe: SVDPipeline,
        predictor: torch.nn.Module | None = None,
        *,
        compile_predictor: bool | None = None,
    ) -> None:
        self.svd_pipe = svd_pipe
        self.predictor = predictor.eval() if predictor is not None else None
        self.state = PerFrameEmbeddingState()
        # torch.compile'd predictor (static shapes, full graph) by default when it runs on a GPU
        param = next(predictor.parameters(), None) if predictor is not None else None
        on_gpu = param is not None and param.device.type == "cuda"
        self.compile_predictor = on_gpu if compile_predictor is None else compile_predictor
        self._compiled: dict[tuple[int, int], Callable] = {}

    def _predict(self, start: Tensor, end: Tensor) -> Tensor:
        if not self.compile_predictor or not hasattr(self.predictor, "config"):
            return self.predictor(start, end)
        from .compiled import compile_predictor

        key = (start.shape[0], start.shape[1])
        if key not in self._compiled:  # one compile per input shape
            self._compiled[key] = compile_predictor(self.predictor, batch_size=key[0], num_tokens=key[1])
        return self._compiled[key](start, end)

    @property
    def embed_dim(self) -> int:
        return int(self.svd_pipe.image_encoder.config.projection_dim)

    @torch.no_grad()
    def encode_image(self, image: ImageInput) -> Tensor:
        """(1, 1, C) image embedding, computed exactly as SVD computes its own conditioning embedding."""
        # SVD's own preprocessing (antialiased resize to 224², CLIP normalisation), so the start frame's
        # embedding is bit-identical to the one SVD conditions on.
        return svd_image_embedding(self.svd_pipe, _load_image(image))

    @torch.no_grad()
    def frame_embeddings(self, start: Tensor, end: Tensor, num_frames: int) -> Tensor:
        """(B, num_frames, T, C): start, the predicted (or interpolated) intermediates, end."""
        if num_frames < 3:
            raise ValueError(
                f"num_frames must be >= 3 (start, at least one intermediate, end), got {num_frames}"
            )
        if start.shape != end.shape or start.ndim != 3:
            raise ValueError(
                "start and end embeddings must both be (B, T, C), "
                f"got {tuple(start.shape)} and {tuple(end.shape)}"
            )
        steps = num_frames - 2
        if self.predictor is None:
            middle = linear_interpolation(start.float(), end.float(), steps)
        else:
            check_predictor(self.predictor, num_frames, start.shape[-1])
            param = next(self.predictor.parameters(), None)
            device, dtype = (param.device, param.dtype) if param is not None else (start.device, start.dtype)
            middle = self._predict(start.to(device, dtype), end.to(device, dtype))
            expected = (start.shape[0], steps, *start.shape[1:])
            if tuple(middle.shape) != expected:
                raise ValueError(
                    f"the motion predictor returned shape {tuple(middle.shape)}, "
                    f"expected (B, L, T, C) = {expected}"
                )
        middle = middle.to(start.device, start.dtype)
        return torch.cat([start.unsqueeze(1), middle, end.unsqueeze(1)], dim=1)

    def __call__(
        self,
        start_image: ImageInput,
        end_image: ImageInput,
        *,
        num_frames: int | None = None,
        num_inference_steps: int = 25,
        height: int | None = None,
        width: int | None = None,
        seed: int = 0,
        fps: int = 7,
        motion_bucket_id: int = 127,
        noise_aug_strength: float = 0.02,
        decode_chunk_size: int | None = None,
        min_guidance_scale: float = 1.0,
        max_guidance_scale: float = 3.0,
        out_dir: str | os.PathLike | None = None,
        name: str = "transition",
    ) -> TransitionResult:
        """Generate the clip from ``start_image`` to ``end_image`` (PIL images or paths).

        ``num_frames`` defaults to the predictor's frame count + 2, else to SVD's own default. ``height`` and
        ``width`` (multiples of 8) default to the start image's size rounded down to multiples of 8.
        ``max_guidance_scale <= 1`` turns classifier-free guidance off, as in SVD. The other settings are
        SVD's. The same ``seed`` gives the same clip. With ``out_dir``, writes ``{name}.gif`` and, when an
        encoder is installed (see ``video_io.MP4_PACKAGES``), ``{name}.mp4``.
        """
        start, end = _load_image(start_image), _load_image(end_image)
        if num_frames is None:
            config = getattr(self.predictor, "config", None)
            predicted = getattr(config, "num_frames", None)
            num_frames = predicted + 2 if predicted is not None else int(self.svd_pipe.unet.config.num_frames)
        width = width or start.width // 8 * 8
        height = height or start.height // 8 * 8
        if height <= 0 or width <= 0 or height % 8 or width % 8:
            raise ValueError(f"height and width must be positive multiples of 8, got {height}x{width}")
        embeddings = self.frame_embeddings(self.encode_image(start), self.encode_image(end), num_frames)

        with per_frame_conditioning(self.svd_pipe.unet, self.state):
            self.state.set(embeddings)  # inside: leaving the block clears it, also on error
            # A CPU generator draws the same noise on every device, so a seed names one clip everywhere.
            output = self.svd_pipe(
                start,
                height=height,
                width=width,
                num_frames=num_frames,
                num_inference_steps=num_inference_steps,
                min_guidance_scale=min_guidance_scale,
                max_guidance_scale=max_guidance_scale,
                fps=fps,
                motion_bucket_id=motion_bucket_id,
                noise_aug_strength=noise_aug_strength,
                decode_chunk_size=decode_chunk_size,
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="pil",
            )
        frames = list(output.frames[0])
        result = TransitionResult(frames, embeddings[0].detach().float().cpu())
        if out_dir is not None:
            result.gif_path, result.mp4_path = write_video(frames, out_dir, name, fps)
        return result
