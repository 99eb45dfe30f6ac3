"""Subject masks from cross-attention: where each frame's image looks at its character's words.

ConsiStory's automatic masks, made explicit. For each image query, the probability the host's own softmax
puts on a character's subject tokens (the words naming it in the frame's prompt) is

    p = Σ_(j subject) softmax(q·kᵀ·scale + bias)_j = exp(lse(subject scores) − lse(all scores))

normalised over **all** the keys the host's softmax sees (text padding included, masked keys excluded),
through each row's logsumexp: never a softmax over the subject columns alone (that would be 1 everywhere),
and never an (N, L) attention matrix at once — the logsumexp runs over key blocks
(:func:`subject_probability`).

:class:`SubjectAttentionRecorder` keeps, per (story frame, character), the sum of that probability over
heads (their mean), layers and the denoiser calls so far, at one resolution: the level of
:data:`RECORD_LEVEL` (1/16 of the image: SD1.5's and SDXL's middle levels, the level ConsiStory aggregates
at; FLUX's only one). A processor feeds it per layer call; :meth:`SubjectAttentionRecorder.masks` turns the
maps into boolean ``SubjectMasks``: each map mean over its calls, min-max normalised to [0, 1], thresholded
by Otsu's method (:func:`otsu_threshold`), and resized to every other level by ``subject_masks``' rule.

:class:`SubjectRecordingProcessor` is a plain diffusers processor for cross-attention (UNet ``attn2``,
``AttnProcessor2_0``'s math, so its output is the stock output) that feeds a recorder;
:func:`install_subject_recorder` puts it on a denoiser's cross-attention layers and returns what to restore.
An IP-Adapter's cross-attention processor is recorded through, not replaced
(:class:`IPAdapterRecordingProcessor`: its own output, the text keys recorded). Joint text+image hosts
(FLUX, SD3, Qwen-Image) need no processor of their own: their consistent
processors hand q and k of the joint sequence to ``ConsistencyState.attend``, and
:meth:`SubjectAttentionRecorder.observe`, as the state's ``observer``, records the image rows' queries
against the whole joint key sequence.

Under batched CFG ([uncond frames; cond frames]) only the conditional half is recorded: the unconditional
prompt names no subject.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .state import COND, ConsistencyState, LayerInfo, Span
from .subject_masks import Size, SubjectMasks, level_grid

#: the level (downsampling factor) the recorder aggregates at unless told
RECORD_LEVEL = 16
#: keys per block of the chunked logsumexp
KEY_BLOCK = 256
#: histogram bins of Otsu's threshold over a map normalised to [0, 1]
OTSU_BINS = 256


def subject_probability(
    query: torch.Tensor,
    key: torch.Tensor,
    columns: torch.Tensor,
    *,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    block: int = KEY_BLOCK,
) -> torch.Tensor:
    """The attention probability each query puts on a set of key columns, normalised over all keys.

    Args:
        query: (B, H, N, D) image queries.
        key: (B, H, L, D) every key the host's softmax sees (text; joint hosts: text and image).
        columns: (B, L) or (B, C, L) bool: the subject columns of each row (per character C).
        scale: the host's score scale (default ``D ** -0.5``, what SDPA uses).
        bias: the host's attention mask, broadcastable to (B, H, N, L): additive (float, -inf masks a key)
            or bool (True: attended).
        block: keys per block of the chunked logsumexp.

    Returns:
        (B, H, N) or (B, C, H, N) float32 (float64 for float64 inputs): sum over the subject columns of
        softmax(q·kᵀ·scale + bias), computed as exp(lse(subject) − lse(all)) in at most float32. A row
        without subject columns gets 0.
    """
    if query.ndim != 4 or key.ndim != 4 or query.shape[:2] != key.shape[:2] or query.shape[3] != key.shape[3]:
        raise ValueError(
            f"query (B, H, N, D) and key (B, H, L, D), got {tuple(query.shape)}, {tuple(key.shape)}"
        )
    single = columns.ndim == 2
    cols = (columns[:, None] if single else columns).cpu()  # a small host-side table: which columns
    batch, heads, tokens, dim = query.shape
    length = key.shape[2]
    if cols.dtype != torch.bool or cols.shape[0] != batch or cols.shape[2] != length:
        raise ValueError(
            f"columns must be ({batch}, [C,] {length}) bool, got {columns.dtype} {tuple(columns.shape)}"
        )
    dtype = torch.promote_types(query.dtype, torch.float32)
    device = query.device
    q = query.to(dtype) * (dim**-0.5 if scale is None else scale)
    k = key.to(dtype)
    if bias is not None and bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, dtype=dtype, device=bias.device).masked_fill(~bias, -math.inf)
    # log of the softmax's denominator: a running logsumexp over key blocks, one (N, block) tile at a time
    lse_all = torch.full((batch, heads, tokens), -math.inf, dtype=dtype, device=device)
    for start in range(0, length, block):
        scores = q @ k[:, :, start : start + block].transpose(-1, -2)  # [B, H, N, blk]
        if bias is not None:
            scores = scores + bias[..., start : start + block].to(dtype)
        lse_all = torch.logaddexp(lse_all, torch.logsumexp(scores, dim=-1))
    # the subject columns' scores alone: each (row, character)'s columns gathered, padded to the longest
    chars = cols.shape[1]
    counts = cols.sum(-1)  # [B, C]
    width = max(int(counts.max()), 1)
    index = torch.argsort((~cols).to(torch.uint8), dim=-1, stable=True)[..., :width]  # chosen columns first
    valid = (torch.arange(width) < counts[..., None]).to(device)  # [B, C, M]
    index = index.to(device)
    picked = k[:, None].expand(batch, chars, heads, length, dim)
    picked = picked.gather(3, index[:, :, None, :, None].expand(batch, chars, heads, width, dim))
    subject = torch.einsum("bhnd,bchmd->bchnm", q, picked)  # [B, C, H, N, M]
    if bias is not None:
        full = bias.to(dtype).expand(batch, heads, tokens, length)[:, None].expand(batch, chars, -1, -1, -1)
        subject = subject + full.gather(-1, index[:, :, None, None, :].expand(-1, -1, heads, tokens, -1))
    subject = subject.masked_fill(~valid[:, :, None, None, :], -math.inf)
    prob = torch.exp(torch.logsumexp(subject, dim=-1) - lse_all[:, None])
    prob = torch.nan_to_num(prob, nan=0.0)  # a row whose keys are all masked
    return prob[:, 0] if single else prob


def otsu_histogram_threshold(counts: torch.Tensor) -> float:
    """Otsu's threshold of a histogram: the split t maximising the between-class variance
    ω₀ω₁(μ₀ − μ₁)² of bins [0, t] against bins (t, end], as a position in bin units (bin i spans [i, i+1)):
    the upper edge of the last bin of class 0. When several splits tie (empty bins between two modes) the
    middle of the tied run is taken, so the threshold sits halfway between the modes."""
    counts = counts.to(torch.float64).flatten()
    if counts.numel() < 2 or counts.sum() <= 0:
        return float(counts.numel())  # nothing to split: everything below
    p = counts / counts.sum()
    omega = p.cumsum(0)[:-1]  # class-0 weight for splits after bins 0 .. n-2
    mu = (p * torch.arange(len(p), dtype=torch.float64)).cumsum(0)[:-1]
    mu_total = (p * torch.arange(len(p), dtype=torch.float64)).sum()
    between = (mu_total * omega - mu) ** 2 / (omega * (1 - omega))
    between = torch.nan_to_num(between, nan=-1.0, posinf=-1.0)  # one class empty: no split
    best = between.max()
    if best < 0:
        return float(counts.numel())
    tied = torch.nonzero(between >= best * (1 - 1e-12)).flatten()
    # the tied run that holds the first maximum (contiguous splits between the same two classes)
    run = [int(tied[0])]
    for t in tied[1:].tolist():
        if t != run[-1] + 1:
            break
        run.append(t)
    return (run[0] + run[-1]) / 2 + 1


def otsu_threshold(
    values: torch.Tensor, bins: int = OTSU_BINS, value_range: tuple[float, float] = (0.0, 1.0)
) -> float:
    """Otsu's threshold of ``values`` over a ``bins``-bin histogram of ``value_range``: values above it
    are foreground."""
    low, high = value_range
    counts = torch.histc(values.to(torch.float64).flatten(), bins=bins, min=low, max=high)
    return low + otsu_histogram_threshold(counts) * (high - low) / bins


def threshold_map(subject_map: torch.Tensor) -> torch.Tensor:
    """A probability map → bool mask: min-max normalised to [0, 1], then above Otsu's threshold. A flat
    map (nothing stands out) gives an empty mask."""
    low, high = subject_map.min(), subject_map.max()
    if not high > low:
        return torch.zeros(subject_map.shape, dtype=torch.bool)
    normalised = ((subject_map - low) / (high - low)).to(torch.float64)
    return normalised > otsu_threshold(normalised)


class SubjectAttentionRecorder:
    """Accumulates, per (story frame, character), the probability image queries put on the character's
    subject tokens, at the level ``level`` of an image of ``size`` (height, width).

    Tell it the batch (:meth:`set_batch`) before each denoiser call; the processors call :meth:`record`
    per layer call (calls at other resolutions are ignored); :meth:`masks` gives the masks so far. State is
    all here: two pipelines keep two recorders. ``active`` False pauses recording (another pass of two-pass
    CFG, a step not to count).
    """

    def __init__(self, size: Size, *, level: int = RECORD_LEVEL, block: int = KEY_BLOCK) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.level = level
        self.grid = level_grid(self.size, level)
        self.block = block
        self.active = True
        self.frames: tuple[int, ...] = ()
        self.subjects: list[dict[str, tuple[int, ...]]] = []
        self.sums: dict[tuple[int, str], torch.Tensor] = {}  # (frame, character) -> (h·w,) float64
        self.calls: dict[tuple[int, str], int] = {}

    def set_batch(self, frames: Sequence[int], subjects: Sequence[Mapping[str, Sequence[int]]]) -> None:
        """The next denoiser calls compute story frames ``frames`` (batch order; the conditional half under
        batched CFG); ``subjects[i]``: character -> the columns of its subject tokens among frame i's text
        keys (empty for a frame without characters)."""
        if len(frames) != len(subjects):
            raise ValueError(f"{len(frames)} frames but subject tokens for {len(subjects)}")
        for frame, per_character in zip(frames, subjects, strict=True):
            for character, cols in per_character.items():
                if not cols:
                    raise ValueError(f"frame {frame} ({character}): no subject token columns")
        self.frames = tuple(frames)
        self.subjects = [{c: tuple(int(j) for j in cols) for c, cols in s.items()} for s in subjects]

    def reset(self) -> None:
        """Forget the maps so far."""
        self.sums.clear()
        self.calls.clear()

    def record(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        *,
        scale: float | None = None,
        bias: torch.Tensor | None = None,
        text_offset: int = 0,
        latent_frames: int = 1,
    ) -> bool:
        """Add one layer call: ``query`` (B, H, N, D) image queries, ``key`` (B, H, L, D) every key of the
        host's softmax, ``scale`` / ``bias`` as the host's (``subject_probability``); the prompt's tokens
        start at key ``text_offset`` (joint sequences). Returns whether it was recorded (active, at the
        recorder's level, characters in the batch).

        ``latent_frames`` > 1: each row is a video shot whose N = latent_frames·h·w queries are that many
        latent frames of the level's grid, row-major over (t, h, w) (Wan). A shot gets ONE 2D map, as its
        masks are one per shot: the probability is averaged over its latent frames (after the heads), so
        a call adds one (h·w,) map per (shot, character) as an image's call does. The caller says T: a
        token count alone cannot (4 latent frames of a 4x4 grid are one 8x8 grid's tokens)."""
        if isinstance(latent_frames, bool) or not isinstance(latent_frames, int) or latent_frames < 1:
            raise ValueError(f"latent_frames must be an int >= 1, got {latent_frames!r}")
        tokens = self.grid[0] * self.grid[1]
        if not self.active or query.shape[2] != latent_frames * tokens or not any(self.subjects):
            return False
        count = len(self.frames)
        if count == 0 or query.shape[0] % count:
            raise RuntimeError(
                f"a batch of {query.shape[0]} rows is not a multiple of the {count} frames set_batch named"
            )
        # batched CFG stacks [uncond frames; cond frames]: the conditional rows are the last ones
        rows = slice(query.shape[0] - count, None)
        characters = sorted({c for s in self.subjects for c in s})
        columns = torch.zeros(count, len(characters), key.shape[2], dtype=torch.bool)
        for i, per_character in enumerate(self.subjects):
            for character, cols in per_character.items():
                if text_offset + max(cols) >= key.shape[2]:
                    raise ValueError(
                        f"frame {self.frames[i]} ({character}): subject column {max(cols)} past the "
                        f"{key.shape[2] - text_offset} text keys"
                    )
                columns[i, characters.index(character), [text_offset + j for j in cols]] = True
        if bias is not None and bias.ndim == 4 and bias.shape[0] == query.shape[0]:
            bias = bias[rows]
        prob = subject_probability(query[rows], key[rows], columns, scale=scale, bias=bias, block=self.block)
        # heads aggregated, [F, C, N]; kept where the call ran (no copy to the host per layer call)
        per_token = prob.mean(dim=2).to(torch.float64)
        if latent_frames > 1:  # [F, C, T·h·w] -> [F, C, h·w]: a shot's latent frames averaged
            per_token = per_token.unflatten(2, (latent_frames, tokens)).mean(dim=2)
        for i, per_character in enumerate(self.subjects):
            for character in per_character:
                entry = (self.frames[i], character)
                value = per_token[i, characters.index(character)]
                self.sums[entry] = self.sums[entry] + value if entry in self.sums else value.clone()
                self.calls[entry] = self.calls.get(entry, 0) + 1
        return True

    def observe(
        self,
        state: ConsistencyState,
        layer: LayerInfo,
        q: torch.Tensor,
        k: torch.Tensor,
        image: Span,
        key_lengths: torch.Tensor | None = None,
    ) -> None:
        """``ConsistencyState.observer`` for joint text+image hosts (FLUX, SD3, Qwen-Image): each consistent
        layer's image query rows ``image`` = [a, b) against the frame's own keys, text and image — the
        host's own softmax (keys borrowed from other frames are consistency's, not the host's). The prompt
        is the rest of the sequence: before the image (FLUX) or after it (SD3, Qwen-Image), so subject
        columns count from the prompt's first token either way. ``key_lengths`` masks text padding
        (Qwen-Image). Image-only self-attention (no text keys) and the unconditional pass of two-pass CFG
        are not recorded."""
        start, stop = image
        if stop - start == k.shape[2]:  # no text keys: image-only self-attention
            return
        if state.current_pass is not None and state.current_pass.group != COND:
            return
        bias = None
        if key_lengths is not None:
            bias = (torch.arange(k.shape[2], device=k.device) < key_lengths[:, None])[:, None, None, :]
        self.record(q[:, :, start:stop], k, bias=bias, text_offset=0 if start > 0 else stop)

    def maps(self) -> dict[tuple[int, str], torch.Tensor]:
        """(frame, character) -> (h, w) float64: the mean probability over the calls recorded."""
        return {
            entry: (total / self.calls[entry]).view(self.grid).cpu() for entry, total in self.sums.items()
        }

    def masks(self, frame_characters: Sequence[Sequence[str]]) -> SubjectMasks:
        """The maps so far as ``SubjectMasks`` (:func:`masks_from_maps`)."""
        return masks_from_maps(self.maps(), frame_characters, self.size)


def masks_from_maps(
    maps: Mapping[tuple[int, str], torch.Tensor], frame_characters: Sequence[Sequence[str]], size: Size
) -> SubjectMasks:
    """Accumulated (frame, character) -> (h, w) probability maps → boolean ``SubjectMasks``: each map
    min-max normalised and Otsu-thresholded (:func:`threshold_map`) on its own grid, then resized to any
    level's grid by the masks' rule (``SubjectMasks.subject_tokens``, ``level_masks``). ``frame_characters``:
    each story frame's characters; a frame showing a character needs its map (ValueError naming it)."""
    found: dict[int, dict[str, torch.Tensor]] = {}
    for (frame, character), subject_map in maps.items():
        found.setdefault(frame, {})[character] = threshold_map(subject_map)
    for frame, shown in enumerate(frame_characters):
        missing = [c for c in shown if c not in found.get(frame, {})]
        if missing:
            raise ValueError(f"frame {frame}: no cross-attention recorded for {', '.join(missing)}")
    return SubjectMasks(found, frame_characters, size)


class SubjectRecordingProcessor:
    """Cross-attention processor (diffusers' ``AttnProcessor2_0`` math) that feeds a
    ``SubjectAttentionRecorder`` with each call's queries and keys; its output is the stock output."""

    def __init__(self, recorder: SubjectAttentionRecorder) -> None:
        self.recorder = recorder

    @torch.compiler.disable
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        self.recorder.record(query, key, bias=attention_mask)  # SDPA's default scale, as below

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.to(query.dtype)))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


