"""The identity bank: sampled, already-projected K/V of each character's identity frames.

Written while a character's identity frames are denoised together, read by every later frame that shows
the character. Per character, per denoising step, per layer it holds ``(k, v)`` of shape
(groups, H, M, D): groups = 2 under classifier-free guidance (uncond, cond), M = identity frames x sampled
tokens. Compared with the official banks (full hidden states, or sampled hidden states re-projected on
every read), it stores only sampled tokens, already as K/V, in the compute dtype; with ``offload`` they
live in pinned CPU memory and the next layer's tensors are copied to the GPU while this layer computes.

Two-pass CFG (``state.CfgPass``: one denoiser call per group) hands each group in its own call
(``store_group``); the entry appears, in the batched layout, once every group is in, so a bank written
either way has the same layout and signature, and either kind of run reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..support.atomic import atomic_path

BANK_FORMAT = "storydiff-bank-v2"
# What a bank must agree on with the run that reads it; each is recorded when the bank is written.
SIGNATURE_KEYS = ("architecture", "layers", "num_inference_steps", "timesteps", "cfg_groups", "rope")
# what a key means in a bank written before it was recorded (banks from RoPE hosts kept source positions)
_UNRECORDED = {"rope": "source"}


def read_bank_header(path: str | Path) -> dict:
    """A bank file's metadata (``character``, ``description``, its signature...) without reading tensors.

    ValueError naming the file when it is missing, not safetensors, or not a bank of this version.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"bank file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ValueError(
            f"{path} is not a storydiff bank file (not readable as safetensors: {exc})"
        ) from None
    if header.get("format") != BANK_FORMAT:
        found = header.get("format")
        if isinstance(found, str) and found.startswith("storydiff-bank-"):
            raise ValueError(f"{path} was written by another storydiff version ({found}); write it again")
        raise ValueError(f"{path} is not a storydiff bank file")
    try:
        return {**json.loads(header.get("meta", "{}")), "character": header["character"]}
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: damaged bank header ({exc})") from None


