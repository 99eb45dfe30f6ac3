"""On-disk cache of per-frame embeddings, so training epochs never re-run the image encoder.

One safetensors file per (video, encoder, mode). The file name carries a hash of the video's path,
modification times and sizes, the encoder's identity and the mode (pooled or token embeddings): change
any of them and the old file is simply not found again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..support.atomic import atomic_path
from .encoder import ImageEncoder
from .video_sources import VideoSource, read_frames, source_fingerprint

__all__ = ["EmbeddingCache"]


class EmbeddingCache:
    """Embeddings of every frame of a video, (F, T, C) float32 on the CPU, encoded at most once.

    Args:
        cache_dir: folder for the safetensors files (created on demand).
        encoder: the frozen image encoder.
        tokens: cache ``encode_tokens`` (T = patches + 1) instead of pooled ``encode`` (T = 1).
        batch_size: frames per encoder call.

    ``encoded_videos`` counts how many videos this cache had to run the encoder on.
    """

    def __init__(
        self, cache_dir: str | Path, encoder: ImageEncoder, *, tokens: bool = False, batch_size: int = 64
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.encoder = encoder
        self.tokens = tokens
        self.batch_size = batch_size
        self.encoded_videos = 0

    def path_for(self, source: VideoSource) -> Path:
        mode = "tokens" if self.tokens else "pooled"
        key = hashlib.sha256(f"{source_fingerprint(source)}|{self.encoder.identity}|{mode}".encode())
        return self.cache_dir / f"{source.path.stem}-{key.hexdigest()[:24]}.safetensors"

    def load(self, source: VideoSource) -> Tensor:
        """The (F, T, C) embeddings of ``source``'s frames, from disk if cached, else encoded and stored."""
        path = self.path_for(source)
        if path.exists():
            return load_file(path)["embeddings"]
        frames = read_frames(source)
        encode = self.encoder.encode_tokens if self.tokens else self.encoder.encode
        embeddings = encode(frames, batch_size=self.batch_size).cpu().contiguous()
        self.encoded_videos += 1
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        metadata = {"source": str(source.path), "encoder": self.encoder.identity, "tokens": str(self.tokens)}
        # An interrupted run must never leave a truncated file that a later run would load as cached.
        with atomic_path(path) as tmp:
            save_file({"embeddings": embeddings}, tmp, metadata=metadata)
        return embeddings

    def load_all(self, sources: list[VideoSource]) -> list[Tensor]:
        with torch.no_grad():
            return [self.load(s) for s in sources]