#: the processors a recorder may replace: the stock ones, whose math ``SubjectRecordingProcessor`` repeats
STOCK_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor", "SubjectRecordingProcessor")
#: IP-Adapter processors a recorder records through (``IPAdapterRecordingProcessor``), by the scale of their
#: text branch's scores: None, SDPA's default (``head_dim ** -0.5``); "attn", the module's ``attn.scale``
#: (``get_attention_scores``)
IP_ADAPTER_PROCESSORS: dict[str, str | None] = {
    "IPAdapterAttnProcessor2_0": None,
    "IPAdapterAttnProcessor": "attn",
}


def prompt_query_key(
    processor,
    attn,
    hidden_states: torch.Tensor,
    encoder_hidden_states,
    attention_mask: torch.Tensor | None = None,
    temb: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(query (B, H, N, D), key (B, H, L, D), bias or None) of an IP-Adapter processor's **text** branch, as
    diffusers' ``IPAdapterAttnProcessor2_0`` / ``IPAdapterAttnProcessor`` compute them: the image tokens are
    split off ``encoder_hidden_states`` first (a (text, images) tuple, or the deprecated tensor whose last
    ``processor.num_tokens[0]`` tokens are the image's), then spatial / group norm, ``to_q``, ``norm_cross``
    on the text, ``to_k``, and the attention mask prepared for the text length (their math: no
    ``norm_q`` / ``norm_k``)."""
    if isinstance(encoder_hidden_states, tuple):
        text = encoder_hidden_states[0]
    else:
        text = encoder_hidden_states[:, : encoder_hidden_states.shape[1] - processor.num_tokens[0]]
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        batch, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
    batch, length, _ = text.shape
    bias = None
    if attention_mask is not None:
        bias = attn.prepare_attention_mask(attention_mask, length, batch)
        bias = bias.view(batch, attn.heads, -1, bias.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if attn.norm_cross:
        text = attn.norm_encoder_hidden_states(text)
    key = attn.to_k(text)
    head_dim = key.shape[-1] // attn.heads
    query, key = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key))
    return query, key, bias


class IPAdapterRecordingProcessor(torch.nn.Module):
    """Records through an IP-Adapter's cross-attention processor (``IP_ADAPTER_PROCESSORS``): the output is
    the wrapped processor's own call, unchanged (bit for bit: it runs as it would without the recorder), and
    the recorder gets the query and the **text** keys (:func:`prompt_query_key`, one extra ``to_q`` /
    ``to_k`` on the recorded level only).

    Why the text keys only: an IP-Adapter adds ``scale · softmax(q·k_imageᵀ)·v_image`` to the text
    attention — a *separate* softmax over the image tokens. The text branch's softmax, whose probability on
    a character's words the masks are made of, is normalised over the prompt's keys alone, exactly the
    stock cross-attention's; adding the image keys to the denominator would describe a softmax the host
    never computes.

    A ``torch.nn.Module`` holding the wrapped processor, so its ``to_k_ip`` / ``to_v_ip`` weights stay in
    the denoiser's module tree while it is installed (device moves, offload hooks). Its ``__call__`` names
    ``scale`` and ``ip_adapter_masks``: diffusers' ``Attention.forward`` passes on only the keyword
    arguments a processor's signature names."""

    def __init__(self, recorder: SubjectAttentionRecorder, processor) -> None:
        name = type(processor).__name__
        if name not in IP_ADAPTER_PROCESSORS:
            raise ValueError(f"processor must be one of {', '.join(IP_ADAPTER_PROCESSORS)}, got {name}")
        super().__init__()
        self.recorder = recorder
        self.processor = processor
        self.scale_rule = IP_ADAPTER_PROCESSORS[name]

    @torch.compiler.disable  # the recorder's bookkeeping stays eager, as SubjectRecordingProcessor's
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states=None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        scale: float = 1.0,
        ip_adapter_masks=None,
    ) -> torch.Tensor:
        recorder = self.recorder
        tokens = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states[0, 0].numel()
        # other levels than the recorder's are skipped before any projection (``record`` would skip them)
        if encoder_hidden_states is not None and recorder.active and tokens == math.prod(recorder.grid):
            with torch.no_grad():
                query, key, bias = prompt_query_key(
                    self.processor, attn, hidden_states, encoder_hidden_states, attention_mask, temb
                )
                score_scale = attn.scale if self.scale_rule == "attn" else None
                recorder.record(query, key, scale=score_scale, bias=bias)
        return self.processor(
            attn,
            hidden_states,
            encoder_hidden_states,
            attention_mask,
            temb,
            scale=scale,
            ip_adapter_masks=ip_adapter_masks,
        )


def is_cross_attention(name: str) -> bool:
    """diffusers' name for a transformer block's cross-attention processor (``...attn2.processor``)."""
    return ".attn2." in name


def _unwrapped(processor):
    """The processor a recorder replaced (one left installed is recorded through again, not twice)."""
    return processor.processor if isinstance(processor, IPAdapterRecordingProcessor) else processor


def check_subject_recorder(
    denoiser: torch.nn.Module, select: Callable[[str], bool] = is_cross_attention
) -> list[str]:
    """The processor names ``install_subject_recorder`` would record from (``select``'s); ValueError for
    none, or for a picked processor it cannot record through: neither a stock one (``STOCK_PROCESSORS``)
    nor an IP-Adapter's (``IP_ADAPTER_PROCESSORS``) — replacing it would drop what it adds. Callers check
    before anything is written (the pipeline: before the output folder exists)."""
    processors = denoiser.attn_processors
    chosen = [name for name in processors if select(name)]
    if not chosen:
        raise ValueError("no cross-attention processor to record from on this denoiser")
    known = (*STOCK_PROCESSORS, *IP_ADAPTER_PROCESSORS)
    foreign = [n for n in chosen if type(_unwrapped(processors[n])).__name__ not in known]
    if foreign:
        raise ValueError(
            f"{foreign[0]} runs {type(processors[foreign[0]]).__name__}, not a stock processor nor an "
            "IP-Adapter's: automatic subject masks cannot record through it (replacing it would drop what it "
            "adds); give the masks instead (subject_masks=DIR, --subject-masks DIR)"
        )
    return chosen


def install_subject_recorder(
    denoiser: torch.nn.Module,
    recorder: SubjectAttentionRecorder,
    select: Callable[[str], bool] = is_cross_attention,
) -> dict[str, object]:
    """Put a recording processor feeding ``recorder`` on the processors ``select`` picks (default: every
    cross-attention); returns the processors it replaced, for :func:`remove_subject_recorder`. A stock
    processor gets ``SubjectRecordingProcessor`` (one shared, the stock math with the recording inside);
    an IP-Adapter's is wrapped in its own ``IPAdapterRecordingProcessor`` (its output unchanged).
    ValueError, from :func:`check_subject_recorder`, for any other."""
    processors = dict(denoiser.attn_processors)
    chosen = check_subject_recorder(denoiser, select)
    replaced = {name: _unwrapped(processors[name]) for name in chosen}
    stock = SubjectRecordingProcessor(recorder)
    installed = {
        name: IPAdapterRecordingProcessor(recorder, processor)
        if type(processor).__name__ in IP_ADAPTER_PROCESSORS
        else stock
        for name, processor in replaced.items()
    }
    denoiser.set_attn_processor({**processors, **installed})
    return replaced


def remove_subject_recorder(denoiser: torch.nn.Module, replaced: Mapping[str, object]) -> None:
    """Put back the processors ``install_subject_recorder`` replaced."""
    denoiser.set_attn_processor({**denoiser.attn_processors, **replaced})


class AutoSubjectMasks:
    """Subject masks found during a story run (``--subject-masks auto``): the recorder's maps of each frame,
    thresholded after every denoising step of that frame, are the masks its next step draws from.

    The choices, argued:

    - **Per frame, from its own steps, as of the step before.** After a denoiser call computes frames F at
      step s (:meth:`after`), each frame of F gets the masks of its maps so far (steps 0..s), kept under
      step s; a call at step s (:meth:`before`) hands the state every frame's masks as of step s - 1. A
      frame's mask at step s thus depends on its own steps before s only, never on which other frames ran
      in between: the stored and the lockstep bank schedules, any read batch size and any window chunking
      give each frame the same masks. "As of s - 1" rather than "latest" matters in window mode, where a
      chunk reads the sampled tokens of an earlier chunk of the same step: those were drawn (and their
      segments taken) under the masks of s - 1, which a later chunk must see too, although the earlier
      chunk's frames have finished step s by then. So each frame keeps its last two steps' masks.
    - **Step 0 runs without masks** (and unbounded): nothing has been recorded yet, and a mask thresholded
      from nothing is noise. It is a warm-up step, as ConsiStory's first steps are; from step 1 on every
      draw lies in the then-current masks.
    - **Banked tokens keep their characters.** Masks are swapped with ``ConsistencyState.swap_subject_masks``,
      which keeps ``bank_segments`` (the characters of tokens banked under earlier masks), so a read of an
      earlier step's bank — every read of the stored schedule — bounds by what was banked.
    - **Over several ranks** (``share``: window mode, where every rank steps together), each rank records
      its own frames and, after each step, every rank's new masks are gathered to every rank (a few KiB a
      frame): a rank's frames read neighbours of other ranks whose draws and segments follow their masks.
      In bank mode no rank needs another's masks while it runs (banks carry their tokens' characters), and
      the run gathers them once at the end (:meth:`latest`).
    - **Resume**: :meth:`state_dict` (the recorder's sums and the masks kept) goes into lockstep checkpoints,
      so a resumed run continues with the maps an uninterrupted run had at that step.
    - A character a frame shows whose description has no columns there (truncated away: warned when the
      columns were found) has no map: its mask is the whole frame. A map with nothing standing out
      thresholds to an empty mask, and the state then draws that frame uniformly with its usual warning.
    """

    def __init__(
        self,
        state: ConsistencyState,
        recorder: SubjectAttentionRecorder,
        frame_characters: Sequence[Sequence[str]],
        subjects: Sequence[Mapping[str, Sequence[int]]],
        *,
        bounded: bool = False,
        share: Callable[[dict], list[dict]] | None = None,
    ) -> None:
        if len(subjects) != len(frame_characters):
            raise ValueError(
                f"subject columns for {len(subjects)} frames, the story has {len(frame_characters)}"
            )
        self.state, self.recorder, self.bounded = state, recorder, bool(bounded)
        self.share = share  # every rank's item, gathered on every rank (window mode over ranks); None: one
        self.frame_characters = [tuple(chars) for chars in frame_characters]
        self.subjects = [{c: tuple(cols) for c, cols in s.items() if cols} for s in subjects]
        # frame -> step -> character -> mask after that step (the frame's last two steps)
        self.found: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
        self._made: tuple[tuple, SubjectMasks] | None = None  # the last masks made, by the steps they are of

    def before(self, frames: Sequence[int], step: int) -> None:
        """Frames ``frames`` are about to take step ``step``: tell the recorder whose words they are, and
        the state which masks they draw from (every frame's as of step ``step - 1``)."""
        self.recorder.set_batch(frames, [self.subjects[f] for f in frames])
        if step == 0:
            if self.state.subject_masks is not None:
                self.state.swap_subject_masks(None, bounded=False)
            return
        masks = self.current(step)
        if masks is not self.state.subject_masks:  # unchanged masks keep this step's draws
            self.state.swap_subject_masks(masks, bounded=self.bounded)

    def after(self, frames: Sequence[int], step: int) -> None:
        """Frames ``frames`` finished step ``step``: their masks after it are those of their maps so far."""
        grid = self.recorder.grid
        new: dict[int, dict[str, torch.Tensor]] = {}
        for frame in frames:
            for character in self.subjects[frame]:
                entry = (frame, character)
                if entry in self.recorder.sums:
                    subject_map = (self.recorder.sums[entry] / self.recorder.calls[entry]).view(grid).cpu()
                    new.setdefault(frame, {})[character] = threshold_map(subject_map)
        parts = [new] if self.share is None else self.share(new)
        for part in parts:
            for frame, masks in part.items():
                kept = self.found.setdefault(frame, {})
                kept[step] = masks
                for old in sorted(kept)[:-2]:
                    del kept[old]

    def current(self, step: int | None = None) -> SubjectMasks:
        """Every frame's masks as of its last step before ``step`` (None: its last finished step); the whole
        frame where it has none yet."""
        chosen = {}
        for frame, kept in self.found.items():
            steps = [s for s in kept if step is None or s < step]
            if steps:
                chosen[frame] = max(steps)
        key = tuple(sorted(chosen.items()))
        if self._made is None or self._made[0] != key:
            self._made = key, self._story_masks({f: self.found[f][s] for f, s in chosen.items()})
        return self._made[1]

    def latest(self) -> dict[int, dict[str, torch.Tensor]]:
        """This process's frames' masks after their last finished step (frame -> character -> mask): what a
        run over several ranks gathers to the leader at its end (``from_latest``)."""
        return {frame: kept[max(kept)] for frame, kept in self.found.items() if kept}

    def from_latest(self, parts: Sequence[Mapping[int, Mapping[str, torch.Tensor]]]) -> SubjectMasks:
        """The story's masks from every rank's :meth:`latest` (frames shown by no part: whole frames)."""
        merged: dict[int, Mapping[str, torch.Tensor]] = {}
        for part in parts:
            merged.update(part)
        return self._story_masks(merged)

    def _story_masks(self, found: Mapping[int, Mapping[str, torch.Tensor]]) -> SubjectMasks:
        """``SubjectMasks`` of every frame that shows characters: ``found``'s mask of each, else the whole
        frame."""
        whole = torch.ones(self.recorder.grid, dtype=torch.bool)
        masks = {
            frame: {c: found.get(frame, {}).get(c, whole) for c in shown}
            for frame, shown in enumerate(self.frame_characters)
            if shown
        }
        return SubjectMasks(masks, self.frame_characters, self.recorder.size)

    # -- checkpoints (lockstep runs) --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a checkpoint keeps: the recorder's sums (on the CPU) and calls, and the masks kept."""
        return {
            "sums": {entry: total.cpu() for entry, total in self.recorder.sums.items()},
            "calls": dict(self.recorder.calls),
            "found": {frame: dict(kept) for frame, kept in self.found.items()},
        }

    def load_state_dict(self, data: Mapping, device: torch.device | str = "cpu") -> None:
        """Continue from :meth:`state_dict`'s ``data``; the sums go back to ``device`` (where the recorder
        adds the next calls)."""
        self.recorder.sums = {entry: total.to(device) for entry, total in data["sums"].items()}
        self.recorder.calls = dict(data["calls"])
        self.found = {frame: dict(kept) for frame, kept in data["found"].items()}
        self._made = None
