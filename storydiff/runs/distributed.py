"""Stories split over processes with ``torch.distributed`` (NCCL on GPUs, gloo on CPUs), under ``torchrun``.

Frames are split over ranks in contiguous blocks (``Partition``); inside a frame nothing is split. Every
random choice is a pure function of (seed, step, layer, frame), so the split never changes a draw.

* Window mode: each rank denoises its block as one batch, all ranks step together. At every consistent
  layer a frame reads the sampled K/V of its neighbours within ``window``; those just outside the block
  come from the neighbour ranks (``HaloExchange``: one ``batch_isend_irecv`` per layer call with the rank
  before and the rank after, of only the boundary frames that a frame over there reads). The result is the
  unchunked single-process computation (frames within fp32 rounding of it: the denoiser sees other
  batches).
* Bank mode: each rank denoises the identity frames of its share of the characters and broadcasts their
  banks (``share_banks``; "recompute": every rank denoises every identity frame instead, no traffic), then
  its contiguous share of the read batches (the single-process run's batches, so frames are bit-identical
  to it).

A rank that fails makes the others fail too: every exchange is bounded by the process group's timeout
(``--dist-timeout``), and each rank keeps its finished frames on disk.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from csa_kernels.pool import index_tensor

from ..families.wan import latent_frames


@dataclass(frozen=True)
class Partition:
    """This process's place among ``world`` ranks."""

    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def leader(self) -> bool:
        """Rank 0 writes what belongs to the whole story (pages, metadata)."""
        return self.rank == 0

    def blocks(self, count: int) -> list[tuple[int, int]]:
        """[start, stop) of every rank's contiguous block of ``count`` items; the first ``count % world``
        ranks take one more."""
        base, extra = divmod(count, self.world)
        bounds, start = [], 0
        for rank in range(self.world):
            stop = start + base + (rank < extra)
            bounds.append((start, stop))
            start = stop
        return bounds

    def block(self, count: int) -> tuple[int, int]:
        return self.blocks(count)[self.rank]


def current_partition() -> Partition:
    """The partition of the initialised default process group, or a single process."""
    if dist.is_available() and dist.is_initialized():
        return Partition(dist.get_rank(), dist.get_world_size())
    return Partition()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_from_environment(backend: str | None, device: torch.device, timeout_s: float) -> Partition:
    """Join the process group ``torchrun`` describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``...). ``backend`` None: NCCL on CUDA, gloo otherwise. Each CUDA rank takes the device
    ``LOCAL_RANK``.

    The group's keys go under a prefix of torchrun's attempt (``TORCHELASTIC_RESTART_COUNT``): after a
    ``--max-restarts`` restart torchrun hands the workers the store of the attempt before, where gloo would
    read the dead rank 0's address (measured: "connectFullMesh failed ... Connection refused")."""
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"storydiff/attempt-{attempt}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return current_partition()


def gather_to_leader(partition: Partition, items: dict) -> dict:
    """Every rank's ``items`` merged on rank 0 (other ranks get {}); Python objects, pickled."""
    if not partition.distributed:
        return dict(items)
    gathered = [None] * partition.world if partition.leader else None
    communicate(partition, "gathering the frames", lambda: dist.gather_object(items, gathered, dst=0))
    if not partition.leader:
        return {}
    merged: dict = {}
    for part in gathered:
        merged.update(part)
    return merged


def gather_to_all(partition: Partition, item) -> list:
    """Every rank's ``item`` (a small Python object), in rank order, on every rank."""
    if not partition.distributed:
        return [item]
    gathered = [None] * partition.world
    communicate(partition, "comparing the ranks", lambda: dist.all_gather_object(gathered, item))
    return gathered


def check_frames_per_rank(partition: Partition, num_frames: int, window: int) -> None:
    """Each rank needs a block of at least ``max(1, window)`` frames: a frame's neighbours then live on
    this rank or the adjacent ones only."""
    smallest = min(stop - start for start, stop in partition.blocks(num_frames))
    if smallest < max(1, window):
        raise ValueError(
            f"{num_frames} frames over {partition.world} ranks leave a rank {smallest} frame(s); each rank "
            f"needs at least {max(1, window)} (the window): use fewer ranks"
        )


