"""Explicit, seeded state shared by the consistent-attention processors of one denoiser.

The pipeline sets the mode and the step; the processors only read them. Nothing is inferred from call
counts, and every random choice is a pure function of (seed, what, step, layer or level), so batching
frames differently never changes a result.

A *mode* says what the frames now in the denoiser's batch attend to (``modes.py``: joint, write, read;
``window.py``: story neighbours). The processors compute the host's own projections and hand q, k, v to
:meth:`ConsistencyState.attend`, which asks the mode.

Classifier-free guidance runs one of two ways. Batched (UNets, SD3, PixArt): one denoiser call per step on
[uncond frames; cond frames], the CFG *groups* (``UNCOND``, ``COND``) stacked in that order. Two passes
(Qwen-Image, Wan: ``Family.cfg_passes``): two calls per step, each on just the frames; the family says which
group each call computes (:meth:`ConsistencyState.cfg_pass`, never inferred from call counts), and every
mode then does for that group exactly what it does for the group's half of a batched call: banks are
written and read in the batched layout (groups, H, M, D), window mode's boundary cache is kept per group,
and token draws and layer skips are shared by both passes as they are by both halves.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from csa_kernels import sample_masked_reference_indices, sample_reference_indices
from csa_kernels.pool import to_device_async
from csa_kernels.sampling import masked_sample_counts

from .bank import IdBank
from .config import ConsistencyConfig
from .modes import JointMode, ReadMode, plain_attention

if TYPE_CHECKING:
    from .subject_masks import SubjectMasks

Span = tuple[int, int]  # token positions [start, stop) within each frame's sequence
# (pool_k (B, H, S, D), positions (B, S)) -> pool_k: the host moves borrowed keys, already carrying their
# source position's rotation, to where they should sit (FLUX's RoPE policy, ConsistencyConfig.rope)
Reposition = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


UNCOND, COND = 0, 1  # CFG groups, in the order a batched call stacks them: [uncond frames; cond frames]
# the share of a masked frame's draws taken outside its subject mask unless told: none (the argument is in
# csa_kernels.sample_masked_reference_indices)
DEFAULT_BACKGROUND_SHARE = 0.0


@dataclass(frozen=True)
class CfgPass:
    """The CFG group one denoiser call of two-pass guidance computes: its batch is just the frames."""

    group: int  # UNCOND or COND: its place in the batched layout (banks, halo messages)
    groups: int = 2  # CFG groups in all


@dataclass(frozen=True)
class LayerInfo:
    name: str  # processor name in ``unet.attn_processors``
    index: int  # position among consistent layers, in forward order
    level: int  # downsampling factor relative to the image: 8, 16, 32 or 64


class Mode(Protocol):
    """What the frames of the current denoiser batch attend to."""

    name: str
    #: story frames in the batch now; the batch holds ``groups`` copies of them (CFG halves)
    num_frames: int

    # ``groups`` below is the CFG groups in this batch: 2 for batched CFG ([uncond; cond]), 1 without
    # guidance or in one pass of two-pass CFG, where ``state.current_pass`` (a ``CfgPass``) says which group

    def attend(
        self,
        state: ConsistencyState,
        layer: LayerInfo,
        q: torch.Tensor,
        k,
        v,
        groups: int,
        image: Span,
        reposition: Reposition | None = None,
        key_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, H, N, D) attention output for this batch; only called when consistency is on. ``image``:
        the token range [a, b) of each frame's sequence that holds image tokens (the rest is text).
        ``reposition``: applied to the keys this batch's frames offer (to each other and to a bank).
        ``key_lengths`` (B,): where each frame's own keys end (passed only when given)."""
        ...

    def on_step(self) -> None:
        """A new denoising step begins: drop whatever belonged to the previous one."""
        ...


