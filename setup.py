from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="storydiff-csa",
    version="0.1.0",
    description="Fast, memory-lean Consistent Self-Attention (StoryDiffusion) for Hugging Face diffusers",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["csa_kernels", "csa_kernels.*", "storydiff", "storydiff.*"]),
    install_requires=[
        # Pinned: on our machines this exact version resolves to a local CPU wheel; an open range pulls
        # the newest CUDA build (GBs). The GPU machines run the sources with their own torch 2.11.
        "torch==2.13.0",
        "triton>=3.2",
        "numpy",
        "tqdm",
        "matplotlib",
        "safetensors",
        "pillow",
        "diffusers>=0.30",
        "transformers>=4.40",
        "nvidia-ml-py",
        "imageio",  # transition videos: MP4 through imageio-ffmpeg's bundled ffmpeg, GIF through PIL
        "imageio-ffmpeg",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-benchmark", "hypothesis", "ruff"],
    },
    entry_points={"console_scripts": ["storydiff=storydiff.cli:main"]},
)