class HaloExchange:
    """Sampled K/V of the frames just outside this rank's block, from the neighbour ranks.

    Which frames cross a boundary is known to both sides from the story alone (which frames show a
    character, the window), so every message has a size both sides agree on: frame j of one block is sent
    to the other block iff it shows a character and some frame over there within ``window`` of it does.
    """

    def __init__(self, partition: Partition, active: list[bool], window: int) -> None:
        self.partition, self.active, self.window = partition, active, window
        self.bounds = partition.blocks(len(active))
        self.bytes_sent = 0  # since construction: the traffic tests and the README formula compare with

    def crossing(self, source: int, target: int) -> list[int]:
        """Frames of rank ``source``'s block read by some frame of rank ``target``'s block."""
        (a, b), (c, d) = self.bounds[source], self.bounds[target]
        return [
            j
            for j in range(a, b)
            if self.active[j] and any(self.active[i] and abs(i - j) <= self.window for i in range(c, d))
        ]

    def exchange(self, pool_k: torch.Tensor, pool_v: torch.Tensor) -> dict[int, tuple[torch.Tensor, ...]]:
        """``pool_k`` / ``pool_v``: [G, F, H, S, D], this block's frames. Returns {story frame: (k, v)}
        ([G, H, S, D] each) for the neighbour frames this block reads."""
        rank, world = self.partition.rank, self.partition.world
        start = self.bounds[rank][0]
        ops, received = [], []
        shape = (pool_k.shape[0], pool_k.shape[2], pool_k.shape[3], pool_k.shape[4])  # G, H, S, D
        for peer in (rank - 1, rank + 1):
            if not 0 <= peer < world:
                continue
            outgoing = self.crossing(rank, peer)
            if outgoing:
                local = index_tensor([j - start for j in outgoing], pool_k.device)
                message = torch.stack([pool_k[:, local], pool_v[:, local]]).contiguous()  # [2, G, n, H, S, D]
                ops.append(dist.P2POp(dist.isend, message, peer))
                self.bytes_sent += message.numel() * message.element_size()
            incoming = self.crossing(peer, rank)
            if incoming:
                buffer = pool_k.new_empty((2, shape[0], len(incoming), *shape[1:]))
                ops.append(dist.P2POp(dist.irecv, buffer, peer))
                received.append((incoming, buffer))
        if ops:

            def run() -> None:
                for request in dist.batch_isend_irecv(ops):
                    request.wait()

            communicate(self.partition, "the halo exchange with the neighbour ranks", run)
        return {
            frame: (buffer[0, :, n], buffer[1, :, n])
            for frames, buffer in received
            for n, frame in enumerate(frames)
        }


def halo_bytes_per_layer(
    active: list[bool],
    world: int,
    window: int,
    *,
    groups: int,
    heads: int,
    samples: int,
    head_dim: int,
    itemsize: int,
    rank: int | None = None,
) -> int:
    """Bytes all ranks (or only ``rank``) send in one consistent layer call: K and V of each crossing frame,
    per CFG half (``halo_bytes_per_frame``; at most ``window`` frames per boundary and direction)."""
    exchange = HaloExchange(Partition(0, world), active, window)
    frames = sum(
        len(exchange.crossing(source, peer))
        for source in (range(world) if rank is None else [rank])
        for peer in (source - 1, source + 1)
        if 0 <= peer < world
    )
    return frames * halo_bytes_per_frame(
        groups=groups, heads=heads, samples=samples, head_dim=head_dim, itemsize=itemsize
    )


def halo_bytes_per_frame(*, groups: int, heads: int, samples: int, head_dim: int, itemsize: int) -> int:
    """One frame's message in one layer call: ``2 · G · H · S · D · b`` (K and V of its ``samples`` sampled
    tokens, per CFG half)."""
    return 2 * groups * heads * samples * head_dim * itemsize


def halo_bytes_per_step(
    active: list[bool],
    world: int,
    window: int,
    layers: list[tuple[int, int, int]],
    *,
    groups: int,
    itemsize: int,
    rank: int | None = None,
) -> int:
    """Bytes all ranks (or only ``rank``) send in one denoising step: ``halo_bytes_per_layer`` summed over
    the consistent ``layers``, each (heads, samples, head_dim)."""
    return sum(
        halo_bytes_per_layer(
            active,
            world,
            window,
            groups=groups,
            heads=heads,
            samples=samples,
            head_dim=head_dim,
            itemsize=itemsize,
            rank=rank,
        )
        for heads, samples, head_dim in layers
    )


