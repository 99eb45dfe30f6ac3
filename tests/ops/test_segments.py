"""Segment ids (bounded attention, StoryBooth-style): several characters in one frame kept apart.

``segments`` (B, N) gives every token of every frame a segment (0: shared / background, c > 0: a character);
``bank_segments`` (groups, M) and ``pool_segments`` (R,) those of bank tokens and caller pool rows. A borrowed
key (sampled, pool or bank) of segment t is seen by a query row of segment c only when t == 0 or t == c; a
frame's own keys are seen by all of its rows.

Triton (interpreter: the pointer kernel and the descriptor kernel) and the torch path (its compact key sets
and its masked form) against the float64 reference, outputs NaN-poisoned. What covers what (BLOCK_M =
BLOCK_N = 64 by default, 16 in the small-tile cases):

- segment layouts of contiguous blocks (a character's tokens together, as in an image) whose boundaries fall
  inside tiles (query tiles and key tiles straddle segments), ids that are not consecutive (0, 1, 5), frames
  with one character or none, banks with per-character tokens; N, S, M not multiples of the tile;
- groups, windows, banks, query rows, pool_k, key_lengths, an explicit pool with its ranges, all at once;
  fp32, fp16 and bf16 under the tolerance rule; int32 and int64 ids;
- all-zero ids == None bit for bit on every path; a test-local reference (each query segment's key set
  built by hand, plain SDPA); changing one character's borrowed tokens leaves the other's rows bit-identical;
  a row whose borrowed keys are all hidden is plain attention over its own keys;
- the reference against the rule, gradients, the custom op (opcheck, torch.compile fullgraph), no host
  reads with ``check_indices=False``, and the errors naming each argument;
- hypothesis draws (derandomized) of random ids per token with groups, windows, banks, query rows, S = 0
  (5 on the interpreter, 20 on the torch path); the op suite's segment rows; the sm_90 compile (slow).
"""

import pytest
import test_key_lengths as kl
import test_pool_ranges as pr
import torch
import torch.nn.functional as F
from helpers import Case, assert_matches_reference, make_inputs
from hypothesis import given
from hypothesis import strategies as st

import csa_kernels.torch_path as tp
import csa_kernels.triton_kernel as tk
from csa_kernels import consistent_attention, consistent_attention_reference
from csa_kernels.op import consistent_attention_op

ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SMALL = {"BLOCK_M": 16, "BLOCK_N": 16}
IDS = (0, 1, 5)  # background and two characters (ids need not be consecutive)


