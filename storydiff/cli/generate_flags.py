"""`storydiff generate`'s flags: the parser (in groups) and the tables that map settings to flags.

``FLAGS`` names the flag of each ``RunSettings`` / ``ConsistencyConfig`` field (errors name flags, not
fields); ``RUN_FLAGS`` are the flags a run's metadata stores, which ``--resume`` refuses.
"""

from __future__ import annotations

import argparse

from ..consistency.config import LAYER_PRESETS, ROPE_POLICIES
from .common import DTYPES

# Settings fields (RunSettings, ConsistencyConfig) and the flags that set them, for error messages.
FLAGS = {
    "mode": "--mode",
    "style": "--style",
    "negative_prompt": "--negative",
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance",
    "height": "--height",
    "width": "--width",
    "seed": "--seed",
    "scheduler": "--scheduler",
    "freeu": "--freeu",
    "layout": "--layout",
    "font": "--font",
    "captions": "--captions",
    "caption_style": "--caption-style",
    "preset": "--preset",
    "id_frames": "--id-frames",
    "read_batch_size": "--read-batch",
    "bank_schedule": "--bank-schedule",
    "save_banks": "--save-banks",
    "chunk_size": "--chunk-size",
    "checkpoint_every": "--checkpoint-every",
    "bank_sharing": "--dist-bank",
    "rate": "--rate",
    "level_rates": "--level-rate",
    "warmup_steps": "--warmup-steps",
    "window": "--window",
    "tile": "--tile",
    "layers": "--layers",
    "rope": "--rope",
    "load_bank": "--load-bank",
    "reference_images": "--ref",
    "ip_scale": "--ip-scale",
}
# Settings a preset chooses (settings.PRESETS) whose flag has the field's name.
PRESET_FIELDS = ("scheduler", "freeu", "layout", "style")
# Flags that describe the run itself: stored in the metadata, so --resume refuses them.
RUN_FLAGS = (
    "model",
    "config",
    "lora",
    "ip_adapter",
    "image_encoder",
    "ip_scale",
    "ref",
    "story",
    "characters",
    "out",
    "overwrite",
    "mode",
    "style",
    "negative",
    "steps",
    "guidance",
    "height",
    "width",
    "seed",
    "preset",
    "scheduler",
    "freeu",
    "layout",
    "font",
    "captions",
    "caption_style",
    "id_frames",
    "read_batch",
    "bank_schedule",
    "save_banks",
    "chunk_size",
    "checkpoint_every",
    "dist_bank",
    "rate",
    "level_rate",
    "warmup_steps",
    "window",
    "tile",
    "layers",
    "rope",
    "no_skip",
    "load_bank",
)


