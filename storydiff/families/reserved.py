"""Reserved model names: models this project builds offline with seeded random weights (``tiny_models.py``
builds them; it is imported only when one of these names is asked for).

Each family module declares its names (``Family.reserved``): the first four families take theirs from the
groups here, which tests and benchmarks pick models by; a later family declares its own in its module
(``qwen.py``). Every story model name: ``registry.reserved_story_models()``. ``RESERVED_MODELS`` are the
names of this module's groups; ``TINY_SVD`` is the video model's.
"""

from __future__ import annotations

import torch

TEXT_TO_IMAGE = ("tiny-sdxl", "tiny-sd15", "random-sdxl")
TINY_TEXT_TO_IMAGE = ("tiny-sdxl", "tiny-sd15")  # small enough for a CPU
TINY_SVD = "tiny-svd"
# Diffusion transformers (FLUX, SD3.5, PixArt-Σ structure at tiny widths).
TINY_DIT = ("tiny-flux", "tiny-sd3", "tiny-pixart")
# Real-size diffusion transformers with random weights, for GPU memory and speed (not for a CPU).
RANDOM_DIT = ("random-flux",)
# each story family's names (``Family.reserved``)
FLUX = ("tiny-flux", "random-flux")
SD3 = ("tiny-sd3",)
PIXART = ("tiny-pixart",)
RESERVED_MODELS = (*TEXT_TO_IMAGE, TINY_SVD, *TINY_DIT, *RANDOM_DIT)
# Reserved models whose default dtype is not ``loading.default_dtype``'s: FLUX.1 runs in bfloat16 (float16
# overflows in its activations, float32 would be 48 GB).
NATIVE_DTYPES = {"random-flux": torch.bfloat16}
