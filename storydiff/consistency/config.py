"""What consistent attention does in a UNet: the user-facing configuration."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch

from csa_kernels.validation import TRITON_INSTALLED, int8_device_problem

# "default": each family's choice (hosts.py); the others exist for some families only
LAYER_PRESETS = ("default", "all", "up", "up+mid", "single", "double")
# where borrowed keys sit for RoPE hosts (FLUX): see ConsistencyConfig.rope
ROPE_POLICIES = ("source", "shift", "none")
# the op's arithmetic for consistent calls: see ConsistencyConfig.attn_precision (csa_kernels/quantize.py)
ATTN_PRECISIONS = ("native", "int8")
# window mode's window when none is given: story neighbours within 2 frames (ConsistencyConfig.resolved)
WINDOW_MODE_WINDOW = 2
# the rate when neither the config nor the model family names one: the official one (images); a family's
# Host.default_rate overrides it for its models (Wan video: 0.1, families/wan.py)
DEFAULT_RATE = 0.5


class InvalidSetting(ValueError):
    """A setting's value is not allowed. ``field`` names the setting, ``problem`` says what is wrong, so
    the CLI can name its own flag instead of the Python name."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def _check_rate(name: str, rate: object) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= float(rate) <= 1.0:
        raise InvalidSetting(name, f"must be a number in [0, 1], got {rate!r}")