class ConsistencyState:
    """Mode, step and bank for one denoiser's consistent-attention processors.

    ``mode`` is None when the processors compute stock self-attention. ``begin_joint``, ``begin_write``
    and ``begin_read`` set the identity-bank modes; ``set_step`` (or ``step_callback`` as diffusers'
    ``callback_on_step_end``) advances the step. Under two-pass CFG the family wraps each denoiser call in
    ``cfg_pass(group)``; ``current_pass`` is the pass now running (None: every group is in the batch).
    """

    def __init__(self, config: ConsistencyConfig, layers: list[LayerInfo], *, offload_bank: bool) -> None:
        self.config = config
        self.layers = layers
        self.bank = IdBank(offload=offload_bank)
        self.mode: Mode | None = None
        self.step = 0
        self._draws: dict[tuple, torch.Tensor] = {}  # token draws of the current step, shared by layers
        self.host: dict = {}  # what identifies the denoiser (attention.host_signature), for banks
        self.text_tokens: int | None = None  # text length of the current call's joint sequences
        self.current_pass: CfgPass | None = None  # the CFG pass now running (two-pass guidance), or None
        # subject masks (set_subject_masks): None draws tokens from whole frames, as always
        self.subject_masks: SubjectMasks | None = None
        self.background_share = DEFAULT_BACKGROUND_SHARE
        self.batch_frames: tuple[int, ...] | None = None  # story frames of a joint batch (masks need them)
        self._mask_warned: set[tuple[int, tuple[str, ...]]] = set()  # frames already warned about
        self.bounded = False  # bounded attention (set_subject_masks)
        # latent frames per story frame for subject masks: 1 (an image), or a video shot's T, which its family
        # sets (WanFamily.prepare): its N = T·h·w tokens cannot say T themselves (subject_masks.token_grid)
        self.latent_frames = 1
        self._segments: dict[tuple, torch.Tensor] = {}  # (frame, image span, tokens, latent frames) -> ids
        # (character, step, level, image tokens) -> (groups, M) segment ids of the tokens banked there: the
        # same draws at every layer of a level, so one entry serves them all
        self.bank_segments: dict[tuple, torch.Tensor] = {}
        # sees every attend call's (state, layer, q, k, image span, key lengths) before it runs, e.g. a
        # cross_attention_masks recorder's ``observe`` on joint text+image hosts; None: nothing extra
        self.observer: Callable[..., None] | None = None

    # -- driven by the pipeline ----------------------------------------------------------------------
    def begin(self, mode: Mode, *, step: int = 0, frames: Sequence[int] | None = None) -> None:
        """Start ``mode`` at ``step`` (a diffusers pipeline call starts at 0; ``step_callback`` advances).
        ``frames``: the story frames a joint (or write) batch holds, in batch order — what subject masks
        are looked up by; without masks it changes nothing."""
        if mode.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {mode.num_frames}")
        if frames is not None and len(frames) != mode.num_frames:
            raise ValueError(f"frames names {len(frames)} story frames for a batch of {mode.num_frames}")
        self.end()
        self.mode, self.step = mode, step
        self.batch_frames = None if frames is None else tuple(frames)

    def begin_joint(self, num_frames: int, *, frames: Sequence[int] | None = None) -> None:
        """The frames of each batch attend to each other's sampled tokens (no bank)."""
        self.begin(JointMode(num_frames), frames=frames)

    def begin_write(self, character: str, num_frames: int, *, frames: Sequence[int] | None = None) -> None:
        """Like joint, and every consistent layer banks the frames' sampled K/V under ``character``."""
        self.bank.start(character)
        self.begin(JointMode(num_frames, writing=character), frames=frames)

    def set_subject_masks(
        self,
        masks: SubjectMasks | None,
        *,
        background_share: float = DEFAULT_BACKGROUND_SHARE,
        bounded: bool = False,
    ) -> None:
        """Draw each frame's offered tokens from its subject mask (``subject_masks.py``): the union of the
        masks of the characters it shows, on the level's token grid, with ``background_share`` of the
        draws outside it (``csa_kernels.sample_masked_reference_indices``); the count per frame is the
        same as without masks. Draws become one per (step, level, story frame) in every mode, so a joint
        batch must name its story frames (``begin(..., frames=...)``). A frame without characters draws
        as without masks; one whose mask holds too few tokens at a level draws uniformly, with a warning
        (once per frame). None: whole frames again, exactly as before.

        ``bounded`` (bank mode): each character's tokens attend only to the same character in the banks
        (StoryBooth's bounded attention) — a token's segment is the character whose mask holds it (two
        masks: none), the op's ``segments``; background tokens see only background bank tokens. A frame's
        own tokens stay visible to all of its rows."""
        share = background_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= float(share) <= 1.0:
            raise ValueError(f"background_share must be a number in [0, 1], got {share!r}")
        if bounded and masks is None:
            raise ValueError("bounded attention needs subject masks (which tokens are which character's)")
        self.subject_masks, self.background_share, self.bounded = masks, float(share), bool(bounded)
        self._draws.clear()
        self._mask_warned.clear()
        self._segments.clear()
        self.bank_segments.clear()

    def swap_subject_masks(self, masks: SubjectMasks | None, *, bounded: bool | None = None) -> None:
        """Replace the subject masks mid-run (automatic masks: refined after every step) keeping what
        writers recorded: ``bank_segments`` are the characters of tokens *already banked*, drawn under the
        masks of their time, and a later read of that step (the stored schedule reads every step's bank
        after the identity frames finished) needs exactly those. Only caches derived from the masks are
        dropped — this step's token draws and the frames' segment ids — and are drawn again from the new
        masks (draws are keyed by step, so those of later steps are fresh anyway). ``bounded``: None keeps
        it; bounded needs masks."""
        bounded = self.bounded if bounded is None else bool(bounded)
        if bounded and masks is None:
            raise ValueError("bounded attention needs subject masks (which tokens are which character's)")
        self.subject_masks, self.bounded = masks, bounded
        self._draws.clear()
        self._segments.clear()

    def segments(self, frames: Sequence[int], image: Span, tokens: int, device: torch.device) -> torch.Tensor:
        """(len(frames), tokens) segment ids of the story ``frames``' tokens (bounded attention): image
        tokens [a, b) inside exactly one character's mask get that character's id (1 + its place among
        the story's characters), every other token 0. A video shot's image tokens are ``latent_frames``
        grids, each with the shot's one mask (``SubjectMasks.character_tokens``)."""
        rows = []
        count = image[1] - image[0]
        shot = self.latent_frames
        for frame in frames:
            key = (frame, image, tokens, shot)
            if key not in self._segments:
                ids = torch.zeros(tokens, dtype=torch.int32)
                masks = self.subject_masks
                owners = torch.zeros(count, dtype=torch.int32)
                for character in masks.masks.get(frame, {}):
                    inside = masks.character_tokens(frame, character, count, shot)
                    ident = self.character_id(character)
                    owners = torch.where(inside & (owners == 0), ident, torch.where(inside, -1, owners))
                ids[image[0] : image[1]] = owners.clamp(min=0)  # in two masks: shared (0)
                self._segments[key] = ids
            rows.append(self._segments[key])
        return to_device_async(torch.stack(rows), device)

    def character_id(self, character: str) -> int:
        """A character's segment id: 1 + its place among the characters the masks' story shows."""
        names = list(dict.fromkeys(c for chars in self.subject_masks.frame_characters for c in chars))
        return 1 + names.index(character)

    def begin_read(
        self, frame_characters: list[tuple[str, ...]], *, step: int = 0, frames: Sequence[int] | None = None
    ) -> None:
        """Each frame attends to its own tokens plus the banks of the characters it shows; one entry per
        frame of the batch (empty for an [NC] frame). ``frames``: their story frames (bounded attention
        looks their masks up)."""
        missing = sorted({c for chars in frame_characters for c in chars if not self.bank.has(c)})
        if missing:
            raise ValueError(f"no identity bank for character(s) {missing}: write or load them first")
        self.begin(ReadMode(frame_characters), step=step, frames=frames)

    def end(self) -> None:
        self.mode = None
        self.batch_frames = None
        self._draws.clear()

    def set_pass(self, group: int | None, groups: int = 2) -> None:
        """The next denoiser calls compute CFG group ``group`` (``UNCOND`` or ``COND``) of ``groups``, on a
        batch of just the frames; None: calls hold every group again ([uncond; cond], or no guidance)."""
        if group is None:
            self.current_pass = None
            return
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 2:
            raise ValueError(f"a CFG pass is one of >= 2 groups, got groups={groups!r}")
        if isinstance(group, bool) or not isinstance(group, int) or not 0 <= group < groups:
            raise ValueError(f"CFG group must be an int in [0, {groups}), got {group!r}")
        self.current_pass = CfgPass(group, groups)

    @contextmanager
    def cfg_pass(self, group: int, groups: int = 2) -> Iterator[CfgPass]:
        """``with state.cfg_pass(COND): denoiser(...)``: the calls inside compute CFG group ``group``."""
        previous = self.current_pass
        self.set_pass(group, groups)
        try:
            yield self.current_pass
        finally:
            self.current_pass = previous

    def cfg_groups(self, groups: int) -> tuple[int, int]:
        """(first, total): the CFG groups a batch holding ``groups`` of them computes are
        [first, first + groups) of ``total``, in the batched layout."""
        if self.current_pass is None:
            return 0, groups
        return self.current_pass.group, self.current_pass.groups

    def set_step(self, step: int) -> None:
        self.step = step
        self._draws.clear()
        if self.mode is not None:
            self.mode.on_step()

    def record_text_length(self, module, args, kwargs) -> None:
        """Forward pre-hook of the denoiser: the length of the text stream it is called with (FLUX's
        single-stream blocks see text and image already concatenated)."""
        context = kwargs.get("encoder_hidden_states")
        self.text_tokens = None if context is None else context.shape[1]

    def step_callback(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """For diffusers' ``callback_on_step_end``: step ``step`` just finished."""
        self.set_step(step + 1)
        return callback_kwargs

    # -- read by the processors ----------------------------------------------------------------------
    def attend(
        self,
        layer: LayerInfo,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        image: Span | None = None,
        reposition: Reposition | None = None,
        key_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Self-attention of (B, H, N, D) q, k, v under the current mode (stock when off or skipped).

        ``image``: the tokens [a, b) of each frame that are image tokens (default: all N). Only they are
        offered to other frames, and only their queries read other frames' tokens (text rows of a joint
        text+image sequence attend to their own frame only, or prompts would leak between frames).
        ``reposition(pool_k, positions)``: the keys a frame offers, (B, H, S, D), gathered at ``positions``
        (B, S) (token positions in the sequence), to wherever they should sit instead (RoPE hosts); they
        are offered and banked that way. None: offered as they are.
        ``key_lengths`` (B,): frame b's own keys are its first ``key_lengths[b]`` tokens (the rest is text
        padding, which nothing attends to: Qwen-Image puts image tokens first); None: all N.
        """
        if self.observer is not None:
            self.observer(self, layer, q, k, image or (0, q.shape[2]), key_lengths)
        mode = self.mode
        if mode is None or not self.consistent_now(layer):
            return plain_attention(q, k, v, key_lengths)
        if q.shape[0] % mode.num_frames:
            raise RuntimeError(
                f"{layer.name}: batch of {q.shape[0]} is not a multiple of the {mode.num_frames} frames "
                f"the state was told about ({mode.name} mode)"
            )
        image = image or (0, q.shape[2])
        # 2 under batched classifier-free guidance: [uncond frames; cond frames]
        groups = q.shape[0] // mode.num_frames
        if self.current_pass is not None and groups != 1:
            raise RuntimeError(
                f"{layer.name}: in CFG pass {self.current_pass.group} the batch holds just the "
                f"{mode.num_frames} frames, got {q.shape[0]} rows"
            )
        if key_lengths is None:  # as modes were called before key lengths existed
            return mode.attend(self, layer, q, k, v, groups, image, reposition)
        return mode.attend(self, layer, q, k, v, groups, image, reposition, key_lengths)

    def borrows(self, layer: LayerInfo) -> bool:
        """Whether a call of ``layer`` now may read other frames' tokens: a mode is on, this (step, layer)
        is consistent and its level samples tokens. When False, ``attend`` is the host's own attention,
        so a host whose own math differs from ours in layout (Qwen-Image) can run its own instead."""
        return self.consistent_now(layer) and self.config.rate_for(layer.level) > 0

    def consistent_now(self, layer: LayerInfo) -> bool:
        """False during warm-up and when this (step, layer) randomly falls back to plain attention."""
        if self.mode is None or self.step < self.config.warmup_steps:
            return False
        prob = self.config.skip_prob(self.step)
        return not (prob > 0 and self.uniform("skip", self.step, layer.index) < prob)

    def reference_indices(self, layer: LayerInfo, image: Span, device: torch.device) -> torch.Tensor:
        """(num_frames, S) positions of the image tokens each frame of the batch offers; one draw per
        (step, level), shared by the level's layers and by both CFG halves (or passes), as in the
        official code."""
        if self.subject_masks is not None:  # per story frame: its own mask, whatever batch it is in
            if self.batch_frames is None:
                raise RuntimeError(
                    f"{layer.name}: subject masks are set, but the {self.mode.name} batch's story frames "
                    "are unknown: begin it with frames=[...]"
                )
            return self.frame_reference_indices(layer, self.batch_frames, image, device)
        writing = getattr(self.mode, "writing", None)
        key = (self.step, layer.level, self.mode.num_frames, image[1] - image[0], writing)
        if key not in self._draws:
            drawn = draw_indices(
                self.seed_for("ref", *key), key[2], key[3], self.config.rate_for(layer.level)
            )
            self._draws[key] = to_device_async(drawn, device)  # drawn on the CPU: device-independent
        return self._draws[key] + image[0]

    def frame_reference_indices(
        self, layer: LayerInfo, frames: Sequence[int], image: Span, device: torch.device
    ) -> torch.Tensor:
        """(len(frames), S) image-token positions offered by each story frame: one draw per (step, level,
        frame), so a frame offers the same tokens whichever batch (or CFG pass) it is computed in. With
        subject masks, each frame's draw comes from its mask (same seed, same count)."""
        rows = []
        count = image[1] - image[0]
        rate = self.config.rate_for(layer.level)
        keys = [("frame", self.step, layer.level, frame, count) for frame in frames]
        if self.subject_masks is not None:  # the frames not drawn yet, in one call (one graph constant)
            new = [key for key in keys if key not in self._draws]
            if new:
                seeds = tuple((key[3], self.seed_for("ref", *key)) for key in new)
                drawn = draw_frames_from_masks(self, seeds, layer.level, count, rate)
                for key, row in zip(new, drawn.split(1), strict=True):
                    self._draws[key] = to_device_async(row, device)
        for key in keys:
            if key not in self._draws:
                drawn = draw_indices(self.seed_for("ref", *key), 1, count, rate)
                self._draws[key] = to_device_async(drawn, device)
            rows.append(self._draws[key])
        return torch.cat(rows) + image[0]

    def warn_small_mask(self, frame: int, level: int, subject: torch.Tensor, rate: float) -> None:
        """Warn (once per frame) when ``subject`` holds fewer tokens than the draws to take inside it."""
        inside, _ = masked_sample_counts(subject.numel(), rate, self.background_share)
        held = int(subject.sum())
        characters = self.subject_masks.frame_characters[frame]
        if held >= inside or (frame, characters) in self._mask_warned:
            return
        self._mask_warned.add((frame, characters))
        warnings.warn(
            f"frame {frame} ({', '.join(characters)}): its subject mask holds {held} of {subject.numel()} "
            f"tokens at level {level}, fewer than the {inside} to draw: its tokens are drawn from the "
            "whole frame there",
            stacklevel=4,
        )

    def next_layer(self, layer: LayerInfo) -> tuple[int, LayerInfo]:
        """(step, layer) that follows ``layer`` in forward order, for bank prefetch."""
        if layer.index + 1 < len(self.layers):
            return self.step, self.layers[layer.index + 1]
        return self.step + 1, self.layers[0]

    def seed_for(self, *key) -> int:
        return seed_for(self.config.seed, *key)

    def uniform(self, *key) -> float:
        return self.seed_for(*key) / 2**63


