"""``key_lengths``: frame b's own keys are only its rows [0, key_lengths[b]); the rest is padding that no
query row of frame b attends to (Qwen-Image's joint attention with prompts of different lengths: image
tokens first, each frame's text after them, its padding at the end).

Every padded K/V row is NaN in the correctness tests (a read reaches the output), outputs are NaN-poisoned,
``ref_idx`` samples each frame below its length. Triton (interpreter; the descriptor path in
test_tma_path.py) and the torch path against the float64 reference. What covers what (BLOCK_M = BLOCK_N =
64 by default, 16 in the small-tile cases):

- lengths: N (no padding), N - 1 (a one-key tail), multiples of the tile (the own range ends on a full tile:
  no tail), 1 (the tail tile only), just past a tile (17, 33: one key in the tail), and lengths whose tail
  sits in the last of several full tiles;
- with groups 1 and 2, windows None, 1, 2, banks none, 5, 19, query rows (image rows first: (0, a); and a
  range straddling tiles), pool_k, S = 0, head dims 8 to 64, int32 and int64 lengths; fp32, fp16 and bf16
  (fp32 dots under the interpreter, ARCHITECTURE.md §5);
- key_lengths == N is bit-identical to None on every path; what the padding holds (huge, inf, NaN) never
  changes a bit; the reference against an independent concatenation; gradients; the custom op (opcheck,
  torch.compile fullgraph) and no host reads of the lengths with ``check_indices=False``.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import Case, assert_matches_reference, make_inputs
from torch.utils._python_dispatch import TorchDispatchMode

import csa_kernels.triton_kernel as tk
from csa_kernels import consistent_attention, consistent_attention_reference
from csa_kernels.op import consistent_attention_op

ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SMALL = {"BLOCK_M": 16, "BLOCK_N": 16}
# (label, case, key lengths per frame, dtypes on the interpreter, interpreter tiles)
CASE_TABLE = [
    ("tails", Case(4, 1, 50, 16, 7, groups=2, window=1, bank=5), [50, 49, 32, 1], ALL_DTYPES, SMALL),
    ("image-first", Case(3, 2, 77, 64, 20, bank=5, query_rows=(0, 60)), [77, 61, 70], ALL_DTYPES, None),
    (
        "across-tiles",
        Case(5, 1, 63, 40, 9, window=2, bank=19, query_rows=(5, 40)),
        [63, 17, 33, 48, 2],
        ALL_DTYPES[:2],
        SMALL,
    ),
    ("no-pool", Case(3, 1, 40, 8, 0), [40, 1, 16], ALL_DTYPES[:1], SMALL),
]
INTERPRETER_CASES = [
    pytest.param(case, lengths, dtype, tiles, id=f"{label}-{dtype}")
    for label, case, lengths, dtypes, tiles in CASE_TABLE
    for dtype in dtypes
]
TORCH_CASES = [pytest.param(case, lengths, id=label) for label, case, lengths, _, _ in CASE_TABLE]


def pad(inputs: dict, value: float) -> dict:
    """k and v with every frame's rows at or past its key length set to ``value``."""
    k, v = inputs["k"].clone(), inputs["v"].clone()
    for b, length in enumerate(inputs["key_lengths"].tolist()):
        k[b, :, length:] = value
        v[b, :, length:] = value
    return {**inputs, "k": k, "v": v}


