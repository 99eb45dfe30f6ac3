"""Compiled inference for the Semantic Motion Predictor, and an eager-vs-compiled benchmark.

At inference the predictor runs once per transition with a fixed batch and token count, and at batch 1
it is launch-bound: 8 small transformer layers are ~100 kernel launches plus Python overhead. Compiling
for one static shape fuses the elementwise work and, on CUDA, captures the whole forward as one CUDA
graph (``mode="reduce-overhead"``), which is where the speedup at batch 1 comes from. Whether it reaches
the 2× target is measured by ``benchmark_compiled``, never asserted.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .model import SemanticMotionPredictor

__all__ = ["CompiledPredictor", "benchmark_compiled", "compile_predictor"]


class CompiledPredictor:
    """A ``torch.compile``'d predictor for one static input shape, (batch_size, num_tokens, embed_dim).

    Calls run without autograd. Another shape raises ``ValueError`` instead of silently recompiling.
    """

    def __init__(
        self,
        model: SemanticMotionPredictor,
        compiled: Callable,
        *,
        batch_size: int,
        num_tokens: int,
        cudagraphs: bool,
    ) -> None:
        self.model = model
        self.compiled = compiled
        self.shape = (batch_size, num_tokens, model.config.embed_dim)
        self.cudagraphs = cudagraphs

    def __call__(self, start: Tensor, end: Tensor) -> Tensor:
        for name, x in (("start", start), ("end", end)):
            if tuple(x.shape) != self.shape:
                raise ValueError(
                    f"{name} has shape {tuple(x.shape)}, this compiled predictor takes {self.shape} "
                    "(compile another one for other shapes)"
                )
        with torch.no_grad():
            if self.cudagraphs:
                # Each call is a new "step": the graph may then reuse its static output buffer.
                torch.compiler.cudagraph_mark_step_begin()
            out = self.compiled(start, end)
        # CUDA-graph outputs live in a buffer the next replay overwrites; hand the caller its own copy.
        return out.clone() if self.cudagraphs else out


def compile_predictor(
    model: SemanticMotionPredictor,
    *,
    batch_size: int,
    num_tokens: int,
    fullgraph: bool = True,
    mode: str | None = None,
    backend: str = "inductor",
    warmup: bool = True,
) -> CompiledPredictor:
    """Compile ``model`` (put in eval mode) for inputs of shape (batch_size, num_tokens, embed_dim).

    Args:
        model: the predictor, already on its device and dtype.
        batch_size, num_tokens: the static input shape.
        fullgraph: refuse graph breaks (the forward has none).
        mode: ``torch.compile`` mode; default ``"reduce-overhead"`` (CUDA graphs) on CUDA, plain on CPU.
        backend: ``torch.compile`` backend.
        warmup: run two calls now so the compile cost is not paid by the first real call.
    """
    if batch_size < 1 or num_tokens < 1:
        raise ValueError(f"batch_size and num_tokens must be >= 1, got {batch_size} and {num_tokens}")
    if num_tokens > model.config.max_tokens:
        raise ValueError(f"num_tokens={num_tokens} exceeds the model's max_tokens={model.config.max_tokens}")
    param = next(model.parameters())
    if mode is None and param.device.type == "cuda":
        mode = "reduce-overhead"
    model.eval()
    compiled = torch.compile(model, fullgraph=fullgraph, dynamic=False, mode=mode, backend=backend)
    cudagraphs = mode is not None and "reduce-overhead" in mode and param.device.type == "cuda"
    predictor = CompiledPredictor(
        model, compiled, batch_size=batch_size, num_tokens=num_tokens, cudagraphs=cudagraphs
    )
    if warmup:
        x = torch.zeros(
            batch_size, num_tokens, model.config.embed_dim, device=param.device, dtype=param.dtype
        )
        for _ in range(2):  # CUDA graphs record on the second call
            predictor(x, x)
    return predictor


def _time_ms(fn: Callable[[], Any], device: torch.device, *, warmup: int, iters: int) -> float:
    """Median milliseconds per call."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end))
        return statistics.median(times)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def _benchmark_one(
    model: SemanticMotionPredictor,
    batch: int,
    num_tokens: int,
    *,
    mode: str | None,
    warmup: int,
    iters: int,
) -> dict[str, Any]:
    param = next(model.parameters())
    dev, dt, cfg = param.device, param.dtype, model.config
    gen = torch.Generator(device="cpu").manual_seed(batch)
    start, end = (torch.randn(batch, num_tokens, cfg.embed_dim, generator=gen).to(dev, dt) for _ in range(2))
    predictor = compile_predictor(model, batch_size=batch, num_tokens=num_tokens, mode=mode)
    with torch.no_grad():
        expected = model(start, end).float()
    got = predictor(start, end).float()
    tolerance = 1e-4 if dt == torch.float32 else 2e-2
    match = bool(torch.allclose(got, expected, atol=tolerance * expected.abs().max().item(), rtol=0))

    def eager() -> Tensor:
        with torch.no_grad():
            return model(start, end)

    eager_ms = _time_ms(eager, dev, warmup=warmup, iters=iters)
    compiled_ms = _time_ms(lambda: predictor(start, end), dev, warmup=warmup, iters=iters)
    return {
        "batch_size": batch,
        "num_tokens": num_tokens,
        "num_frames": cfg.num_frames,
        "embed_dim": cfg.embed_dim,
        "hidden_dim": cfg.hidden_dim,
        "num_layers": cfg.num_layers,
        "device": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": str(dt).removeprefix("torch."),
        "torch": torch.__version__,
        "mode": mode or ("reduce-overhead" if dev.type == "cuda" else "default"),
        "match": match,
        "eager_ms": eager_ms,
        "compiled_ms": compiled_ms,
        "speedup": eager_ms / compiled_ms,
    }


def benchmark_compiled(
    model: SemanticMotionPredictor,
    batch_sizes: Sequence[int] = (1, 8),
    device: str | torch.device | None = None,
    *,
    num_tokens: int = 1,
    dtype: torch.dtype | None = None,
    mode: str | None = None,
    warmup: int = 5,
    iters: int = 30,
) -> list[dict[str, Any]]:
    """Eager vs compiled forward latency (median ms), one row per batch size.

    Both sides run in eval mode without autograd on the same inputs, and the compiled output is checked
    against eager first (a row with ``"match": False`` reports a wrong compile; its speedup means
    nothing). Defaults: CUDA when available; fp16 on CUDA, fp32 on CPU. The model is moved there.
    """
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = dtype if dtype is not None else (torch.float16 if dev.type == "cuda" else torch.float32)
    # nn.Module.to, not ModelMixin.to: diffusers 0.42 warns about fp32-pinned modules on every dtype cast,
    # even when (as here) there are none.
    model = torch.nn.Module.to(model, dev, dt).eval()
    return [
        _benchmark_one(model, batch, num_tokens, mode=mode, warmup=warmup, iters=iters)
        for batch in batch_sizes
    ]
