"""The torch.library registration: schema, fake implementation, and torch.compile without graph breaks."""

from unittest.mock import patch

import pytest
import torch
from helpers import Case, make_inputs

from csa_kernels import consistent_attention, consistent_attention_reference
from csa_kernels.op import consistent_attention_op


def op_args(inputs, scale=0.3):
    rows = inputs.get("query_rows")
    return (
        inputs["q"],
        inputs["k"],
        inputs["v"],
        inputs["ref_idx"],
        inputs["groups"],
        inputs["window"],
        inputs.get("bank_k"),
        inputs.get("bank_v"),
        scale,
        *(() if rows is None else rows),  # query_row_start, query_row_end
    )


@pytest.mark.parametrize(
    "case",
    [
        Case(4, 2, 20, 16, 5, groups=2, bank=3),
        Case(3, 1, 9, 8, 4, window=1),
        Case(4, 1, 20, 16, 5, groups=2, bank=3, query_rows=(7, 20)),
    ],
    ids=lambda c: c.id,
)
def test_opcheck(case):
    """Schema, fake tensor and dispatch checks (runs the kernel under the interpreter on CPU)."""
    inputs = make_inputs(case, torch.float32)
    torch.library.opcheck(
        consistent_attention_op,
        op_args(inputs),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )


@pytest.mark.parametrize("rows", [(), (3, 8)], ids=["all-rows", "query-rows"])
def test_fake_output_layout_matches_real(rows):
    frames, tokens, heads, dim = 2, 10, 2, 8
    x = torch.randn(frames, tokens, heads * dim).view(frames, tokens, heads, dim).transpose(1, 2)
    idx = torch.zeros(frames, 3, dtype=torch.int64)
    real = consistent_attention_op(x, x, x, idx, 1, None, None, None, 1.0, *rows)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        fake = consistent_attention_op(fx, fx, fx, mode.from_tensor(idx), 1, None, None, None, 1.0, *rows)
    assert fake.shape == real.shape and fake.stride() == real.stride() == x.stride()


@pytest.mark.parametrize("query_rows", [None, (5, 24)], ids=["all-rows", "query-rows"])
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_compile_fullgraph_cpu(backend, query_rows):
    """On CPU "auto" traces the torch path and "triton" traces the custom op; neither breaks the graph."""
    inputs = make_inputs(Case(4, 2, 24, 16, 6, groups=2, window=1, bank=2), torch.float32)

    def layer(q, k, v, ref_idx, bank_k, bank_v):
        out = consistent_attention(
            q * 1.5,
            k,
            v,
            ref_idx,
            groups=2,
            window=1,
            bank_k=bank_k,
            bank_v=bank_v,
            backend=backend,
            query_rows=query_rows,
        )
        return out.relu()

    args = [inputs[key] for key in ("q", "k", "v", "ref_idx", "bank_k", "bank_v")]
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    expected = consistent_attention_reference(
        inputs["q"] * 1.5,
        inputs["k"],
        inputs["v"],
        inputs["ref_idx"],
        groups=2,
        window=1,
        bank_k=inputs["bank_k"],
        bank_v=inputs["bank_v"],
        query_rows=query_rows,
    ).relu()
    torch.testing.assert_close(compiled(*args), expected, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_fixed_config_lies_in_the_pruned_autotune_space(dtype):
    """CSA_AUTOTUNE=0 uses one config per path and head dim; it must be one the autotuner would also keep on
    every arch that path runs on (descriptors: sm_90; pointers: sm_80, 86, 89)."""
    from csa_kernels.tuning import SMALL, as_dict, autotune_configs, fixed_config, prune, shared_memory_limit

    for path, arches in (("tma", (90,)), ("pointer", (80, 86, 89))):
        for head_dim_p in (16, 32, 64, 128, 256):
            fixed = fixed_config(head_dim_p, dtype, path)
            for arch in arches:
                limit = shared_memory_limit(arch)
                with patch("csa_kernels.tuning.shared_memory_limit", lambda limit=limit: limit):
                    kept = prune(
                        autotune_configs(),
                        {"Q": torch.empty(1, dtype=dtype)},
                        path=path,
                        HEAD_DIM_P=head_dim_p,
                    )
                assert fixed in [as_dict(c) for c in kept], (path, arch, head_dim_p, fixed)
            if dtype == torch.float32 or head_dim_p > 128:
                assert fixed == SMALL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_int8_fixed_config_lies_in_its_pruned_space(dtype):
    """The 8-bit path's fixed configs are in its pruned space on every arch of their path, and that space
    holds its spill-free tiles (tuning.INT8_SPILL_FREE), not the 16-bit rules' (which drop pointer hd128
    64x64x4, spill-free in int8) — and never pointer hd128 128x128x8 (496 bytes of spill in int8)."""
    from csa_kernels.tuning import (
        INT8_SPILL_FREE,
        as_dict,
        autotune_configs,
        fixed_config,
        prune,
        shared_memory_limit,
    )

    for path, arches in (("tma", (90,)), ("pointer", (80, 86, 89))):
        for head_dim_p in (32, 64, 128):
            fixed = fixed_config(head_dim_p, dtype, path, int8=True)
            for arch in arches:
                limit = shared_memory_limit(arch)
                with patch("csa_kernels.tuning.shared_memory_limit", lambda limit=limit: limit):
                    kept = prune(
                        autotune_configs(),
                        {"Q": torch.empty(1, dtype=torch.int8), "V": torch.empty(1, dtype=dtype)},
                        path=path,
                        HEAD_DIM_P=head_dim_p,
                        INT8=True,
                    )
                tiles = {(c["BLOCK_M"], c["BLOCK_N"], c["num_warps"]) for c in map(as_dict, kept)}
                assert fixed in [as_dict(c) for c in kept], (path, arch, head_dim_p, fixed)
                assert tiles <= INT8_SPILL_FREE[(path, max(64, head_dim_p))], (path, arch, head_dim_p)
                if (path, head_dim_p) == ("pointer", 128):  # int8's own rule: a tile the 16-bit rule drops
                    assert (64, 64, 4) in tiles, (arch, tiles)
    assert (128, 128, 8) not in INT8_SPILL_FREE[("pointer", 128)]
