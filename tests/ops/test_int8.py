"""The 8-bit path (``precision="int8"``, ``csa_kernels/quantize.py``): INT8 Q·Kᵀ with K smoothed by the
call's key mean, per-row float32 scales, P·V in the input's type.

- The kernel's scores are the plain-PyTorch quantized scores bit for bit (``_int8_scores``, the helper the
  kernel's tiles call, against ``quantize.int8_scores``: the same codes, scales, integer products).
- The pointer kernel (interpreter) and the torch path equal the *quantized* float64 gold (attention over
  the dequantized rows) within the native path's own rounding bound, on the op tests' case tables (tails,
  padded head dims, windows, banks, query rows, groups, key lengths, pool_k, an explicit pool with ranges,
  segments), outputs NaN-poisoned, fp16 and bf16 — so everything int8 changes is the quantization.
- The accuracy contract against the float64 reference, on diffusion-like inputs at SDXL-, FLUX- and
  Wan-like shapes (scaled down): Gaussian, K with a few large-magnitude channels, and those plus a large
  different offset per frame; thresholds per input type (``CONTRACT``). Unsmoothed INT8 breaks them on
  the outlier and offset inputs (why smoothing is there); a per-frame mean breaks them grossly (why the
  mean is one vector for the call).
- The custom op takes ``precision`` (opcheck, fullgraph trace); bad values and autograd are refused.

Why the contract holds (the bounds of ``CONTRACT``): a per-row absmax quantizer's error is uniform in
±scale/2, std ``amax / (127·√12)``; for a Gaussian row of D values amax ≈ 2.5–3σ, so each element errs by
≈ 0.7 % of σ. A score sums D products, each erring in q and in k independently: its error is ≈ √2 · 0.7 %
of the score's own std. After the softmax scale the scores have std ≈ 1, so probabilities move by ≈ 1 %
relative and the output by about as much in L1 (measured 0.84–0.92 %: bound 1.5 %). Smoothing removes a
channel bias common to all keys (the outlier input) before the absmax, so that input quantizes like the
Gaussian one; unsmoothed, a ±20 bias in 4 channels sets amax ≈ 20σ, ×7 the error (measured 4.6–4.8 %).
A per-frame offset (std 2 per channel) is not common to the keys a query sees, so it stays in the rows and
raises amax to ≈ 5–6σ: ×2 the error (measured 1.3–1.5 %: bound 2.5 %).
"""

from __future__ import annotations

import dataclasses

import pytest
import test_key_lengths as kl
import test_segments as seg
import torch
import triton
import triton.language as tl
from helpers import Case, as_float64, make_inputs

import csa_kernels.quantize as quantize
import csa_kernels.triton_kernel as tk
from csa_kernels import consistent_attention, consistent_attention_reference, reference_error_bound
from csa_kernels.op import consistent_attention_op
from csa_kernels.triton_common import _int8_scores
from csa_kernels.triton_quantize import quantize_rows_triton

SMALL = {"BLOCK_M": 16, "BLOCK_N": 16}


# -- scores, bit for bit -----------------------------------------------------------------------------------
@triton.jit
def _scores_kernel(Q, K, KS, Out, M: tl.constexpr, N: tl.constexpr, D: tl.constexpr):
    o_m, o_n, o_d = tl.arange(0, M), tl.arange(0, N), tl.arange(0, D)
    b_q = tl.load(Q + o_m[:, None] * D + o_d[None, :])
    b_kt = tl.load(K + o_n[None, :] * D + o_d[:, None])
    tl.store(Out + o_m[:, None] * N + o_n[None, :], _int8_scores(b_q, b_kt, KS, 1, o_n, N, False))


