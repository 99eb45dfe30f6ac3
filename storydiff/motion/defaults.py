"""The Semantic Motion Predictor's default size, in a module light enough for ``storydiff --help``."""

# Paper-sized transformer (≈ 8 layers, hidden 1024); everything here can be overridden.
DEFAULT_MODEL = {"hidden_dim": 1024, "num_layers": 8, "num_heads": 16, "dropout": 0.0}
