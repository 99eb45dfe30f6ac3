"""Reference images per character, through diffusers' IP-Adapter support (UNet models: SD1.x/2.x, SDXL;
and FLUX.1).

    sp = StoryDiffusionPipeline(pipe, config)
    sp.load_ip_adapter("ip-adapter_sdxl.safetensors", image_encoder="image_encoder/", scale=0.6)
    sp(story, reference_images={"Bob": "bob.png", "Alice": alice_image})

Loading is diffusers' own ``load_ip_adapter`` (its file format: ``image_proj`` and ``ip_adapter`` parts; the
plain adapter, which reads CLIP's image embedding, and the "plus" ones, plus-face included, which read its
penultimate hidden states). Each character's image is encoded once, as diffusers' pipelines encode an
``ip_adapter_image`` (``prepare_ip_adapter_image_embeds``: under guidance the negative is what they use,
zeros or the encoding of a black image).

How a frame gets only its own characters' images: every denoiser call on a chunk of frames passes
``image_embeds`` of shape (batch, slots, ...) — slots: the most characters-with-an-image any frame of the
chunk shows — and ``ip_adapter_masks`` (batch, slots, h, w), 1 where a slot holds one of the frame's
characters and 0 elsewhere. diffusers' ``IPAdapterAttnProcessor2_0`` adds ``scale · mask · attention`` per
slot, so an empty slot adds exactly zero: a frame's result does not depend on which frames share its chunk,
a frame showing two characters reads both images, a frame showing none reads nothing. With an adapter
loaded and no images every mask is zero (the UNet needs ``image_embeds`` once an adapter is loaded), which
computes the stock cross-attention.

With subject masks (given or automatic) a slot's mask is, instead of 1 over the whole frame, the frame's
subject mask of that slot's character (``ReferenceImages``): each character's image acts in its own region.

FLUX: diffusers' IP-Adapter processors sit on the double-stream blocks (consistency's default is the
single-stream ones) and take no masks; ``dit_processors.FluxMaskedIPAdapterProcessor`` replaces them with
the same weights and per-image masks (B, slots). FLUX has no CFG batch, so no negative embeddings.
"""

from __future__ import annotations

import hashlib
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from ..consistency.config import InvalidSetting
from ..consistency.subject_masks import SubjectMasks
from ..families.base import SUPPORTED, Family
from ..families.registry import find_family
from .errors import ModelLoadError

_SOURCE_ATTR = "_storydiff_ip_adapter"  # on the denoiser: where load_ip_adapter's adapter came from
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _family(pipe) -> Family | None:
    """The pipeline's family if its stories take reference images, else None."""
    family = find_family(pipe)
    return family if family is not None and family.supports_reference_images else None


def _denoiser(pipe):
    family = _family(pipe)
    return family.denoiser if family is not None else None


def adapter_projection(pipe):
    """The loaded IP-Adapter's image projection (diffusers' ``MultiIPAdapterImageProjection``) or None."""
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    projection = getattr(_denoiser(pipe), "encoder_hid_proj", None)
    return projection if isinstance(projection, MultiIPAdapterImageProjection) else None


def _ip_processor_classes() -> tuple[type, ...]:
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    return IPAdapterAttnProcessor2_0, FluxIPAdapterAttnProcessor


def _variant(layer) -> str:
    from diffusers.models.embeddings import (
        ImageProjection,
        IPAdapterFullImageProjection,
        IPAdapterPlusImageProjection,
    )

    names = {
        ImageProjection: "plain",
        IPAdapterPlusImageProjection: "plus",
        IPAdapterFullImageProjection: "full",
    }
    for cls, name in names.items():
        if type(layer) is cls:
            return name
    raise ValueError(
        f"IP-Adapters with a {type(layer).__name__} take face embeddings, not images: reference images "
        "support the plain, plus, plus-face and full-face adapters"
    )


def _single_layer(pipe):
    projection = adapter_projection(pipe)
    if projection is None:
        return None
    if projection.num_ip_adapters != 1:
        raise ValueError(
            f"reference images use one IP-Adapter; this pipeline has {projection.num_ip_adapters} loaded"
        )
    return projection.image_projection_layers[0]


