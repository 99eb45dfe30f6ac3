"""A spy for values read back on the host: on a GPU every such read is a host-device sync.

``HostReads`` is a TorchDispatchMode that records every op handing a tensor's value to Python
(``.item()``, ``int()``, ``float()``, ``bool()``, ``torch.equal``: ``aten._local_scalar_dense`` and friends);
``no_host_reads()`` also catches ``Tensor.tolist`` / ``numpy`` / ``__array__``, which do not dispatch.
It also records, from this library's own code, every copy of a host index to a device that would be
pageable on a GPU (and so wait for it): an integer tensor's ``.to(device)`` without ``non_blocking``, or
``torch.tensor(..., device=...)``, anywhere but ``csa_kernels.pool.to_device_async`` (pinned,
non-blocking). On a CPU run such a copy is a no-op, so nothing else would see it.
``guard_forward(module, reads)`` runs a denoiser's every forward under all of it, so a story's denoising
steps are watched while its text encoding, decoding and saving (host work by design) are not.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import csa_kernels
import csa_kernels.pool
import storydiff

READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)
# ops whose output shape depends on values: the host waits for them on a GPU
SHAPE_FROM_VALUES = {
    getattr(torch.ops.aten, name)
    for name in ("nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive")
}
LIBRARY = tuple(str(Path(package.__file__).parent) for package in (csa_kernels, storydiff))
ASYNC_COPY = csa_kernels.pool.__file__  # to_device_async: the one place a host index may go to a device


def _from_library(depth: int) -> bool:
    """Whether the caller ``depth`` frames up is this library's code, other than ``to_device_async``."""
    filename = sys._getframe(depth + 1).f_code.co_filename
    return filename.startswith(LIBRARY) and filename != ASYNC_COPY


def _where() -> str:
    return "".join(traceback.format_list(traceback.extract_stack()[-12:-2]))


def _value_read(func, args, kwargs) -> str | None:
    """What ``func`` on these arguments reads back on the host, if anything."""
    packet = func.overloadpacket
    if func in READS or packet is torch.ops.aten.equal or packet in SHAPE_FROM_VALUES:
        return str(func)
    if packet is torch.ops.aten.repeat_interleave and "output_size" not in kwargs:
        repeats = args[0] if len(args) == 1 else args[1]
        return f"{func}, repeats as a tensor" if isinstance(repeats, torch.Tensor) else None
    if packet in (torch.ops.aten.index, torch.ops.aten.index_put, torch.ops.aten._unsafe_index):
        masks = [i for i in args[1] or () if isinstance(i, torch.Tensor) and i.dtype == torch.bool]
        return f"{func} with a boolean mask" if masks else None
    return None


class HostReads(TorchDispatchMode):
    """Records (what, where) for every op that reads a tensor's value on the host, or whose output shape
    depends on values (nonzero, boolean-mask indexing, unique, ...: the host waits for those too)."""

    def __init__(self, reads: list[tuple[str, str]]):
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = _value_read(func, args, kwargs)
        if what is not None:
            self.reads.append((what, _where()))
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_reads(reads: list[tuple[str, str]]):
    """Within: every host read of a tensor's value, and every pageable index copy the library makes, is
    appended to ``reads`` (and still happens)."""
    saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "__array__", "to")}
    make_tensor = torch.tensor

    def spying(name):
        def read(self, *args, **kwargs):
            reads.append((f"Tensor.{name}", _where()))
            return saved[name](self, *args, **kwargs)

        return read

    def to(self, *args, **kwargs):
        device, _, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        index = not (self.is_floating_point() or self.is_complex())
        if device is not None and index and not non_blocking and _from_library(1):
            reads.append(("pageable index copy: Tensor.to(device)", _where()))
        return saved["to"](self, *args, **kwargs)

    def tensor(data, *args, **kwargs):
        if kwargs.get("device") is not None and _from_library(1):
            reads.append(("pageable index copy: torch.tensor(..., device=...)", _where()))
        return make_tensor(data, *args, **kwargs)

    for name in ("tolist", "numpy", "__array__"):
        setattr(torch.Tensor, name, spying(name))
    torch.Tensor.to, torch.tensor = to, tensor
    try:
        with HostReads(reads):
            yield reads
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
        torch.tensor = make_tensor