@pytest.mark.parametrize(("rows", "keys", "dim"), [(16, 16, 32), (32, 64, 64), (64, 16, 128)])
def test_kernel_scores_equal_the_quantized_reference_exactly(rows, keys, dim):
    """Codes at the int8 extremes (±127: the largest products) and random key scales: the scores the
    kernel's tiles compute (``_int8_scores``: int32 products times key scales; the query rows' scales
    join the softmax scale after) are ``quantize.int8_scores``' with unit query scales, bit for bit."""
    gen = torch.Generator().manual_seed(rows + keys + dim)
    q = torch.randn(rows, dim, generator=gen) * 3
    k = torch.randn(keys, dim, generator=gen) * 5 + 2
    (q8, qs), (k8, ks) = quantize.quantize_rows(q), quantize.quantize_rows(k)
    q8[0], k8[0] = 127, -127  # extremes
    out = torch.full((rows, keys), float("nan"))
    _scores_kernel[(1,)](q8, k8, ks, out, M=rows, N=keys, D=dim)
    expected = quantize.int8_scores(q8, torch.ones_like(qs), k8, ks)
    assert torch.equal(out, expected)
    assert int((q8.to(torch.int32) @ k8.to(torch.int32).T).abs().max()) >= 127 * 127  # exact integers used


def test_quantize_rows_round_trips_within_half_a_step():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 7, 40, generator=gen) * torch.tensor([0.01, 1.0, 100.0])[:, None, None]
    x[0, 0, 0] = 0.0  # a zero row: scale 1, codes 0
    codes, scale = quantize.quantize_rows(x)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and codes.abs().max() <= 127
    error = (quantize.dequantize(codes, scale) - x).abs()
    assert (error <= scale[..., None] / 2 * (1 + 1e-6)).all()
    assert torch.equal(codes[0, 0, 0], torch.zeros(40, dtype=torch.int8)) and scale[0, 0, 0] == 1
    assert (codes.abs().amax(-1)[x.abs().amax(-1) > 0] == 127).all()  # every nonzero row uses the range


@pytest.mark.parametrize(
    ("shape", "layout"),
    [((3, 2, 37, 40), "contiguous"), ((50, 3, 64), "heads-major"), ((2, 4, 5, 128), "contiguous")],
)
def test_the_one_launch_pre_pass_equals_quantize_rows(shape, layout):
    """``triton_quantize.quantize_rows_triton`` (the kernels' pre-pass) gives ``quantize_rows``' codes and
    scales bit for bit, with and without a mean, for (B, H, N, D) and heads-major (R, H, D) rows — ties
    (x.5 after scaling) rounded to even as ``torch.round``, padded head dims left out of the maximum."""
    gen = torch.Generator().manual_seed(len(shape) + shape[-1])
    x = (torch.randn(*shape, generator=gen) * 3).half()
    x.view(-1, shape[-1])[0, :6] = torch.tensor([127.0, 2.5, 3.5, -2.5, -3.5, 0.5])  # scale 1: ties
    if layout == "heads-major":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    mean = torch.randn(shape[-3] if len(shape) == 4 else shape[1], shape[-1], generator=gen)
    for m in (None, mean):
        expected = quantize.quantize_rows(x, None if m is None else (m if x.ndim == 3 else m[:, None, :]))
        got = quantize_rows_triton(x, m)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    ties = quantize_rows_triton(x, None)[0].view(-1, shape[-1])[0, :6] if layout == "contiguous" else None
    if ties is not None:
        assert ties.tolist() == [127, 2, 4, -2, -4, 0]


def test_key_mean_leaves_padding_out_and_counts_the_bank():
    gen = torch.Generator().manual_seed(1)
    k, bank = torch.randn(3, 2, 6, 4, generator=gen), torch.randn(2, 2, 5, 4, generator=gen)
    lengths = torch.tensor([6, 2, 4])
    padded = k.clone()
    padded[1, :, 2:], padded[2, :, 4:] = float("nan"), float("nan")
    rows = [k[0], k[1, :, :2], k[2, :, :4], bank[0], bank[1]]  # each (H, n, D)
    expected = torch.cat(rows, dim=1).mean(dim=1)
    torch.testing.assert_close(quantize.key_mean(padded, lengths, (bank,)), expected)