def adapter_scale(pipe) -> float | None:
    """The scale of the loaded adapter's processors (the first one's: ``set_ip_adapter_scale`` sets all)."""
    for processor in _denoiser(pipe).attn_processors.values():
        if isinstance(processor, _ip_processor_classes()):
            return float(processor.scale[0])
    return None


def adapter_metadata(pipe) -> dict | None:
    """What a run records about the loaded IP-Adapter (None without one): its weights and image encoder
    (paths, when loaded by :func:`load_ip_adapter`; None when loaded otherwise), variant, scale."""
    layer = _single_layer(pipe)
    if layer is None:
        return None
    denoiser = _denoiser(pipe)
    source = getattr(denoiser, _SOURCE_ATTR, None)
    if source is None or source["projection"]() is not denoiser.encoder_hid_proj:
        source = {"weights": None, "image_encoder": None}  # loaded since with diffusers' own call
    return {
        "weights": source["weights"],
        "image_encoder": source["image_encoder"],
        "variant": _variant(layer),
        "scale": adapter_scale(pipe),
    }


def _check_pipe(pipe) -> None:
    if _denoiser(pipe) is None or not hasattr(pipe, "load_ip_adapter"):
        raise ValueError(f"{SUPPORTED}; got {type(pipe).__name__}")


def _weights_file(weights: str | Path) -> Path:
    path = Path(weights).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
        if len(found) != 1:
            listed = ", ".join(p.name for p in found) or "none"
            raise ModelLoadError(
                f"IP-Adapter folder {path} must hold exactly one weights file "
                f"({'/'.join(WEIGHT_SUFFIXES)}), found {listed}: pass the file"
            )
        return found[0]
    if not path.is_file():
        raise ModelLoadError(f"IP-Adapter weights {path}: no such file or folder")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ModelLoadError(f"IP-Adapter weights {path}: expected a {'/'.join(WEIGHT_SUFFIXES)} file")
    return path


def load_ip_adapter(
    pipe, weights: str | Path, *, image_encoder: str | Path | None = None, scale: float = 1.0
) -> dict:
    """Load an IP-Adapter from a local file (or a folder holding one weights file) into ``pipe``, with
    diffusers' ``pipe.load_ip_adapter``; returns :func:`adapter_metadata`.

    ``image_encoder``: a local ``CLIPVisionModelWithProjection`` folder. None: keep the pipeline's image
    encoder if it has one, else load the ``image_encoder`` folder next to the weights (the layout of the
    IP-Adapter repositories). ``scale``: the adapter's weight (``set_ip_adapter_scale``). Raises
    ``loading.ModelLoadError`` for a missing or unloadable file or folder (a failed load may leave the
    denoiser half converted: load the pipeline again).
    """
    from transformers import CLIPVisionModelWithProjection

    _check_pipe(pipe)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InvalidSetting("ip_scale", f"must be a finite number, got {scale!r}")
    path = _weights_file(weights)
    denoiser = _denoiser(pipe)
    if image_encoder is None and getattr(pipe, "image_encoder", None) is None:
        image_encoder = path.parent / "image_encoder"
        if not image_encoder.is_dir():
            raise ModelLoadError(
                f"no image encoder for the IP-Adapter {path}: give --image-encoder (image_encoder: a "
                f"CLIP vision model folder), or put one at {image_encoder}"
            )
    encoder_path = None
    if image_encoder is not None:
        encoder_path = Path(image_encoder).expanduser()
        if not (encoder_path / "config.json").is_file():
            raise ModelLoadError(f"image encoder {encoder_path}: not a folder with a config.json")
        try:
            encoder = CLIPVisionModelWithProjection.from_pretrained(
                encoder_path, dtype=denoiser.dtype, local_files_only=True
            )
        except Exception as exc:  # transformers' errors vary with what is wrong with the folder
            raise ModelLoadError(f"image encoder {encoder_path}: {type(exc).__name__}: {exc}") from exc
        pipe.register_modules(image_encoder=encoder.to(denoiser.device).eval())
    # no image encoder folder (FLUX's loader names the argument differently): it is registered above (or
    # was already there)
    no_encoder = {_family(pipe).ip_encoder_argument: None}
    try:
        pipe.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, **no_encoder)
    except Exception as exc:
        model = type(denoiser).__name__
        raise ModelLoadError(
            f"IP-Adapter {path} does not load into this {model}: {type(exc).__name__}: {exc}"
        ) from exc
    _variant(_single_layer(pipe))  # refuse face-embedding adapters now, not at the first story
    pipe.set_ip_adapter_scale(float(scale))
    setattr(
        denoiser,
        _SOURCE_ATTR,
        {
            "weights": str(path.resolve()),
            "image_encoder": str(encoder_path.resolve()) if encoder_path is not None else None,
            "projection": weakref.ref(denoiser.encoder_hid_proj),  # which load these paths describe
        },
    )
    return adapter_metadata(pipe)