@dataclass
class ConsistencyConfig:
    """Consistent self-attention settings (defaults follow the official StoryDiffusion code).

    Attributes:
        rate: fraction of each frame's tokens offered to the other frames, for every level not in
            ``level_rates``. None (default): the model family's — 0.5 for image models (the official
            default; its HF Space uses 0.7), 0.1 for Wan video (``install`` fills it in).
        level_rates: per-level rates keyed by the level's downsampling factor relative to the image:
            8 (full latent resolution), 16, 32, 64. Official ``sa32`` is ``level_rates[32]`` and ``sa64``
            is ``level_rates[16]`` (the names count latent pixels at 1024²).
        layers: which attention layers become consistent: "default" (each model family's choice, see
            ``hosts.py``; for UNets the up blocks' ``attn1``, as the official code), "all", "up" /
            "up+mid" (UNets), "single" / "double" (FLUX), a list of processor names, or a predicate.
        warmup_steps: the first denoising steps use plain attention (official variant B: 1).
        skip_prob_early / skip_prob_late / skip_switch_step: each layer call randomly falls back to plain
            self-attention with probability ``skip_prob_early`` before step ``skip_switch_step`` and
            ``skip_prob_late`` after (official 0.3 / 0.1 / 20; 0 disables). Decisions depend only on
            (seed, step, layer), so batching never changes them.
        window: None lets a frame see every other frame of its batch; w >= 1 only story neighbours
            within w frames (identity frames are written as one such batch). Window mode fills in
            ``WINDOW_MODE_WINDOW`` (2) when none is given (:meth:`resolved`).
        tile: long-story (window) mode only: the paper's tiled form instead of the sliding window,
            tiles of ``tile`` consecutive frames (stride 1) within each UNet chunk, outputs averaged;
            tiles take every frame of the chunk, [NC] frames included.
        seed: seeds every random choice (token samples, layer skips).
        rope: where borrowed keys sit for hosts with rotary position embeddings (FLUX). Every FLUX frame
            uses the same positions, so a borrowed token at grid position (h, w) lands on the reader's own
            (h, w). "source" (default): keep the source frame's rotation, the host's plain math.
            "shift": move borrowed keys off the reader's grid by +1 on position-id axis 0 (FLUX ids are
            (0, h, w); FLUX Kontext marks reference-image tokens the same way, (1, h, w)). "none": borrowed
            keys carry no rotation. Applies to banked keys too; other hosts accept "source" only.
        offload_bank: keep the identity bank in (pinned) CPU memory and prefetch it layer by layer;
            None means "on when running on CUDA".
        attn_precision: the arithmetic of every consistent attention call (the ones that borrow tokens:
            joint and write batches, bank reads, window neighbours): "native" (default: Q·Kᵀ in the
            model's dtype, as before) or "int8" (the op's 8-bit path, ``csa_kernels/quantize.py``: per-row
            int8 codes of Q and of every key after subtracting one key mean per head, exact int32 Q·Kᵀ,
            P·V in the model's dtype; forward only, within the op's accuracy contract). Calls that borrow
            nothing stay native: those that run the host's plain SDPA (rate 0 in joint batches, [NC]
            frames, warm-up steps, skipped layers, a window frame without neighbours) and the op's calls
            with nothing to borrow (a bank or window pool of 0 tokens at rate 0, a one-frame joint batch:
            ``modes.call_precision``), so a rate-0 run is bit for bit the native one, the stock model's
            arithmetic. The tiled window form takes it per tile. On CUDA it needs compute capability 8.0+
            where the Triton kernel runs (:meth:`check_device`); the CPU torch path runs it anywhere.
    """

    rate: float | None = None
    level_rates: dict[int, float] = field(default_factory=dict)
    layers: str | list[str] | Callable[[str], bool] = "default"
    warmup_steps: int = 1
    skip_prob_early: float = 0.3
    skip_prob_late: float = 0.1
    skip_switch_step: int = 20
    window: int | None = None
    tile: int | None = None
    seed: int = 0
    offload_bank: bool | None = None
    rope: str = "source"
    attn_precision: str = "native"

    def __post_init__(self) -> None:
        if self.rate is not None:
            _check_rate("rate", self.rate)
        for level, rate in self.level_rates.items():
            if level not in (8, 16, 32, 64):
                problem = f"keys must be level factors 8, 16, 32 or 64, got {level!r}"
                raise InvalidSetting("level_rates", problem)
            _check_rate(f"level_rates[{level}]", rate)
        _check_rate("skip_prob_early", self.skip_prob_early)
        _check_rate("skip_prob_late", self.skip_prob_late)
        if isinstance(self.layers, str) and self.layers not in LAYER_PRESETS:
            raise InvalidSetting("layers", f"must be one of {LAYER_PRESETS}, a list of names or a predicate")
        for name in ("warmup_steps", "skip_switch_step", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidSetting(name, f"must be a whole number >= 0, got {value!r}")
        if self.window is not None and (
            isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1
        ):
            raise InvalidSetting("window", f"must be None or a whole number >= 1, got {self.window!r}")
        if self.tile is not None and (
            isinstance(self.tile, bool) or not isinstance(self.tile, int) or self.tile < 1
        ):
            raise InvalidSetting("tile", f"must be None or a whole number >= 1, got {self.tile!r}")
        if self.rope not in ROPE_POLICIES:
            raise InvalidSetting("rope", f"must be one of {ROPE_POLICIES}, got {self.rope!r}")
        if self.attn_precision not in ATTN_PRECISIONS:
            problem = f"must be one of {ATTN_PRECISIONS}, got {self.attn_precision!r}"
            raise InvalidSetting("attn_precision", problem)

    def resolved(self, mode: str) -> ConsistencyConfig:
        """This configuration as a run in ``mode`` ("bank" or "window") uses it: window mode's ``window``
        is ``WINDOW_MODE_WINDOW`` when none was given; anything else is kept. The one place that default is
        applied, by the library and the CLI alike."""
        if mode == "window" and self.window is None:
            return replace(self, window=WINDOW_MODE_WINDOW)
        return self

    def check_device(self, device: torch.device | str) -> None:
        """InvalidSetting naming ``attn_precision`` if it cannot run on ``device``: int8 on a CUDA GPU
        older than compute capability 8.0 when the Triton kernel would run (the op's "auto" backend picks
        it for CUDA tensors of the dtypes and head dims it supports whenever Triton is installed) — its int8
        Q·Kᵀ is integer MMA, which pre-Ampere GPUs lack. CPU (the torch path) and "native" pass. Called
        before a run makes its output folder."""
        device = torch.device(device)
        if self.attn_precision != "int8" or device.type != "cuda" or not TRITON_INSTALLED:
            return
        if not torch.cuda.is_available():
            return  # no GPU to ask: the run fails on its own, with torch's message
        problem = int8_device_problem(device)  # the op's own rule
        if problem is not None:
            raise InvalidSetting("attn_precision", f"int8 {problem}: use native, or run on the CPU")

    def rate_for(self, level_factor: int) -> float:
        rate = DEFAULT_RATE if self.rate is None else self.rate
        return float(self.level_rates.get(level_factor, rate))

    def with_default_rate(self, rate: float) -> ConsistencyConfig:
        """This config with ``rate`` where it leaves the rate to the model (``rate`` None): what
        ``install`` does with its host's ``default_rate``."""
        return self if self.rate is not None else replace(self, rate=rate)

    def skip_prob(self, step: int) -> float:
        return self.skip_prob_early if step < self.skip_switch_step else self.skip_prob_late

    @classmethod
    def from_dict(cls, data: dict) -> ConsistencyConfig:
        """The inverse of ``to_dict`` (level keys back to ints); a predicate ``layers`` cannot come back.
        A key an older record lacks takes its field's default (``attn_precision``: "native", what every
        run made before the setting existed computed)."""
        data = dict(data)
        data["level_rates"] = {int(k): v for k, v in data.get("level_rates", {}).items()}
        return cls(**data)

    def to_dict(self) -> dict:
        """JSON-friendly form for metadata (a predicate ``layers`` is recorded by name). ``attn_precision``
        only when it is not "native": a native run's dict is the one every run wrote before the setting
        existed, so their checkpoints (whose fingerprint hashes this dict, ``runs/plan.py``) still resume
        and eval-suite still finds their finished runs the same; ``from_dict`` reads its absence as native."""
        data = asdict(self)
        if self.attn_precision == "native":
            del data["attn_precision"]
        if callable(self.layers):
            data["layers"] = getattr(self.layers, "__name__", repr(self.layers))
        data["level_rates"] = {str(k): v for k, v in self.level_rates.items()}
        return data
