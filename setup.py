import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
# One version for the whole distribution: csa_kernels/__init__.py holds it (storydiff re-exports it).
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "csa_kernels" / "__init__.py").read_text(encoding="utf-8"), re.M
).group(1)

# Supported ranges, stated here only (README "Supported versions" says which bounds were run). Lower bounds
# come from the APIs the code uses; upper bounds only where a known break exists (none so far). A range,
# not a pin, so pip keeps the torch build a user already has (CUDA, ROCm or CPU).
REQUIRES = [
    # API floor 2.5 (torch.library.custom_op + register_fake 2.4, FlexAttention in the op benchmark 2.5);
    # 2.8 because its CUDA wheels pin Triton 3.4, the oldest Triton supported below. UNTESTED below 2.13
    # here (the GPU image runs 2.11).
    "torch>=2.8",
    # Linux only: Triton publishes no other wheels; elsewhere the torch path runs (backend="auto").
    # 3.4: with Triton 3.2 and 3.3, triton.autotune needs a GPU driver at decoration time, so the kernel
    # module does not import on a CPU machine, not even interpreted (tests, compile_for_target). Tested
    # here: 3.4 and 3.6 (sm_90 compile; interpreter with numpy < 2.4, triton-lang/triton#9171), 3.9.
    "triton>=3.4; platform_system == 'Linux'",
    # 0.35.2: the first diffusers that imports beside transformers 5 (0.35.1 and older fail on
    # transformers.utils.FLAX_WEIGHTS_NAME); it has all else used (set_attn_processor,
    # callback_on_step_end, StableVideoDiffusionPipeline, models.transformers.transformer_temporal).
    "diffusers>=0.35.2",
    # 5.0: CLIPTokenizer(vocab=..., merges=...) builds the tiny models' tokenizers in memory (no hub).
    "transformers>=5.0",
    "numpy",
    "tqdm",
    "matplotlib",  # benchmark and memory plots; its DejaVu Sans draws captions in any Latin script
    "safetensors",  # identity banks on disk
    "pillow",
    "pyyaml",  # storydiff eval-suite: benchmark files (the ConsiStory+ YAML format)
    # generate --lora: diffusers loads LoRA weights through peft (and refuses to without it)
    "peft",
]
EXTRAS = {
    # storydiff profile-vram: GPU memory over time through NVML (without it: host RSS, with a note)
    "profile": ["nvidia-ml-py"],
    # transition videos as MP4 (imageio-ffmpeg bundles ffmpeg) and reading video files for train-motion;
    # without them: GIF only, with a warning, and video files are skipped
    "video": ["imageio", "imageio-ffmpeg"],
    # storydiff eval --face: dlib as prebuilt wheels (no compiler needed) and its face models (5-point
    # landmarks, ResNet descriptor). In "all", so also in "dev", where the face tests then run for real.
    # DreamSim (--dreamsim) is no extra: its package pulls open-clip, timm, peft and torchvision.
    "face": ["dlib-bin", "face-recognition-models"],
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})
# Wan image-to-video prompt cleaning as diffusers does it (ftfy repairs mojibake). Not in "all" (so not in
# "dev"): the offline machines the tests run on have no ftfy wheel; without it prompts are used as given
# (families/wan.py).
EXTRAS["wan"] = ["ftfy"]
# The tests exercise the optional features too (NVML through fakes, MP4 where installed), and diffusers'
# model CPU offload, which needs accelerate.
# pytest-xdist: the test command runs one worker per core (the suite is thousands of one-thread tiny ops).
EXTRAS["dev"] = [
    *EXTRAS["all"],
    "accelerate",
    "pytest>=8",
    "pytest-benchmark",
    "pytest-xdist",
    "hypothesis",
    "ruff",
]

setup(
    name="storydiff-csa",
    version=VERSION,
    description="Fast, memory-lean Consistent Self-Attention (StoryDiffusion) for Hugging Face diffusers",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["csa_kernels", "csa_kernels.*", "storydiff", "storydiff.*"]),
    install_requires=REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["storydiff=storydiff.cli:main"]},
)