# -- reference images ------------------------------------------------------------------------------------


def read_reference_image(name: str, image: Image.Image | str | Path) -> tuple[Image.Image, dict]:
    """(RGB image, its record) for a character's reference image given as a PIL image or a file path. The
    record's sha256 is of the RGB pixels (with the size), the same whether the image came as a file or an
    object, so a resumed run can check it is given the same image; a path is recorded too."""
    record: dict = {}
    if isinstance(image, (str, Path)):
        path = Path(image).expanduser()
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise InvalidSetting(
                "reference_images", f"of {name!r}: cannot read {path} as an image ({type(exc).__name__})"
            ) from None
        record["path"] = str(path.resolve())
    elif isinstance(image, Image.Image):
        image = image.convert("RGB")
    else:
        raise InvalidSetting(
            "reference_images",
            f"of {name!r} must be a PIL image or an image file path, got {type(image).__name__}",
        )
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return image, {"sha256": digest.hexdigest(), **record}


def check_reference_images(pipe, images: Mapping, appears) -> None:
    """The errors a run with ``images`` (character name -> image) must raise before anything runs:
    ``appears(name)``: whether the story shows the character."""
    if not images:
        return
    if not isinstance(images, Mapping):
        raise InvalidSetting(
            "reference_images", f"must map character names to images, got {type(images).__name__}"
        )
    if _denoiser(pipe) is None:
        raise InvalidSetting(
            "reference_images",
            f"work with UNet models (SD1.x/2.x, SDXL) and FLUX.1 only, not {type(pipe).__name__}",
        )
    if adapter_projection(pipe) is None:
        raise InvalidSetting(
            "reference_images", "need an IP-Adapter: load one first (StoryDiffusionPipeline.load_ip_adapter)"
        )
    _variant(_single_layer(pipe))
    check_adapter_layers(pipe)
    if getattr(pipe, "image_encoder", None) is None or getattr(pipe, "feature_extractor", None) is None:
        raise InvalidSetting(
            "reference_images", "need the IP-Adapter's image encoder, which the pipeline lacks"
        )
    absent = sorted(str(name) for name in images if not appears(name))
    if absent:
        raise InvalidSetting(
            "reference_images", f"name {', '.join(map(repr, absent))}, who is in no frame of the story"
        )


def check_adapter_layers(pipe) -> None:
    """The IP-Adapter's processors must still be where the family needs them (FLUX: the double-stream
    blocks, which consistency installed there after loading the adapter replaces)."""
    family = _family(pipe)
    if family is not None and adapter_projection(pipe) is not None:
        family.check_adapter_layers(_ip_processor_classes())


