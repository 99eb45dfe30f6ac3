"""The package without its optional pieces: no Triton, no NVML (nvidia-ml-py), no imageio / imageio-ffmpeg,
no CUDA — what a plain `pip install storydiff-csa` on a CPU-only or non-Linux machine gives.

Absence is simulated in a fresh interpreter: ``sys.modules[name] = None`` before anything is imported makes
every ``import name`` fail as if the package were not installed (and ``importlib.util.find_spec`` return
None), and an empty ``CUDA_VISIBLE_DEVICES`` hides any GPU. The child checks that the packages import
without a word about the missing pieces, that the op is registered and its torch path gives the reference
answer, and that using each missing feature says which package (and extra) to install, in one line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    r"""
    import sys

    MISSING = ("triton", "pynvml", "imageio", "imageio_ffmpeg")
    for name in MISSING:
        sys.modules[name] = None  # `import name` now fails as for an absent package

    import importlib.util
    import tempfile
    import warnings

    def one_line(message, *needles):
        assert "\n" not in message, message
        for needle in needles:
            assert needle in message, (needle, message)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch

        import csa_kernels
        import storydiff
        import storydiff.benchmark.memory
        import storydiff.benchmark.providers
        import storydiff.pages.video_io
        import storydiff.pipeline  # imports diffusers and transformers
    # Nothing is said about a missing optional piece until its feature is used.
    noisy = [str(w.message) for w in caught if any(n in str(w.message) for n in MISSING + ("NVML",))]
    assert not noisy, noisy
    assert not torch.cuda.is_available()
    for name in MISSING:
        assert importlib.util.find_spec(name) is None, name
    assert csa_kernels.__version__ == storydiff.__version__

    # The op: registered, traceable without Triton (fake implementation), and the public call runs on the CPU.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from csa_kernels import consistent_attention, consistent_attention_reference, sample_reference_indices
    from csa_kernels.validation import TRITON_INSTALLED

    assert not TRITON_INSTALLED
    op = torch.ops.csa.consistent_attention
    assert "csa::consistent_attention" in str(op.default._schema)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 2, 24, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    bank_k, bank_v = (torch.randn(2, 2, 5, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    ref_idx = sample_reference_indices(4, 24, rate=0.5, generator=gen)
    args = dict(groups=2, window=1, bank_k=bank_k, bank_v=bank_v)
    expected = consistent_attention_reference(q, k, v, ref_idx, upcast=False, **args)  # float64 math
    for backend in ("auto", "torch"):
        out = consistent_attention(q, k, v, ref_idx, backend=backend, **args)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    mode = FakeTensorMode()
    fq, fk, fv, fidx = (mode.from_tensor(t) for t in (q.float(), k.float(), v.float(), ref_idx))
    with mode:
        fake = op(fq, fk, fv, fidx, 2, None, None, None, 0.25)
    assert fake.shape == q.shape and fake.dtype == torch.float32

    # Triton's features: a one-line ModuleNotFoundError naming the package, from the API and from the op.
    q32, k32, v32 = (t.float() for t in (q, k, v))
    for call in (
        lambda: consistent_attention(q32, k32, v32, ref_idx, groups=2, backend="triton"),
        lambda: op(q32, k32, v32, ref_idx, 2, None, None, None, 0.25),
    ):
        try:
            call()
        except ModuleNotFoundError as exc:
            assert exc.name == "triton"
            one_line(str(exc), "triton package", "pip install triton", "backend='auto'")
        else:
            raise AssertionError("backend='triton' ran without Triton")
    # Gradients never needed Triton: backend='triton' with autograd takes the torch path, as documented.
    qg = q32.clone().requires_grad_()
    consistent_attention(qg, k32, v32, ref_idx, groups=2, backend="triton").sum().backward()
    assert qg.grad is not None
    # The op benchmark leaves the Triton provider out rather than failing on a CUDA machine without Triton.
    assert "ours_triton" not in storydiff.benchmark.providers.default_providers(torch.device("cuda"))

    # NVML (profile-vram): the memory sampler falls back to host RSS and its note names the package.
    from storydiff.benchmark.memory import MemorySampler

    with MemorySampler("cuda", interval_s=0.01) as sampler:
        pass
    assert sampler.source == "host-rss", sampler.source
    one_line(sampler.note, "nvidia-ml-py", "[profile]")

    # MP4 (transition videos): GIF only, with one warning naming the packages and the extra.
    from PIL import Image

    from storydiff.pages.video_io import mp4_available, write_video

    assert not mp4_available()
    frames = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(3)]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gif, mp4 = write_video(frames, tmp, "clip", fps=4)
        assert gif.is_file() and mp4 is None
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    one_line(messages[0], "imageio-ffmpeg", "[video]")
    print("OK")
    """
)


def test_package_works_without_optional_dependencies():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr
