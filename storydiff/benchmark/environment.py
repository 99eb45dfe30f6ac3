"""Where a benchmark ran: device, library versions, git commit (stored with every result row)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, cwd=Path(__file__).resolve().parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_commit() -> str:
    """Short commit of the storydiff sources, "-dirty" if tracked files changed, "unknown" outside git."""
    commit = _git("rev-parse", "--short", "HEAD")
    if commit is None:
        return "unknown"
    return commit + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "kernel_path": _kernel_path(device),
        "python": platform.python_version(),
        "commit": git_commit(),
    }


def _kernel_path(device: torch.device) -> str:
    """Which fused kernel a Triton call on ``device`` runs: "tma" (descriptors) or "pointer"; "none"
    without Triton or off CUDA."""
    if device.type != "cuda":
        return "none"
    try:
        from csa_kernels.triton_kernel import kernel_path
    except ImportError:
        return "none"
    return kernel_path(torch.empty(0, device=device))