# The draws are pure functions of their arguments. Inside a traced processor (torch.compile) they run at
# trace time and their results become constants of the graph, guarded by the Python values they were called
# with (step, layer, ...): no host work, no generator object and no graph break in the compiled step.
@torch._dynamo.assume_constant_result
def seed_for(*key) -> int:
    """A 63-bit seed from a tuple of Python values (stable across processes and platforms)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


# Like draw_indices: run at trace time inside a traced processor, its result a constant of the graph.
@torch._dynamo.assume_constant_result
def draw_frames_from_masks(
    state: ConsistencyState, frames: tuple[tuple[int, int], ...], level: int, tokens: int, rate: float
) -> torch.Tensor:
    """(len(frames), S) tokens each (story frame, seed) of ``frames`` offers at ``level`` (``tokens``
    image tokens) under the state's subject masks, drawn on the CPU from its seed: the frame's own
    ``sample_masked_reference_indices`` of its subject mask (a warning first when the mask is too small),
    or ``draw_indices``'s draw for a frame without characters — which an all-True mask also gives. A
    video shot's ``tokens`` are ``state.latent_frames`` grids, its mask on each
    (``SubjectMasks.subject_tokens``)."""
    rows = []
    for frame, seed in frames:
        subject = state.subject_masks.subject_tokens(frame, tokens, state.latent_frames)
        if subject is None:
            rows.append(draw_indices(seed, 1, tokens, rate))
            continue
        state.warn_small_mask(frame, level, subject, rate)
        gen = torch.Generator().manual_seed(seed)
        share = state.background_share
        rows.append(sample_masked_reference_indices(subject[None], rate, share, generator=gen))
    return torch.cat(rows)


@torch._dynamo.assume_constant_result
def draw_indices(seed: int, num_frames: int, num_tokens: int, rate: float) -> torch.Tensor:
    """``sample_reference_indices`` on the CPU from ``seed``: the same values on every device."""
    gen = torch.Generator().manual_seed(seed)
    return sample_reference_indices(num_frames, num_tokens, rate, generator=gen)