# -- kernel and torch path against the quantized gold --------------------------------------------------------
def quantized_gold(inputs: dict) -> torch.Tensor:
    """The float64 reference over the rows the 8-bit path computes its scores from (``quantize_inputs``'
    codes times scales) and the inputs' values: what int8 changes, and nothing else."""
    pool = inputs.get("pool")
    quantized = quantize.quantize_inputs(
        inputs["q"],
        inputs["k"],
        key_lengths=inputs.get("key_lengths"),
        pool_k=inputs.get("pool_k"),
        bank_k=inputs.get("bank_k"),
        pool_keys=None if pool is None else pool[0],
    )

    def rows(pair):
        return None if pair is None else quantize.dequantize(*pair).double()

    gold = {
        **inputs,
        "q": rows(quantized.q),
        "k": rows(quantized.k),
        "v": inputs["v"].double(),
    }
    if "bank_k" in inputs:
        gold["bank_k"], gold["bank_v"] = rows(quantized.bank_k), inputs["bank_v"].double()
    if "pool_k" in inputs:
        gold["pool_k"] = rows(quantized.pool_k)
    if pool is not None:
        gold["pool"] = (rows(quantized.pool_keys), pool[1].double())
    return consistent_attention_reference(**gold, upcast=False)


def assert_matches_quantized_gold(out: torch.Tensor, inputs: dict) -> None:
    """Finite, q-shaped and typed, and within the native path's bound (2x PyTorch's own error in the dtype,
    plus a few ulps) of the quantized gold: the 16-bit rounding of the softmax and P·V is all that remains."""
    q = inputs["q"]
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all(), "non-finite (or never written) outputs"
    bound = reference_error_bound(inputs).bound
    error = (out.double() - quantized_gold(inputs)).abs().max().item()
    assert error <= bound, f"max error {error:.3g} > bound {bound:.3g}"


def run(inputs: dict, backend: str, monkeypatch) -> torch.Tensor:
    return seg.run({**inputs, "precision": "int8"}, backend, monkeypatch)


# (label, inputs builder, dtypes, interpreter tiles)
CASES = [
    ("tails", lambda d: make_inputs(Case(4, 1, 50, 16, 7, groups=2, window=1, bank=5), d, seed=1), SMALL),
    ("padded-dim", lambda d: make_inputs(Case(3, 2, 37, 40, 9, bank=6), d, seed=2), SMALL),
    ("rows", lambda d: make_inputs(Case(3, 2, 77, 64, 20, bank=5, query_rows=(0, 60)), d, seed=3), None),
    ("key-lengths", lambda d: kl.with_key_lengths(Case(3, 1, 40, 24, 8), [40, 13, 1], d, seed=4), SMALL),
    ("segments", lambda d: seg.with_segments(Case(5, 1, 63, 40, 9, window=2, bank=19), d, seed=5), SMALL),
    ("every-argument", lambda d: seg.combined_inputs(d, pool=False), SMALL),
    ("explicit-pool", lambda d: seg.pool_inputs(d, seed=6), SMALL),
]


KERNEL_CASES = [
    pytest.param(label, build, tiles, dtype, path, id=f"{label}-{dtype}-{path}")
    for label, build, tiles in CASES
    for path in tk.PATHS
    for dtype in (torch.float16, torch.bfloat16)
    if path == "pointer" or dtype == torch.float16  # the descriptor kernel: fp16 suffices here
]


@pytest.mark.parametrize(("label", "build", "tiles", "dtype", "path"), KERNEL_CASES)
def test_kernels_match_the_quantized_gold(label, build, tiles, dtype, path, poisoned_outputs, monkeypatch):
    """Both kernels (the descriptor one falls back to the pointer one where TMA cannot address the int8
    rows: a head dim that is not a multiple of 16)."""
    if tiles is not None:
        monkeypatch.setattr(tk, "INTERPRETER_CONFIG", tiles)
    inputs = build(dtype)
    for name in ("segments", "bank_segments", "pool_segments", "key_lengths", "pool_ranges"):
        if name in inputs:  # the kernel reads int32 ids as well as int64
            inputs[name] = inputs[name].to(torch.int32)
    assert_matches_quantized_gold(run(inputs, path, monkeypatch), inputs)


@pytest.mark.parametrize("backend", ["torch", "torch-masked"])
@pytest.mark.parametrize(("label", "build", "tiles"), CASES, ids=[c[0] for c in CASES])
def test_torch_path_matches_the_quantized_gold(label, build, tiles, backend, monkeypatch):
    inputs = build(torch.float16)
    assert_matches_quantized_gold(run(inputs, backend, monkeypatch), inputs)


