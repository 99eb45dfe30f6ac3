"""The official StoryDiffusion algorithm, written once: the oracle our processor is checked against and
the baseline the benchmarks time. Written from ARCHITECTURE.md §3 (how HVision-NKU/StoryDiffusion
behaves), not from its code.

Variant A (HF Space, notebook). One Bernoulli(rate) keep-row per (step, level), a level being recognised
by its token count, shared by every layer of the level, query frame, head and CFG half. Write: the
identity frames of a CFG half form one sequence and one SDPA call runs under a dense (frames·tokens)²
boolean mask; the bank keeps every identity frame's full hidden states. Read: the frame's own tokens and
ALL banked hidden states, (ids + 1)·tokens, are projected and attended under the mask (the draw masks
the bank; a frame always sees its own tokens). Warm-up: steps < 5 are plain attention when writing and
see the whole, unsampled bank when reading.

Variant B (the "low VRAM" app). Independent Bernoulli draws per frame at every layer call, shared by the
CFG halves. Write: a Python loop over frames, each concatenating its own tokens with the kept tokens of
the other frames and projecting them; the bank keeps the kept hidden states. Read: own tokens + bank,
re-projected on every read. Warm-up: step 0 is plain attention.

Both: after the warm-up each layer call falls back to plain attention with probability 0.3 before step
20 and 0.1 after. Under CFG the batch is [uncond frames; cond frames] and each half sees only itself.

Two forms share the mask rule (``visible``) and the per-frame gather (``frame_contexts``): op level
(``official_a`` / ``official_b`` on projected q, k, v; the op suite's providers) and processor level
(``OfficialAttnProcessor`` via ``install_official``; the UNet suite, ``profile-vram``, parity tests).
``OfficialState.select`` replaces the random draws by a given token selection and ``warmup`` /
``layer_skip`` turn the schedule off, so a test can feed this oracle and our processor the same tokens.

Joint text + image sequences (FLUX, SD3; not in the official code, which has UNets only): the op-level
variants take ``query_rows=(a, b)`` as ``csa_kernels.consistent_attention`` does — only query rows
a..b-1 (the image tokens) see other frames' kept tokens and the bank; every other row (text) sees its own
frame only. The keep mask then marks image positions only. Variant A masks those rows in its dense mask;
variant B masks them from the concatenated keys of its per-frame loop.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

Variant = Literal["a", "b"]
Phase = Literal["write", "read"]
WARMUP_STEPS = {"a": 5, "b": 1}
SKIP_SWITCH_STEP, SKIP_PROB_EARLY, SKIP_PROB_LATE = 20, 0.3, 0.1
#: (step, frames, tokens) -> (frames, tokens) bool: which tokens each frame offers, instead of a draw
Selection = Callable[[int, int, int], torch.Tensor]


# -- token selection and the mask rule ------------------------------------------------------------------
def keep_from_indices(ref_idx: torch.Tensor, num_tokens: int, groups: int = 1) -> torch.Tensor:
    """Our (B, S) token positions as the official keep mask: (F, N) bool when every CFG half has the
    same rows (the official draw is shared by the halves), else (groups, F, N)."""
    keep = torch.zeros(ref_idx.shape[0], num_tokens, dtype=torch.bool, device=ref_idx.device)
    halves = keep.scatter_(1, ref_idx, True).unflatten(0, (groups, -1))
    return halves[0] if bool((halves == halves[:1]).all()) else halves


def visible(query_frame, key_frame, key_kept, window: int | None = None, query_borrows=None):
    """Variant A's mask rule, on index tensors or inside a FlexAttention ``mask_mod``: a query sees every
    token of its own frame and the kept tokens of the other frames. ``window`` is not in the official
    code; it limits those to frames at story distance <= window, the generalisation csa_kernels has.
    ``query_borrows`` (bool per query, joint sequences): False rows see their own frame only."""
    if window is not None:
        key_kept = key_kept & ((query_frame - key_frame).abs() <= window)
    if query_borrows is not None:
        key_kept = key_kept & query_borrows
    return (query_frame == key_frame) | key_kept


def borrowing_rows(tokens: int, query_rows: tuple[int, int] | None, device=None) -> torch.Tensor | None:
    """(N,) bool: the positions of a frame whose queries read other frames (None: all of them)."""
    if query_rows is None:
        return None
    position = torch.arange(tokens, device=device)
    return (position >= query_rows[0]) & (position < query_rows[1])


def consistency_mask(
    keep: torch.Tensor,
    *,
    window: int | None = None,
    bank_keep: torch.Tensor | None = None,
    query_rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Variant A's dense mask over one CFG half: (F·N, F·N + M) bool, rows are queries, True = attend.

    keep: (F, N) bool, the tokens of each frame that the other frames see.
    bank_keep: (M,) bool over key columns appended after the frames' tokens, the same for every query
        (the read path: the draw over the banked identity tokens; all True for an unsampled bank).
    query_rows: (a, b): only query positions a..b-1 of each frame see other frames and the bank.
    """
    frames, tokens = keep.shape
    frame_of = torch.arange(frames * tokens, device=keep.device) // tokens
    rows = borrowing_rows(tokens, query_rows, keep.device)
    borrows = None if rows is None else rows.repeat(frames)[:, None]
    mask = visible(frame_of[:, None], frame_of[None, :], keep.reshape(1, -1), window, borrows)
    if bank_keep is not None:
        bank = bank_keep.reshape(1, -1).expand(len(frame_of), -1)
        mask = torch.cat([mask, bank if borrows is None else bank & borrows], dim=1)
    return mask


def _frames(batch: int, groups: int) -> int:
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or batch % groups:
        raise ValueError(f"groups must be an int >= 1 dividing the batch of {batch}, got {groups!r}")
    return batch // groups


def _halves(keep: torch.Tensor, groups: int, frames: int, tokens: int) -> list[tuple[slice, torch.Tensor]]:
    """[(CFG halves, their (F, N) keep)]: one entry when the halves share the draw, else one per half."""
    if (
        keep.dtype != torch.bool
        or keep.ndim not in (2, 3)
        or tuple(keep.shape[-2:]) != (frames, tokens)
        or (keep.ndim == 3 and keep.shape[0] != groups)
    ):
        raise ValueError(
            f"keep must be a bool mask ({frames}, {tokens}) shared by the CFG halves or ({groups}, "
            f"{frames}, {tokens}); got {tuple(keep.shape)} {keep.dtype}"
        )
    if keep.ndim == 2:
        return [(slice(None), keep)]
    return [(slice(g, g + 1), keep[g]) for g in range(groups)]


# -- op level: projected q, k, v (B, H, N, D) -----------------------------------------------------------
def official_a_mask(
    keep: torch.Tensor,
    *,
    window: int | None = None,
    bank_keep: torch.Tensor | None = None,
    query_rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Masks for :func:`official_a`: (1, 1, F·N, F·N + M) for a keep (F, N) shared by the CFG halves,
    (G, 1, ...) for a keep (G, F, N). Separate from the attention because the official code builds them
    once per step and level, not per layer call. ``query_rows``: see :func:`consistency_mask`."""
    rule = {"window": window, "bank_keep": bank_keep, "query_rows": query_rows}
    if keep.ndim == 2:
        return consistency_mask(keep, **rule)[None, None]
    return torch.stack([consistency_mask(k, **rule) for k in keep])[:, None]


def official_a(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    *,
    groups: int = 1,
    bank_k: torch.Tensor | None = None,
    bank_v: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Variant A: all frames of a CFG half as one sequence, one SDPA call under ``mask``.

    q, k, v: (B, H, N, D), B = groups · F frames, [uncond frames; cond frames] under CFG.
    mask: from :func:`official_a_mask`. bank_k, bank_v: (groups, H, M, D) keys appended after the frames'
    tokens (``mask``'s last M columns say which each query sees). Returns (B, H, N, D).
    """
    batch, heads, tokens, dim = q.shape
    frames = _frames(batch, groups)

    def merge(x):  # (B, H, N, D) -> (G, H, F·N, D): one sequence per CFG half
        return x.reshape(groups, frames, heads, tokens, dim).transpose(1, 2).flatten(2, 3)

    keys, values = merge(k), merge(v)
    if bank_k is not None:
        keys, values = torch.cat([keys, bank_k], dim=2), torch.cat([values, bank_v], dim=2)
    if mask.shape[-2:] != (frames * tokens, keys.shape[2]):
        raise ValueError(
            f"mask must end in ({frames * tokens}, {keys.shape[2]}) (queries, keys); got {tuple(mask.shape)}"
        )
    out = F.scaled_dot_product_attention(merge(q), keys, values, attn_mask=mask, scale=scale)
    return out.unflatten(2, (frames, tokens)).transpose(1, 2).flatten(0, 1)


def frame_contexts(
    xs: Sequence[torch.Tensor],
    keep: torch.Tensor,
    groups: int = 1,
    extras: Sequence[torch.Tensor | None] | None = None,
) -> Iterator[tuple[slice, int, list[torch.Tensor]]]:
    """Variant B's gather: a Python loop over frames, as in the official code.

    xs: tensors (B, ..., N, E), frames first and tokens on dim -2 (hidden states (B, N, C), or keys and
        values (B, H, N, D)), B = groups · F.
    keep: (F, N) bool shared by the CFG halves, or (groups, F, N).
    extras: per tensor of ``xs``, None or (groups, ..., M, E) tokens every frame of a half also sees.
    Yields (halves, frame, contexts): row ``frame`` of the CFG halves ``halves`` of
    ``x.unflatten(0, (groups, F))``, and per tensor its context: own tokens, the kept tokens of the other
    frames of its half in frame order, then the extra tokens.
    """
    batch, tokens = xs[0].shape[0], xs[0].shape[-2]
    frames = _frames(batch, groups)
    grouped = [x.unflatten(0, (groups, frames)) for x in xs]
    extras = extras or [None] * len(xs)
    for halves, rows in _halves(keep, groups, frames, tokens):
        offered = [row.nonzero().squeeze(1) for row in rows]
        for i in range(frames):
            contexts = []
            for x, extra in zip(grouped, extras, strict=True):
                parts = [x[halves, i]]
                parts += [x[halves, j].index_select(-2, offered[j]) for j in range(frames) if j != i]
                if extra is not None:
                    parts.append(extra[halves])
                contexts.append(torch.cat(parts, dim=-2))
            yield halves, i, contexts


def official_b(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    *,
    groups: int = 1,
    bank_k: torch.Tensor | None = None,
    bank_v: torch.Tensor | None = None,
    scale: float | None = None,
    query_rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Variant B: per frame, concatenate its keys with the other frames' kept keys, one SDPA call each.

    q, k, v: (B, H, N, D); keep: (F, N) or (groups, F, N) bool (see :func:`frame_contexts`);
    bank_k, bank_v: (groups, H, M, D) seen by every frame of its half. query_rows: (a, b), joint
    sequences: rows outside a..b-1 are masked from everything but their own N keys. Returns (B, H, N, D).
    """
    tokens = q.shape[2]
    queries = q.unflatten(0, (groups, _frames(q.shape[0], groups)))
    rows = borrowing_rows(tokens, query_rows, q.device)
    out = torch.empty_like(queries)
    for halves, i, (keys, values) in frame_contexts((k, v), keep, groups, (bank_k, bank_v)):
        mask = None
        if rows is not None:  # (N, own + borrowed keys): own keys for every row, the rest for image rows
            mask = (torch.arange(keys.shape[-2], device=q.device) < tokens) | rows[:, None]
        out[halves, i] = F.scaled_dot_product_attention(
            queries[halves, i], keys, values, attn_mask=mask, scale=scale
        )
    return out.flatten(0, 1)


# -- processor level: diffusers attention layers ----------------------------------------------------------
@dataclass
class OfficialState:
    """Phase, step, draws and bank shared by the official processors of one UNet.

    warmup / layer_skip: the official schedule (on for faithful timing and memory). select: a given token
    selection instead of the Bernoulli draws (variant A still uses one per step and level).
    """

    variant: Variant
    rate: float = 0.5
    seed: int = 0
    warmup: bool = True
    layer_skip: bool = True
    select: Selection | None = None
    phase: Phase = "write"
    step: int = 0
    num_frames: int = 1  # frames per CFG half in the UNet batch
    bank: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # (step, layer) -> tokens

    def __post_init__(self) -> None:
        if self.variant not in ("a", "b"):
            raise ValueError(f"variant must be 'a' or 'b', got {self.variant!r}")
        if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)) or not 0 <= self.rate <= 1:
            raise ValueError(f"rate must be a number in [0, 1], got {self.rate!r}")
        self._skip_rng = random.Random(self.seed)
        self._generators: dict[str, torch.Generator] = {}
        self._masks: dict[int, torch.Tensor] = {}  # tokens (the level) -> variant A's mask at this step

    def begin_write(self, num_frames: int) -> None:
        """The identity frames, ``num_frames`` per CFG half, are denoised together; the bank starts empty."""
        self.bank.clear()
        self._begin("write", num_frames)

    def begin_read(self, num_frames: int) -> None:
        """Frames are denoised against the bank (the official code reads one frame per run)."""
        self._begin("read", num_frames)

    def _begin(self, phase: Phase, num_frames: int) -> None:
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
        self.phase, self.num_frames = phase, num_frames
        self.set_step(0)

    def set_step(self, step: int) -> None:
        self.step = step
        self._masks.clear()  # variant A redraws every step

    def step_callback(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """For diffusers' ``callback_on_step_end``: step ``step`` just finished."""
        self.set_step(step + 1)
        return callback_kwargs

    def bank_bytes(self, step: int | None = None) -> int:
        return sum(t.numel() * t.element_size() for (s, _), t in self.bank.items() if step in (None, s))

    def schedule(self) -> Literal["warm-up", "skip", "consistent"]:
        """What this layer call does; the skip is a fresh random draw per call, as in the official code."""
        if self.warmup and self.step < WARMUP_STEPS[self.variant]:
            return "warm-up"
        prob = SKIP_PROB_EARLY if self.step < SKIP_SWITCH_STEP else SKIP_PROB_LATE
        if self.layer_skip and self._skip_rng.random() < prob:
            return "skip"
        return "consistent"

    def keep(self, frames: int, tokens: int, device: torch.device) -> torch.Tensor:
        """(frames, tokens) bool: a Bernoulli(rate) draw, or the given selection."""
        if self.select is not None:
            return self.select(self.step, frames, tokens).to(device=device, dtype=torch.bool)
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return torch.rand(frames, tokens, generator=self._generators[key], device=device) < self.rate

    def mask_a(self, frames: int, tokens: int, device: torch.device) -> torch.Tensor:
        """Variant A's mask at this step for the level of ``tokens``, drawn once and shared by its layers:
        write (1, 1, F·N, F·N) over the identity frames; read (1, 1, N, N + F·N) over the frame's own
        tokens and the ``frames`` banked ones."""
        if tokens not in self._masks:
            keep = self.keep(frames, tokens, device)
            if self.phase == "write":
                mask = consistency_mask(keep)
            else:
                own = torch.zeros(1, tokens, dtype=torch.bool, device=device)
                mask = consistency_mask(own, bank_keep=keep.flatten())
            self._masks[tokens] = mask[None, None]
        return self._masks[tokens]


def _heads(attn, x: torch.Tensor) -> torch.Tensor:  # (G, L, H·D) -> (G, H, L, D)
    return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)


def _attention(attn, queries: torch.Tensor, context: torch.Tensor, mask=None) -> torch.Tensor:
    """Project queries (G, Lq, C) and context (G, Lk, C), attend; returns (G, Lq, H·D)."""
    q, k, v = (
        _heads(attn, attn.to_q(queries)),
        _heads(attn, attn.to_k(context)),
        _heads(attn, attn.to_v(context)),
    )
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)


