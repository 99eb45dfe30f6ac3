"""Input builders and the correctness assertion shared by the tests.

The tolerance rule itself lives in ``csa_kernels.reference_error_bound`` (the benchmarks' gate uses it
too): gold is the reference in float64, and an output passes within twice PyTorch's own error in the
same dtype plus a few ulps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from csa_kernels import reference_error_bound, sample_reference_indices


@dataclass(frozen=True)
class Case:
    frames: int
    heads: int
    tokens: int
    head_dim: int
    refs: int  # S, sampled tokens per frame
    groups: int = 1
    window: int | None = None
    bank: int | None = None  # M bank tokens per group, None for no bank
    query_rows: tuple[int, int] | None = None  # (a, b): only query rows a <= r < b borrow; None: all

    @property
    def id(self) -> str:
        rows = "" if self.query_rows is None else f"-r{self.query_rows[0]}:{self.query_rows[1]}"
        return (
            f"B{self.frames}-H{self.heads}-N{self.tokens}-D{self.head_dim}-S{self.refs}"
            f"-g{self.groups}-w{self.window}-M{self.bank}{rows}"
        )


def make_inputs(case: Case, dtype: torch.dtype, device="cpu", seed: int = 0, std: float = 1.0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    shape = (case.frames, case.heads, case.tokens, case.head_dim)

    def randn(*s):
        return (torch.randn(*s, generator=gen) * std).to(device=device, dtype=dtype)

    inputs = {
        "q": randn(*shape),
        "k": randn(*shape),
        "v": randn(*shape),
        "ref_idx": sample_reference_indices(
            case.frames, case.tokens, case.refs / case.tokens, generator=gen, device=device
        ),
        "groups": case.groups,
        "window": case.window,
    }
    assert inputs["ref_idx"].shape == (case.frames, case.refs)
    if case.query_rows is not None:
        inputs["query_rows"] = case.query_rows
    if case.bank is not None:
        bank_shape = (case.groups, case.heads, case.bank, case.head_dim)
        inputs["bank_k"], inputs["bank_v"] = randn(*bank_shape), randn(*bank_shape)
    return inputs


def as_float64(inputs: dict) -> dict:
    return {
        key: val.double() if isinstance(val, torch.Tensor) and val.is_floating_point() else val
        for key, val in inputs.items()
    }


def assert_matches_reference(out: torch.Tensor, inputs: dict) -> None:
    """out must be finite, q-shaped and q-typed, and within 2x PyTorch's own error of the fp64 gold.
    ``inputs`` are the call's keyword arguments (query_rows included), which the gold is computed from."""
    q = inputs["q"]
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all(), "non-finite (or never written) outputs"
    reference_error_bound(inputs).check(out)


def compile_test_unet():
    """The smallest UNet with one consistent level (8x8, two blocks, one cross-attention block each way): for
    tests that torch.compile a whole denoiser, where every module costs compile time."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 32),
        layers_per_block=1,
        attention_head_dim=2,
        cross_attention_dim=16,
        norm_num_groups=8,
    ).eval()