def bank_bytes_per_character_step(
    layers: list[tuple[int, int, int]], *, groups: int, identity_frames: int, itemsize: int
) -> int:
    """Bytes of one character's bank for one step, which every rank that does not write it receives in bank
    mode (``share_banks``): ``Σ_l 2 · G · n · S_l · H_l · D_l · b`` over the consistent ``layers``, each
    (heads, samples, head_dim), for n identity frames."""
    return sum(
        identity_frames
        * halo_bytes_per_frame(
            groups=groups, heads=heads, samples=samples, head_dim=head_dim, itemsize=itemsize
        )
        for heads, samples, head_dim in layers
    )


def bank_bytes_per_step(
    layers: list[tuple[int, int]], *, keeps: str, frames: int, groups: int, rate: float, itemsize: int
) -> int:
    """Bytes one denoising step's identity bank holds, for ``frames`` identity frames over the consistent
    ``layers``, each (tokens N_l, channels C_l): ``G · F · b · f · Σ_l N_l · C_l`` where ``keeps`` says what
    is stored — "official_a": the full hidden states (f = 1), "official_b": the sampled hidden states
    (f = r), "ours": the sampled K and V, no re-projection (f = 2r); the sampled count per layer is
    ``round(r · N_l)``, as the token draws take it (``csa_kernels.sampling``)."""
    per_frame = sum(
        {"official_a": tokens, "official_b": round(rate * tokens), "ours": 2 * round(rate * tokens)}[keeps]
        * channels
        for tokens, channels in layers
    )
    return groups * frames * itemsize * per_frame