def _plain(attn, x: torch.Tensor) -> torch.Tensor:  # (G, F, N, C) -> (G, F, N, H·D)
    flat = x.flatten(0, 1)
    return _attention(attn, flat, flat).unflatten(0, x.shape[:2])


class OfficialAttnProcessor:
    """An official-variant self-attention processor for one layer (diffusers' processor interface)."""

    def __init__(self, state: OfficialState, name: str) -> None:
        self.state, self.name = state, name

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        if hidden_states.ndim != 3 or encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(
                f"{self.name}: the official processors handle (batch, tokens, channels) self-attention "
                "without an attention mask"
            )
        if any(
            getattr(attn, norm, None) is not None
            for norm in ("spatial_norm", "group_norm", "norm_q", "norm_k")
        ):
            raise ValueError(f"{self.name}: the official processors do not apply spatial, group or q/k norms")
        batch, frames = hidden_states.shape[0], self.state.num_frames
        if batch % frames:
            raise RuntimeError(
                f"{self.name}: batch of {batch} is not a multiple of the {frames} frames the state was told "
                "about (begin_write / begin_read)"
            )
        x = hidden_states.unflatten(0, (batch // frames, frames))  # (G, F, N, C)
        out = (self._write if self.state.phase == "write" else self._read)(attn, x)
        out = attn.to_out[1](attn.to_out[0](out.flatten(0, 1)))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def _write(self, attn, x: torch.Tensor) -> torch.Tensor:
        state = self.state
        groups, frames, tokens, channels = x.shape
        key, when = (state.step, self.name), state.schedule()
        if state.variant == "a":
            state.bank[key] = x.detach().clone()  # full hidden states, at every step: reads need them all
            if when != "consistent":
                return _plain(attn, x)
            merged = x.reshape(groups, frames * tokens, channels)
            out = _attention(attn, merged, merged, state.mask_a(frames, tokens, x.device))
            return out.unflatten(1, (frames, tokens))
        if when == "warm-up":
            return _plain(attn, x)
        keep = state.keep(frames, tokens, x.device)  # per frame, drawn again at every layer call
        state.bank[key] = torch.cat([x[:, j][:, keep[j]] for j in range(frames)], dim=1)
        if when == "skip":
            return _plain(attn, x)
        # keep is shared by the CFG halves: frame_contexts yields every half at once, frames in order
        outs = [
            _attention(attn, x[:, i], ctx) for _, i, (ctx,) in frame_contexts([x.flatten(0, 1)], keep, groups)
        ]
        return torch.stack(outs, dim=1)

    def _read(self, attn, x: torch.Tensor) -> torch.Tensor:
        state = self.state
        groups, frames, tokens, _ = x.shape
        when = state.schedule()
        if when == "skip" or (when == "warm-up" and state.variant == "b"):
            return _plain(attn, x)
        bank = state.bank.get((state.step, self.name))
        if bank is None or bank.shape[0] != groups:
            raise RuntimeError(
                f"{self.name}: no bank for step {state.step} with {groups} CFG group(s): write the identity "
                "frames first, with the same steps and guidance"
            )
        mask = None  # variant B, and variant A's warm-up: the whole bank
        if state.variant == "a":
            if when == "consistent":
                mask = state.mask_a(bank.shape[1], tokens, x.device)
            bank = bank.flatten(1, 2)  # (G, ids·N, C): projected again at every read, all of it
        outs = [_attention(attn, x[:, i], torch.cat([x[:, i], bank], dim=1), mask) for i in range(frames)]
        return torch.stack(outs, dim=1)


def install_official(
    unet, variant: Variant, rate: float = 0.5, seed: int = 0, *, warmup: bool = True, layer_skip: bool = True
) -> tuple[OfficialState, Callable[[], None]]:
    """Official processors on the UNet's up-block self-attention layers, as the official code chooses them.

    Returns the shared state and a function restoring the processors installed before.
    """
    original = dict(unet.attn_processors)
    state = OfficialState(variant=variant, rate=rate, seed=seed, warmup=warmup, layer_skip=layer_skip)
    processors = {
        name: OfficialAttnProcessor(state, name)
        if name.startswith("up_blocks.") and ".attn1." in name
        else proc
        for name, proc in original.items()
    }
    unet.set_attn_processor(processors)
    return state, lambda: unet.set_attn_processor(dict(original))