def _default_mode(path: Path) -> None:
    """The permissions every other file gets (0666 less the umask; safetensors writes 0600)."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    path.chmod(0o666 & ~mask)


_LABELS = {
    "architecture": "model architecture",
    "num_inference_steps": "denoising steps (--steps)",
    "cfg_groups": "classifier-free guidance groups (--guidance above 1 or not)",
    "rope": "RoPE policy of borrowed keys (rope)",
}


def signature_differences(stored: dict, expected: dict) -> list[str]:
    """What a bank (``stored`` metadata) disagrees on with the run that wants it (``expected``)."""
    differences = []
    for key in SIGNATURE_KEYS:
        recorded = stored.get(key, _UNRECORDED.get(key))
        if key in expected and recorded != expected[key]:
            if key == "layers":
                theirs, ours = stored.get(key) or {}, expected[key]
                missing = sorted(set(ours) - set(theirs))
                shapes = sorted(n for n in set(ours) & set(theirs) if theirs[n] != ours[n])
                detail = f"{len(missing)} layer(s) missing, {len(shapes)} with other head shapes"
                if shapes:
                    detail += f" (e.g. {shapes[0]}: {theirs[shapes[0]]} vs {ours[shapes[0]]})"
                differences.append(f"attention layers: {detail}")
            elif key == "timesteps":
                differences.append("scheduler timesteps (another scheduler or step count)")
            else:
                label = _LABELS.get(key, key)
                differences.append(f"{label}: bank {recorded!r}, this run {expected[key]!r}")
    return differences


def _pair_bytes(pair: tuple[torch.Tensor, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in pair)


class IdBank:
    def __init__(self, *, offload: bool = False) -> None:
        self.offload = offload
        # character -> step -> layer -> (k, v)
        self._store: dict[str, dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = {}
        self._meta: dict[str, dict] = {}
        self._prefetched: dict[tuple[str, int, str], tuple[torch.Tensor, torch.Tensor, object]] = {}
        # (character, step, layer) -> {group: (k, v)}: CFG groups of a two-pass write not all in yet
        self._groups: dict[tuple[str, int, str], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._stream: torch.cuda.Stream | None = None
        # Memory as data: bytes alive now, the most alive at once, and bytes each character ever wrote
        # (equal under every schedule; a lockstep run frees each step's bank after reading it).
        self.live_bytes = 0
        self.peak_bytes = 0
        self._written: dict[str, int] = {}

    # -- writing -------------------------------------------------------------------------------------
    def clear(self, character: str) -> None:
        self.live_bytes -= self.nbytes(character)
        self._store.pop(character, None)
        self._meta.pop(character, None)
        self._written.pop(character, None)
        for key in [key for key in self._groups if key[0] == character]:
            del self._groups[key]

    def start(self, character: str) -> None:
        """Begin a fresh bank for ``character``: it exists from now on, even before (or without) any
        stored step, e.g. when every step of a short run falls in the warm-up."""
        self.clear(character)
        self._store[character] = {}

    def store(self, character: str, step: int, layer: str, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.offload and k.is_cuda:
            # stream-ordered copy into pinned memory: later kernels reuse k's memory only after it
            k, v = (
                torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                for t in (k, v)
            )
        layers = self._store.setdefault(character, {}).setdefault(step, {})
        if layer in layers:
            self.live_bytes -= _pair_bytes(layers[layer])
        layers[layer] = (k, v)
        self._account(character, _pair_bytes((k, v)))

    def store_group(
        self,
        character: str,
        step: int,
        layer: str,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        group: int,
        groups: int,
    ) -> None:
        """One CFG group's (1, H, M, D) tokens, from one pass of two-pass guidance. Once all ``groups`` of
        (character, step, layer) are in, they are stored as one (groups, H, M, D) entry in group order —
        the entry a batched [uncond; cond] write stores — and readers see it; until then nothing."""
        key = (character, step, layer)
        parts = self._groups.setdefault(key, {})
        parts[group] = (k, v)
        if len(parts) < groups:
            return
        del self._groups[key]
        if sorted(parts) != list(range(groups)):
            raise ValueError(
                f"CFG groups {sorted(parts)} of {character!r} at step {step}, {layer}: not 0..{groups - 1}"
            )
        ordered = [parts[g] for g in range(groups)]
        self.store(
            character, step, layer, torch.cat([k for k, _ in ordered]), torch.cat([v for _, v in ordered])
        )

    def drop_step(self, step: int, characters) -> None:
        """Free the characters' tokens of denoising ``step`` (a lockstep run, once the step is read)."""
        for character in characters:
            for pair in self._store.get(character, {}).pop(step, {}).values():
                self.live_bytes -= _pair_bytes(pair)
        for key in [key for key in self._groups if key[1] == step and key[0] in set(characters)]:
            del self._groups[key]

    def _account(self, character: str, nbytes: int) -> None:
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self._written[character] = self._written.get(character, 0) + nbytes

    def reset_peak(self) -> None:
        """Start measuring ``peak_bytes`` from what is alive now (e.g. at the start of a story)."""
        self.peak_bytes = self.live_bytes

    def written_bytes(self, character: str) -> int:
        """Bytes ``character``'s bank received since it was started or loaded (all steps, all layers)."""
        return self._written.get(character, 0)

    def set_metadata(self, character: str, **meta) -> None:
        self._meta.setdefault(character, {}).update(meta)

    # -- reading -------------------------------------------------------------------------------------
    @property
    def characters(self) -> list[str]:
        return list(self._store)

    def metadata(self, character: str) -> dict:
        return dict(self._meta.get(character, {}))

    def has(self, character: str) -> bool:
        return character in self._store

    def get(
        self, characters: tuple[str, ...], step: int, layer: str, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The characters' tokens for (step, layer) concatenated along M, on ``device``; None if absent."""
        parts = []
        for character in characters:
            entry = self._store.get(character, {}).get(step, {}).get(layer)
            if entry is None:
                return None
            parts.append(self._to_device(character, step, layer, entry, device))
        if len(parts) == 1:
            return parts[0]
        return torch.cat([k for k, _ in parts], dim=2), torch.cat([v for _, v in parts], dim=2)

    def entries(self, character: str, step: int | None = None):
        """(step, layer, k, v) of ``character``'s bank as stored (host or device), of one step or all."""
        steps = self._store.get(character, {})
        for at in [step] if step is not None else list(steps):
            for layer, (k, v) in steps.get(at, {}).items():
                yield at, layer, k, v

    def prefetch(self, characters: tuple[str, ...], step: int, layer: str, device: torch.device) -> None:
        """Start copying offloaded tensors to the GPU on a side stream (no-op unless offloaded + CUDA)."""
        if not (self.offload and device.type == "cuda"):
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        self._stream.wait_stream(torch.cuda.current_stream(device))  # pending offload copies land first
        for character in characters:
            entry = self._store.get(character, {}).get(step, {}).get(layer)
            key = (character, step, layer)
            if entry is None or key in self._prefetched:
                continue
            with torch.cuda.stream(self._stream):
                k, v = (t.to(device, non_blocking=True) for t in entry)
                event = torch.cuda.Event()
                event.record(self._stream)
            self._prefetched[key] = (k, v, event)

    def _to_device(self, character, step, layer, entry, device):
        prefetched = self._prefetched.pop((character, step, layer), None)
        if prefetched is not None:
            k, v, event = prefetched
            torch.cuda.current_stream(device).wait_event(event)
            # the copies were allocated on the side stream: tell the allocator they are used here now
            k.record_stream(torch.cuda.current_stream(device))
            v.record_stream(torch.cuda.current_stream(device))
            return k, v
        k, v = entry
        return k.to(device, non_blocking=True), v.to(device, non_blocking=True)

    # -- size and persistence ------------------------------------------------------------------------
    def nbytes(self, character: str | None = None) -> int:
        """Bytes alive now, of one character or of all."""
        names = [character] if character is not None else list(self._store)
        return sum(
            _pair_bytes(pair)
            for name in names
            for layers in self._store.get(name, {}).values()
            for pair in layers.values()
        )

    def save(self, character: str, path: str | Path) -> Path:
        """Write one character's bank as safetensors (tensors ``{step}/{layer}/k|v`` + JSON metadata)."""
        if character not in self._store:
            raise KeyError(f"no bank for character {character!r}; have {self.characters}")
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # offloaded tensors are filled by asynchronous copies
        tensors = {
            f"{step}/{layer}/{kind}": tensor.contiguous().cpu()
            for step, layers in self._store[character].items()
            for layer, pair in layers.items()
            for kind, tensor in zip("kv", pair, strict=True)
        }
        meta = {
            "format": BANK_FORMAT,
            "character": character,
            "meta": json.dumps(self._meta.get(character, {})),
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:  # a crash never leaves a truncated file under the final name
            save_file(tensors, str(tmp), metadata=meta)
            _default_mode(tmp)
        return path

    def load(self, path: str | Path, *, character: str | None = None, expected: dict | None = None) -> str:
        """Read a bank written by :meth:`save`; returns the character name it is stored under.

        Its metadata (character description, signature) comes back through :meth:`metadata`.
        ``expected``: signature values of the run that will read it (``SIGNATURE_KEYS``); a bank that
        disagrees on any of them is refused with a ValueError saying what differs.
        """
        meta = read_bank_header(path)
        differences = signature_differences(meta, expected or {})
        if differences:
            raise ValueError(
                f"bank {path} does not fit this run: " + "; ".join(differences) + " — write the bank again "
                "with this model and these settings"
            )
        name = character or meta["character"]
        self.clear(name)
        tensors = load_file(str(path))
        pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            step, layer, kind = key.split("/")
            pairs.setdefault((int(step), layer), {})[kind] = tensor.pin_memory() if self._pin() else tensor
        self._store[name] = {}
        for (step, layer), pair in sorted(pairs.items()):
            self._store[name].setdefault(step, {})[layer] = (pair["k"], pair["v"])
            self._account(name, _pair_bytes((pair["k"], pair["v"])))
        self._meta[name] = {k: v for k, v in meta.items() if k != "character"}
        return name

    def _pin(self) -> bool:
        return self.offload and torch.cuda.is_available()