def test_the_descriptor_kernel_runs_int8(monkeypatch):
    """With TMA-addressable int8 rows (D % 16 == 0) the descriptor kernel itself runs the 8-bit path: a
    spy on its launch sees INT8 on."""
    monkeypatch.setattr(tk, "INTERPRETER_CONFIG", SMALL)
    monkeypatch.setattr(tk, "FORCED_PATH", "tma")
    seen = []
    launch = tk._launch_tma
    monkeypatch.setattr(tk, "_launch_tma", lambda *args: seen.append(args[-2]) or launch(*args))
    inputs = make_inputs(Case(3, 1, 40, 32, 8, bank=4), torch.float16, seed=7)
    assert_matches_quantized_gold(consistent_attention(**inputs, backend="triton", precision="int8"), inputs)
    assert seen == [True]


# -- the accuracy contract -----------------------------------------------------------------------------------
#: per input type: (least cosine similarity, most relative L1, most max error) against the float64 reference
CONTRACT = quantize.ACCURACY_CONTRACT
# SDXL (hd64, rate 0.5), FLUX (hd128), Wan (hd128, rate 0.1) scaled down: frames, heads, tokens, dim, refs
SHAPES = {"sdxl": (4, 2, 256, 64, 128), "flux": (3, 2, 256, 128, 128), "wan": (2, 2, 512, 128, 51)}


def diffusion_like(shape: tuple[int, ...], kind: str, *, seed: int = 0, bank: int = 32) -> dict:
    """Gaussian q, k, v (fp16) and a bank; "outlier": 4 channels of K (bank keys too) biased by ±20, as
    diffusion keys are; "offset": that plus a different offset per frame (std 2 per channel)."""
    frames, heads, tokens, dim, refs = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(frames, heads, tokens, dim, generator=gen) for _ in range(3))
    bank_k, bank_v = (torch.randn(1, heads, bank, dim, generator=gen) for _ in range(2))
    if kind in ("outlier", "offset"):
        channels = torch.randperm(dim, generator=gen)[:4]
        bias = 20 * torch.sign(torch.randn(heads, 1, 4, generator=gen))
        k[..., channels] += bias
        bank_k[..., channels] += bias
    if kind == "offset":
        k += 2 * torch.randn(frames, heads, 1, dim, generator=gen)
    ref_idx = torch.stack([torch.randperm(tokens, generator=gen)[:refs] for _ in range(frames)])
    inputs = {"q": q, "k": k, "v": v, "ref_idx": ref_idx, "bank_k": bank_k, "bank_v": bank_v}
    return {name: t.half() if t.is_floating_point() else t for name, t in inputs.items()}


def accuracy(out: torch.Tensor, inputs: dict) -> tuple[float, float, float]:
    """(cosine similarity, relative L1, max error) of ``out`` against the float64 reference (float64 inputs
    and float64 math: not rounded to the inputs' 16 bits)."""
    gold = consistent_attention_reference(**as_float64(inputs), upcast=False).flatten()
    ours = out.double().flatten()
    cosine = torch.nn.functional.cosine_similarity(ours, gold, dim=0).item()
    return cosine, ((ours - gold).abs().sum() / gold.abs().sum()).item(), (ours - gold).abs().max().item()


def within(measured: tuple[float, float, float], kind: str) -> bool:
    cosine, l1, worst = measured
    least_cosine, most_l1, most_max = CONTRACT[kind]
    return cosine >= least_cosine and l1 <= most_l1 and worst <= most_max


@pytest.mark.parametrize("kind", list(CONTRACT))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_accuracy_contract(shape, kind, monkeypatch):
    """Smoothed INT8 within the contract; unsmoothed INT8 outside it on the outlier and offset inputs (within
    it on Gaussian ones: smoothing is for outliers); a per-frame mean grossly outside on the offset input
    (borrowed scores shifted against own ones)."""
    inputs = diffusion_like(SHAPES[shape], kind)
    measured = accuracy(consistent_attention(**inputs, backend="torch", precision="int8"), inputs)
    assert within(measured, kind), measured
    quantize_inputs = quantize.quantize_inputs
    with monkeypatch.context() as patch:
        patch.setattr(
            "csa_kernels.torch_path.quantize_inputs",
            lambda *a, **kw: quantize_inputs(*a, **{**kw, "smooth": False}),
        )
        raw = accuracy(consistent_attention(**inputs, backend="torch", precision="int8"), inputs)
    assert within(raw, kind) == (kind == "gaussian"), raw
    if kind == "offset":

        def per_frame(q, k, **kw):  # smoothed by each frame's own mean: wrong
            return dataclasses.replace(
                quantize_inputs(q, k, **kw), k=quantize.quantize_rows(k, k.float().mean(dim=2, keepdim=True))
            )

        with monkeypatch.context() as patch:
            patch.setattr("csa_kernels.torch_path.quantize_inputs", per_frame)
            wrong = accuracy(consistent_attention(**inputs, backend="torch", precision="int8"), inputs)
        assert wrong[0] < 0.99, wrong


