"""UNet suite: one denoising step with official-A, official-B (``consistency/official.py``) and ours,
on the real SDXL UNet architecture (embedded config, random weights, no download), plus the identity
bank each keeps for a whole run. A "write" case times the identity frames denoised together; a "read"
case times one more frame denoised against their bank (the official code reads one frame at a time).

Every provider runs a step where all its layers are consistent: the warm-up and the random layer skip
are off for all of them (both only replace some layer calls by plain attention). Each timed step
redraws its token selection, as a real step does.

Bank bytes are measured after one step and scaled to ``bank_steps`` steps: every step stores the same
shapes (variant B's Bernoulli counts vary by a fraction of a percent).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from ..consistency.config import ConsistencyConfig
from ..consistency.official import install_official
from ..families.attach import apply_consistent_attention, remove_consistent_attention
from ..families.registry import family_named
from ..families.tiny_models import SDXL_UNET_CONFIG, build_tiny_pipeline
from ..support.progress import default_progress, progress_bar
from .timing import median_ms, peak_extra_mib

TEXT_TOKENS = 77
PROVIDERS = ("official_a", "official_b", "ours")


@dataclass(frozen=True)
class UNetCase:
    name: str
    resolution: int  # image side in pixels
    frames: int = 4  # identity frames, denoised together (x2 under CFG)
    rate: float = 0.5
    bank_steps: int = 50
    phase: Literal["write", "read"] = "write"  # time the identity frames, or one frame reading their bank

    @property
    def batch_frames(self) -> int:
        return self.frames if self.phase == "write" else 1


def gpu_cases() -> list[UNetCase]:
    return [
        UNetCase(f"sdxl-{res}-f4{'-read' if phase == 'read' else ''}", res, phase=phase)
        for res in (768, 1024)
        for phase in ("write", "read")
    ]


def cpu_cases() -> list[UNetCase]:
    return [
        UNetCase("tiny-sdxl-128-f4", 128),
        UNetCase("tiny-sdxl-256-f4", 256),
        UNetCase("tiny-sdxl-256-f4-read", 256, phase="read"),
    ]


def build_unet(size: str, device: torch.device, dtype: torch.dtype):
    """ "full": the SDXL UNet built directly on ``device`` (2.6 B random parameters); "tiny": tiny-sdxl's."""
    if size == "tiny":
        return torch.nn.Module.to(build_tiny_pipeline("tiny-sdxl").unet, device=device, dtype=dtype).eval()
    with torch.device(device):  # allocate on the GPU directly: no 10 GB fp32 detour through host memory
        unet = family_named("unet").denoiser_class(**SDXL_UNET_CONFIG)
    return torch.nn.Module.to(unet, dtype=dtype).eval()


def unet_inputs(unet, case: UNetCase, device: torch.device, dtype: torch.dtype, frames: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    batch, side = 2 * frames, case.resolution // 8
    config = unet.config
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    return {
        "sample": randn(batch, config.in_channels, side, side),
        "timestep": torch.tensor(500, device=device),
        "encoder_hidden_states": randn(batch, TEXT_TOKENS, config.cross_attention_dim),
        "added_cond_kwargs": {"text_embeds": randn(batch, text_dim), "time_ids": randn(batch, 6)},
    }


@dataclass
class _Installed:
    bank_bytes: Callable[[], int]  # bank of the current step
    begin_write: Callable[[], None]  # empty bank, step 0, identity frames
    begin_read: Callable[[], None]  # step 0 again, one frame against the bank
    remove: Callable[[], None]


def _install(unet, provider: str, case: UNetCase) -> _Installed:
    """Install a provider, every layer consistent (no warm-up, no layer skip), in write mode."""
    if provider == "ours":
        config = ConsistencyConfig(rate=case.rate, warmup_steps=0, skip_prob_early=0.0, skip_prob_late=0.0)
        config.offload_bank = False
        state = apply_consistent_attention(unet, config)
        installed = _Installed(
            bank_bytes=state.bank.nbytes,
            begin_write=lambda: state.begin_write("id", case.frames),
            begin_read=lambda: state.begin_read([("id",)]),
            remove=lambda: remove_consistent_attention(unet),
        )
    else:
        variant = "a" if provider == "official_a" else "b"
        official, restore = install_official(unet, variant, case.rate, warmup=False, layer_skip=False)
        installed = _Installed(
            bank_bytes=official.bank_bytes,
            begin_write=lambda: official.begin_write(case.frames),
            begin_read=lambda: official.begin_read(1),
            remove=restore,
        )
    installed.begin_write()
    return installed


def _step_fn(unet, inputs: dict, reset: Callable[[], None]) -> Callable:
    def step():
        reset()  # time one step: a fresh draw, and no growing bank
        return unet(**inputs)

    return step


def run_unet_suite(
    cases: list[UNetCase],
    providers: list[str],
    *,
    size: str,
    device: torch.device,
    dtype: torch.dtype,
    env: dict,
) -> list[dict]:
    rows = []
    unet = build_unet(size, device, dtype)
    progress = progress_bar(len(cases) * len(providers), "unet suite", "run", default_progress())
    for case in cases:
        write_inputs = unet_inputs(unet, case, device, dtype, case.frames)
        inputs = unet_inputs(unet, case, device, dtype, case.batch_frames)
        for provider in providers:
            progress.set_postfix_str(f"{case.name} {provider}")
            row = {
                **asdict(case),
                "provider": provider,
                "model": size,
                "dtype": str(dtype).removeprefix("torch."),
            }
            row.update(env, ms=None, peak_extra_mib=None, bank_mib_per_step=None, bank_gib_total=None)
            installed = _install(unet, provider, case)
            reset = installed.begin_write if case.phase == "write" else installed.begin_read
            step = _step_fn(unet, inputs, reset)
            try:
                with torch.no_grad():
                    unet(**write_inputs)  # one step fills one step's bank
                    per_step = installed.bank_bytes()
                    row["ms"] = median_ms(step, device)
                    row["peak_extra_mib"] = peak_extra_mib(step, device)
                row["bank_mib_per_step"] = per_step / 2**20
                row["bank_gib_total"] = per_step * case.bank_steps / 2**30
                row["status"] = "ok"
            except torch.OutOfMemoryError:
                row["status"] = "out of memory"
            finally:
                installed.begin_write()  # frees the bank
                installed.remove()
            rows.append(row)
            progress.update()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    progress.close()
    for row in rows:  # speedups against the other providers of the same case
        for other in rows:
            if other["name"] == row["name"] and other is not row and row["ms"] and other["ms"]:
                row[f"speedup_vs_{other['provider']}"] = other["ms"] / row["ms"]
    return rows


def format_unet_table(rows: list[dict]) -> str:
    columns = [  # (row key, title, width, precision)
        ("ms", "ms/step", 9, 2),
        ("peak_extra_mib", "peak MiB", 9, 0),
        ("bank_mib_per_step", "bank MiB/step", 13, 1),
        ("bank_gib_total", "bank GiB/run", 12, 2),
    ]
    header = f"{'case':<20} {'provider':<11} " + " ".join(
        f"{title:>{width}}" for _, title, width, _ in columns
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = [
            f"{row[key]:{width}.{digits}f}" if row.get(key) is not None else f"{'-':>{width}}"
            for key, _, width, digits in columns
        ]
        lines.append(f"{row['name']:<20} {row['provider']:<11} " + " ".join(cells) + f"  {row['status']}")
    return "\n".join(lines)
