"""Real sizes on a CUDA GPU (bf16 tensor-core dots included) and torch.compile with Inductor.

Skipped without CUDA (conftest.py). Run on the GPU machine with `pytest -m gpu`.
"""

import pytest
import torch
from helpers import Case, assert_matches_reference, make_inputs

from csa_kernels import consistent_attention

pytestmark = pytest.mark.gpu

REAL_CASES = [
    Case(8, 10, 4096, 64, 2048, groups=2),  # SDXL 1024², 1/16 level, 4 frames x CFG, rate 0.5
    Case(8, 20, 1024, 64, 512, groups=2),  # SDXL 1024², 1/32 level
    Case(8, 20, 988, 64, 692, groups=2, bank=1000),  # SDXL 832x1216, rate 0.7, with an id bank
    Case(4, 8, 4096, 40, 2048, window=1),  # SD1.5 512², 1/8 level
    Case(6, 8, 1024, 80, 307, groups=2, window=2),  # SD1.5 1/16 level, rate 0.3
    Case(4, 8, 256, 160, 128, bank=64),  # SD1.5 1/32 level
    Case(4, 24, 4096, 128, 2048, groups=2),  # hd128 (FLUX-like width)
    Case(3, 4, 257, 256, 0),  # largest head dim, no references
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", REAL_CASES, ids=lambda c: c.id)
def test_real_sizes_match_reference(case, dtype, poisoned_outputs):
    inputs = make_inputs(case, dtype, device="cuda")
    out = consistent_attention(**inputs, backend="auto")
    assert_matches_reference(out, inputs)


@pytest.mark.parametrize("path", ["pointer", "tma"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", REAL_CASES[:3] + REAL_CASES[6:7], ids=lambda c: c.id)
def test_both_kernel_paths(case, dtype, path, poisoned_outputs, monkeypatch):
    """The pointer kernel (pre-Hopper) and the descriptor kernel (sm_90+) on this GPU, each forced."""
    import csa_kernels.triton_kernel as tk

    if path == "tma" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors (TMA) need compute capability 9.0")
    monkeypatch.setattr(tk, "FORCED_PATH", path)
    inputs = make_inputs(case, dtype, device="cuda")
    assert_matches_reference(consistent_attention(**inputs, backend="triton"), inputs)


INT8_CASES = [REAL_CASES[0], REAL_CASES[2], REAL_CASES[6]]  # SDXL 1/16, SDXL with a bank, hd128


@pytest.mark.parametrize("path", ["pointer", "tma"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", INT8_CASES, ids=lambda c: c.id)
def test_int8_kernels_match_the_quantized_gold(case, dtype, path, poisoned_outputs, monkeypatch):
    """The 8-bit path compiled (not interpreted): each kernel equals the float64 attention over the
    dequantized rows within the native rounding bound (``test_int8.assert_matches_quantized_gold``)."""
    import test_int8

    import csa_kernels.triton_kernel as tk

    if path == "tma" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors (TMA) need compute capability 9.0")
    monkeypatch.setattr(tk, "FORCED_PATH", path)
    inputs = make_inputs(case, dtype, device="cuda")
    out = consistent_attention(**inputs, backend="triton", precision="int8")
    test_int8.assert_matches_quantized_gold(out, inputs)


def test_int8_pre_pass_and_scores_are_exact_on_the_gpu():
    """On the hardware: the one-launch pre-pass gives quantize_rows' codes and scales bit for bit (IEEE
    divisions, ties to even), and the kernels' int8 MMA products equal torch's integer matmul."""
    import test_int8

    from csa_kernels import quantize
    from csa_kernels.triton_quantize import quantize_rows_triton

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 8, 1024, 128, generator=gen, device="cuda").half() * 3
    mean = torch.randn(8, 128, generator=gen, device="cuda")
    codes, scales = quantize_rows_triton(x, mean)
    expected = quantize.quantize_rows(x, mean[:, None, :])
    assert torch.equal(codes, expected[0]) and torch.equal(scales, expected[1])
    q8, k8 = codes[0, 0, :64, :64].contiguous(), codes[1, 0, :64, :64].contiguous()
    ks = scales[1, 0, :64].contiguous()
    out = torch.full((64, 64), float("nan"), device="cuda")
    test_int8._scores_kernel[(1,)](q8, k8, ks, out, M=64, N=64, D=64)
    products = (q8.cpu().to(torch.int32) @ k8.cpu().to(torch.int32).T).to(torch.float32)
    assert torch.equal(out.cpu(), products * ks.cpu()[None, :])


@pytest.mark.parametrize("kind", ["gaussian", "outlier", "offset"])
def test_int8_contract_at_sdxl_size(kind):
    """The accuracy contract's cosine and relative L1 at SDXL's real 1/16 shape (4 frames, 10 heads, 4096
    tokens, hd64, rate 0.5) on the compiled kernel (the max error of 10⁷ outputs is not gated here)."""
    import test_int8

    inputs = {name: t.cuda() for name, t in test_int8.diffusion_like((4, 10, 4096, 64, 2048), kind).items()}
    out = consistent_attention(**inputs, backend="triton", precision="int8")
    cosine, l1, _ = test_int8.accuracy(out, inputs)
    least_cosine, most_l1, _ = test_int8.CONTRACT[kind]
    assert cosine >= least_cosine and l1 <= most_l1, (cosine, l1)


def test_bit_identical_runs():
    inputs = make_inputs(REAL_CASES[0], torch.bfloat16, device="cuda")
    first = consistent_attention(**inputs)
    assert torch.equal(first, consistent_attention(**inputs))


def test_torch_compile_inductor_fullgraph():
    inputs = make_inputs(Case(8, 10, 1024, 64, 512, groups=2, bank=77), torch.float16, device="cuda")

    def layer(q, k, v, ref_idx, bank_k, bank_v):
        out = consistent_attention(q, k, v, ref_idx, groups=2, bank_k=bank_k, bank_v=bank_v)
        return out.transpose(1, 2).flatten(2) * 2.0

    args = [inputs[key] for key in ("q", "k", "v", "ref_idx", "bank_k", "bank_v")]
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(*args), layer(*args), rtol=0, atol=0)


def test_story_on_gpu_with_and_without_bank_offload(tmp_path):
    """Tiny SDXL in fp16 on CUDA: the Triton path through the processors, with and without bank offload."""
    import numpy as np

    from storydiff.consistency.config import ConsistencyConfig
    from storydiff.pipeline import StoryDiffusionPipeline

    story = "[Bob] a man in a black suit\n---\n[Bob] walks\n[Bob] reads\n[Bob] waves #bye\n[NC] a street\n"
    images = {}
    for offload in (False, True):
        sp = StoryDiffusionPipeline.from_pretrained(
            "tiny-sdxl", ConsistencyConfig(offload_bank=offload), device="cuda"
        )
        result = sp(story, num_inference_steps=4, progress=False, out_dir=tmp_path / str(offload))
        assert sp.state.bank.offload == offload
        if offload:
            assert all(
                k.device.type == "cpu" and k.is_pinned() for k, _ in _bank_tensors(sp.state.bank, "Bob")
            )
        images[offload] = np.stack([np.asarray(im, dtype=np.int16) for im in result.images])
        sp.close()
    assert np.abs(images[False] - images[True]).max() == 0


def _bank_tensors(bank, character):
    return [pair for layers in bank._store[character].values() for pair in layers.values()]
