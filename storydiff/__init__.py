"""storydiff: StoryDiffusion's Consistent Self-Attention for Hugging Face diffusers.

The kernels live in ``csa_kernels``; this package holds the integration layers above them and the CLI
(``storydiff --help``).
"""

__version__ = "0.1.0"
