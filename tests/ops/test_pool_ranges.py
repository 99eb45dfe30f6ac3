"""``pool=(keys, values)`` with ``pool_ranges``: the caller hands the borrowed rows over as data — an
(R, H, D) pool of any row count and, per frame, the rows [before_start, before_end) and
[after_start, after_end) it borrows (a long story's window mode: each CFG group's sampled tokens of the
visible frames laid out in story order, so a frame's neighbours are one range before its own segment and
one after it).

Triton (interpreter; the descriptor path in test_tma_path.py) and the torch path against the float64
reference, outputs NaN-poisoned, and every pool row that no frame's ranges cover set to NaN (a read
reaches the output). What covers what (BLOCK_M = BLOCK_N = 64 by default, 16 in the small-tile cases):

- ranges: empty (both, before only, after only), one range overlapping the other (those rows count twice),
  ranges ending at R, ranges of one row, ranges of several full tiles plus a tail, unread rows between and
  after the ranges (a tail tile runs into them), an empty pool (R = 0);
- pools laid out (R, H, D) contiguous, heads-major ((H, R, D) memory) and mixed (keys and values with
  different strides: one copy); int32 and int64 ranges; with groups (the bank of the group), banks, query
  rows, key_lengths; fp32, fp16 and bf16 (fp32 dots under the interpreter, ARCHITECTURE.md §5);
- ranges built like the window/groups rule over the gathered pool give the existing window path's result
  (bit for bit on both kernels and the reference); a range covering the frame's own segment means what it
  says (its own tokens borrowed again); ref_idx None equals (B, 0);
- the reference against an independent concatenation, gradients, the custom op (opcheck, torch.compile
  fullgraph) and no host reads of the ranges with ``check_indices=False``;
- hypothesis draws (derandomized) of all of it together: groups, banks, query rows, key lengths, layouts,
  random ranges over random pools (6 on the interpreter, 25 on the torch path).
"""

import pytest
import test_key_lengths as kl
import torch
import torch.nn.functional as F
from helpers import Case, assert_matches_reference, make_inputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import csa_kernels.torch_path as tp
import csa_kernels.triton_kernel as tk
from csa_kernels import consistent_attention, consistent_attention_reference
from csa_kernels.op import consistent_attention_op
from csa_kernels.reference import visible_frames

ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SMALL = {"BLOCK_M": 16, "BLOCK_N": 16}
# (label, case (S = 0), pool rows R, ranges (a row per frame), key lengths, pool layout, interpreter dtypes,
# interpreter tiles)
CASE_TABLE = [
    (
        "tails",
        Case(4, 1, 50, 16, 0, groups=2, bank=5),
        70,
        [[0, 20, 37, 50], [3, 3, 20, 53], [0, 0, 0, 0], [5, 21, 16, 33]],
        None,
        "heads-major",
        ALL_DTYPES,
        SMALL,
    ),
    (
        "image-first",
        Case(3, 2, 77, 64, 0, bank=5, query_rows=(0, 60)),
        100,
        [[0, 40, 60, 100], [40, 60, 0, 0], [10, 90, 95, 100]],
        [77, 61, 70],
        "mixed",
        ALL_DTYPES,
        None,
    ),
    (
        "long-ranges",
        Case(2, 1, 63, 40, 0, query_rows=(5, 40)),
        150,
        [[0, 75, 90, 150], [17, 18, 20, 149]],
        None,
        "contiguous",
        ALL_DTYPES[:2],
        SMALL,
    ),
    (
        "empty-pool",
        Case(2, 1, 40, 8, 0, bank=3),
        0,
        [[0, 0, 0, 0]] * 2,
        [40, 9],
        "contiguous",
        ALL_DTYPES[:1],
        SMALL,
    ),
]
INTERPRETER_CASES = [
    pytest.param(*row[1:6], dtype, row[7], id=f"{row[0]}-{dtype}") for row in CASE_TABLE for dtype in row[6]
]
TORCH_CASES = [pytest.param(*row[1:6], id=row[0]) for row in CASE_TABLE]