def add_parser(subparsers, parents: list) -> argparse.ArgumentParser:
    """The `generate` parser, its flags in groups."""
    from ..runs.settings import BANK_DEFAULTS, WINDOW_DEFAULTS, RunSettings

    d = RunSettings()
    gen = subparsers.add_parser(
        "generate",
        parents=parents,
        help="generate a consistent story: frames, comic pages and metadata",
        description="Story file: character lines `[Name] description`, a `---` line, then one frame per "
        "line with [Name] tags ([NC]: no character) and an optional `#caption`. Models: a diffusers path "
        "or hub id of SD1.x/2.x, SDXL, FLUX.1, SD3/SD3.5 or PixArt-Σ, or tiny-sdxl / tiny-sd15 / tiny-flux / "
        "tiny-sd3 / tiny-pixart (random weights, offline, for smoke tests).",
    )
    model = gen.add_argument_group("model")
    model.add_argument(
        "--model",
        help="diffusers model path or hub id (SD1.x/2.x, SDXL, FLUX.1, SD3/SD3.5, PixArt-Σ); offline random "
        "weights: tiny-sdxl, tiny-sd15, random-sdxl, tiny-flux, tiny-sd3, tiny-pixart, random-flux (GPU)",
    )
    model.add_argument(
        "--config",
        default=None,
        metavar="DIR",
        help="with --model FILE.safetensors: a local diffusers folder of the same architecture (e.g. the "
        "base model's) whose configs describe the file (offline, diffusers cannot fetch them)",
    )
    model.add_argument(
        "--lora",
        action="append",
        default=None,
        metavar="PATH[:SCALE]",
        help="a LoRA file (or diffusers LoRA folder) applied with weight SCALE (default 1); repeatable",
    )
    model.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    model.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="default: float16 on CUDA (random-flux: bfloat16), float32 on CPU",
    )
    story = gen.add_argument_group("story and output")
    story.add_argument("--story", help="story file (UTF-8 text)")
    story.add_argument("--characters", default=None, help="character file (instead of a block in --story)")
    story.add_argument("--out", help="output folder")
    story.add_argument(
        "--overwrite", action="store_true", default=None, help="replace an earlier run in --out"
    )
    story.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue an interrupted run (window mode, lockstep banks) with its stored settings",
    )
    look = gen.add_argument_group("images")
    look.add_argument(
        "--preset",
        choices=("official",),
        default=None,
        help="official: the official StoryDiffusion app's settings — DDIM + FreeU(0.6, 0.4, 1.1, 1.2), "
        "768x768, guidance 5, 35 steps, 1 identity frame, style 'Japanese Anime', its comic layout; "
        "UNet models; the flags you give override them",
    )
    look.add_argument(
        "--style", default=None, help=f"style template (storydiff/styles.py), or 'none' (default: {d.style})"
    )
    look.add_argument("--negative", default=None, help="extra negative prompt")
    look.add_argument(
        "--steps", type=int, default=None, help=f"denoising steps (default: {d.num_inference_steps})"
    )
    look.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=f"classifier-free guidance scale; <= 1 turns it off (default: {d.guidance_scale})",
    )
    look.add_argument(
        "--scheduler",
        choices=("model", "ddim"),
        default=None,
        help=f"UNet models: the model's own scheduler, or DDIM from its config (default: {d.scheduler})",
    )
    look.add_argument(
        "--freeu",
        type=parse_freeu,
        default=None,
        metavar="S1,S2,B1,B2",
        help="UNet models: FreeU with these factors (official: 0.6,0.4,1.1,1.2), or 'off' (default: off)",
    )
    look.add_argument(
        "--height", type=int, default=None, help="image height in pixels (default: the model's size)"
    )
    look.add_argument(
        "--width", type=int, default=None, help="image width in pixels (default: the model's size)"
    )
    look.add_argument(
        "--seed", type=int, default=None, help=f"seed; frame i starts from seed + i (default: {d.seed})"
    )
    pages = gen.add_argument_group("comic pages")
    pages.add_argument(
        "--layout",
        choices=("grid", "classic", "official"),
        default=None,
        help=f"comic page layout: grid, classic, or official (the official app's classic comic: rows of "
        f"panels and stacked half panels, arranged by --seed) (default: {d.layout})",
    )
    pages.add_argument(
        "--captions",
        choices=("line", "hash", "none"),
        default=None,
        help="panel captions: line = the text after '#', else the frame line without its tags (as the "
        "official app); hash = only text after '#'; none (default: line)",
    )
    pages.add_argument(
        "--caption-style",
        choices=("band", "overlay"),
        default=None,
        help="captions in a white band, or in a semi-transparent box over the panel's bottom (default: "
        "the layout's: overlay for official, band otherwise)",
    )
    pages.add_argument(
        "--font",
        default=None,
        metavar="PATH",
        help="caption font file (default: DejaVu Sans, or an installed font covering the caption's script)",
    )
    ref = gen.add_argument_group("reference images (IP-Adapter; SD1.x/2.x, SDXL, FLUX.1)")
    ref.add_argument(
        "--ip-adapter",
        default=None,
        metavar="PATH",
        help="IP-Adapter weights in diffusers' format (a local file, or a folder holding one): plain, plus, "
        "plus-face",
    )
    ref.add_argument(
        "--image-encoder",
        default=None,
        metavar="DIR",
        help="the adapter's CLIP vision encoder folder (default: image_encoder/ beside the weights)",
    )
    ref.add_argument(
        "--ip-scale", type=float, default=None, help="how strongly the images steer the frames (default: 1.0)"
    )
    ref.add_argument(
        "--ref",
        action="append",
        default=None,
        metavar="NAME=IMAGE",
        help="a reference image of character NAME: every frame showing NAME is conditioned on it; repeatable",
    )
    csa = gen.add_argument_group("consistency")
    csa.add_argument(
        "--mode",
        choices=("bank", "window"),
        default=None,
        help="bank: identity frames write a bank the others read (official); window: long stories, "
        f"neighbours within --window, chunked denoising with checkpoints (default: {d.mode})",
    )
    csa.add_argument(
        "--rate", type=float, default=None, help="share of tokens each frame offers, 0..1 (default: 0.5)"
    )
    csa.add_argument(
        "--level-rate",
        action="append",
        default=None,
        metavar="LEVEL=RATE",
        help="per-level rate, LEVEL in 8, 16, 32, 64 (official sa32 = 32, sa64 = 16); repeatable",
    )
    csa.add_argument(
        "--layers",
        choices=LAYER_PRESETS,
        default=None,
        help="attention layers that get consistency: default = the model family's choice (UNets: up "
        "blocks, as the official code; FLUX: single-stream blocks; SD3, PixArt: all); all; up, up+mid "
        "(UNets); single, double (FLUX)",
    )
    csa.add_argument(
        "--rope",
        choices=ROPE_POLICIES,
        default=None,
        help="FLUX: where borrowed tokens sit under RoPE: source = their own frame's position (default), "
        "shift = off the reader's grid (position ids (1, h, w), as FLUX Kontext marks reference images), "
        "none = no rotation",
    )
    csa.add_argument(
        "--warmup-steps", type=int, default=None, help="first steps without consistency (default: 1)"
    )
    csa.add_argument(
        "--no-skip", action="store_true", default=None, help="disable the random layer-skip schedule"
    )
    bank = gen.add_argument_group("bank mode")
    bank.add_argument(
        "--id-frames",
        type=int,
        default=None,
        help=f"bank mode: identity frames per character (default: {BANK_DEFAULTS['id_frames']})",
    )
    bank.add_argument(
        "--read-batch",
        type=int,
        default=None,
        help=f"bank mode: frames per denoiser call after the identities (default: "
        f"{BANK_DEFAULTS['read_batch_size']})",
    )
    bank.add_argument(
        "--bank-schedule",
        choices=("lockstep", "stored"),
        default=None,
        help="bank mode: lockstep keeps one denoising step's bank alive at a time (frames identical); "
        "stored keeps every step's bank, needed by --save-banks / --load-bank (default: lockstep unless "
        "banks are saved or loaded)",
    )
    bank.add_argument(
        "--save-banks",
        action="store_true",
        default=None,
        help="bank mode: write each character's bank (safetensors) into OUT/banks",
    )
    bank.add_argument(
        "--load-bank",
        action="append",
        default=None,
        metavar="[NAME=]PATH",
        help="bank mode: reuse a character's bank from an earlier run (--save-banks); repeatable",
    )
    window = gen.add_argument_group("window mode")
    window.add_argument(
        "--window", type=int, default=None, help="neighbours within W frames (default: 2 in window mode)"
    )
    window.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help=f"window mode: frames per denoiser call (default: {WINDOW_DEFAULTS['chunk_size']})",
    )
    window.add_argument(
        "--tile", type=int, default=None, help="window mode: the paper's tiled form, tile size"
    )
    window.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="window mode and lockstep bank schedule: write a checkpoint every N steps (for --resume)",
    )
    dist = gen.add_argument_group("several processes (torchrun)")
    dist.add_argument(
        "--dist-backend",
        choices=("gloo", "nccl"),
        default=None,
        help="under torchrun: the torch.distributed backend (default: nccl on CUDA, gloo otherwise)",
    )
    dist.add_argument(
        "--dist-bank",
        choices=("recompute", "broadcast"),
        default=None,
        help="bank mode under torchrun: the characters' identity frames are dealt over the ranks and each "
        "step's bank broadcast (broadcast, default), or every rank denoises every identity frame itself "
        "(recompute, no traffic); same frames",
    )
    dist.add_argument(
        "--dist-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="under torchrun: how long a rank waits for the others before failing with an error "
        "(default: 600)",
    )
    return gen


def parse_freeu(text: str) -> tuple[float, ...] | str:
    if text.strip().lower() == "off":
        return "off"
    try:
        factors = tuple(float(part) for part in text.split(","))
    except ValueError:
        factors = ()
    if len(factors) != 4:
        raise argparse.ArgumentTypeError(f"expected four numbers S1,S2,B1,B2 or 'off', got {text!r}")
    return factors
