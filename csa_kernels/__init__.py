"""csa_kernels: fused consistent self-attention (StoryDiffusion) for PyTorch.

Layers, one direction: reference / pool → triton_kernel → op (torch.library) → api.
"""

from storydiff import __version__  # one version per distribution (storydiff-csa); storydiff holds it

from .api import consistent_attention
from .reference import attended_keys, consistent_attention_reference
from .sampling import sample_reference_indices

__all__ = [
    "__version__",
    "attended_keys",
    "consistent_attention",
    "consistent_attention_reference",
    "sample_reference_indices",
]