def with_pool(
    case: Case,
    rows: int,
    ranges: list[list[int]],
    key_lengths: list[int] | None,
    layout: str,
    dtype: torch.dtype,
    *,
    seed: int = 0,
    index_dtype: torch.dtype = torch.int64,
    device: str = "cpu",
) -> dict:
    """``make_inputs`` (ref_idx (B, 0)) plus a random (R, H, D) pool and its ranges; pool rows no frame reads
    are NaN, as are padded own rows (with key lengths). ``layout``: "contiguous", "heads-major" ((H, R, D)
    memory for both) or "mixed" (keys heads-major, values contiguous)."""
    assert case.refs == 0 and case.window is None
    inputs = make_inputs(case, dtype, device=device, seed=seed)
    gen = torch.Generator().manual_seed(seed + 200)
    keys, values = (torch.randn(rows, case.heads, case.head_dim, generator=gen) for _ in range(2))
    read = torch.zeros(rows, dtype=torch.bool)
    for before_start, before_end, after_start, after_end in ranges:
        read[before_start:before_end] = read[after_start:after_end] = True
    keys[~read] = values[~read] = float("nan")
    keys, values = (x.to(device=device, dtype=dtype) for x in (keys, values))
    heads_major = {"contiguous": (), "heads-major": (0, 1), "mixed": (0,)}[layout]
    keys, values = (
        x.transpose(0, 1).contiguous().transpose(0, 1) if i in heads_major else x
        for i, x in enumerate((keys, values))
    )
    inputs["pool"] = (keys, values)
    inputs["pool_ranges"] = torch.tensor(ranges, dtype=index_dtype, device=device).reshape(case.frames, 4)
    if key_lengths is not None:
        inputs["key_lengths"] = torch.tensor(key_lengths, device=device)
        inputs = kl.pad(inputs, float("nan"))
    return inputs


def window_layout(inputs: dict) -> dict:
    """The existing path's borrowed keys as an explicit pool: k and v at ref_idx, frame j's S rows at j·S
    ((B·S, H, D)), and for each frame i its visible frames [lo, hi) (the reference's rule) as the ranges
    [lo·S, i·S) and [(i+1)·S, hi·S)."""
    k, v, ref_idx = inputs["k"], inputs["v"], inputs["ref_idx"]
    frames, refs = ref_idx.shape
    pool = tuple(torch.cat([x[j][:, ref_idx[j]].transpose(0, 1) for j in range(frames)]) for x in (k, v))
    ranges = []
    for i in range(frames):
        seen = [*visible_frames(i, frames, inputs["groups"], inputs["window"]), i]
        lo, hi = min(seen), max(seen) + 1
        ranges.append([lo * refs, i * refs, (i + 1) * refs, hi * refs])
    empty = ref_idx[:, :0]
    return {**inputs, "ref_idx": empty, "window": None, "pool": pool, "pool_ranges": torch.tensor(ranges)}


def run(inputs: dict, backend: str, monkeypatch) -> torch.Tensor:
    """backend: "pointer" / "tma" (the Triton path forced), "torch", or "reference"."""
    if backend == "reference":
        return consistent_attention_reference(**inputs)
    if backend in tk.PATHS:
        monkeypatch.setattr(tk, "FORCED_PATH", backend)
    return consistent_attention(**inputs, backend="torch" if backend == "torch" else "triton")


@pytest.mark.parametrize(("case", "rows", "ranges", "lengths", "layout", "dtype", "tiles"), INTERPRETER_CASES)
def test_triton_matches_reference(
    case, rows, ranges, lengths, layout, dtype, tiles, poisoned_outputs, monkeypatch
):
    if tiles is not None:
        monkeypatch.setattr(tk, "INTERPRETER_CONFIG", tiles)
    inputs = with_pool(case, rows, ranges, lengths, layout, dtype, seed=1, index_dtype=torch.int32)
    assert_matches_reference(consistent_attention(**inputs, backend="triton"), inputs)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize(("case", "rows", "ranges", "lengths", "layout"), TORCH_CASES)
def test_torch_path_matches_reference(case, rows, ranges, lengths, layout, dtype):
    inputs = with_pool(case, rows, ranges, lengths, layout, dtype, seed=1)
    assert_matches_reference(consistent_attention(**inputs, backend="torch"), inputs)


