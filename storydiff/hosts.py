"""The denoisers consistent attention installs on, one adapter per model family.

An adapter says which attention modules get consistency by default (and why), the level each sits at (its
downsampling factor relative to the image, which ``ConsistencyConfig.level_rates`` keys), and which
processor replaces the host's own there. Everything else — the CFG layout ([uncond; cond] batches, or
none), where text and image tokens sit in a joint sequence — the processors read from the calls.

* unet (UNet2DConditionModel: SD1.x/2.x, SDXL): ``attn1`` of the up blocks — the official code's choice.
* flux (FluxTransformer2DModel): the single-stream blocks, where FLUX consistency work shares image
  tokens ("double" adds the double-stream ones); text and image form one joint sequence.
* sd3 (SD3Transformer2DModel): every joint block and SD3.5's image-only ``attn2`` — one token grid, no
  levels to choose between.
* pixart (PixArtTransformer2DModel): every ``attn1``, image-only self-attention as in a UNet.

Presets for ``ConsistencyConfig.layers``: "default" (the table), "all"; UNets also "up", "up+mid"; FLUX
also "single", "double"; or a list of processor names, or a predicate on them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .config import ConsistencyConfig, InvalidSetting

_UNET_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^mid_block\.")


@dataclass(frozen=True)
class Host:
    family: str
    denoiser: torch.nn.Module
    presets: dict[str, Callable[[str], bool]]  # preset name -> which attention processors it selects
    level: Callable[[str], int | None]  # processor name -> level factor; None: never consistent
    # processor name -> our processor class for it (attention.BoundProcessor), built as
    # (state, layer, **options) — or with no arguments by diffusers, reading the module's binding
    processor: Callable[[str], type]
    rope: bool = False  # rotary position embeddings on the keys: ConsistencyConfig.rope applies
    options: dict = field(default_factory=dict)  # keyword options every processor of this host takes


def find_host(pipe_or_denoiser) -> Host:
    """The adapter for a diffusers pipeline (its ``unet`` or ``transformer``) or a bare denoiser."""
    from diffusers import (
        FluxTransformer2DModel,
        PixArtTransformer2DModel,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )

    denoiser = pipe_or_denoiser
    for attribute in ("unet", "transformer"):
        if getattr(pipe_or_denoiser, attribute, None) is not None:
            denoiser = getattr(pipe_or_denoiser, attribute)
            break
    denoiser = getattr(denoiser, "_orig_mod", denoiser)  # torch.compile'd: its processors are the module's
    builders = {
        UNet2DConditionModel: _unet_host,
        FluxTransformer2DModel: _flux_host,
        SD3Transformer2DModel: _sd3_host,
        PixArtTransformer2DModel: _pixart_host,
    }
    for cls, build in builders.items():
        if isinstance(denoiser, cls):
            return build(denoiser)
    raise ValueError(
        "consistent attention installs on UNet2DConditionModel (SD1.x/2.x, SDXL), FluxTransformer2DModel, "
        "SD3Transformer2DModel and PixArtTransformer2DModel denoisers, or pipelines with one as `.unet` / "
        f"`.transformer`; got {type(pipe_or_denoiser).__name__}"
    )


def selector(host: Host, config: ConsistencyConfig) -> Callable[[str], bool]:
    """Which attention processors of ``host`` ``config.layers`` selects (``InvalidSetting`` for a preset
    the family does not have)."""
    layers = config.layers
    if callable(layers):
        return lambda name: host.level(name) is not None and bool(layers(name))
    if isinstance(layers, list):
        return lambda name: host.level(name) is not None and name in layers
    if layers not in host.presets:
        raise InvalidSetting(
            "layers",
            f"{layers!r} is not a preset of {host.family} denoisers; choose from "
            f"{', '.join(host.presets)}, a list of processor names, or a predicate",
        )
    chosen = host.presets[layers]
    return lambda name: host.level(name) is not None and chosen(name)


# -- families ------------------------------------------------------------------------------------------


def _unet_host(unet) -> Host:
    from .attention import ConsistentAttnProcessor

    num_levels = len(unet.config.block_out_channels)

    def level(name: str) -> int | None:
        """Downsampling factor of a self-attention layer's block (VAE factor 8 × 2^depth)."""
        match = _UNET_BLOCK.match(name)
        if match is None or ".attn1." not in name:
            return None
        if name.startswith("mid_block."):
            depth = num_levels - 1
        elif match.group(1) == "down_blocks":
            depth = int(match.group(2))
        else:
            depth = num_levels - 1 - int(match.group(2))
        return 8 * 2**depth

    def up(name: str) -> bool:
        return name.startswith("up_blocks.")

    presets = {
        "default": up,
        "up": up,
        "up+mid": lambda name: name.startswith(("up_blocks.", "mid_block.")),
        "all": lambda name: True,
    }
    return Host("unet", unet, presets, level, lambda name: ConsistentAttnProcessor)


def _flux_host(transformer) -> Host:
    from .dit_processors import FluxConsistentProcessor

    def single(name: str) -> bool:
        return name.startswith("single_transformer_blocks.")

    def level(name: str) -> int | None:
        # one token grid: the VAE's 8x and the 2x2 latent packing
        return 16 if name.endswith(".attn.processor") else None

    presets = {
        "default": single,
        "single": single,
        "double": lambda name: name.startswith("transformer_blocks."),
        "all": lambda name: True,
    }
    # the transformer's own position embedder: rope="shift" rotates borrowed keys by its offset ids
    options = {"pos_embed": transformer.pos_embed}
    return Host(
        "flux", transformer, presets, level, lambda name: FluxConsistentProcessor, rope=True, options=options
    )


def _sd3_host(transformer) -> Host:
    from .attention import ConsistentAttnProcessor
    from .dit_processors import SD3ConsistentProcessor

    patch = transformer.config.patch_size

    def level(name: str) -> int | None:
        return 8 * patch if name.endswith((".attn.processor", ".attn2.processor")) else None

    def processor(name: str) -> type:
        # SD3.5's attn2 is image-only self-attention: the UNet processor's math applies as it is
        return ConsistentAttnProcessor if name.endswith(".attn2.processor") else SD3ConsistentProcessor

    presets = {"default": lambda name: True, "all": lambda name: True}
    return Host("sd3", transformer, presets, level, processor)


def _pixart_host(transformer) -> Host:
    from .attention import ConsistentAttnProcessor

    patch = transformer.config.patch_size

    def level(name: str) -> int | None:
        return 8 * patch if name.endswith(".attn1.processor") else None

    presets = {"default": lambda name: True, "all": lambda name: True}
    return Host("pixart", transformer, presets, level, lambda name: ConsistentAttnProcessor)
