"""DiT suite: one denoising step of FLUX.1-dev's, SD3.5-large's or Wan 2.1's (1.3B, 14B) transformer, stock
vs ours.

The real architectures (configs embedded below, random weights built directly on the device in the run's
dtype: no download, no float32 detour), at 1024² with 4 story frames denoised together: FLUX-dev has no CFG
batch (guidance is an input), SD3.5 batches [uncond frames; cond frames]. The official StoryDiffusion code
has no DiT variant, so there is no official row here (the op suite times official-style baselines on the
joint sequences); each row reports its step time over the stock step's (``ms_vs_stock``): what consistency
costs in a whole step. "ours" installs on each family's default layers (``storydiff/hosts.py``: FLUX's
single-stream blocks, every SD3.5 joint block); for FLUX, "ours_double" / "ours_all" take the double-stream
blocks / all 57.

Wan (text to video, ``families/wan.py``): a story frame is a shot; a step is a 3-shot 480p story's two
transformer calls (true CFG: cond, then uncond, the consistency state told which group each computes, as
``Family.pass_outputs`` does), "stock" (rate 0: our processor then *is* diffusers') vs "ours" (the case's
rate on every block's ``attn1``).

Every consistent layer is consistent at every timed step (no warm-up, no random layer skip), and each timed
step draws fresh tokens (``set_step``), as a real step does.
"""

from __future__ import annotations

import contextlib
import itertools
import traceback
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from ..consistency.config import ConsistencyConfig
from ..consistency.state import COND, UNCOND
from ..families.attach import apply_consistent_attention, remove_consistent_attention
from ..families.registry import family_named
from ..families.tiny_models import FLUX_DEV_CONFIG, build_tiny_pipeline, default_dtype
from ..families.wan import latent_frames
from ..support.progress import default_progress, progress_bar
from .timing import median_ms, peak_extra_mib

Model = Literal["flux", "sd3", "wan", "wan14b"]

