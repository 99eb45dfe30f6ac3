"""Op suite: one consistent-attention layer call per provider, at SDXL / SD1.5 / hd128 shapes, at the
joint text + image shapes of FLUX.1-dev and SD3.5-large (only image rows borrow: ``query_rows``), and at
Wan 2.x's video self-attention (a story frame is a shot of T·h·w tokens).

Every provider except the dense-SDPA anchors is first checked on the same inputs with the project's one
tolerance rule (``csa_kernels.reference_error_bound``: within twice PyTorch's own error of the float64
reference); the 8-bit path (``precision="int8"``, issue #25), whose quantization errs by far more than
rounding, is held to its accuracy contract instead (``INT8_CONTRACT``); a provider that fails is reported as
failed and not timed. Every checked row carries its accuracy against the float64 reference: max error,
cosine similarity and relative L1 (``accuracy``). A provider that cannot run here
(``providers.unavailable``: no Triton, no GPU, an optional package missing) is reported as n/a with the
reason. A case or provider whose estimated memory (``estimated_bytes``) exceeds what the device has free —
on a CPU, ``CPU_BUDGET_BYTES`` — is reported as skipped, with the estimate, and not run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from csa_kernels import reference_error_bound, sample_reference_indices
from csa_kernels.quantize import ACCURACY_CONTRACT

from ..support.progress import default_progress, progress_bar
from .providers import INT8, UNGATED, query_key_pairs, setup_provider, unavailable
from .timing import median_ms, peak_extra_mib


@dataclass(frozen=True)
class OpCase:
    name: str
    frames: int  # story frames; CFG doubles the batch
    heads: int
    tokens: int  # image tokens per frame: the tokens sampled and offered to other frames
    head_dim: int
    rate: float
    cfg: bool = True
    text_tokens: int = 0  # joint text + image sequences (DiTs): text tokens per frame, never borrowed
    text_first: bool = True  # FLUX: [text; image]; SD3: [image; text]
    characters: int = 0  # > 0: segment ids (bounded attention), that many character blocks per frame

    @property
    def batch(self) -> int:
        return self.frames * (2 if self.cfg else 1)

    @property
    def groups(self) -> int:
        return 2 if self.cfg else 1

    @property
    def sequence(self) -> int:
        """Tokens per frame in the attention call: image, plus text for a joint sequence."""
        return self.tokens + self.text_tokens

    @property
    def image_span(self) -> tuple[int, int]:
        """Where the image tokens sit in a frame's sequence: the ``query_rows`` of a joint case."""
        start = self.text_tokens if self.text_first else 0
        return start, start + self.tokens


