"""Stable Video Diffusion: the video model the transition stage (``motion/``) conditions. Not a story
family (consistency does not install on it); this module is where the rest of the library gets its class.

* Offline model: ``tiny-svd`` (``tiny_models.py``).
"""

from __future__ import annotations

from diffusers import StableVideoDiffusionPipeline

from .reserved import TINY_SVD

#: the diffusers pipeline class of SVD (motion/ annotates and loads with it)
SVDPipeline = StableVideoDiffusionPipeline
reserved = (TINY_SVD,)
