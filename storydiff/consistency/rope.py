"""Where borrowed keys sit on hosts with rotary position embeddings (FLUX): ``ConsistencyConfig.rope``.

FLUX turns every query and key by its token's position ids before attention: image tokens have ids
(0, h, w), text tokens (0, 0, 0), and every frame of a story has the same ids. A key borrowed from another
frame at (h, w) therefore sits exactly where the reader's own (h, w) key sits ("positional collision").

RoPE turns each channel pair (2c, 2c + 1) by the angle pos·freq_c (pos: the ids axis that owns channel c);
turns compose by adding angles, so a key already turned to its source position a moves to a + Δ with one
more turn by Δ. A policy therefore acts on the gathered pool (S rows per frame, ``csa_kernels``'
``pool_k``), never on K, and needs no pre-RoPE keys:

* "source": the pool as it is (the host's math, nothing runs);
* "shift": every borrowed key turned by the ids Δ = (1, 0, 0), one cos/sin row for all: from (0, h, w)
  to (1, h, w), off the reader's grid, where FLUX Kontext puts its reference-image tokens;
* "none": each borrowed key turned back by its own source position (cos, -sin of its row of the joint
  sequence): no rotation at all.

Each turn is one fp32 rotation rounded to the keys' dtype, as the host's own RoPE.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .processors import Binding, BoundProcessor
from .state import ConsistencyState, LayerInfo, Reposition

Rotation = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), (..., D), FLUX's interleaved channel pairs


def shift_ids(num_axes: int) -> torch.Tensor:
    """(1, num_axes) position ids of the "shift" offset: +1 on axis 0, as FLUX Kontext's reference images."""
    ids = torch.zeros(1, num_axes)
    ids[0, 0] = 1.0
    return ids


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x turned by (cos, sin) with diffusers' ``apply_rotary_emb`` math for FLUX (``use_real``, channel
    pairs interleaved): x·cos + (-x₁, x₀)·sin per pair, in fp32, back to x's dtype."""
    real, imag = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2).unbind(-1)  # not -1: S may be 0
    turned = torch.stack([-imag, real], dim=-1).flatten(-2)
    return (x.float() * cos + turned.float() * sin).to(x.dtype)


def reposition_for(
    policy: str, image_rotary_emb: Rotation | None, shift: Callable[[torch.device], Rotation]
) -> Reposition | None:
    """The ``reposition(pool_k, positions)`` for ``ConsistencyState.attend`` under ``policy``, or None
    ("source"). ``image_rotary_emb``: the host's (cos, sin), (tokens, D), one row per position of the
    joint sequence; ``shift(device)``: the (1, D) rotation by the shift ids."""
    if policy == "source":
        return None
    if image_rotary_emb is None:
        raise RuntimeError(
            f"rope={policy!r} needs the rotary embedding the transformer passes its attention "
            "(image_rotary_emb); this call had none"
        )
    if policy == "shift":
        return lambda pool, positions: rotate(pool, *shift(pool.device))
    if policy == "none":
        cos, sin = image_rotary_emb

        def unrotate(pool: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            # (B, S, D) rows of the borrowed keys' own positions, broadcast over heads
            at = positions.to(cos.device)
            return rotate(pool, cos[at].unsqueeze(1).to(pool.device), -sin[at].unsqueeze(1).to(pool.device))

        return unrotate
    raise ValueError(f"rope must be 'source', 'shift' or 'none', got {policy!r}")


class RotaryProcessor(BoundProcessor):
    """Base of the processors of RoPE hosts (FLUX, Qwen-Image): the binding's ``pos_embed`` option (the
    transformer's own position embedder) and, made from it once per device, the rotation rope="shift" turns
    borrowed keys by (``shift_rotation``, each family's)."""

    def __init__(
        self, state: ConsistencyState | None = None, layer: LayerInfo | None = None, pos_embed=None
    ) -> None:
        super().__init__(state, layer, **({} if pos_embed is None else {"pos_embed": pos_embed}))
        self._shift: dict[torch.device, Rotation] = {}

    def shift_rotation(self, pos_embed) -> Rotation:
        """(cos, sin), (1, D): the rotation by the host's shift offset."""
        raise NotImplementedError

    def reposition(self, binding: Binding, rotation: Rotation | None) -> Reposition | None:
        """``reposition_for`` this call: the state's policy, the host's rows ``rotation`` (cos, sin) of the
        joint sequence, and the shift rotation made on first use."""

        def shift(device: torch.device) -> Rotation:
            if device not in self._shift:
                pos_embed = binding.options.get("pos_embed")
                if pos_embed is None:
                    raise RuntimeError(
                        f"{binding.layer.name}: rope='shift' needs the transformer's pos_embed"
                    )
                cos, sin = self.shift_rotation(pos_embed)
                self._shift[device] = (cos.to(device), sin.to(device))
            return self._shift[device]

        return reposition_for(binding.state.config.rope, rotation, shift)