def gpu_cases() -> list[OpCase]:
    """Real sizes: SDXL levels at 768² and 1024², SD1.5 head dims, an hd128 case, then the DiT and Wan
    cases."""
    cases = [
        OpCase(f"sdxl{res}-1/{level}-f{frames}-r{rate}", frames, heads, (res // level) ** 2, 64, rate)
        for res in (768, 1024)
        for level, heads in ((16, 10), (32, 20))
        for frames in (2, 4, 8)
        for rate in (0.3, 0.5, 0.7)
    ]
    cases += [
        OpCase("sd15-512-1/8-hd40", 4, 8, 4096, 40, 0.5),
        OpCase("sd15-512-1/16-hd80", 4, 8, 1024, 80, 0.5),
        OpCase("sd15-512-1/32-hd160", 4, 8, 256, 160, 0.5),
        OpCase("hd128-4096", 4, 24, 4096, 128, 0.5),
    ]
    return cases + dit_cases() + wan_cases()


# FLUX.1-dev: T5 prompt of 512 tokens before the image tokens, 24 heads x 128, guidance-distilled (no CFG
# batch). SD3.5-large: image tokens first, then 77 CLIP + 256 T5 tokens, 38 heads x 64, CFG [uncond; cond].
FLUX_TEXT, SD35_TEXT = 512, 77 + 256


def flux_case(resolution: int, frames: int, rate: float = 0.5) -> OpCase:
    image = (resolution // 16) ** 2  # VAE 8x, then 2x2 latent packing
    name = f"flux{resolution}-f{frames}-r{rate}"
    return OpCase(name, frames, 24, image, 128, rate, cfg=False, text_tokens=FLUX_TEXT, text_first=True)


def sd35_case(resolution: int, frames: int, rate: float = 0.5) -> OpCase:
    image = (resolution // 16) ** 2  # VAE 8x, then 2x2 patches
    name = f"sd35l{resolution}-f{frames}-r{rate}"
    return OpCase(name, frames, 38, image, 64, rate, cfg=True, text_tokens=SD35_TEXT, text_first=False)


def dit_cases() -> list[OpCase]:
    """Joint text + image attention of FLUX.1-dev and SD3.5-large at rate 0.5, most important first: each
    model at 1024², 4 frames; FLUX with 2 and 8 frames; both at 768² (2304 image tokens)."""
    return [
        flux_case(1024, 4),
        sd35_case(1024, 4),
        flux_case(1024, 2),
        flux_case(1024, 8),
        flux_case(768, 4),
        sd35_case(768, 4),
    ]


# Wan 2.x (families/wan.py): consistency on every block's video self-attention (attn1), 128-dim heads; a
# shot of F video frames at W x H is T·h·w tokens, T = (F - 1) / 4 + 1, h = H / 16, w = W / 16 (81 frames at
# 832 x 480: 21 x 30 x 52 = 32,760). Guidance is two transformer calls per step, each on just the shots, so
# one layer call holds one CFG group (cfg=False); a step makes two such calls per layer.
WAN_HEADS = {"wan1.3b": 12, "wan14b": 40}
WAN_480P_81F = (21, 30, 52)  # (T, h, w)
WAN_RATES = (0.05, 0.1, 0.25)


def wan_case(
    model: str,
    shots: int,
    rate: float,
    grid: tuple[int, int, int] = WAN_480P_81F,
    *,
    heads: int | None = None,
    head_dim: int = 128,
    label: str = "480p-81f",
) -> OpCase:
    """One Wan layer call over ``shots`` shots of ``grid`` = (T, h, w) tokens; ``heads`` defaults to the
    model's (``WAN_HEADS``). The official variants run on the joined shots: A's dense (shots·N)² mask, B's
    per-shot loop (own tokens + the other shots' gathered tokens, SDPA)."""
    latent, rows, cols = grid
    heads = WAN_HEADS[model] if heads is None else heads
    name = f"{model}-{label}-s{shots}-r{rate}"
    return OpCase(name, shots, heads, latent * rows * cols, head_dim, rate, cfg=False)


def wan_cases() -> list[OpCase]:
    """Wan-1.3B (12 heads) and Wan-14B (40 heads) at 480p, 81 frames, 3 shots, rates 0.05 / 0.1 / 0.25."""
    return [wan_case(model, 3, rate) for model in WAN_HEADS for rate in WAN_RATES]


def headline_cases() -> list[OpCase]:
    """Issue targets: SDXL 1024², 1/16 level, 4 frames x CFG, rate 0.5, at hd64 (10 heads) and hd128; and the
    hd64 case with two characters per frame (bounded attention's segment ids: their cost on a GPU)."""
    return [
        OpCase("sdxl1024-1/16-f4-r0.5", 4, 10, 4096, 64, 0.5),
        OpCase("sdxl1024-1/16-f4-r0.5-hd128", 4, 5, 4096, 128, 0.5),
        OpCase("sdxl1024-1/16-f4-r0.5-seg2", 4, 10, 4096, 64, 0.5, characters=2),
    ]


def int8_cases() -> list[OpCase]:
    """The 8-bit path's GPU rows (issue #25 item 5; ``storydiff bench --size int8``): the headline SDXL
    case at hd64 and hd128 (the speed targets are per head dim), FLUX.1-dev at 1024², 4 frames (hd128), and
    Wan-1.3B's 3-shot 480p story at rate 0.1 (hd128, 32,760 tokens per shot). FLUX and Wan have no hd64
    layer, so no hd64 case of theirs. Sized for a few minutes on an H100 (``gpu_session.sh int8``)."""
    return [*headline_cases()[:2], flux_case(1024, 4), wan_case("wan1.3b", 3, 0.1)]


def cpu_int8_cases() -> list[OpCase]:
    """``int8_cases`` at CPU sizes, from the same builders as the CPU suite's cases (``--size cpu-int8``):
    the tiny 1/16 level at hd64 and, with half the heads, hd128; the FLUX-like joint case; tiny Wan at rate
    0.1 (hd128)."""
    return [
        OpCase("tiny-1/16-f4-r0.5", 4, 2, 1024, 64, 0.5),
        OpCase("tiny-1/16-f4-r0.5-hd128", 4, 1, 1024, 128, 0.5),
        cpu_dit_cases()[0],
        cpu_wan_cases()[1],
    ]


def cpu_cases() -> list[OpCase]:
    """Scaled-down shapes that finish in about a minute on a 2-core CPU."""
    return [
        OpCase("tiny-1/32-f4-r0.5", 4, 2, 256, 64, 0.5),
        OpCase("tiny-1/16-f4-r0.5", 4, 1, 1024, 64, 0.5),
        OpCase("tiny-1/16-f8-r0.3", 8, 1, 576, 64, 0.3),
        OpCase("tiny-sd15-hd40", 4, 2, 256, 40, 0.5),
        *cpu_dit_cases(),
        *cpu_wan_cases(),
        *cpu_segment_cases(),
    ]


def cpu_segment_cases() -> list[OpCase]:
    """Bounded attention (segment ids) beside the same cases without: two characters per frame at the
    1/16 level, and in a FLUX-like joint sequence (the official variants have no segments: n/a)."""
    return [
        OpCase("tiny-1/16-f4-r0.5-seg2", 4, 1, 1024, 64, 0.5, characters=2),
        OpCase("tiny-flux-f4-r0.5-seg2", 4, 2, 256, 64, 0.5, cfg=False, text_tokens=40, characters=2),
    ]


def cpu_dit_cases() -> list[OpCase]:
    """Joint sequences at CPU sizes, both layouts: FLUX-like (text first, no CFG), SD3-like (image first,
    CFG), with text lengths that are not multiples of a tile."""
    return [
        OpCase("tiny-flux-f4-r0.5", 4, 2, 256, 64, 0.5, cfg=False, text_tokens=40, text_first=True),
        OpCase("tiny-sd3-f2-r0.5", 2, 2, 256, 32, 0.5, cfg=True, text_tokens=45, text_first=False),
    ]


def cpu_wan_cases() -> list[OpCase]:
    """``wan_cases`` scaled down (same builder, same providers): 3 shots of a (3, 4, 6) token grid (72
    tokens: 4 borrowed per shot at rate 0.05), 2 heads of 128."""
    return [wan_case("wan1.3b", 3, rate, (3, 4, 6), heads=2, label="tiny") for rate in WAN_RATES]


def make_case_inputs(case: OpCase, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape = (case.batch, case.heads, case.sequence, case.head_dim)
    q, k, v = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    # one draw shared by the CFG halves, as both the official code and our processor do; image tokens only
    ref_idx = sample_reference_indices(case.frames, case.tokens, case.rate, generator=gen, device=device)
    ref_idx = ref_idx + case.image_span[0]
    inputs = {"q": q, "k": k, "v": v, "ref_idx": ref_idx.repeat(case.groups, 1), "groups": case.groups}
    if case.text_tokens:
        inputs["query_rows"] = case.image_span
    if case.characters:
        inputs["segments"] = character_segments(case, device)
    return inputs


def character_segments(case: OpCase, device: torch.device) -> torch.Tensor:
    """(batch, sequence) int32 segment ids: each frame's image tokens split into a background quarter (0)
    and ``case.characters`` equal blocks (ids 1, 2, ...), shifted by a few tokens per frame so block
    boundaries fall inside tiles; text tokens 0. Both CFG halves alike."""
    start, stop = case.image_span
    segments = torch.zeros(case.frames, case.sequence, dtype=torch.int32)
    background = case.tokens // 4
    block = (case.tokens - background) // case.characters
    for frame in range(case.frames):
        first = start + background + 3 * frame
        for c in range(case.characters):
            segments[frame, first + c * block : min(first + (c + 1) * block, stop)] = c + 1
    return segments.repeat(case.groups, 1).to(device)


def case_flops(case: OpCase) -> int:
    """FLOPs of one layer call as the suite reports them: 4·H·D per attended (query, key) pair (QKᵀ and
    PV) — 4·H·N·D per attended key when every row borrows; in a joint sequence only image rows do."""
    refs = round(case.rate * case.tokens)  # what sample_reference_indices draws
    rows = case.image_span if case.text_tokens else None
    pairs = query_key_pairs(case.batch, case.sequence, refs, groups=case.groups, query_rows=rows)
    return 4 * case.heads * case.head_dim * pairs


# The most a case may need on a CPU: the suite's CPU cases need a few MiB; a real-size case (Wan's 98,280
# joined tokens) is for a GPU.
CPU_BUDGET_BYTES = 2 * 2**30


def estimated_bytes(case: OpCase, provider: str, itemsize: int) -> int:
    """Memory one (case, provider) row needs at its peak, roughly: q, k, v and an output in the run's
    dtype; the float64 gold and its error (the correctness gate); and the provider's own: official A's
    (F·S)² boolean mask per CFG group, which SDPA turns into an additive mask in the run's dtype and pads
    (two copies); official B's per-frame keys and values; dense SDPA's keys and values."""
    elements = case.batch * case.heads * case.sequence * case.head_dim
    need = 4 * elements * itemsize
    if provider not in UNGATED:
        need += 2 * elements * 8
    if provider in INT8:  # the pre-pass's codes; the torch path also attends over dequantized float32 rows
        need += 2 * elements * (1 + (4 if provider == "ours_int8_torch" else 0))
    joined = case.frames * case.sequence
    refs = round(case.rate * case.tokens)
    if provider in ("official_a", "flex"):
        need += case.groups * joined * joined * (1 + (2 * itemsize if provider == "official_a" else 0))
    elif provider in ("official_b", "sdpa_dense", "sdpa_flash", "sageattention"):
        keys = case.sequence + refs * (case.frames - 1)
        need += 2 * case.groups * case.heads * keys * case.head_dim * itemsize
    return need


def skip_reason(case: OpCase, provider: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why (case, provider) is not run on ``device``: its ``estimated_bytes`` exceed the device's free
    memory (CUDA: ``mem_get_info``; a CPU: ``CPU_BUDGET_BYTES``); None when it fits."""
    need = estimated_bytes(case, provider, torch.empty((), dtype=dtype).element_size())
    if device.type == "cuda":
        free, what = torch.cuda.mem_get_info(device)[0], "free on the GPU"
    else:
        free, what = CPU_BUDGET_BYTES, "allowed on a CPU"
    if need <= free:
        return None
    return f"skipped: needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB {what}"


# The 8-bit path's accuracy contract on Gaussian inputs (tests/ops/test_int8.py ``CONTRACT``, derived in that
# file's docstring), which the suite draws (``make_case_inputs``). Its max-error bound (3e-2) is left out of
# the gate: it was measured on interpreter-sized inputs, and the largest of millions of errors grows with
# the output's size, so at real sizes max_err is reported, not gated.
# the op's contract on Gaussian inputs (what the suite draws): cosine and relative L1; the max error of
# millions of outputs grows with the size, so it is reported, not gated, at real sizes
INT8_CONTRACT = dict(zip(("cosine", "rel_l1"), ACCURACY_CONTRACT["gaussian"][:2], strict=True))


def accuracy(out: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
    """``out`` against the float64 ``gold``: max error, cosine similarity and relative L1 (Σ|out - gold| /
    Σ|gold|) over all elements; NaN anywhere makes all three NaN. Summed one frame at a time, so the float64
    temporaries are one frame's (a Wan-size output is 1.2 GB in float64)."""
    dot = out_sq = gold_sq = l1 = gold_l1 = 0.0
    worst = 0.0
    for ours, ref in zip(out, gold, strict=True):
        ours = ours.double()
        diff = (ours - ref).abs()
        dot += (ours * ref).sum().item()
        out_sq += ours.square().sum().item()
        gold_sq += ref.square().sum().item()
        l1 += diff.sum().item()
        gold_l1 += ref.abs().sum().item()
        worst = max(worst, diff.max().item()) if diff.numel() else worst
    if any(map(math.isnan, (dot, out_sq, l1, worst))):
        return {"max_err": math.nan, "cosine": math.nan, "rel_l1": math.nan}
    cosine = dot / math.sqrt(out_sq * gold_sq) if out_sq and gold_sq else float(out_sq == gold_sq)
    return {"max_err": worst, "cosine": cosine, "rel_l1": l1 / gold_l1 if gold_l1 else l1}


def int8_contract_failure(measured: dict[str, float]) -> str | None:
    """Why ``accuracy``'s ``measured`` breaks ``INT8_CONTRACT`` (None: within it; NaN breaks it)."""
    least_cosine, most_l1 = INT8_CONTRACT["cosine"], INT8_CONTRACT["rel_l1"]
    if not measured["cosine"] >= least_cosine:
        return f"cosine {measured['cosine']:.6f} < {least_cosine} (the int8 contract)"
    if not measured["rel_l1"] <= most_l1:
        return f"relative L1 {measured['rel_l1']:.3g} > {most_l1} (the int8 contract)"
    return None


def run_op_suite(
    cases: list[OpCase],
    providers: list[str],
    *,
    device: torch.device,
    dtype: torch.dtype,
    env: dict,
) -> list[dict]:
    """One row per (case, provider): median ms, effective TFLOP/s, peak extra MiB, accuracy (``accuracy``:
    max_err, cosine, rel_l1; None for the dense anchors), status."""
    rows = []
    progress = progress_bar(len(cases) * len(providers), "op suite", "run", default_progress())
    for case in cases:
        flops = case_flops(case)
        skips = {name: skip_reason(case, name, device, dtype) for name in providers}
        for name in providers:  # what cannot run here at all says so, whatever the case
            reason = unavailable(name, device)
            skips[name] = f"n/a: {reason}" if reason else skips[name]
        inputs = None if all(skips.values()) else make_case_inputs(case, dtype, device)
        bound = None
        for name in providers:
            progress.set_postfix_str(f"{case.name} {name}")
            row = {**asdict(case), "provider": name, "dtype": str(dtype).removeprefix("torch."), **env}
            row.update(gflop=flops / 1e9, ms=None, tflops=None, peak_extra_mib=None)
            row.update(max_err=None, cosine=None, rel_l1=None)
            if skips[name]:
                row["status"] = skips[name]
                rows.append(row)
                progress.update()
                continue
            try:
                fn = setup_provider(name, inputs)
                if name not in UNGATED:
                    if bound is None:  # gold once per case, for every provider
                        bound = reference_error_bound(inputs)
                    out = fn()
                    row.update(accuracy(out, bound.gold))
                    if name in INT8:
                        failure = int8_contract_failure(row)
                        if failure:
                            raise AssertionError(failure)
                    else:
                        row["max_err"] = bound.check(out)  # AssertionError above the bound or on NaN
                    del out
                row["ms"] = median_ms(fn, device)
                row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
                row["peak_extra_mib"] = peak_extra_mib(fn, device)
                row["status"] = "ok"
            except (NotImplementedError, ModuleNotFoundError) as exc:  # e.g. ours_triton without Triton
                row["status"] = f"n/a: {exc}"
            except torch.OutOfMemoryError:
                row["status"] = "out of memory"
            except AssertionError as exc:
                row["status"] = f"failed: {exc}"
            rows.append(row)
            progress.update()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del inputs, bound
    progress.close()
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """speedup_vs_<provider>: this provider's speed over that provider's, for the same case."""
    by_case: dict[str, dict[str, float]] = {}
    for row in rows:
        if row["ms"]:
            by_case.setdefault(row["name"], {})[row["provider"]] = row["ms"]
    for row in rows:
        for other, ms in by_case.get(row["name"], {}).items():
            if other != row["provider"] and row["ms"]:
                row[f"speedup_vs_{other}"] = ms / row["ms"]


def format_accuracy(rows: list[dict]) -> str:
    """Case x provider lines of the accuracy columns (cosine, relative L1, max error) of the rows that have
    them: the 8-bit path's beside the 16-bit path's."""
    lines = [f"{'case':<28} {'provider':<17} {'cosine':>10} {'rel L1':>9} {'max err':>9}"]
    for row in rows:
        if row.get("cosine") is not None:
            cosine, l1, worst = row["cosine"], row["rel_l1"], row["max_err"]
            lines.append(f"{row['name']:<28} {row['provider']:<17} {cosine:>10.6f} {l1:>9.3g} {worst:>9.3g}")
    return "\n".join(lines)
