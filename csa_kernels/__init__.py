"""csa_kernels: fused consistent self-attention (StoryDiffusion) for PyTorch.

Layers, one direction: reference / pool → triton_kernel → op (torch.library) → api; tolerance (the
correctness rule of tests and benchmarks) sits on the reference.
"""

# One version for the whole distribution (storydiff-csa), here at the bottom of the dependency order:
# setup.py reads it, storydiff re-exports it. Log changes in CHANGELOG.md.
__version__ = "0.9.0"

from .api import consistent_attention
from .reference import attended_keys, consistent_attention_reference
from .sampling import sample_masked_reference_indices, sample_reference_indices
from .tolerance import ErrorBound, reference_error_bound

__all__ = [
    "ErrorBound",
    "__version__",
    "attended_keys",
    "consistent_attention",
    "consistent_attention_reference",
    "reference_error_bound",
    "sample_masked_reference_indices",
    "sample_reference_indices",
]
