"""csa_kernels: fused consistent self-attention (StoryDiffusion) for PyTorch.

Layers, one direction: reference / pool → triton_kernel → op (torch.library) → api.
"""

from .api import consistent_attention
from .reference import attended_keys, consistent_attention_reference
from .sampling import sample_reference_indices

__all__ = [
    "attended_keys",
    "consistent_attention",
    "consistent_attention_reference",
    "sample_reference_indices",
]
__version__ = "0.1.0"