def block_segments(frames: int, tokens: int, *, seed: int, ids=IDS, dtype=torch.int64) -> torch.Tensor:
    """(frames, tokens) ids: background, then per frame up to two character blocks at random boundaries
    (frame 1 shows only the first character, frame 2 none when there are more than two frames)."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.full((frames, tokens), ids[0], dtype=dtype)
    for b in range(frames):
        cuts = sorted(torch.randint(0, tokens + 1, (4,), generator=gen).tolist())
        out[b, cuts[0] : cuts[1]] = ids[1]
        if b != 1:
            out[b, cuts[2] : cuts[3]] = ids[2]
        if b == 2 and frames > 2:
            out[b] = ids[0]
    return out


def with_segments(
    case: Case, dtype: torch.dtype, *, seed: int = 0, index_dtype=torch.int64, device: str = "cpu"
) -> dict:
    """``make_inputs`` plus block ``segments`` and (with a bank) random ``bank_segments``."""
    inputs = make_inputs(case, dtype, device=device, seed=seed)
    inputs["segments"] = block_segments(case.frames, case.tokens, seed=seed, dtype=index_dtype).to(device)
    if case.bank is not None:
        gen = torch.Generator().manual_seed(seed + 300)
        bank = torch.tensor(IDS)[torch.randint(0, 3, (case.groups, case.bank), generator=gen)]
        inputs["bank_segments"] = bank.to(device=device, dtype=index_dtype)
    return inputs


def run(inputs: dict, backend: str, monkeypatch) -> torch.Tensor:
    """backend: "pointer" / "tma" (the Triton path forced), "torch", "torch-masked" (the torch path's form
    for index tensors on a device), or "reference"."""
    if backend == "reference":  # float64 inputs: float64 math
        return consistent_attention_reference(**inputs, upcast=inputs["q"].dtype != torch.float64)
    if backend in tk.PATHS:
        monkeypatch.setattr(tk, "FORCED_PATH", backend)
    if backend == "torch-masked":
        monkeypatch.setattr(tp, "_host_known", lambda ranges: False)
    return consistent_attention(**inputs, backend="triton" if backend in tk.PATHS else "torch")


# (label, case, dtypes on the interpreter, interpreter tiles)
CASE_TABLE = [
    ("tails", Case(4, 1, 50, 16, 7, groups=2, window=1, bank=5), ALL_DTYPES, SMALL),
    ("image-rows", Case(3, 2, 77, 64, 20, bank=5, query_rows=(0, 60)), ALL_DTYPES[:2], None),
    ("across-tiles", Case(5, 1, 63, 40, 9, window=2, bank=19, query_rows=(5, 40)), ALL_DTYPES[:1], SMALL),
]
INTERPRETER_CASES = [
    pytest.param(case, dtype, tiles, path, id=f"{label}-{dtype}-{path}")
    for label, case, dtypes, tiles in CASE_TABLE
    for dtype in dtypes
    for path in tk.PATHS
    if path == "pointer" or dtype != torch.float32  # the descriptor kernel: fp16 and bf16 suffice here
]


@pytest.mark.parametrize(("case", "dtype", "tiles", "path"), INTERPRETER_CASES)
def test_triton_matches_reference(case, dtype, tiles, path, poisoned_outputs, monkeypatch):
    if tiles is not None:
        monkeypatch.setattr(tk, "INTERPRETER_CONFIG", tiles)
    inputs = with_segments(case, dtype, seed=1, index_dtype=torch.int32)
    assert_matches_reference(run(inputs, path, monkeypatch), inputs)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize(("label", "case"), [(label, case) for label, case, _, _ in CASE_TABLE])
def test_torch_path_matches_reference(label, case, dtype):
    inputs = with_segments(case, dtype, seed=1)
    assert_matches_reference(consistent_attention(**inputs, backend="torch"), inputs)


def pool_inputs(dtype: torch.dtype, *, seed: int = 2, index_dtype=torch.int64) -> dict:
    """An explicit pool (R = 70, ragged overlapping ranges) with per-row segments, a bank with segments,
    groups, query rows and key lengths."""
    case = Case(4, 1, 50, 16, 0, groups=2, bank=5, query_rows=(3, 45))
    ranges = [[0, 20, 37, 50], [3, 3, 20, 53], [0, 0, 0, 0], [5, 21, 16, 33]]
    inputs = pr.with_pool(case, 70, ranges, [50, 23, 32, 9], "heads-major", dtype, seed=seed)
    inputs["segments"] = block_segments(4, 50, seed=seed, dtype=index_dtype)
    gen = torch.Generator().manual_seed(seed + 400)
    inputs["pool_segments"] = torch.tensor(IDS)[torch.randint(0, 3, (70,), generator=gen)].to(index_dtype)
    inputs["bank_segments"] = torch.tensor(IDS)[torch.randint(0, 3, (2, 5), generator=gen)].to(index_dtype)
    return inputs


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [
        ("pointer", torch.float16),
        ("tma", torch.bfloat16),
        ("torch", torch.float32),
        ("torch", torch.bfloat16),
        ("torch-masked", torch.float16),
    ],
)
def test_explicit_pool_matches_reference(backend, dtype, poisoned_outputs, monkeypatch):
    monkeypatch.setattr(tk, "INTERPRETER_CONFIG", SMALL)
    inputs = pool_inputs(dtype, index_dtype=torch.int32 if backend in tk.PATHS else torch.int64)
    assert_matches_reference(run(inputs, backend, monkeypatch), inputs)


def combined_inputs(dtype: torch.dtype, *, pool: bool) -> dict:
    """Every other argument at once. pool=False: groups, a window, a bank, query rows (straddling tiles),
    pool_k, key lengths; pool=True: an explicit pool and its ranges (which rule out the window and pool_k)
    with groups, a bank, query rows and key lengths."""
    if pool:
        return pool_inputs(dtype, seed=5)
    case = Case(4, 1, 45, 24, 11, groups=2, window=1, bank=7, query_rows=(9, 41))
    inputs = kl.with_key_lengths(case, [45, 30, 1, 33], dtype, seed=5)
    gen = torch.Generator().manual_seed(6)
    inputs["pool_k"] = torch.randn(4, 1, 11, 24, generator=gen).to(dtype)
    inputs["segments"] = block_segments(4, 45, seed=5)
    inputs["bank_segments"] = torch.tensor(IDS)[torch.randint(0, 3, (2, 7), generator=gen)]
    return inputs


@pytest.mark.parametrize("pool", [False, True], ids=["ref_idx", "pool"])
@pytest.mark.parametrize("backend", ["pointer", "tma", "torch", "torch-masked"])
def test_every_argument_at_once(backend, pool, poisoned_outputs, monkeypatch):
    monkeypatch.setattr(tk, "INTERPRETER_CONFIG", SMALL)
    inputs = combined_inputs(torch.float16, pool=pool)
    assert_matches_reference(run(inputs, backend, monkeypatch), inputs)


def without_segments(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k not in ("segments", "bank_segments", "pool_segments")}


def all_zero(inputs: dict) -> dict:
    return {
        **inputs,
        **{
            name: torch.zeros_like(inputs[name])
            for name in ("segments", "bank_segments", "pool_segments")
            if name in inputs
        },
    }


@pytest.mark.parametrize("pool", [False, True], ids=["ref_idx", "pool"])
@pytest.mark.parametrize("backend", ["pointer", "tma", "torch", "torch-masked", "reference"])
def test_all_zero_segments_are_bit_identical_to_none(backend, pool, poisoned_outputs, monkeypatch):
    """Segment 0 everywhere (each part given or not) is today's output, bit for bit: the kernels' segment
    select keeps the unmasked arithmetic, the torch path's mask is all true, the reference's all false."""
    monkeypatch.setattr(tk, "INTERPRETER_CONFIG", SMALL)
    inputs = combined_inputs(torch.float16 if backend in tk.PATHS else torch.float32, pool=pool)
    expected = run(without_segments(inputs), backend, monkeypatch)
    zeros = all_zero(inputs)
    assert torch.equal(run(zeros, backend, monkeypatch), expected)
    if backend not in tk.PATHS:  # the kernels take the parts not given as zeros (the launcher's tensors)
        only = {**without_segments(inputs), "segments": zeros["segments"]}
        assert torch.equal(run(only, backend, monkeypatch), expected)


@pytest.mark.parametrize("backend", ["pointer", "tma", "torch", "reference"])
def test_two_characters_by_hand(backend, poisoned_outputs, monkeypatch):
    """Frame 0 of three has a background, Alice (1) and Bob (2). Each query segment's key set, built by hand:
    frame 0's own tokens, then the borrowed tokens (other frames' sampled tokens, the bank) of segment 0 or
    the query's own; plain SDPA per segment gives frame 0's rows."""
    monkeypatch.setattr(tk, "INTERPRETER_CONFIG", SMALL)
    case = Case(3, 2, 40, 16, 13, bank=6)
    dtype = torch.float32 if backend in tk.PATHS else torch.float64
    inputs = make_inputs(case, dtype, seed=8)
    segments = torch.zeros(3, 40, dtype=torch.int64)
    segments[:, 5:19] = 1
    segments[:, 23:37] = 2
    segments[1, 30:] = 1  # another frame's layout differs
    inputs["segments"] = segments
    inputs["bank_segments"] = torch.tensor([[0, 1, 1, 2, 2, 0]])
    out = run(inputs, backend, monkeypatch)
    q, k, v, ref_idx = (inputs[name] for name in ("q", "k", "v", "ref_idx"))
    borrowed_k = torch.cat([k[j][:, ref_idx[j]] for j in (1, 2)] + [inputs["bank_k"][0]], dim=1)
    borrowed_v = torch.cat([v[j][:, ref_idx[j]] for j in (1, 2)] + [inputs["bank_v"][0]], dim=1)
    borrowed_seg = torch.cat([segments[1, ref_idx[1]], segments[2, ref_idx[2]], inputs["bank_segments"][0]])
    for c in (0, 1, 2):
        rows = segments[0] == c
        shown = (borrowed_seg == 0) | (borrowed_seg == c)
        keys = torch.cat([k[0], borrowed_k[:, shown]], dim=1)
        values = torch.cat([v[0], borrowed_v[:, shown]], dim=1)
        expected = F.scaled_dot_product_attention(q[0][:, rows], keys, values)
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(out[0][:, rows], expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["pointer", "tma", "torch", "torch-masked", "reference"])
def test_changing_bobs_tokens_leaves_alices_rows_bit_identical(backend, poisoned_outputs, monkeypatch):
    """Bob's (segment 5) tokens of every other frame and of the bank replaced by other values: frame 0's
    Alice and background rows do not change a bit (Bob's keys reach them with probability exactly 0);
    frame 0's Bob rows do change."""
    monkeypatch.setattr(tk, "INTERPRETER_CONFIG", SMALL)
    case = Case(4, 1, 50, 16, 20, groups=1, bank=9, query_rows=(2, 48))
    inputs = with_segments(case, torch.float16 if backend in tk.PATHS else torch.float32, seed=9)
    segments = inputs["segments"]
    assert (segments[0] == 5).any() and (segments[1:] == 5).any() and (segments[0] == 1).any()
    inputs["bank_segments"][0, :3] = 5
    bob = (segments == 5)[:, None, :, None].clone()
    bob[0] = False  # frame 0's own tokens stay (every row of frame 0 sees them)
    changed = dict(inputs)
    for name in ("k", "v"):
        changed[name] = torch.where(bob, torch.randn_like(inputs[name]) * 3, inputs[name])
    bank_bob = (inputs["bank_segments"] == 5)[:, None, :, None]
    for name in ("bank_k", "bank_v"):
        changed[name] = torch.where(bank_bob, torch.randn_like(inputs[name]) * 3, inputs[name])
    before, after = run(inputs, backend, monkeypatch), run(changed, backend, monkeypatch)
    others = segments[0] != 5
    assert torch.equal(after[0][:, others], before[0][:, others])
    assert not torch.equal(after[0][:, ~others], before[0][:, ~others])


@pytest.mark.parametrize("backend", ["pointer", "tma", "torch"])
def test_rows_that_see_no_borrowed_key_are_plain_attention(backend, poisoned_outputs, monkeypatch):
    """Every borrowed token is Bob's (segment 2) and frame 0's rows are Alice's or background: they see no
    borrowed key at all (no empty softmax: their own keys remain), i.e. plain attention over frame 0."""
    monkeypatch.setattr(tk, "INTERPRETER_CONFIG", SMALL)
    inputs = make_inputs(Case(3, 1, 30, 16, 7, bank=4), torch.float32, seed=10)
    segments = torch.full((3, 30), 2)
    segments[0] = torch.arange(30) % 2  # Alice and background alternate
    inputs["segments"] = segments
    inputs["bank_segments"] = torch.full((1, 4), 2)
    out = run(inputs, backend, monkeypatch)
    q, k, v = (inputs[name][:1] for name in ("q", "k", "v"))
    torch.testing.assert_close(out[:1], F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=2e-6)
    assert_matches_reference(out, inputs)


def test_host_and_device_forms_of_the_torch_path_agree(monkeypatch):
    """Compact key sets (ranges on the CPU) and the masked form (ranges on a device): same keys and masks."""
    inputs = pool_inputs(torch.float32)
    compact = consistent_attention(**inputs, backend="torch")
    monkeypatch.setattr(tp, "_host_known", lambda ranges: False)
    masked = consistent_attention(**inputs, backend="torch")
    torch.testing.assert_close(compact, masked, atol=2e-6, rtol=2e-6)


def test_gradients_match_reference():
    """Autograd takes the torch path (masked SDPA) and agrees with the reference in float64."""
    case = Case(4, 1, 12, 8, 3, groups=2, window=1, bank=3, query_rows=(0, 9))
    inputs = with_segments(case, torch.float64, seed=11)
    leaves = [inputs[key].requires_grad_(True) for key in ("q", "k", "v", "bank_k", "bank_v")]
    out = consistent_attention(**inputs, backend="auto")
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, leaves, grad)
    expected = torch.autograd.grad(consistent_attention_reference(**inputs, upcast=False), leaves, grad)
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_opcheck():
    """Schema (segments, bank_segments, pool_segments last), fake tensor and dispatch checks."""
    inputs = pool_inputs(torch.float32, index_dtype=torch.int32)
    args = [inputs[key] for key in ("q", "k", "v", "ref_idx", "groups", "window", "bank_k", "bank_v")]
    args[3] = torch.empty(4, 0, dtype=torch.int64)
    args += [0.3, *inputs["query_rows"], None, inputs["key_lengths"], *inputs["pool"], inputs["pool_ranges"]]
    args += [inputs["segments"], inputs["bank_segments"], inputs["pool_segments"]]
    torch.library.opcheck(
        consistent_attention_op,
        args,
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_compile_fullgraph(backend):
    """On CPU "auto" traces the torch path and "triton" the custom op (fake impl): no graph break."""
    case = Case(4, 2, 24, 16, 6, groups=2, window=1, bank=2, query_rows=(0, 20))
    inputs = with_segments(case, torch.float32, seed=12)
    names = ("q", "k", "v", "ref_idx", "bank_k", "bank_v", "segments", "bank_segments")

    def layer(q, k, v, ref_idx, bank_k, bank_v, segments, bank_segments):
        out = consistent_attention(
            q * 1.5, k, v, ref_idx, groups=2, window=1, bank_k=bank_k, bank_v=bank_v, backend=backend,
            query_rows=(0, 20), segments=segments, bank_segments=bank_segments, check_indices=False,
        )  # fmt: skip
        return out.relu()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    expected = consistent_attention_reference(**{**inputs, "q": inputs["q"] * 1.5}).relu()
    torch.testing.assert_close(compiled(*[inputs[n] for n in names]), expected, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_host_reads_without_check_indices(backend, monkeypatch):
    """check_indices=False: segment ids are only read on the device; the default check reads them."""
    inputs = pool_inputs(torch.float32)
    monkeypatch.setattr(tp, "_host_known", lambda ranges: False)
    with kl.no_host_reads(monkeypatch):
        out = consistent_attention(**inputs, backend=backend, check_indices=False)
        with pytest.raises(AssertionError, match="host read"):
            consistent_attention(**inputs, backend=backend)
    monkeypatch.undo()
    assert_matches_reference(out, inputs)


def error_inputs(**changes) -> dict:
    inputs = with_segments(Case(2, 1, 8, 8, 2, bank=3), torch.float32)
    return {**inputs, **changes}


BAD = [
    (
        {"segments": torch.zeros(2, 7, dtype=torch.int64)},
        ValueError,
        r"segments must have shape \(B=2, N=8\)",
    ),
    ({"segments": torch.zeros(2, 8, dtype=torch.uint8)}, TypeError, "segments must be int32 or int64"),
    ({"segments": torch.zeros(2, 8)}, TypeError, "segments must be int32 or int64"),
    ({"segments": [[0] * 8] * 2}, TypeError, "segments must be None or a torch.Tensor"),
    (
        {"segments": torch.zeros(2, 8, dtype=torch.int64, device="meta")},
        ValueError,
        "segments must be on the",
    ),
    ({"segments": torch.full((2, 8), -1)}, ValueError, r"segments must be segment ids in \[0, 2147483647\]"),
    (
        {"segments": torch.full((2, 8), 2**31)},
        ValueError,
        r"segments must be segment ids .* got range \[2147483648",
    ),
    ({"bank_segments": torch.zeros(1, 4, dtype=torch.int64)}, ValueError, r"bank_segments must have shape"),
    (
        {"bank_segments": torch.tensor([[0, -2, 1]])},
        ValueError,
        r"bank_segments must be segment ids in \[0, ",
    ),
    ({"bank_k": None, "bank_v": None}, ValueError, "bank_segments must be None without a bank"),
    (
        {"pool_segments": torch.zeros(4, dtype=torch.int64)},
        ValueError,
        "pool_segments must be None without pool",
    ),
]


@pytest.mark.parametrize(("changes", "error", "match"), BAD)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_errors_name_the_argument(changes, error, match, backend):
    with pytest.raises(error, match=match):
        consistent_attention(**error_inputs(**changes), backend=backend)


def test_pool_segment_errors():
    inputs = pool_inputs(torch.float32)
    with pytest.raises(ValueError, match=r"pool_segments must have shape \(R=70,\)"):
        consistent_attention(**{**inputs, "pool_segments": torch.zeros(69, dtype=torch.int64)})
    with pytest.raises(ValueError, match=r"pool_segments must be segment ids in \[0, "):
        consistent_attention(**{**inputs, "pool_segments": torch.full((70,), -3)})


@pytest.mark.gpu
@pytest.mark.parametrize("path", tk.PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_compiled_kernel_on_a_two_character_layer(dtype, path, poisoned_outputs, monkeypatch):
    """The compiled kernels (tensor-core dots) at SDXL's 1/32 level with two characters per frame: the
    reference's result, and all-zero ids bit-identical to none."""
    if path == "tma" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors (TMA) need compute capability 9.0")
    monkeypatch.setattr(tk, "FORCED_PATH", path)
    inputs = with_segments(Case(8, 20, 1024, 64, 512, groups=2, window=2, bank=77), dtype, device="cuda")
    assert_matches_reference(consistent_attention(**inputs, backend="triton"), inputs)
    plain = consistent_attention(**without_segments(inputs), backend="triton")
    assert torch.equal(consistent_attention(**all_zero(inputs), backend="triton"), plain)


def test_op_suite_rows_with_segments():
    """The op suite's segment cases: the library's providers pass the correctness gate with segment ids,
    the official variants (which have none) say n/a; the ids split the image tokens into background and
    characters, text tokens 0."""
    from storydiff.benchmark import op_suite

    case = op_suite.OpCase("tiny-seg", 2, 1, 40, 16, 0.5, cfg=False, text_tokens=9, characters=2)
    segments = op_suite.make_case_inputs(case, torch.float32, torch.device("cpu"))["segments"]
    assert segments.shape == (2, 49) and (segments[:, :9] == 0).all()
    assert {0, 1, 2} <= set(segments[0].tolist()) and segments[0].tolist() != segments[1].tolist()
    providers = ["reference", "official_a", "ours_torch"]
    env = {"device": "cpu"}
    rows = op_suite.run_op_suite([case], providers, device=torch.device("cpu"), dtype=torch.float32, env=env)
    status = {row["provider"]: row["status"] for row in rows}
    assert status["reference"] == status["ours_torch"] == "ok", status
    assert status["official_a"].startswith("n/a") and "segments" in status["official_a"], status


@pytest.mark.slow  # one sm_90 compile (~15 s on 2 cores); the numbers: benchmarks/results/inspect_segments_*
def test_segments_compile_clean_on_sm90():
    """The descriptor kernel with segment ids (the default sm_90 config): spill-free, TMA loads, wgmma; the
    own tokens' loop (the first steady loop) is the plain kernel's."""
    import test_inspect as ti

    plain = ti.inspect_default(90, "float16", 64, "tma")
    row = ti.inspect_default(90, "float16", 64, "tma", features={"has_segments": True})
    assert row["has_segments"] and row["spill_bytes"] == 0 and row["local_bytes"] == 0, row
    assert row["load"] == "TMA" and row["mma"] == "wgmma", row
    assert row["instr_per_1k_scores"] == plain["instr_per_1k_scores"], (row, plain)
    assert len(row["loops"]) == len(plain["loops"]), (row, plain)


@st.composite
def segment_draws(draw, max_tokens: int, max_frames: int):
    """A case (groups, window, bank, query rows, S = 0 included) with random ids in [0, 3] per token and
    bank token (not blocks: every tile mixes segments)."""
    groups = draw(st.integers(1, 2))
    frames = groups * draw(st.integers(1, max_frames // groups))
    tokens = draw(st.integers(1, max_tokens))
    rows = st.tuples(st.integers(0, tokens), st.integers(0, tokens)).map(lambda pair: tuple(sorted(pair)))
    case = Case(
        frames=frames,
        heads=draw(st.integers(1, 2)),
        tokens=tokens,
        head_dim=draw(st.sampled_from([8, 16, 24, 40])),
        refs=draw(st.integers(0, tokens)),
        groups=groups,
        window=draw(st.one_of(st.none(), st.integers(1, 2))),
        bank=draw(st.one_of(st.none(), st.integers(0, 9))),
        query_rows=draw(st.one_of(st.none(), rows)),
    )
    return case, draw(st.integers(0, 2**16))


def random_segments(case: Case, dtype: torch.dtype, seed: int) -> dict:
    inputs = make_inputs(case, dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    inputs["segments"] = torch.randint(0, 4, (case.frames, case.tokens), generator=gen)
    if case.bank is not None:
        inputs["bank_segments"] = torch.randint(0, 4, (case.groups, case.bank), generator=gen)
    return inputs


@pr.fuzz(max_examples=5)
@given(draw=segment_draws(max_tokens=32, max_frames=4), dtype=st.sampled_from(ALL_DTYPES[:2]))
def test_fuzz_triton_matches_reference(draw, dtype, monkeypatch, poisoned_outputs):
    monkeypatch.setattr(tk, "INTERPRETER_CONFIG", SMALL)
    inputs = random_segments(draw[0], dtype, draw[1])
    assert_matches_reference(consistent_attention(**inputs, backend="triton"), inputs)


@pr.fuzz(max_examples=20)
@given(draw=segment_draws(max_tokens=60, max_frames=6), dtype=st.sampled_from(ALL_DTYPES[:2]))
def test_fuzz_torch_matches_reference(draw, dtype):
    inputs = random_segments(draw[0], dtype, draw[1])
    assert_matches_reference(consistent_attention(**inputs, backend="torch"), inputs)


@pytest.mark.parametrize("part", ["bank_segments", "pool_segments"])
@pytest.mark.parametrize("backend", ["pointer", "torch", "torch-masked"])
def test_one_part_alone(backend, part, poisoned_outputs, monkeypatch):
    """Bank or pool ids without ``segments``: every query row is segment 0, so it sees only the shared
    (id 0) bank tokens or pool rows — the reference's answer, and not the answer without ids."""
    monkeypatch.setattr(tk, "INTERPRETER_CONFIG", SMALL)
    full = pool_inputs(torch.float32)
    inputs = {**without_segments(full), part: full[part]}
    out = run(inputs, backend, monkeypatch)
    assert_matches_reference(out, inputs)
    assert (out - run(without_segments(full), backend, monkeypatch)).abs().max() > 1e-3