def guard_forward(module: torch.nn.Module, reads: list[tuple[str, str]]) -> None:
    """Every call of ``module`` (a denoiser: one denoising step, or one CFG pass or chunk of it) runs
    under ``no_host_reads(reads)``; ``del module.forward`` undoes it."""
    forward = module.forward

    def watched(*args, **kwargs):
        with no_host_reads(reads):
            return forward(*args, **kwargs)

    module.forward = watched


def report(reads: list[tuple[str, str]]) -> str:
    """The first reads, each with where it happened."""
    return "\n".join(f"{what} at\n{where}" for what, where in reads[:3])


# -- the story setups both the CPU spy (tests/ops/test_sync_free.py) and the GPU sync-debug tests
# (tests/pipeline/test_gpu_sync_free.py) run: every consistency mode, on a UNet and on both kinds of DiT

STORY = """\
[Bob] a man with red hair
[Alice] a woman in a yellow dress
---
[Bob] walks in the park
[Alice] waters the flowers
[Bob] and [Alice] have dinner together by the sea
[NC] a quiet street
[Bob] waves goodbye
"""
RUN = {"num_inference_steps": 2, "seed": 3, "style": "none", "progress": False}
NO_SKIP = {"warmup_steps": 0, "skip_prob_early": 0.0, "skip_prob_late": 0.0}
BANK_CALLERS = {"modes:attend", "modes:read"}  # identity frames write (joint attention + bank), others read

# (model, ConsistencyConfig fields, run settings, the op's callers "module:function")
STORY_SETUPS = [
    pytest.param("tiny-sd15", {}, {"id_frames": 1}, BANK_CALLERS, id="bank"),
    pytest.param(
        "tiny-sd15", {}, {"id_frames": 1, "bank_schedule": "stored"}, BANK_CALLERS, id="bank-stored"
    ),
    # window mode over chunks: one pool per call, pool_ranges made on the host
    pytest.param(
        "tiny-sd15", {"window": 1}, {"mode": "window", "chunk_size": 2}, {"window:read"}, id="window"
    ),
    # the paper's tiled form
    pytest.param(
        "tiny-sd15",
        {"tile": 3},
        {"mode": "window", "chunk_size": 4},
        {"tiled:tiled_consistent_attention"},
        id="tiled",
    ),
    # DiT joint attention: text rows never borrow (query_rows; FLUX text first, SD3 image first); PixArt
    pytest.param("tiny-flux", {}, {"id_frames": 1}, BANK_CALLERS, id="flux"),
    pytest.param("tiny-sd3", {}, {"id_frames": 1}, BANK_CALLERS, id="sd3"),
    pytest.param(
        "tiny-pixart", {"window": 1}, {"mode": "window", "chunk_size": 2}, {"window:read"}, id="pixart-window"
    ),
    # Qwen-Image: prompts of different lengths (key_lengths), true CFG in two passes
    pytest.param("tiny-qwen-image", {}, {"id_frames": 1}, BANK_CALLERS, id="qwen-bank"),
    pytest.param(
        "tiny-qwen-image",
        {"window": 1},
        {"mode": "window", "chunk_size": 2},
        {"window:read"},
        id="qwen-window",
    ),
]


def story_pipeline(model: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32, **config):
    from storydiff.consistency.config import ConsistencyConfig
    from storydiff.families.tiny_models import build_tiny_pipeline
    from storydiff.pipeline import StoryDiffusionPipeline

    pipe = build_tiny_pipeline(model, progress_bar=False, device=device, dtype=dtype)
    return StoryDiffusionPipeline(pipe, ConsistencyConfig(rate=0.5, seed=1, **{**NO_SKIP, **config}))


def picture(seed: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (40, 40, 3), dtype=np.uint8))


def load_tiny_ip_adapter(sp, folder) -> dict:
    """Random IP-Adapter weights and image encoder for ``sp``'s tiny model, loaded; the run settings that
    give each character a reference image."""
    from storydiff.families.tiny_models import (
        save_tiny_image_encoder,
        tiny_clip_vision_model,
        write_tiny_ip_adapter,
    )

    weights = write_tiny_ip_adapter(folder / "ip.safetensors", sp.family.denoiser, tiny_clip_vision_model())
    sp.load_ip_adapter(weights, image_encoder=save_tiny_image_encoder(folder / "encoder"))
    return {"id_frames": 1, "reference_images": {"Bob": picture(0), "Alice": picture(1)}}