@pytest.mark.parametrize("backend", ["pointer", "tma", "reference", "torch"])
def test_window_layout_equals_the_window_path(backend, poisoned_outputs, monkeypatch):
    """Ranges built by the window/groups rule over the gathered pool are the existing path's key sets in
    the same order: bit for bit on both kernels (same tiles, same sums) and the reference; the torch path
    (one masked key set instead of compact ones) within float32 rounding."""
    monkeypatch.setattr(tk, "INTERPRETER_CONFIG", SMALL)
    case = Case(6, 1, 40, 16, 13, groups=2, window=1, bank=5, query_rows=(7, 40))
    dtype = torch.float32 if backend == "torch" else torch.float16
    inputs = make_inputs(case, dtype, seed=6)
    expected = run(inputs, backend, monkeypatch)
    out = run(window_layout(inputs), backend, monkeypatch)
    if backend == "torch":
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=2e-6)
    else:
        assert torch.equal(out, expected)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_range_over_the_frames_own_segment_means_what_it_says(backend, poisoned_outputs, monkeypatch):
    """Frame i's before-range widened over its own segment [i·S, (i+1)·S): it borrows its own sampled
    tokens as well (they are then attended twice: as own keys and as pool rows), as the reference says."""
    monkeypatch.setattr(tk, "INTERPRETER_CONFIG", SMALL)
    inputs = window_layout(make_inputs(Case(3, 1, 30, 16, 9, window=1), torch.float32, seed=7))
    ranges = inputs["pool_ranges"].clone()
    ranges[:, 1] = ranges[:, 2]  # before_end = (i + 1)·S
    widened = {**inputs, "pool_ranges": ranges}
    out = consistent_attention(**widened, backend=backend)
    assert_matches_reference(out, widened)
    assert (out - consistent_attention(**inputs, backend=backend)).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_reference_is_the_concatenation():
    """Independent check of the ground truth: frame 0 attends to [k0; pool rows 1..3; pool rows 2..4] (rows
    2 and 3 twice), frame 1 to [k1; nothing; pool row 0] then its bank."""
    case = Case(2, 1, 6, 8, 0, bank=2)
    inputs = with_pool(case, 5, [[1, 4, 2, 5], [3, 3, 0, 1]], None, "contiguous", torch.float64)
    q, k, v, bank_k, bank_v = (inputs[key] for key in ("q", "k", "v", "bank_k", "bank_v"))
    keys, values = inputs["pool"]
    out = consistent_attention_reference(**inputs, upcast=False)
    for i, (rows_before, rows_after) in enumerate([((1, 4), (2, 5)), ((3, 3), (0, 1))]):
        key_set = [k[i], *(keys[slice(*r)].transpose(0, 1) for r in (rows_before, rows_after)), bank_k[0]]
        value_set = [v[i], *(values[slice(*r)].transpose(0, 1) for r in (rows_before, rows_after)), bank_v[0]]
        key, value = torch.cat(key_set, dim=1), torch.cat(value_set, dim=1)
        expected = torch.softmax(q[i] @ key.transpose(-1, -2) * 8**-0.5, dim=-1) @ value
        torch.testing.assert_close(out[i], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_ranges_are_plain_attention(backend, poisoned_outputs):
    """A pool no range reaches (all of it NaN) and no bank: every frame attends to its own keys only."""
    case = Case(3, 2, 30, 16, 0)
    inputs = with_pool(
        case, 40, [[0, 0, 40, 40], [7, 7, 0, 0], [40, 40, 3, 3]], None, "contiguous", torch.float32
    )
    assert inputs["pool"][0].isnan().all()
    out = consistent_attention(**inputs, backend=backend)
    plain = F.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"])
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ref_idx_none_equals_empty(backend):
    inputs = with_pool(*CASE_TABLE[0][1:6], torch.float16, seed=2)
    expected = consistent_attention(**inputs, backend=backend)
    assert torch.equal(consistent_attention(**{**inputs, "ref_idx": None}, backend=backend), expected)


def test_gradients_reach_the_pool():
    """With grad on, the torch path is taken; gradients of q, k, v, bank and both pool tensors equal the
    reference's (float64). Rows no range reaches get none."""
    case = Case(4, 1, 12, 8, 0, groups=2, bank=3, query_rows=(2, 10))
    ranges = [[0, 4, 6, 9], [2, 2, 3, 7], [1, 8, 5, 9], [0, 0, 0, 0]]
    inputs = with_pool(case, 11, ranges, [12, 5, 9, 1], "heads-major", torch.float64)
    inputs = kl.pad(inputs, 0.0)
    keys, values = (x.nan_to_num(0.0) for x in inputs["pool"])
    inputs["pool"] = (keys, values)
    leaves = [inputs[key].requires_grad_(True) for key in ("q", "k", "v", "bank_k", "bank_v")]
    leaves += [keys.requires_grad_(True), values.requires_grad_(True)]
    out = consistent_attention(**inputs, backend="triton")  # grad sends it to the torch path
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, leaves, grad)
    expected = torch.autograd.grad(consistent_attention_reference(**inputs, upcast=False), leaves, grad)
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert ours[5][:9].abs().sum(dim=(1, 2)).min() > 0 and ours[5][9:].abs().max() == 0


