"""What a model family is: the one object the rest of the library asks about a pipeline or a denoiser.

A family module (``unet.py``, ``flux.py``, ``sd3.py``, ``pixart.py``) subclasses :class:`Family` and holds
everything that family needs: its diffusers pipeline and denoiser classes, which attention modules get
consistency and why (``host``), its token layout and the processors that know it, how it takes one
denoising step exactly as its diffusers pipeline does (noise, timesteps, conditioning, the denoiser call with
guidance, decoding), its IP-Adapter and sampler facts, how its single-file checkpoints load, and the names of
its offline tiny models. ``registry.py`` is the only code that asks "which family is this?".

``LockstepDenoiser`` (runs/lockstep.py) runs every story — bank mode (both schedules), window mode,
checkpoints and resume — through a family's step methods, so those features work alike on every family. A
story with consistency off gives the stock pipeline's latents for the same prompts and seeds (tests check it
for every family).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import ClassVar

import torch
from PIL import Image

from ..consistency.config import InvalidSetting
from ..consistency.install import Host, installed_state
from ..consistency.state import COND, UNCOND
from ..support.compat import execution_device

# the error for the families whose stories take no IP-Adapter
SUPPORTED = "reference images work with UNet models (SD1.x/2.x, SDXL) and FLUX.1 only"


class Family:
    """One model family; an instance drives one pipeline of it (``family.pipe``)."""

    name: ClassVar[str]
    title: ClassVar[str]  # what users call the models, e.g. "SD1.x/2.x, SDXL"
    #: the diffusers pipeline classes stories run on, and the denoiser class consistency installs on
    pipelines: ClassVar[tuple[type, ...]]
    denoiser_class: ClassVar[type]
    #: the pipeline attribute holding the denoiser
    denoiser_attribute: ClassVar[str] = "transformer"
    #: reserved names of this family's offline random-weight models (``reserved.py``, ``tiny_models.py``)
    reserved: ClassVar[tuple[str, ...]] = ()
    #: reference images (an IP-Adapter, ``models/ip_adapter.py``) can condition this family's frames
    supports_reference_images: ClassVar[bool] = False
    #: the scheduler swap to DDIM and FreeU (``models/sampler.py``) apply to this family
    official_sampler: ClassVar[bool] = False
    #: the official StoryDiffusion variants (``consistency/official.py``: processors for UNets only) exist
    #: for this family, so benchmarks and the VRAM profiler can compare with them
    official_variants: ClassVar[bool] = False
    #: single-file checkpoints (``models/model_files.py``): None, "whole" (UNet, VAE and text encoders in one
    #: file) or "transformer" (the denoiser only; the rest comes from a config folder)
    single_file: ClassVar[str | None] = None
    #: how classifier-free guidance runs: 1 — one denoiser call per step on [uncond frames; cond frames];
    #: 2 — two calls per step, cond then uncond, each on just the frames (Qwen-Image, Wan), through
    #: ``guided_passes``, which tells the installed consistency state which CFG group each call computes.
    #: Either way the conditioning from ``encode`` holds both halves and banks hold both groups.
    cfg_passes: ClassVar[int] = 1
    #: a story frame is a shot (a clip of ``RunSettings.shot_frames`` video frames): ``decode`` gives its
    #: frames, and the output writes videos and a storyboard
    video: ClassVar[bool] = False
    #: each shot starts from a given image (image-to-video): ``RunPlan.keyframes``
    needs_keyframes: ClassVar[bool] = False
    #: automatic subject masks (``subject_token_columns``, ``record_subjects``) work on this family
    records_subject_masks: ClassVar[bool] = False

    def __init__(self, pipe) -> None:
        self.pipe = pipe

    # -- automatic subject masks (consistency/cross_attention_masks.py) ----------------------------------
    def subject_token_columns(self, prompt: str, phrase: str) -> list[int]:
        """The text-key columns of ``phrase`` (a character's description) inside ``prompt`` as this family's
        denoiser sees the prompt's tokens: what a cross-attention recorder sums over. Families that
        record subject masks override it; the others refuse (ValueError, one line)."""
        raise ValueError(auto_masks_refused(self.title))

    def record_subjects(self, state, recorder) -> Callable[[], None]:
        """Feed ``recorder`` (a ``SubjectAttentionRecorder``) from this family's denoiser calls; returns
        what undoes it. Refused where ``subject_token_columns`` is."""
        self.subject_token_columns("", "")
        raise NotImplementedError  # a family with columns records too

    # -- which family ------------------------------------------------------------------------------------
    @classmethod
    def drives(cls, pipe) -> bool:
        """Whether stories run on ``pipe`` through this family."""
        return isinstance(pipe, cls.pipelines)

    @classmethod
    def hosts(cls, denoiser) -> bool:
        """Whether ``denoiser`` is this family's denoiser."""
        return isinstance(denoiser, cls.denoiser_class)

    @classmethod
    def host(cls, denoiser) -> Host:
        """Which attention modules of ``denoiser`` get consistency, at which level, with which processor."""
        raise NotImplementedError

    @classmethod
    def experts(cls, pipe) -> tuple[torch.nn.Module, ...]:
        """Further denoisers of ``pipe`` that take other steps of the same run (``Host.experts``)."""
        return ()

    @classmethod
    def is_transformer(cls) -> bool:
        return cls.denoiser_attribute == "transformer"

    # -- facts of the pipeline -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return execution_device(self.pipe)  # a property: model CPU offload may be enabled later

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_attribute)

    @property
    def multiple(self) -> int:
        """What height and width must be multiples of (VAE factor, times patching for transformers)."""
        return self.pipe.vae_scale_factor

    @property
    def default_size(self) -> int:
        """The model's native image side in pixels."""
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    @property
    def latent_dtype(self) -> torch.dtype:
        """The dtype the run keeps latents in between steps (the stock pipeline's)."""
        return self.denoiser.dtype

    def uses_cfg_batch(self, guidance_scale: float) -> bool:
        """Whether guidance is classifier-free with [uncond; cond] halves: one doubled batch
        (``cfg_passes`` 1) or two denoiser calls (2). Either way banks hold 2 CFG groups."""
        return guidance_scale > 1

    def check_size(self, height: int, width: int) -> None:
        for name, value in (("height", height), ("width", width)):
            if value % self.multiple:
                raise ValueError(
                    f"{name} must be a multiple of {self.multiple} pixels for {self.name} models, got {value}"
                )

    # -- one story ----------------------------------------------------------------------------------------
    def noise_shape(self, height: int, width: int) -> tuple[int, ...]:
        """One frame's starting noise, as the stock pipeline draws it for one image."""
        scale = self.pipe.vae_scale_factor
        return (self.denoiser.config.in_channels, height // scale, width // scale)

    def initial_latents(self, noise: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(frames, ...) latents the denoiser steps on, from (frames, *noise_shape) noise."""
        return noise * self.pipe.scheduler.init_noise_sigma

    def set_timesteps(self, scheduler, steps: int, height: int, width: int) -> torch.Tensor:
        scheduler.set_timesteps(steps, device=self.device)
        timesteps, trained = scheduler.timesteps, scheduler.config.get("num_train_timesteps")
        if trained and len(timesteps) and not timesteps.is_floating_point():
            # "leading" spacing adds steps_offset after spacing: with as many steps as training timesteps
            # the first is num_train_timesteps, one past the model's last (DDIM, PNDM index their alphas
            # with it). Shifted down, the schedule is every trained timestep, as "trailing" gives.
            over = int(timesteps.max()) - trained + 1
            if over > 0:
                scheduler.timesteps = timesteps - over
        return scheduler.timesteps

    def check_settings(self, settings) -> None:
        """Raise ``InvalidSetting`` for run settings this family cannot take (before anything is written)."""
        for name in ("shot_frames", "fps"):
            if getattr(settings, name) is not None:
                raise InvalidSetting(name, f"applies to video models (Wan 2.x), not {self.title} models")

    def fps(self, settings) -> float:
        raise ValueError(f"{self.title} models make images, not video")

    def prepare(self, plan) -> None:
        """Take what a run (``runs.plan.RunPlan``) says beyond prompts and size (video: the clip length)."""

    def encode(self, prompts: list[str], negatives: list[str], cfg: bool, height: int, width: int):
        """Conditioning of some frames (the uncond half first under CFG), for ``predict``."""
        raise NotImplementedError

    def encode_frames(self, frames: list[int], prompts, negatives, cfg: bool, height: int, width: int):
        """``encode`` for the story frames ``frames`` (families whose frames have more than a prompt)."""
        return self.encode(prompts, negatives, cfg, height, width)

    def predict(self, scheduler, latents, t, conditioning, guidance_scale: float, cfg: bool) -> torch.Tensor:
        """The guided model output for ``latents`` (a batch of frames) at timestep ``t``."""
        raise NotImplementedError

    def pass_outputs(self, call: Callable[[int], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """True CFG as two denoiser calls (``cfg_passes`` 2): ``call(group)`` runs the denoiser once on just
        the frames, with the conditioning of CFG group ``group`` — ``COND``, then ``UNCOND`` — while the
        consistency state installed on the denoiser (if any) is told which group that call computes
        (``ConsistencyState.cfg_pass``). Returns (cond, uncond)."""
        state = installed_state(self.denoiser)
        out = {}
        for group in (COND, UNCOND):
            with state.cfg_pass(group) if state is not None else nullcontext():
                out[group] = call(group)
        return out[COND], out[UNCOND]

    def guided_passes(self, call: Callable[[int], torch.Tensor], guidance_scale: float) -> torch.Tensor:
        """``pass_outputs`` combined: ``uncond + guidance_scale · (cond − uncond)``."""
        cond, uncond = self.pass_outputs(call)
        return uncond + guidance_scale * (cond - uncond)

    def decode(self, latent: torch.Tensor, height: int, width: int) -> Image.Image:
        """One frame's final latent → PIL image (SDXL's fp32 VAE upcast where its config asks for it)."""
        vae = self.pipe.vae
        latent = latent[None].to(self.device)
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        with torch.no_grad():
            if upcast:
                vae.to(torch.float32)
            image = vae.decode(self._to_vae(latent, height, width).to(vae.dtype), return_dict=False)[0]
            if upcast:
                vae.to(torch.float16)
        return self.pipe.image_processor.postprocess(image, output_type="pil")[0]

    def _to_vae(self, latent: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return latent / self.pipe.vae.config.scaling_factor

    # -- reference images (IP-Adapter) ---------------------------------------------------------------------
    #: the keyword of ``pipe.load_ip_adapter`` that names the image encoder's folder
    ip_encoder_argument: ClassVar[str] = "image_encoder_folder"

    def image_mask_size(self, height: int, width: int) -> tuple[int, ...]:
        """The shape of one frame's IP-Adapter mask per image (``ip_adapter.ReferenceImages.chunk``)."""
        raise ValueError(f"{SUPPORTED}, not {self.name} models")

    def with_reference_images(self, conditioning, image_embeds: list, masks: list):
        """``conditioning`` (from ``encode``) plus IP-Adapter inputs for the same frames."""
        raise ValueError(f"{SUPPORTED}, not {self.name} models")

    def check_adapter_layers(self, ip_processors: tuple[type, ...]) -> None:
        """Raise if consistency took the place of the IP-Adapter's processors where the family needs them."""

    def prepare_reference_images(self, ip_processors: tuple[type, ...]) -> None:
        """Make the loaded adapter ready for per-frame image masks (once per run with images)."""

    @torch.no_grad()
    def encode_reference(self, image: Image.Image, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive, negative) embedding of one image, as diffusers' pipelines make them for the loaded
        adapter: the image embedding (plain) or penultimate hidden states (plus, full), shape (*embed)."""
        (embeds,) = self.pipe.prepare_ip_adapter_image_embeds(
            [image], None, device, 1, True
        )  # (2, 1, *embed)
        negative, positive = embeds[:, 0]
        return positive, negative


def guide(out: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance on an [uncond; cond] output."""
    uncond, cond = out.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def phrase_columns(tokenizer, prompt: str, phrase: str, max_length: int) -> list[int]:
    """Where ``phrase``'s tokens sit in ``prompt``'s token sequence as the text encoder gets it (special
    tokens added, truncated to ``max_length``): the first contiguous run of the phrase's own token ids
    (tokenized alone, without BOS/EOS). BPE (CLIP) and SentencePiece (T5) tokenize a phrase standing
    between spaces or punctuation the same alone as inside a sentence, so the run is found whenever the
    phrase survived truncation; [] otherwise (the caller warns)."""
    ids = tokenizer(prompt, truncation=True, max_length=max_length).input_ids
    wanted = tokenizer(phrase, add_special_tokens=False).input_ids
    if not wanted:
        return []
    for start in range(len(ids) - len(wanted) + 1):
        if ids[start : start + len(wanted)] == wanted:
            return list(range(start, start + len(wanted)))
    return []


def auto_masks_refused(title: str) -> str:
    return (
        "automatic subject masks (--subject-masks auto) work with UNet models (SD1.x/2.x, SDXL), FLUX.1, "
        f"SD3/SD3.5, Qwen-Image, Wan 2.x and PixArt-Σ, not {title} models: give a folder of masks"
    )


def observe_subjects(state, recorder) -> Callable[[], None]:
    """Subject recording on joint text+image hosts (FLUX, SD3): they have no cross-attention to hook, but
    their consistent processors hand the joint q, k to ``state.attend``, whose ``observer`` the recorder
    becomes (``SubjectAttentionRecorder.observe``). Returns what undoes it."""
    if state.observer is not None:
        raise ValueError("the consistency state already has an observer: one recorder at a time")
    state.observer = recorder.observe

    def remove() -> None:
        state.observer = None

    return remove


def video_vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Decode (B, C, T, h, w) latents of a video VAE that normalises them per channel (Wan's, Qwen-Image's:
    ``latents_mean``, ``latents_std`` in its config), as their pipelines do."""
    config = vae.config
    mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(latents)
    std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(latents)  # as theirs
    with torch.no_grad():
        return vae.decode((latents / std + mean).to(vae.dtype), return_dict=False)[0]


def text_length(pipe, default: int, tokenizer: str) -> int:
    """The T5 sequence length the stock pipeline pads to, capped by its tokenizer's (tiny models: 77)."""
    return min(default, getattr(pipe, tokenizer).model_max_length)


class TransformerFamily(Family):
    """Diffusion transformers: the denoiser is ``pipe.transformer``, images are patched after the VAE."""

    @property
    def multiple(self) -> int:
        return self.pipe.vae_scale_factor * self.denoiser.config.patch_size
