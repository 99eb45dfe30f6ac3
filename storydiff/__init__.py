"""storydiff: StoryDiffusion's Consistent Self-Attention for Hugging Face diffusers.

    state = storydiff.apply_consistent_attention(pipe, storydiff.ConsistencyConfig(rate=0.5))
    storydiff.remove_consistent_attention(pipe)
    story = storydiff.StoryDiffusionPipeline(pipe)("story.txt", out_dir="out")

The kernels live in ``csa_kernels``. Names are imported lazily so that ``storydiff --help`` and the
benchmark harness start without importing diffusers.
"""

from importlib import import_module

_EXPORTS = {
    "apply_consistent_attention": "families.attach",
    "remove_consistent_attention": "families.attach",
    "ConsistentAttnProcessor": "families.attach",
    "ConsistencyConfig": "consistency.config",
    "ConsistencyState": "consistency.state",
    "IdBank": "consistency.bank",
    "StoryDiffusionPipeline": "pipeline",
    "parse_story": "pages.story",
    "load_story": "pages.story",
    "load_pipeline": "models.loading",
    "RunSettings": "runs.settings",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name == "__version__":  # the distribution's one version lives in csa_kernels (imports torch)
        return import_module("csa_kernels").__version__
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'storydiff' has no attribute {name!r}")