def shot_tokens(shot_frames: int, height: int, width: int, *, patch: int = 16) -> int:
    """Video tokens of one shot (Wan 2.x: ``families/wan.py``): T·h·w, T = ``latent_frames(shot_frames)``
    (the VAE's 4x in time, the first frame alone), h = H / ``patch``, w = W / ``patch`` (the VAE's 8x, then
    (1, 2, 2) patches): 81 frames at 832 x 480 give 21 x 30 x 52 = 32,760."""
    return latent_frames(shot_frames) * (height // patch) * (width // patch)


def video_bank_bytes_per_step(
    *,
    layers: int,
    heads: int,
    head_dim: int,
    shot_frames: int,
    height: int,
    width: int,
    shots: int,
    rate: float,
    groups: int = 2,
    itemsize: int = 2,
) -> int:
    """Bytes of one character's bank for one step on a video family whose every consistent layer has the
    same token grid (Wan: every block's ``attn1``), for ``shots`` identity shots: ``bank_bytes_per_step``
    with "ours" over ``layers`` layers of N = ``shot_tokens`` tokens and C = H·D channels, i.e.
    ``layers · 2 (K and V) · G · shots · round(r · T·h·w) · H · D · b``; G = 2: the two CFG passes write
    the batched layout's two groups."""
    tokens = shot_tokens(shot_frames, height, width)
    return bank_bytes_per_step(
        [(tokens, heads * head_dim)] * layers,
        keeps="ours",
        frames=shots,
        groups=groups,
        rate=rate,
        itemsize=itemsize,
    )


def transfer_seconds(nbytes: int, bytes_per_second: float) -> float:
    """``nbytes`` over a link of ``bytes_per_second`` (no latency, no overlap): the README's link times."""
    return nbytes / bytes_per_second


def leader_first(partition: Partition, action):
    """Run ``action()`` on rank 0 only and tell every rank how it went: its result on rank 0 (None
    elsewhere); if it raised, rank 0 re-raises and the others raise a RuntimeError saying so — never
    waiting forever for a rank that gave up."""
    result, error = None, None
    if partition.leader:
        try:
            result = action()
        except Exception as exc:  # every rank must hear about it before anyone raises
            error = exc
    if partition.distributed:
        box = [None if error is None else f"{type(error).__name__}: {error}"]
        communicate(partition, "starting the run", lambda: dist.broadcast_object_list(box, src=0))
        if box[0] is not None and error is None:
            raise RuntimeError(f"rank 0 could not start the run: {box[0]}")
    if error is not None:
        raise error
    return result


STORY_HINT = "the exchange passed its timeout (--dist-timeout); finished frames stay on disk"


def communicate(partition: Partition, what: str, call, hint: str = STORY_HINT):
    """``call()`` (a collective or point-to-point exchange), with a clear error when a peer is gone;
    ``hint``: what else may have happened and what is kept (default: a story run's)."""
    try:
        return call()
    except (RuntimeError, dist.DistError) as exc:
        raise RuntimeError(
            f"rank {partition.rank} of {partition.world}: {what} failed — another rank stopped or {hint} "
            f"({exc})"
        ) from exc


def bank_owners(partition: Partition, characters: list[str], sharing: str) -> dict[str, int]:
    """The rank that writes (and decodes, and saves) each character's identity frames. "broadcast": the
    characters dealt over the ranks in contiguous blocks, so each rank denoises only its characters'
    identity frames (a character's identity frames stay one batch: they attend to each other at every
    layer, so splitting them would need an exchange per layer); "recompute": every rank writes every bank
    and rank 0 owns the frames."""
    if sharing != "broadcast" or not partition.distributed:
        return dict.fromkeys(characters, 0)
    return {
        name: rank
        for rank, (start, stop) in enumerate(partition.blocks(len(characters)))
        for name in characters[start:stop]
    }


def share_banks(
    partition: Partition,
    bank,
    owners: dict[str, int],
    step: int | None = None,
    segments: dict | None = None,
) -> int:
    """Each character's bank (one ``step``, or every step) from the rank that owns it into every rank's
    ``bank``; returns the bytes this rank received. Per owner the keys and shapes go first (one small
    object), then one flat buffer per character and step, through the backend's device (NCCL: this rank's
    GPU; gloo: the CPU). ``segments``: the state's ``bank_segments`` (bounded attention: the banked tokens'
    characters, keyed (character, step, level, tokens)); the owner's entries of the shared banks travel
    with the keys (small integer tensors), so a rank reading another's bank bounds it as its writer did."""
    transport = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    received = 0
    for source in sorted(set(owners.values())):
        grouped: dict[tuple[str, int], list] = {}  # on the source: (character, step) -> [(layer, k, v)]
        theirs: dict[tuple, torch.Tensor] = {}  # on the source: the shared banks' token segments
        if partition.rank == source:
            mine = {name for name, rank in owners.items() if rank == source}
            for name in mine:
                for at, layer, k, v in bank.entries(name, step):
                    grouped.setdefault((name, at), []).append((layer, k, v))
            for key, ids in (segments or {}).items():
                if key[0] in mine and (step is None or key[1] == step):
                    theirs[key] = ids.cpu()
        layout = [
            (name, at, [(layer, tuple(k.shape), tuple(v.shape), _dtype_name(k)) for layer, k, v in pairs])
            for (name, at), pairs in grouped.items()
        ]
        box = [layout, theirs]  # (character, step, [(layer, k shape, v shape, dtype)]); token segments
        communicate(
            partition, "sharing the banks", lambda b=box, s=source: dist.broadcast_object_list(b, src=s)
        )
        if partition.rank != source and segments is not None:
            segments.update(box[1])
        for name, at, rows in box[0]:
            if partition.rank == source:  # one (character, step) at a time: never a second copy of a bank
                parts = [t.reshape(-1).view(torch.uint8) for _, k, v in grouped[(name, at)] for t in (k, v)]
                flat = torch.cat([p.to(transport) if transport is not None else p.cpu() for p in parts])
            else:
                size = sum(
                    _nbytes(shape, dtype)
                    for _, k_shape, v_shape, dtype in rows
                    for shape in (k_shape, v_shape)
                )
                flat = torch.empty(size, dtype=torch.uint8, device=transport or "cpu")
            communicate(partition, "sharing the banks", lambda t=flat, s=source: dist.broadcast(t, src=s))
            if partition.rank == source:
                continue
            offset = 0
            for layer, k_shape, v_shape, dtype in rows:
                pair = []
                for shape in (k_shape, v_shape):
                    nbytes = _nbytes(shape, dtype)
                    pair.append(flat[offset : offset + nbytes].view(getattr(torch, dtype)).view(shape))
                    offset += nbytes
                bank.store(name, at, layer, *pair)
            received += flat.numel()
    return received


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * getattr(torch, dtype).itemsize