def test_kernel_meets_the_contract(monkeypatch):
    """The pointer kernel on a FLUX-like offset input (hd128; interpreter-sized)."""
    inputs = diffusion_like((2, 1, 128, 128, 64), "offset", seed=3)
    measured = accuracy(consistent_attention(**inputs, backend="triton", precision="int8"), inputs)
    assert within(measured, "offset"), measured


# -- the op and its arguments ---------------------------------------------------------------------------
def test_opcheck():
    """Schema (precision last), fake tensor and dispatch checks with every other argument."""
    inputs = seg.pool_inputs(torch.float32, index_dtype=torch.int32)
    args = [inputs[key] for key in ("q", "k", "v", "ref_idx", "groups", "window", "bank_k", "bank_v")]
    args[3] = torch.empty(4, 0, dtype=torch.int64)
    args += [0.3, *inputs["query_rows"], None, inputs["key_lengths"], *inputs["pool"], inputs["pool_ranges"]]
    args += [inputs["segments"], inputs["bank_segments"], inputs["pool_segments"], "int8"]
    torch.library.opcheck(
        consistent_attention_op,
        args,
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_compile_fullgraph(backend):
    """On CPU "auto" traces the torch path and "triton" the custom op (fake impl): no graph break."""
    inputs = make_inputs(Case(4, 2, 24, 16, 6, groups=2, window=1, bank=2), torch.float32, seed=12)
    names = ("q", "k", "v", "ref_idx", "bank_k", "bank_v")

    def layer(q, k, v, ref_idx, bank_k, bank_v):
        out = consistent_attention(
            q * 1.5, k, v, ref_idx, groups=2, window=1, bank_k=bank_k, bank_v=bank_v, backend=backend,
            check_indices=False, precision="int8",
        )  # fmt: skip
        return out.relu()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(*[inputs[n] for n in names])
        expected = consistent_attention(
            **{**inputs, "q": inputs["q"] * 1.5}, backend="torch", precision="int8"
        ).relu()
    torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-3)


def test_bad_precision_and_autograd_are_refused():
    inputs = make_inputs(Case(2, 1, 8, 16, 2), torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"precision must be one of \('native', 'int8'\), got 'fp8'"):
        consistent_attention(**inputs, precision="fp8")
    inputs["q"].requires_grad_(True)
    with pytest.raises(ValueError, match="precision='int8' is forward-only"):
        consistent_attention(**inputs, precision="int8")


def test_pre_ampere_gpus_are_refused_for_the_kernels(monkeypatch):
    """The Triton kernels' int8 needs integer MMA (sm_80+): an older CUDA device is refused in one line
    naming the precision and the way out; sm_80 and CPU tensors (the interpreter) pass."""
    from csa_kernels.validation import check_int8_device

    for capability, refused in (((7, 5), True), ((8, 0), False), ((9, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        if refused:
            with pytest.raises(ValueError, match=r"precision='int8'.*8\.0\+.*cuda:0 is 7\.5") as info:
                check_int8_device(torch.device("cuda", 0))
            assert "\n" not in str(info.value)
        else:
            check_int8_device(torch.device("cuda", 0))
    check_int8_device(torch.device("cpu"))


def test_native_precision_is_the_default_bit_for_bit(poisoned_outputs, monkeypatch):
    """``precision="native"`` is today's path: the same bits as leaving it out, on both backends."""
    monkeypatch.setattr(tk, "INTERPRETER_CONFIG", SMALL)
    inputs = seg.combined_inputs(torch.float16, pool=False)
    for backend in ("triton", "torch"):
        assert torch.equal(
            consistent_attention(**inputs, backend=backend),
            consistent_attention(**inputs, backend=backend, precision="native"),
        )