def with_key_lengths(
    case: Case,
    lengths: list[int],
    dtype: torch.dtype,
    *,
    seed: int = 0,
    padding: float | None = float("nan"),
    index_dtype: torch.dtype = torch.int64,
    device: str = "cpu",
) -> dict:
    """``make_inputs`` plus ``key_lengths``; ref_idx drawn below each frame's length (with repeats where
    the length is below S); padded K/V rows set to ``padding`` (None: left random)."""
    inputs = make_inputs(case, dtype, device=device, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    ref_idx = torch.stack([torch.randint(0, n, (case.refs,), generator=gen) for n in lengths])
    inputs["ref_idx"] = ref_idx.to(device)
    inputs["key_lengths"] = torch.tensor(lengths, dtype=index_dtype, device=device)
    return inputs if padding is None else pad(inputs, padding)


@pytest.mark.parametrize(("case", "lengths", "dtype", "tiles"), INTERPRETER_CASES)
def test_triton_matches_reference(case, lengths, dtype, tiles, poisoned_outputs, monkeypatch):
    if tiles is not None:
        monkeypatch.setattr(tk, "INTERPRETER_CONFIG", tiles)
    inputs = with_key_lengths(case, lengths, dtype, seed=1, index_dtype=torch.int32)
    assert_matches_reference(consistent_attention(**inputs, backend="triton"), inputs)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize(("case", "lengths"), TORCH_CASES)
def test_torch_path_matches_reference(case, lengths, dtype):
    inputs = with_key_lengths(case, lengths, dtype, seed=1)
    assert_matches_reference(consistent_attention(**inputs, backend="torch"), inputs)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_with_pool_k(backend, poisoned_outputs, monkeypatch):
    """Given borrowed keys (RoPE re-positioned) combine with padded own keys."""
    monkeypatch.setattr(tk, "INTERPRETER_CONFIG", SMALL)
    case = Case(4, 1, 50, 16, 7, groups=2, bank=5, query_rows=(0, 40))
    inputs = with_key_lengths(case, [50, 23, 32, 9], torch.float16, seed=2)
    gen = torch.Generator().manual_seed(3)
    inputs["pool_k"] = torch.randn(4, 1, 7, 16, generator=gen).to(torch.float16)
    assert_matches_reference(consistent_attention(**inputs, backend=backend), inputs)


@pytest.mark.parametrize("backend", ["pointer", "tma", "torch", "reference"])
def test_full_lengths_are_bit_identical_to_none(backend, poisoned_outputs, monkeypatch):
    monkeypatch.setattr(tk, "INTERPRETER_CONFIG", SMALL)
    inputs = make_inputs(
        Case(4, 1, 50, 16, 17, groups=2, window=1, bank=6, query_rows=(7, 50)), torch.float16
    )

    def run(**kwargs):
        if backend == "reference":
            return consistent_attention_reference(**inputs, **kwargs)
        if backend in tk.PATHS:
            monkeypatch.setattr(tk, "FORCED_PATH", backend)
        return consistent_attention(**inputs, backend="torch" if backend == "torch" else "triton", **kwargs)

    expected = run()
    for dtype in (torch.int32, torch.int64):
        assert torch.equal(run(key_lengths=torch.full((4,), 50, dtype=dtype)), expected)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # TMA boxes load, then mask
@pytest.mark.parametrize("backend", ["pointer", "tma", "torch"])
def test_padding_is_never_read(backend, monkeypatch):
    """Whatever the padded rows hold — random values, fp16's largest, inf, NaN — the output is the same
    bit for bit (the kernels never load them; the torch path zeroes them and masks their scores)."""
    monkeypatch.setattr(tk, "INTERPRETER_CONFIG", SMALL)
    if backend in tk.PATHS:
        monkeypatch.setattr(tk, "FORCED_PATH", backend)
    case = Case(3, 1, 40, 16, 5, window=1, bank=3, query_rows=(0, 30))
    inputs = with_key_lengths(case, [40, 17, 32], torch.float16, seed=4, padding=None)
    run_backend = "torch" if backend == "torch" else "triton"
    clean = consistent_attention(**inputs, backend=run_backend)
    assert torch.isfinite(clean).all()
    for value in (65504.0, -65504.0, float("inf"), float("nan")):
        assert torch.equal(consistent_attention(**pad(inputs, value), backend=run_backend), clean), value


def test_reference_is_the_concatenation():
    """Independent check of the ground truth: frame 0 of two (length 3 of 6) attends to [k0 rows 0..2;
    k1 at ref_idx[1]] (its padded query rows 3..5 too); frame 1 (length 5) to [k1 rows 0..4; k0 at
    ref_idx[0]]."""
    inputs = with_key_lengths(Case(2, 1, 6, 8, 2), [3, 5], torch.float64, padding=None)
    q, k, v, ref_idx = (inputs[key] for key in ("q", "k", "v", "ref_idx"))
    out = consistent_attention_reference(**inputs, upcast=False)
    for i, j, length in ((0, 1, 3), (1, 0, 5)):
        keys = torch.cat([k[i][:, :length], k[j][:, ref_idx[j]]], dim=1)
        values = torch.cat([v[i][:, :length], v[j][:, ref_idx[j]]], dim=1)
        expected = torch.softmax(q[i] @ keys.transpose(-1, -2) * 8**-0.5, dim=-1) @ values
        torch.testing.assert_close(out[i], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_rows_outside_query_rows_see_only_valid_own_keys(backend, poisoned_outputs, monkeypatch):
    """query_rows + key_lengths: a row that does not borrow is plain attention over its frame's valid keys."""
    monkeypatch.setattr(tk, "INTERPRETER_CONFIG", SMALL)
    case = Case(3, 1, 40, 16, 5, window=1, bank=3, query_rows=(0, 24))
    inputs = with_key_lengths(case, [40, 17, 32], torch.float32, seed=5, padding=None)
    out = consistent_attention(**inputs, backend=backend)
    for b, length in enumerate([40, 17, 32]):
        q, k, v = (inputs[key][b : b + 1] for key in ("q", "k", "v"))
        plain = F.scaled_dot_product_attention(q[:, :, 24:], k[:, :, :length], v[:, :, :length])
        torch.testing.assert_close(out[b : b + 1, :, 24:], plain, rtol=1e-5, atol=2e-6)


def test_gradients_match_reference():
    """Autograd takes the torch path (masked SDPA) and agrees with the reference in float64; the padded
    rows get zero gradient."""
    case = Case(4, 1, 12, 8, 3, groups=2, window=1, bank=3, query_rows=(0, 9))
    inputs = with_key_lengths(case, [12, 5, 9, 1], torch.float64, padding=None)
    leaves = [inputs[key].requires_grad_(True) for key in ("q", "k", "v", "bank_k", "bank_v")]
    out = consistent_attention(**inputs, backend="auto")
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, leaves, grad)
    expected = torch.autograd.grad(consistent_attention_reference(**inputs, upcast=False), leaves, grad)
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert ours[1][1, :, 5:].abs().max() == 0 and ours[2][3, :, 1:].abs().max() == 0


def test_opcheck():
    """Schema (key_lengths after pool_k), fake tensor and dispatch checks."""
    case = Case(4, 1, 20, 16, 5, groups=2, bank=3, query_rows=(0, 14))
    inputs = with_key_lengths(case, [20, 7, 16, 1], torch.float32, index_dtype=torch.int32)
    args = [inputs[key] for key in ("q", "k", "v", "ref_idx", "groups", "window", "bank_k", "bank_v")]
    args += [0.3, *inputs["query_rows"], None, inputs["key_lengths"]]
    torch.library.opcheck(
        consistent_attention_op,
        args,
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_compile_fullgraph(backend):
    """On CPU "auto" traces the torch path and "triton" the custom op (fake impl): no graph break."""
    case = Case(4, 2, 24, 16, 6, groups=2, window=1, bank=2, query_rows=(0, 20))
    inputs = with_key_lengths(case, [24, 9, 16, 3], torch.float32, padding=None)
    names = ("q", "k", "v", "ref_idx", "bank_k", "bank_v", "key_lengths")

    def layer(q, k, v, ref_idx, bank_k, bank_v, key_lengths):
        out = consistent_attention(
            q * 1.5, k, v, ref_idx, groups=2, window=1, bank_k=bank_k, bank_v=bank_v, backend=backend,
            query_rows=(0, 20), key_lengths=key_lengths, check_indices=False,
        )  # fmt: skip
        return out.relu()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    expected = consistent_attention_reference(**{**inputs, "q": inputs["q"] * 1.5}).relu()
    torch.testing.assert_close(compiled(*[inputs[n] for n in names]), expected, rtol=1e-5, atol=2e-6)


class HostReads(TorchDispatchMode):
    """Raises on every op that hands a tensor's value to the host (``.item()``, ``int()``, ``bool()``:
    a device sync on CUDA)."""

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS or func.overloadpacket is torch.ops.aten.equal:
            raise AssertionError(f"host read: {func}")
        return func(*args, **(kwargs or {}))


def no_host_reads(monkeypatch):
    def read(*args, **kwargs):
        raise AssertionError("host read: tolist/numpy")

    monkeypatch.setattr(torch.Tensor, "tolist", read)
    monkeypatch.setattr(torch.Tensor, "numpy", read)
    return HostReads()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_host_reads_without_check_indices(backend, monkeypatch):
    """check_indices=False: the lengths are only read on the device (the kernel's load, the torch path's
    mask); the default check reads them (and says so through the same detector)."""
    case = Case(4, 1, 20, 16, 4, groups=2, bank=3, query_rows=(0, 14))
    inputs = with_key_lengths(case, [20, 7, 16, 4], torch.float32)
    with no_host_reads(monkeypatch):
        out = consistent_attention(**inputs, backend=backend, check_indices=False)
        with pytest.raises(AssertionError, match="host read"):
            consistent_attention(**inputs, backend=backend)
    monkeypatch.undo()
    assert_matches_reference(out, inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("path", tk.PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_compiled_kernel_on_a_qwen_like_layer(dtype, path, poisoned_outputs, monkeypatch):
    """The compiled kernels (tensor-core dots) on a Qwen-Image-like joint layer: 1024 image rows first,
    then up to 512 text rows padded to each frame's prompt length; image rows borrow."""
    if path == "tma" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors (TMA) need compute capability 9.0")
    monkeypatch.setattr(tk, "FORCED_PATH", path)
    case = Case(4, 24, 1536, 128, 512, groups=2, bank=256, query_rows=(0, 1024))
    inputs = with_key_lengths(case, [1536, 1100, 1031, 1024], dtype, device="cuda")
    inputs["ref_idx"] = inputs["ref_idx"] % 1024  # image tokens only
    assert_matches_reference(consistent_attention(**inputs, backend="triton"), inputs)
    plain = make_inputs(case, dtype, device="cuda")
    full = torch.full((4,), 1536, dtype=torch.int32, device="cuda")
    without = consistent_attention(**plain, backend="triton")
    assert torch.equal(consistent_attention(**plain, key_lengths=full, backend="triton"), without)
