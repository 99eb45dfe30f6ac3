"""The Wan 2.x video family (``WanPipeline``, ``WanImageToVideoPipeline``; ``WanTransformer3DModel``).

A story "frame" is a shot: one clip of ``RunSettings.shot_frames`` video frames, denoised as one latent
video (C, T, h, w), T = (frames - 1) / 4 + 1.

* Consistency: every block's self-attention ``attn1`` (video tokens only; text and the 2.1 I2V image
  tokens come through ``attn2``, which stays stock). Every video token of a shot may be borrowed: a shot's
  pool is rate x T·h·w tokens (see the README for the bank size per shot and step). ``WanConsistentProcessor``
  keeps ``WanAttnProcessor``'s math — projections (fused or not), RMS norm on q and k across heads, the 3D
  RoPE — and replaces only the attention call; when a call borrows nothing it *is* diffusers' processor.
* RoPE: every shot's tokens sit at (t, h, w), t < T. ``ConsistencyConfig.rope``: "source" leaves borrowed
  keys where they were in their own shot (on the reader's positions); "shift" moves them T latent frames
  later, to (t + T, h, w) — the frames right after the reader's shot, which no token of the reader occupies
  (2T must fit the transformer's ``rope_max_seq_len``); "none" unrotates them.
* Step: the stock pipelines' loop — float32 latents, the model input cast to the transformer's dtype, true
  CFG as two transformer calls (cond, then uncond) with the state told which pass runs, and Wan 2.2's two
  experts (``transformer`` above ``boundary_ratio`` x 1000, ``transformer_2`` below; both carry the
  processors and share one state). I2V adds the shot's condition — the mask and the VAE latents of its
  first (and, for first–last-frame clips, last) image — and, for 2.1 models, the CLIP image embedding.
* Subject masks: one 2D mask per character per shot, on every latent frame of it (``subject_masks.py``:
  the family tells the state the shot's T in ``prepare``). Automatic masks record each block's
  cross-attention ``attn2`` (``WanSubjectRecordingProcessor``: the stock math, its output bit for bit;
  both experts of Wan 2.2), averaged over a shot's latent frames into one map per shot.
* Offline models: ``tiny-wan``, ``tiny-wan2.2`` (two experts), ``tiny-wan-i2v`` (2.1 I2V: CLIP image
  encoder, first frame only), ``tiny-wan-flf2v`` (2.1 FLF2V: first and last frame), ``tiny-wan2.2-i2v``
  (two experts, no image encoder: either); ``tiny_wan.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import ClassVar

import torch
from diffusers import WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers import transformer_wan
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from PIL import Image

from ..consistency.install import Host, installed_state
from ..consistency.rope import RotaryProcessor, Rotation, reposition_for
from ..consistency.state import COND, ConsistencyState, LayerInfo
from .base import TransformerFamily, phrase_columns, text_length, video_vae_decode

# a shot offers rate x T·h·w tokens to every other shot (32,760 tokens a shot at 480p / 81 frames): 0.1
# keeps a 3-shot pool at 6,552 keys, a fifth of a shot's own; images default to 0.5 of ~4,096
DEFAULT_VIDEO_RATE = 0.1
DEFAULT_SHOT_FRAMES = 81  # Wan's own default clip: 5 s at 16 fps
DEFAULT_FPS = 16.0  # Wan's
DEFAULT_SIDE = 480  # 480p; Wan's native 832 x 480 is --width 832 --height 480
TEXT_LENGTH = 512  # Wan's text length; 2.1 I2V processors split image tokens from text at 512 (hard-coded)


def latent_frames(shot_frames: int, temporal: int = 4) -> int:
    """Latent frames of a clip of ``shot_frames`` video frames (Wan's VAE: 4x in time, the first alone)."""
    return (shot_frames - 1) // temporal + 1


def check_shot_frames(shot_frames: int, temporal: int = 4) -> None:
    if not isinstance(shot_frames, int) or shot_frames < 1 or (shot_frames - 1) % temporal:
        raise ValueError(
            f"shot_frames must be of the form {temporal}k+1 (1, 5, 9, ..., 81: Wan's VAE compresses "
            f"{temporal} frames into one after the first), got {shot_frames!r}"
        )


class WanFamily(TransformerFamily):
    name = "wan"
    title = "Wan 2.x"
    pipelines = (WanPipeline,)
    denoiser_class = WanTransformer3DModel
    reserved = ("tiny-wan", "tiny-wan2.2")
    cfg_passes = 2  # the stock pipelines run the transformer once for the prompts, once for the negatives
    video: ClassVar[bool] = True
    records_subject_masks: ClassVar[bool] = True  # from attn2 (WanSubjectRecordingProcessor)

    def __init__(self, pipe) -> None:
        if pipe.config.get("expand_timesteps"):
            raise ValueError(
                "Wan 2.2 TI2V-5B (expand_timesteps: a timestep per token) is not supported yet; use Wan 2.1 "
                "or the Wan 2.2 A14B models"
            )
        super().__init__(pipe)
        self.shot_frames = self.default_shot_frames

    # -- where consistency goes -----------------------------------------------------------------------
    @classmethod
    def host(cls, denoiser) -> Host:
        def level(name: str) -> int | None:
            # video self-attention only; one token grid: the VAE's 8x and the (1, 2, 2) patches
            return 16 if name.endswith(".attn1.processor") else None

        presets = {"default": lambda name: True, "all": lambda name: True}
        return Host(
            cls.name,
            denoiser,
            presets,
            level,
            lambda name: WanConsistentProcessor,
            rope=True,
            options={"pos_embed": denoiser.rope},
            default_rate=DEFAULT_VIDEO_RATE,
        )

    @classmethod
    def experts(cls, pipe) -> tuple[torch.nn.Module, ...]:
        """Wan 2.2's second expert, which denoises the low-noise steps: it gets the processors too."""
        second = getattr(pipe, "transformer_2", None)
        return () if second is None else (second,)

    # -- facts of the pipeline -----------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer if self.pipe.transformer is not None else self.pipe.transformer_2

    @property
    def default_shot_frames(self) -> int:
        return getattr(self.pipe, "default_num_frames", DEFAULT_SHOT_FRAMES)

    @property
    def multiple(self) -> int:
        return self.pipe.vae_scale_factor_spatial * self.denoiser.config.patch_size[1]

    @property
    def default_size(self) -> int:
        sample = getattr(self.pipe, "default_sample_size", None)
        return DEFAULT_SIDE if sample is None else sample * self.pipe.vae_scale_factor_spatial

    @property
    def latent_dtype(self) -> torch.dtype:
        return torch.float32  # the stock loop keeps latents in float32 and casts the model input

    def prepare(self, plan) -> None:
        """Take the run's clip length (``RunSettings.shot_frames``; None: the model's default)."""
        frames = plan.settings.shot_frames
        if frames is not None:
            check_shot_frames(frames, self.pipe.vae_scale_factor_temporal)
            self.shot_frames = frames
        self._check_rope(self.latent_frames)
        state = installed_state(self.denoiser)
        if state is not None:  # a shot's tokens are T grids: subject masks repeat on each (subject_masks.py)
            state.latent_frames = self.latent_frames

    def _check_rope(self, latent_frames: int) -> None:
        state = installed_state(self.denoiser)
        table = self.denoiser.config.rope_max_seq_len
        if state is not None and state.config.rope == "shift" and 2 * latent_frames > table:
            raise ValueError(
                f"rope='shift' puts borrowed tokens {latent_frames} latent frames after the shot's own, "
                f"beyond this transformer's {table} RoPE positions: use shorter shots or rope='none'"
            )

    def fps(self, settings) -> float:
        return settings.fps if settings.fps is not None else DEFAULT_FPS

    def check_settings(self, settings) -> None:
        temporal = self.pipe.vae_scale_factor_temporal
        if settings.shot_frames is not None:
            check_shot_frames(settings.shot_frames, temporal)
        self._check_rope(latent_frames(settings.shot_frames or self.default_shot_frames, temporal))

    @property
    def latent_frames(self) -> int:
        return latent_frames(self.shot_frames, self.pipe.vae_scale_factor_temporal)

    # -- one story ----------------------------------------------------------------------------------------
    def noise_shape(self, height: int, width: int) -> tuple[int, ...]:
        scale = self.pipe.vae_scale_factor_spatial
        return (self.pipe.vae.config.z_dim, self.latent_frames, height // scale, width // scale)

    def initial_latents(self, noise: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return noise

    def set_timesteps(self, scheduler, steps: int, height: int, width: int) -> torch.Tensor:
        scheduler.set_timesteps(steps, device=self.device)
        if type(self.pipe) is WanPipeline:
            scheduler.set_begin_index(0)  # as WanPipeline does (the I2V pipeline does not)
        return scheduler.timesteps

    @property
    def text_length(self) -> int:
        return text_length(self.pipe, TEXT_LENGTH, "tokenizer")

    def encode(self, prompts, negatives, cfg, height, width):
        """(prompt embeddings, negative embeddings or None), in the transformer's dtype."""
        embeds, negative = self.pipe.encode_prompt(
            prompt=prompts,
            negative_prompt=negatives if cfg else None,
            do_classifier_free_guidance=cfg,
            max_sequence_length=self.text_length,
            device=self.device,
        )
        dtype = self.denoiser.dtype
        return embeds.to(dtype), None if negative is None else negative.to(dtype)

    # -- automatic subject masks ----------------------------------------------------------------------------
    def subject_token_columns(self, prompt: str, phrase: str) -> list[int]:
        """Columns of ``phrase`` among ``attn2``'s text keys: the UMT5 tokens ``encode`` feeds — the prompt
        cleaned as the stock pipeline cleans it (``prompt_clean``: ftfy where installed, whitespace
        collapsed), EOS at its end, no BOS, truncated to and zero-padded up to ``text_length`` (the padding
        is not masked: Wan's softmax sees it, and the recorder normalises over it too)."""
        if not phrase:
            return []
        return phrase_columns(
            self.pipe.tokenizer, prompt_clean(prompt), prompt_clean(phrase), self.text_length
        )

    def record_subjects(self, state, recorder) -> Callable[[], None]:
        """A ``WanSubjectRecordingProcessor`` feeding ``recorder`` on every block's ``attn2`` of every
        transformer that denoises steps (Wan 2.2: both experts, so every step is recorded). Returns what
        puts the replaced processors back."""
        processor = WanSubjectRecordingProcessor(state, recorder)
        restores: list[Callable[[], None]] = []

        def remove() -> None:
            for restore in reversed(restores):
                restore()

        try:
            for denoiser in self.transformers():
                restores.append(install_wan_recorder(denoiser, processor))
        except BaseException:
            remove()
            raise
        return remove

    def transformers(self) -> tuple[torch.nn.Module, ...]:
        """Every transformer of the pipeline that denoises steps, once each (Wan 2.2: both experts)."""
        found = (self.pipe.transformer, getattr(self.pipe, "transformer_2", None))
        unique = {id(module): module for module in found if module is not None}
        return tuple(unique.values())

    def expert(self, t: torch.Tensor) -> torch.nn.Module:
        """The transformer that denoises timestep ``t`` (Wan 2.2: the high-noise one above the boundary)."""
        ratio = self.pipe.config.boundary_ratio
        if ratio is None or t >= ratio * self.pipe.scheduler.config.num_train_timesteps:
            return self.pipe.transformer
        return self.pipe.transformer_2

    def model_input(self, latents: torch.Tensor, conditioning) -> tuple[torch.Tensor, dict]:
        """The transformer's input for ``latents`` and any extra keyword arguments (I2V: the condition)."""
        return latents.to(self.denoiser.dtype), {}

    def predict(self, scheduler, latents, t, conditioning, guidance_scale, cfg):
        embeds, negative = conditioning[:2]
        model = self.expert(t)
        hidden_states, extra = self.model_input(latents, conditioning)
        timestep = t.expand(latents.shape[0])

        def run(group: int) -> torch.Tensor:
            text = embeds if group == COND else negative
            return model(
                hidden_states=hidden_states,
                timestep=timestep,
                encoder_hidden_states=text,
                return_dict=False,
                **extra,
            )[0]

        if not cfg:
            return run(COND)
        # guidance_scale_2 defaults to guidance_scale in the stock pipelines: one scale for both experts
        return self.guided_passes(run, guidance_scale)

    def decode(self, latent: torch.Tensor, height: int, width: int) -> list[Image.Image]:
        """One shot's final latent (C, T, h, w) → its video frames."""
        video = video_vae_decode(self.pipe.vae, latent[None].to(self.device, self.pipe.vae.dtype))
        return self.pipe.video_processor.postprocess_video(video, output_type="pil")[0]


def clean_prompts_without_ftfy() -> None:
    """diffusers' Wan I2V pipeline cleans prompts with ``ftfy.fix_text`` whether or not ftfy is installed
    (its T2V pipeline only when it is), so without the package every I2V prompt fails with a NameError.
    Without ftfy the I2V pipeline gets the T2V pipeline's behaviour: text as given (ftfy repairs mojibake,
    which well-formed UTF-8 prompts do not have). ``pip install ftfy`` (the [wan] extra) restores it."""
    from diffusers.pipelines.wan import pipeline_wan_i2v

    if not hasattr(pipeline_wan_i2v, "ftfy"):
        pipeline_wan_i2v.ftfy = SimpleNamespace(fix_text=lambda text: text)


class WanImageToVideoFamily(WanFamily):
    """Shots that start on a given image (and may end on another: first–last-frame clips)."""

    title = "Wan 2.x image-to-video"
    pipelines = (WanImageToVideoPipeline,)
    reserved = ("tiny-wan-i2v", "tiny-wan-flf2v", "tiny-wan2.2-i2v")
    needs_keyframes: ClassVar[bool] = True

    def __init__(self, pipe) -> None:
        super().__init__(pipe)
        clean_prompts_without_ftfy()
        self.keyframes: list[tuple[Image.Image, Image.Image | None]] = []
        self._conditions: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def prepare(self, plan) -> None:
        super().prepare(plan)
        keyframes = plan.keyframes
        if keyframes is None or len(keyframes) != plan.num_frames:
            raise ValueError(
                f"image-to-video stories need one keyframe per shot ({plan.num_frames}), got "
                f"{0 if keyframes is None else len(keyframes)}"
            )
        self.check_keyframes(keyframes)
        self.keyframes, self._conditions = list(keyframes), {}

    def check_keyframes(self, keyframes) -> None:
        """Wan 2.1's image encoder takes one image per clip (I2V) or exactly two (FLF2V: its
        ``pos_embed_seq_len`` holds both); Wan 2.2 I2V models, without one, take either."""
        if not self.uses_image_encoder:
            return
        pairs = self.denoiser.config.pos_embed_seq_len is not None
        for index, (_, last) in enumerate(keyframes):
            if pairs and last is None:
                raise ValueError(
                    f"shot {index}: this first–last-frame model (Wan 2.1 FLF2V) needs a last image for every "
                    "clip (storydiff video --transitions); animate single keyframes with an I2V model"
                )
            if not pairs and last is not None:
                raise ValueError(
                    f"shot {index}: this image-to-video model (Wan 2.1 I2V) cannot end on a given image; "
                    "first–last-frame clips need Wan 2.1 FLF2V or a Wan 2.2 I2V model"
                )

    @property
    def uses_image_encoder(self) -> bool:
        return self.denoiser.config.image_dim is not None

    @torch.no_grad()
    def shot_condition(self, frame: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Shot ``frame``'s (mask + condition latents (1, 4 + C, T, h, w), CLIP embedding or None), as the
        stock pipeline makes them for its image (and last image); made once per shot."""
        if frame not in self._conditions:
            pipe, device = self.pipe, self.device
            first, last = self.keyframes[frame]
            embeds = None
            if self.uses_image_encoder:
                embeds = pipe.encode_image(first if last is None else [first, last], device)
                embeds = embeds.to(self.denoiser.dtype)

            def pixels(image: Image.Image) -> torch.Tensor:
                tensor = pipe.video_processor.preprocess(image, height=height, width=width)
                return tensor.to(device, torch.float32)

            image = pixels(first)
            last = None if last is None else pixels(last)
            placeholder = torch.zeros(1, *self.noise_shape(height, width), device=device)
            _, condition = pipe.prepare_latents(
                image,
                1,
                pipe.vae.config.z_dim,
                height,
                width,
                self.shot_frames,
                torch.float32,
                device,
                None,
                placeholder,
                last,
            )
            self._conditions[frame] = (condition, embeds)
        return self._conditions[frame]

    def encode_frames(self, frames, prompts, negatives, cfg, height, width):
        embeds, negative = self.encode(prompts, negatives, cfg, height, width)
        shots = [self.shot_condition(frame, height, width) for frame in frames]
        condition = torch.cat([c for c, _ in shots])
        images = torch.cat([e for _, e in shots]) if self.uses_image_encoder else None
        return embeds, negative, condition, images

    def model_input(self, latents, conditioning):
        condition, images = conditioning[2:]
        hidden_states = torch.cat([latents, condition.to(latents)], dim=1).to(self.denoiser.dtype)
        return hidden_states, {"encoder_hidden_states_image": images}


# diffusers renamed Wan's processor (WanAttnProcessor2_0 before 0.36); either is the stock math
WanAttnProcessor = getattr(transformer_wan, "WanAttnProcessor", None) or transformer_wan.WanAttnProcessor2_0


def projections(attn, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of Wan's self-attention, from its fused projection when ``fuse_projections`` made one."""
    if getattr(attn, "fused_projections", False):
        return attn.to_qkv(hidden_states).chunk(3, dim=-1)
    return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)


def _rows(rotary_emb) -> Rotation:
    """Wan's (cos, sin), each (1, N, 1, D) with every value repeated per channel pair, as (N, D) rows."""
    cos, sin = rotary_emb
    return cos[0, :, 0], sin[0, :, 0]


def rotate_as_wan(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``WanAttnProcessor``'s RoPE on (B, N, H, D) ``x`` with (1, N, 1, D) ``cos``/``sin`` (same math)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def time_shift(rotary_emb, pos_embed) -> Rotation:
    """(1, D) rotation by (T, 0, 0): T = the shot's latent frames. Read off the call's own rows without a
    host sync: its last row turns the time channels by T - 1 steps, ``pos_embed``'s row 1 by one more."""
    cos, sin = _rows(rotary_emb)
    t_channels = pos_embed.t_dim
    last_cos, last_sin = cos[-1:].clone(), sin[-1:].clone()
    last_cos[:, t_channels:], last_sin[:, t_channels:] = 1, 0
    one_cos = torch.ones_like(last_cos)
    one_sin = torch.zeros_like(last_sin)
    one_cos[:, :t_channels] = pos_embed.freqs_cos[1, :t_channels].to(one_cos)
    one_sin[:, :t_channels] = pos_embed.freqs_sin[1, :t_channels].to(one_sin)
    # angle addition: turning by a then by b is turning by a + b
    return last_cos * one_cos - last_sin * one_sin, last_sin * one_cos + last_cos * one_sin


class WanConsistentProcessor(RotaryProcessor):
    """For ``WanAttnProcessor``'s self-attention modules (``attn1``): the same math, the fused op's
    attention. ``pos_embed`` (an option of the binding): the transformer's ``WanRotaryPosEmbed``."""

    def __init__(
        self, state: ConsistencyState | None = None, layer: LayerInfo | None = None, pos_embed=None
    ) -> None:
        super().__init__(state, layer, pos_embed)
        self._stock = WanAttnProcessor()

    @torch.compiler.disable  # see ConsistentAttnProcessor: the state's bookkeeping stays eager
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        binding = self.binding(attn)
        state, layer = binding.state, binding.layer
        if not state.borrows(layer):  # nothing to borrow in this call: diffusers' processor, bit for bit
            return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            raise ValueError(f"{layer.name}: consistent attention is for Wan's video self-attention (attn1)")
        query, key, value = projections(attn, hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        rows = None
        if rotary_emb is not None:
            query, key = (rotate_as_wan(x, *rotary_emb) for x in (query, key))
            rows = _rows(rotary_emb)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        reposition = self.reposition_wan(binding, rotary_emb, rows)
        out = state.attend(layer, q, k, v, reposition=reposition)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    def reposition_wan(self, binding, rotary_emb, rows):
        """``reposition_for`` this call: "shift" turns by this shot's own length in time (``time_shift``)."""
        pos_embed = binding.options.get("pos_embed")

        def shift(device: torch.device) -> Rotation:
            if pos_embed is None:
                raise RuntimeError(f"{binding.layer.name}: rope='shift' needs the transformer's rope module")
            return tuple(x.to(device) for x in time_shift(rotary_emb, pos_embed))

        return reposition_for(binding.state.config.rope, rows, shift)


def cross_projections(attn, hidden_states: torch.Tensor, context: torch.Tensor):
    """q, k, v of Wan's cross-attention (``attn2``): q from the video tokens, k and v from the text, from
    the fused K/V projection when ``fuse_projections`` made one (diffusers' ``_get_qkv_projections``)."""
    query = attn.to_q(hidden_states)
    if getattr(attn, "fused_projections", False):
        key, value = attn.to_kv(context).chunk(2, dim=-1)
    else:
        key, value = attn.to_k(context), attn.to_v(context)
    return query, key, value


class WanSubjectRecordingProcessor(WanAttnProcessor):
    """For Wan's cross-attention ``attn2``: ``WanAttnProcessor``'s math statement for statement (its output
    is the stock output, bit for bit: tests compare), feeding a ``SubjectAttentionRecorder`` with each
    call's video queries against the text keys.

    * A subclass of the stock processor, so an attention backend set on the model reaches it as it reaches
      the stock one (``_attention_backend``), and the attention runs through the same dispatch.
    * The recorded softmax is the host's over the text keys (all ``text_length`` of them: Wan pads text
      with zeros and masks nothing). Wan 2.1 I2V adds image keys in a *separate* softmax whose output is
      added to the text one's; the text softmax alone is the one that holds the subject's words, so it is
      recorded as is and the image branch runs untouched.
    * A call's queries are T latent frames of the shot's grid: ``state.latent_frames``, read per call —
      the run's family sets it in ``prepare``, after installation, and it is the one T the state's mask
      draws use too; the recorder averages over them into one map per shot.
    * Two-pass CFG: only the conditional pass is recorded (``state.current_pass``), as the negative prompt
      names no subject.

    ``state``: the consistency state shared by the transformers (its CFG pass, the shots' T);
    ``recorder``: what to feed.
    """

    def __init__(self, state: ConsistencyState, recorder) -> None:
        super().__init__()
        self.state, self.recorder = state, recorder

    @torch.compiler.disable  # the recorder's bookkeeping stays eager, as ConsistentAttnProcessor's
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError(
                "WanSubjectRecordingProcessor is for Wan's cross-attention (attn2): no text given"
            )
        image_context = None
        if attn.add_k_proj is not None:  # 2.1 I2V: image tokens first, then the text (512, as diffusers')
            split = encoder_hidden_states.shape[1] - TEXT_LENGTH
            image_context = encoder_hidden_states[:, :split]
            encoder_hidden_states = encoder_hidden_states[:, split:]
        query, key, value = cross_projections(attn, hidden_states, encoder_hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        if rotary_emb is not None:  # the blocks pass none to attn2; kept for the stock math's sake
            query, key = (rotate_as_wan(x, *rotary_emb) for x in (query, key))

        current = self.state.current_pass
        if current is None or current.group == COND:  # SDPA's default scale, as the host's attention
            self.recorder.record(
                query.transpose(1, 2),
                key.transpose(1, 2),
                bias=attention_mask,
                latent_frames=self.state.latent_frames,
            )

        image_out = None
        if image_context is not None:
            if getattr(attn, "fused_projections", False):
                key_img, value_img = attn.to_added_kv(image_context).chunk(2, dim=-1)
            else:
                key_img, value_img = attn.add_k_proj(image_context), attn.add_v_proj(image_context)
            key_img = attn.norm_added_k(key_img)
            key_img, value_img = (x.unflatten(2, (attn.heads, -1)) for x in (key_img, value_img))
            image_out = dispatch_attention_fn(
                query,
                key_img,
                value_img,
                attn_mask=None,
                dropout_p=0.0,
                is_causal=False,
                backend=self._attention_backend,
                parallel_config=None,
            )
            image_out = image_out.flatten(2, 3).type_as(query)
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=None,  # the stock one's for cross-attention (a text context is always given)
        )
        out = out.flatten(2, 3).type_as(query)
        if image_out is not None:
            out = out + image_out
        return attn.to_out[1](attn.to_out[0](out))


def install_wan_recorder(
    denoiser: torch.nn.Module, processor: WanSubjectRecordingProcessor
) -> Callable[[], None]:
    """Put ``processor`` on every block's ``attn2`` of one Wan transformer; returns what puts the stock
    processors back. ValueError when there is none, or one runs another processor than the stock
    ``WanAttnProcessor`` (recording would drop what it adds, or a recorder is installed already)."""
    processors = dict(denoiser.attn_processors)
    chosen = [name for name in processors if name.endswith(".attn2.processor")]
    if not chosen:
        raise ValueError("no cross-attention (attn2) on this Wan transformer to record subject masks from")
    foreign = [name for name in chosen if type(processors[name]) is not WanAttnProcessor]
    if foreign:
        raise ValueError(
            f"{foreign[0]} runs {type(processors[foreign[0]]).__name__}, not Wan's stock processor: "
            "recording subject masks there would replace it"
        )
    replaced = {name: processors[name] for name in chosen}
    denoiser.set_attn_processor({**processors, **dict.fromkeys(chosen, processor)})

    def restore() -> None:
        denoiser.set_attn_processor({**denoiser.attn_processors, **replaced})

    return restore