def test_opcheck():
    """Schema (pool=(keys, values) as pool_rows_k / pool_rows_v, then pool_ranges), fake tensor and
    dispatch checks."""
    inputs = with_pool(*CASE_TABLE[0][1:6], torch.float32, index_dtype=torch.int32)
    args = [inputs[key] for key in ("q", "k", "v", "ref_idx", "groups", "window", "bank_k", "bank_v")]
    args += [0.3, 0, 30, None, None, *inputs["pool"], inputs["pool_ranges"]]
    torch.library.opcheck(
        consistent_attention_op,
        args,
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_compile_fullgraph(backend):
    """On CPU "auto" traces the torch path and "triton" the custom op (fake impl): no graph break, with
    every new argument (ref_idx None, pool, pool_ranges, key_lengths) and query rows."""
    case = Case(4, 2, 24, 16, 0, groups=2, bank=2, query_rows=(0, 20))
    ranges = [[0, 6, 12, 20], [3, 3, 0, 31], [10, 20, 20, 31], [0, 31, 2, 9]]
    inputs = with_pool(case, 31, ranges, [24, 9, 16, 3], "contiguous", torch.float32)
    inputs = kl.pad(inputs, 0.0)
    names = ("q", "k", "v", "bank_k", "bank_v", "key_lengths", "pool_ranges")

    def layer(q, k, v, bank_k, bank_v, key_lengths, pool_ranges, pool_rows):
        out = consistent_attention(
            q * 1.5, k, v, None, groups=2, bank_k=bank_k, bank_v=bank_v, backend=backend,
            query_rows=(0, 20), key_lengths=key_lengths, pool=(pool_rows[0], pool_rows[1] * 2.0),
            pool_ranges=pool_ranges, check_indices=False,
        )  # fmt: skip
        return out.relu()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    keys, values = inputs["pool"]
    got = compiled(*[inputs[n] for n in names], torch.stack([keys, values]))
    doubled = {**inputs, "q": inputs["q"] * 1.5, "pool": (keys, values * 2.0)}
    torch.testing.assert_close(got, consistent_attention_reference(**doubled).relu(), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_host_reads_without_check_indices(backend, monkeypatch):
    """check_indices=False: the ranges (and key lengths) are only read on the device (the kernel's loads,
    the torch path's masks); the default check reads them. (The torch path reads ranges that live on the
    CPU, where reading costs no sync: here it is made to take its device form, as on a GPU.)"""
    inputs = with_pool(*CASE_TABLE[0][1:6], torch.float32)
    inputs["key_lengths"] = torch.tensor([50, 20, 33, 1])
    monkeypatch.setattr(tp, "_host_known", lambda ranges: False)
    with kl.no_host_reads(monkeypatch):
        out = consistent_attention(**inputs, backend=backend, check_indices=False)
        with pytest.raises(AssertionError, match="host read"):
            consistent_attention(**inputs, backend=backend)
    monkeypatch.undo()
    assert_matches_reference(out, inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("path", tk.PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_compiled_kernel_on_a_window_layer(dtype, path, poisoned_outputs, monkeypatch):
    """The compiled kernels (tensor-core dots) at SDXL's 1/32 level: a story window as pool ranges equals
    the window path bit for bit, and a random pool with ragged ranges matches the reference."""
    if path == "tma" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors (TMA) need compute capability 9.0")
    monkeypatch.setattr(tk, "FORCED_PATH", path)
    inputs = make_inputs(Case(8, 20, 1024, 64, 512, groups=2, window=2, bank=77), dtype, device="cuda")
    expected = consistent_attention(**inputs, backend="triton")
    layout = window_layout(inputs)
    layout["pool_ranges"] = layout["pool_ranges"].cuda()
    assert torch.equal(consistent_attention(**layout, backend="triton"), expected)
    ranges = [[0, 700, 1500, 2100], [100, 1000, 1001, 1002], [0, 0, 0, 2100], [5, 5, 9, 9]] * 2
    case = Case(8, 20, 1024, 64, 0, groups=2, bank=77)
    random_pool = with_pool(case, 2100, ranges, [1024, 1000, 999, 1] * 2, "contiguous", dtype, device="cuda")
    assert_matches_reference(consistent_attention(**random_pool, backend="triton"), random_pool)


@st.composite
def pool_draws(draw, max_tokens: int, max_frames: int, max_rows: int):
    """A case with an explicit pool, random ranges (empty, overlapping, reaching R) and maybe key lengths."""
    groups = draw(st.integers(1, 2))
    frames = groups * draw(st.integers(1, max_frames // groups))
    tokens = draw(st.integers(1, max_tokens))
    rows = draw(st.integers(0, max_rows))
    bound = st.integers(0, rows)
    ranges = [
        [value for pair in (sorted(draw(st.tuples(bound, bound))) for _ in range(2)) for value in pair]
        for _ in range(frames)
    ]
    lengths = draw(st.one_of(st.none(), st.lists(st.integers(1, tokens), min_size=frames, max_size=frames)))
    query_rows = draw(st.one_of(st.none(), st.tuples(st.integers(0, tokens), st.integers(0, tokens))))
    case = Case(
        frames=frames,
        heads=draw(st.integers(1, 2)),
        tokens=tokens,
        head_dim=draw(st.sampled_from([8, 16, 24, 40])),
        refs=0,
        groups=groups,
        bank=draw(st.one_of(st.none(), st.integers(0, 9))),
        query_rows=None if query_rows is None else tuple(sorted(query_rows)),
    )
    layout = draw(st.sampled_from(["contiguous", "heads-major", "mixed"]))
    return case, rows, ranges, lengths, layout


def fuzz(max_examples: int):
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,  # the same draws every run (see test_fuzz.py)
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


@fuzz(max_examples=6)
@given(draw=pool_draws(max_tokens=32, max_frames=4, max_rows=40), dtype=st.sampled_from(ALL_DTYPES[:2]))
def test_fuzz_triton_matches_reference(draw, dtype, monkeypatch, poisoned_outputs):
    monkeypatch.setattr(tk, "INTERPRETER_CONFIG", {"BLOCK_M": 16, "BLOCK_N": 16})
    inputs = with_pool(*draw, dtype, seed=3)
    assert_matches_reference(consistent_attention(**inputs, backend="triton"), inputs)


@fuzz(max_examples=25)
@given(draw=pool_draws(max_tokens=60, max_frames=6, max_rows=90), dtype=st.sampled_from(ALL_DTYPES[:2]))
def test_fuzz_torch_matches_reference(draw, dtype):
    inputs = with_pool(*draw, dtype, seed=3)
    assert_matches_reference(consistent_attention(**inputs, backend="torch"), inputs)


@pytest.mark.gpu
def test_no_sync_and_cuda_graph_replay_with_every_new_argument():
    """On a GPU: key lengths, a caller pool and its ranges add no host sync (sync debug mode "error" with
    check_indices=False), and the op replays inside a CUDA graph (the value checks are skipped during
    capture) to the eager result."""
    case = Case(4, 8, 512, 64, 0, groups=2, bank=32, query_rows=(0, 400))
    ranges = [[0, 300, 300, 600], [100, 200, 250, 600], [0, 0, 0, 0], [0, 600, 599, 600]]
    inputs = with_pool(case, 600, ranges, [512, 450, 401, 1], "contiguous", torch.float16, device="cuda")
    inputs["pool_ranges"] = inputs["pool_ranges"].to(torch.int32)
    expected = consistent_attention(**inputs)  # compiles / tunes, and checks the values once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        consistent_attention(**inputs, check_indices=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as CUDA graph capture wants
        consistent_attention(**inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = consistent_attention(**inputs)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("case", [c[1:6] for c in CASE_TABLE[:3]], ids=[c[0] for c in CASE_TABLE[:3]])
def test_host_and_device_forms_of_the_torch_path_agree(case, monkeypatch):
    """Ranges on the CPU are read and gathered as compact key sets; on a device they become masks over the
    whole pool. Same keys, same result (to float rounding: the masked form sums over more columns)."""
    inputs = with_pool(*case, torch.float32)
    compact = consistent_attention(**inputs, backend="torch")
    monkeypatch.setattr(tp, "_host_known", lambda ranges: False)
    masked = consistent_attention(**inputs, backend="torch")
    torch.testing.assert_close(compact, masked, atol=2e-6, rtol=2e-6)
    assert_matches_reference(compact, inputs)