# FLUX_DEV_CONFIG: black-forest-labs/FLUX.1-dev, transformer/config.json (tiny_models.py, which builds
# random-flux from it).
# stabilityai/stable-diffusion-3.5-large, transformer/config.json (SD3Transformer2DModel, diffusers 0.42):
# no dual-attention layers (those are SD3.5-medium's)
SD35_LARGE_CONFIG = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 38,
    "attention_head_dim": 64,
    "num_attention_heads": 38,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
    "dual_attention_layers": (),
    "qk_norm": "rms_norm",
}
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers and Wan-AI/Wan2.1-T2V-14B-Diffusers, transformer/config.json
# (WanTransformer3DModel, diffusers 0.42): 1.42 B and 14.3 B parameters
WAN_1_3B_CONFIG = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-06,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}
WAN_14B_CONFIG = {**WAN_1_3B_CONFIG, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
CONFIGS = {
    "flux": FLUX_DEV_CONFIG,
    "sd3": SD35_LARGE_CONFIG,
    "wan": WAN_1_3B_CONFIG,
    "wan14b": WAN_14B_CONFIG,
}
FAMILIES = {"flux": "flux", "sd3": "sd3", "wan": "wan", "wan14b": "wan"}  # registry names
FULL_NAMES = {"flux": "flux-dev", "sd3": "sd35-large", "wan": "wan2.1-t2v-1.3b", "wan14b": "wan2.1-t2v-14b"}
TINY_NAMES = {"flux": "tiny-flux", "sd3": "tiny-sd3", "wan": "tiny-wan", "wan14b": "tiny-wan"}
# text tokens per frame: FLUX-dev's T5 prompt (max_sequence_length 512); SD3.5's 77 CLIP + 256 T5; Wan's
# UMT5 prompt (512)
TEXT_TOKENS = {"flux": 512, "sd3": 77 + 256, "wan": 512, "wan14b": 512}
# provider -> ConsistencyConfig.layers; None: the stock transformer
LAYERS = {"stock": None, "ours": "default", "ours_double": "double", "ours_all": "all"}
PROVIDERS = {
    "flux": ("stock", "ours", "ours_double", "ours_all"),
    "sd3": ("stock", "ours"),
    "wan": ("stock", "ours"),
    "wan14b": ("stock", "ours"),
}
VIDEO = ("wan", "wan14b")  # two CFG passes per step, each on just the shots


@dataclass(frozen=True)
class DiTCase:
    name: str
    model: Model
    resolution: int  # image side in pixels
    frames: int = 4  # story frames (Wan: shots) denoised together (x2 under SD3's CFG)
    rate: float = 0.5
    text_tokens: int | None = None  # default: the model's (TEXT_TOKENS)
    width: int | None = None  # pixels; None: ``resolution`` (square)
    shot_frames: int | None = None  # video: frames of one shot (Wan: 4k + 1)

    @property
    def batch(self) -> int:
        """Frames in one transformer call (SD3 stacks [uncond; cond]; Wan makes one call per CFG group)."""
        return self.frames * (2 if self.model == "sd3" else 1)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return self.resolution, self.width or self.resolution

    @property
    def text(self) -> int:
        return TEXT_TOKENS[self.model] if self.text_tokens is None else self.text_tokens


def wan_case(model: Model, shot_frames: int = 81, rate: float = 0.1, shots: int = 3) -> DiTCase:
    """A ``shots``-shot 480p (832 x 480) Wan story step, shots of ``shot_frames`` frames."""
    name = f"{FULL_NAMES[model].removeprefix('wan2.1-t2v-')}-480p-{shot_frames}f-s{shots}"
    return DiTCase(name, model, 480, shots, rate, width=832, shot_frames=shot_frames)


def gpu_cases(models: tuple[Model, ...] = ("flux", "sd3")) -> list[DiTCase]:
    cases = [
        DiTCase("flux-dev-1024-f4", "flux", 1024),
        DiTCase("sd35-large-1024-f4", "sd3", 1024),
        wan_case("wan"),
        wan_case("wan14b"),
    ]
    return [case for case in cases if case.model in models]


def cpu_cases(models: tuple[Model, ...] = ("flux", "sd3")) -> list[DiTCase]:
    cases = [
        DiTCase("tiny-flux-128-f4", "flux", 128, text_tokens=16),
        DiTCase("tiny-sd3-128-f4", "sd3", 128, text_tokens=16),
        # tiny-wan: 9 frames (3 latent frames) of 32 x 48 pixels: 3 x 2 x 3 tokens per shot
        DiTCase("tiny-wan-32x48-9f-s3", "wan", 32, 3, 0.1, text_tokens=16, width=48, shot_frames=9),
    ]
    return [case for case in cases if case.model in models]


def build_transformer(model: Model, size: str, device: torch.device, dtype: torch.dtype):
    """ "full": the real architecture with random weights, allocated on ``device`` in ``dtype`` directly
    (FLUX-dev: 11.9 B parameters, 24 GB in bf16; Wan-14B: 28.6 GB); "tiny": the tiny pipeline's
    transformer."""
    if size == "tiny":
        transformer = build_tiny_pipeline(TINY_NAMES[model], progress_bar=False).transformer
    else:
        cls = family_named(FAMILIES[model]).denoiser_class
        with torch.device(device), default_dtype(dtype):
            transformer = cls(**CONFIGS[model])
    return torch.nn.Module.to(transformer, device=device, dtype=dtype).eval()


def transformer_inputs(transformer, case: DiTCase, device: torch.device, dtype: torch.dtype) -> dict:
    """One step's keyword arguments, shaped as the diffusers pipelines pass them."""
    gen = torch.Generator().manual_seed(0)
    config, batch = transformer.config, case.batch

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    if case.model in VIDEO:  # (shots, C, T, H/8, W/8) latents; each CFG pass has its own text
        height, width = case.size
        latents = (config.in_channels, latent_frames(case.shot_frames), height // 8, width // 8)
        return {
            "hidden_states": randn(batch, *latents),
            "timestep": torch.full((batch,), 500.0, device=device),
            "encoder_hidden_states": randn(batch, case.text, config.text_dim),
            "negative_hidden_states": randn(batch, case.text, config.text_dim),
            "return_dict": False,
        }
    common = {
        "encoder_hidden_states": randn(batch, case.text, config.joint_attention_dim),
        "pooled_projections": randn(batch, config.pooled_projection_dim),
        "return_dict": False,
    }
    if case.model == "sd3":
        side = case.resolution // 8  # latent side; the transformer patchifies it
        return {
            "hidden_states": randn(batch, config.in_channels, side, side),
            "timestep": torch.full((batch,), 500.0, device=device),
            **common,
        }
    side = case.resolution // 16  # FLUX packs 2x2 latent pixels into one token
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1)
    img_ids = torch.cat([torch.zeros(side * side, 1), grid.flatten(0, 1).float()], dim=1)
    guidance = torch.full((batch,), 3.5, device=device) if config.guidance_embeds else None
    return {
        "hidden_states": randn(batch, side * side, config.in_channels),
        "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),  # the pipeline passes t / 1000
        "img_ids": img_ids.to(device),
        "txt_ids": torch.zeros(case.text, 3, device=device),
        "guidance": guidance,
        **common,
    }


def _step(transformer, inputs: dict, state):
    """One denoising step; ours draws fresh tokens at every call (a new step number). Video inputs (with
    ``negative_hidden_states``): two calls, cond then uncond, each in its CFG pass; [uncond; cond] out."""
    steps = itertools.count()
    inputs = dict(inputs)
    negative = inputs.pop("negative_hidden_states", None)

    def call(group: int) -> torch.Tensor:
        if negative is None:
            return transformer(**inputs)[0]
        text = inputs["encoder_hidden_states"] if group == COND else negative
        with state.cfg_pass(group) if state is not None else contextlib.nullcontext():
            return transformer(**{**inputs, "encoder_hidden_states": text})[0]

    def step():
        if state is not None:
            state.set_step(next(steps))
        if negative is None:
            return call(COND)
        cond = call(COND)
        return torch.cat([call(UNCOND), cond])

    return step


def run_dit_suite(
    cases: list[DiTCase],
    *,
    size: str,
    device: torch.device,
    dtype: torch.dtype,
    env: dict,
    providers: dict[str, tuple[str, ...]] | None = None,
) -> list[dict]:
    """One row per (case, provider): ms per step, ms over the stock step's, peak extra MiB, status.

    ``size``: "full" (the embedded configs) or "tiny" (tiny-flux / tiny-sd3 / tiny-wan). Builds each model
    once, and frees it before building the next."""
    providers = providers or PROVIDERS
    rows = []
    progress = progress_bar(
        sum(len(providers[case.model]) for case in cases), "dit suite", "run", default_progress()
    )
    for model in dict.fromkeys(case.model for case in cases):
        transformer = build_transformer(model, size, device, dtype)
        for case in (case for case in cases if case.model == model):
            inputs = transformer_inputs(transformer, case, device, dtype)
            for provider in providers[model]:
                progress.set_postfix_str(f"{case.name} {provider}")
                rows.append(_run_one(transformer, inputs, case, provider, size, device, dtype, env))
                progress.update()
            del inputs
        del transformer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    progress.close()
    stock = {row["name"]: row["ms"] for row in rows if row["provider"] == "stock" and row["ms"]}
    for row in rows:
        row["ms_vs_stock"] = row["ms"] / stock[row["name"]] if row["ms"] and row["name"] in stock else None
    return rows


def _run_one(transformer, inputs, case: DiTCase, provider: str, size: str, device, dtype, env) -> dict:
    model = (FULL_NAMES if size == "full" else TINY_NAMES)[case.model]
    row = {**asdict(case), "text_tokens": case.text, "provider": provider, "model": model}
    row.update(dtype=str(dtype).removeprefix("torch."), **env)
    row.update(consistent_layers=0, ms=None, peak_extra_mib=None, finite=None)
    state = None
    try:
        if LAYERS[provider] is not None:
            config = ConsistencyConfig(
                rate=case.rate,
                layers=LAYERS[provider],
                warmup_steps=0,
                skip_prob_early=0.0,
                skip_prob_late=0.0,
            )
            state = apply_consistent_attention(transformer, config)
            state.begin_joint(case.frames)
            row["consistent_layers"] = len(state.layers)
        step = _step(transformer, inputs, state)
        with torch.no_grad():
            row["finite"] = bool(step().isfinite().all())  # random weights: a note, not a gate
            row["ms"] = median_ms(step, device)
            row["peak_extra_mib"] = peak_extra_mib(step, device)
        row["status"] = "ok"
    except torch.OutOfMemoryError:
        row["status"] = "out of memory"
    except Exception as exc:  # one provider's failure must not cost a GPU session the other rows
        traceback.print_exc()
        row["status"] = f"error: {type(exc).__name__}: {exc}"
    finally:
        if state is not None:
            state.end()
            remove_consistent_attention(transformer)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def format_dit_table(rows: list[dict]) -> str:
    header = (
        f"{'case':<20} {'provider':<12} {'layers':>6} {'ms/step':>9} {'x stock':>8} {'peak MiB':>9}  status"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        ms = f"{row['ms']:9.2f}" if row["ms"] else f"{'-':>9}"
        ratio = f"{row['ms_vs_stock']:8.3f}" if row.get("ms_vs_stock") else f"{'-':>8}"
        peak = f"{row['peak_extra_mib']:9.0f}" if row["peak_extra_mib"] is not None else f"{'-':>9}"
        lines.append(
            f"{row['name']:<20} {row['provider']:<12} {row['consistent_layers']:>6} {ms} {ratio} {peak}  "
            f"{row['status']}"
        )
    return "\n".join(lines)