def encode_reference(pipe, image: Image.Image, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) embedding of one image, as diffusers' pipelines make them for the loaded adapter
    (the family's ``encode_reference``: FLUX has no CFG batch, and zeros stand for the unused negative)."""
    return _family(pipe).encode_reference(image, device)


def _filler_shape(layer) -> tuple[int, ...]:
    """What the projection layer reads, for a slot no image fills (its output is masked out): the plain
    adapter's embedding width, or one token of the hidden states the others read."""
    variant = _variant(layer)
    if variant == "plain":
        return (layer.image_embeds.in_features,)
    width = layer.proj_in.in_features if variant == "plus" else layer.ff.net[0].proj.in_features
    return (1, width)


@dataclass
class ReferenceImages:
    """Each character's encoded reference image and the characters with one each frame shows (in the
    frame's order); builds the IP-Adapter inputs of any chunk of frames (see the module docstring).

    ``subject_masks``: where the run's current subject masks come from (a callable: ``SubjectMasks`` or
    None), or None. With masks, a character's image applies inside that character's subject mask in each
    frame — its slot's IP-Adapter mask is the frame's subject mask for it at the mask size (the resize rule
    of ``subject_masks.py``) — instead of the whole frame, so two characters sharing a frame each get their
    own image in their own region (diffusers' documented masked IP-Adapter use). Whole frame where there is
    no mask yet (the source gives None: automatic masks' warm-up step 0), and where a character's mask is
    empty at the mask size (nothing found: the image is kept rather than dropped, as the state then draws
    the frame whole). FLUX's masked processor takes one number per frame and slot (``size`` ()): whole
    frames there. Without a source the masks are those of no subject masks, bit for bit.

    The source is read at every :meth:`chunk`: ``LockstepDenoiser`` builds a call's reference inputs after
    its step hook has swapped in that call's masks (automatic masks change them before every call)."""

    embeds: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (positive, negative), (*embed)
    frame_slots: Sequence[tuple[str, ...]]
    filler: torch.Tensor  # an empty slot's embedding (zeros, of the embeddings' shape, device and dtype)
    subject_masks: Callable[[], SubjectMasks | None] | None = None

    @classmethod
    def encode(
        cls,
        pipe,
        images: Mapping[str, Image.Image],
        frame_characters: Sequence[Sequence[str]],
        device,
        *,
        subject_masks: Callable[[], SubjectMasks | None] | None = None,
    ) -> ReferenceImages:
        """Encode ``images`` (name -> RGB image) once; ``frame_characters``: each frame's characters;
        ``subject_masks``: the run's current subject masks (see the class docstring)."""
        family = _family(pipe)
        family.prepare_reference_images(_ip_processor_classes())
        embeds = {name: encode_reference(pipe, image, device) for name, image in images.items()}
        slots = [tuple(name for name in names if name in embeds) for names in frame_characters]
        if embeds:
            filler = torch.zeros_like(next(iter(embeds.values()))[0])
        else:
            dtype = _denoiser(pipe).dtype
            filler = torch.zeros(_filler_shape(_single_layer(pipe)), device=device, dtype=dtype)
        return cls(embeds, slots, filler, subject_masks)

    @classmethod
    def none(cls, pipe, num_frames: int, device) -> ReferenceImages:
        """No frame has an image: every mask is zero (an adapter is loaded, and the UNet wants inputs)."""
        return cls.encode(pipe, {}, [()] * num_frames, device)

    def chunk(self, frames: Sequence[int], cfg: bool, size: tuple[int, ...]) -> tuple[list, list]:
        """(image_embeds, ip_adapter_masks) for the denoiser call on ``frames`` (CFG: [uncond; cond] rows);
        ``size``: each mask's (UNet: the latent grid (height, width), which gives diffusers' downsampling
        the aspect ratio; FLUX: () — one number per frame and slot)."""
        slots = max(1, *(len(self.frame_slots[i]) for i in frames))
        positive = self.filler.expand(len(frames), slots, *self.filler.shape).clone()
        negative = positive.clone()
        mask = torch.zeros(len(frames), slots, *size, device=self.filler.device)
        for row, frame in enumerate(frames):
            for slot, name in enumerate(self.frame_slots[frame]):
                positive[row, slot], negative[row, slot] = self.embeds[name]
                mask[row, slot] = 1.0
        if self.subject_masks is not None and size:  # each image inside its character's subject mask
            mask = self._masks(frames, slots, size, self.subject_masks())
        if cfg:
            return [torch.cat([negative, positive])], [torch.cat([mask, mask])]
        return [positive], [mask]

    def _masks(
        self, frames: Sequence[int], slots: int, size: tuple[int, ...], current: SubjectMasks | None
    ) -> torch.Tensor:
        """(frames, slots, *size): each slot's region in its frame (the class docstring)."""
        mask = torch.zeros(len(frames), slots, *size)
        for row, frame in enumerate(frames):
            for slot, name in enumerate(self.frame_slots[frame]):
                mask[row, slot] = 1.0
                if current is None or not size or name not in current.masks.get(frame, {}):
                    continue
                region = current.mask(frame, name, size)
                if region.any():  # an empty mask found nothing: the whole frame, not no image
                    mask[row, slot] = region.to(mask.dtype)
        return mask.to(self.filler.device)


def wants_image_inputs(pipe) -> bool:
    """Whether the pipeline's denoiser needs IP-Adapter inputs at every call (an adapter is loaded)."""
    return adapter_projection(pipe) is not None
