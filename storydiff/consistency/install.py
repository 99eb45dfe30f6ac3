"""Installing consistent attention on a denoiser described by a ``Host``, and removing it again.

A ``Host`` is what a model family (``families/``) says about its denoiser: which attention modules get
consistency by default (and why), the level each sits at (its downsampling factor relative to the image,
which ``ConsistencyConfig.level_rates`` keys), and which processor replaces the host's own there. Nothing
here knows a model family: ``families.attach`` asks the registry for the host and calls :func:`install`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .config import DEFAULT_RATE, ConsistencyConfig, InvalidSetting
from .processors import BINDING_ATTR, Binding, BoundProcessor
from .state import ConsistencyState, LayerInfo

_STATE_ATTR = "_storydiff_consistency"  # set on the denoiser so uninstall can undo


@dataclass(frozen=True)
class Host:
    family: str
    denoiser: torch.nn.Module
    presets: dict[str, Callable[[str], bool]]  # preset name -> which attention processors it selects
    level: Callable[[str], int | None]  # processor name -> level factor; None: never consistent
    # processor name -> our processor class for it (processors.BoundProcessor), built as
    # (state, layer, **options) — or with no arguments by diffusers, reading the module's binding
    processor: Callable[[str], type]
    rope: bool = False  # rotary position embeddings on the keys: ConsistencyConfig.rope applies
    options: dict = field(default_factory=dict)  # keyword options every processor of this host takes
    # further denoisers of the same architecture that run other steps of the same story (Wan 2.2's
    # low-noise expert): they get the same layers' processors, bound to the same state
    experts: tuple[torch.nn.Module, ...] = ()
    # the rate a config without one (ConsistencyConfig.rate None) gets on this host
    default_rate: float = DEFAULT_RATE


def selector(host: Host, config: ConsistencyConfig) -> Callable[[str], bool]:
    """Which attention processors of ``host`` ``config.layers`` selects (``InvalidSetting`` for a preset
    the family does not have)."""
    layers = config.layers
    if callable(layers):
        return lambda name: host.level(name) is not None and bool(layers(name))
    if isinstance(layers, list):
        return lambda name: host.level(name) is not None and name in layers
    if layers not in host.presets:
        raise InvalidSetting(
            "layers",
            f"{layers!r} is not a preset of {host.family} denoisers; choose from "
            f"{', '.join(host.presets)}, a list of processor names, or a predicate",
        )
    chosen = host.presets[layers]
    return lambda name: host.level(name) is not None and chosen(name)


def host_signature(denoiser, layers: list[LayerInfo]) -> dict:
    """What identifies the denoiser for an identity bank: its class and configuration (a hash: same for
    every checkpoint of one architecture) and each consistent layer's [heads, head dim]."""
    config = {k: v for k, v in dict(denoiser.config).items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    shapes = {}
    for layer in layers:
        attn = denoiser.get_submodule(layer.name.removesuffix(".processor"))
        shapes[layer.name] = [attn.heads, attn.to_k.out_features // attn.heads]
    return {"architecture": f"{type(denoiser).__name__}:{digest}", "layers": shapes}


def install(host: Host, config: ConsistencyConfig) -> ConsistencyState:
    """Install consistent-attention processors on the layers of ``host`` that ``config`` selects; returns
    the state. Installing again replaces the previous installation (its state is discarded)."""
    if config.rope != "source" and not host.rope:
        raise InvalidSetting(
            "rope",
            f"applies to RoPE hosts only (FLUX, Qwen-Image); this {host.family} denoiser has no rotary "
            "position embedding, so borrowed keys carry no position to move: use 'source', "
            f"got {config.rope!r}",
        )
    config = config.with_default_rate(host.default_rate)
    denoiser = host.denoiser
    if hasattr(denoiser, _STATE_ATTR):
        uninstall(denoiser)
    chosen = selector(host, config)
    original = dict(denoiser.attn_processors)
    layers = []
    for name in original:  # attn_processors lists layers in module order, which is forward order
        if chosen(name):
            layers.append(LayerInfo(name=name, index=len(layers), level=host.level(name)))
    if isinstance(config.layers, list):
        unknown = sorted(set(config.layers) - {layer.name for layer in layers})
        if unknown:
            raise ValueError(
                f"config.layers names no consistent-capable attention processor of this {host.family} "
                f"denoiser: {unknown[:3]}"
            )
    if not layers:
        raise ValueError(f"config.layers selects no attention layer of this {host.family} denoiser")
    offload = config.offload_bank if config.offload_bank is not None else denoiser.device.type == "cuda"
    state = ConsistencyState(config, layers, offload_bank=offload)
    state.host = host_signature(denoiser, layers)
    if host.rope:  # a bank holds keys where this policy put them: reading it under another would mislead
        state.host["rope"] = config.rope
    for expert in host.experts:
        if list(expert.attn_processors) != list(original):
            raise ValueError(
                f"the {host.family} experts differ in their attention layers: one state cannot serve both"
            )
        if hasattr(expert, _STATE_ATTR):
            uninstall(expert)
    for module in (denoiser, *host.experts):
        _install_on(module, host, state, layers)
    return state


def _install_on(denoiser, host: Host, state: ConsistencyState, layers: list[LayerInfo]) -> None:
    original = dict(denoiser.attn_processors)
    processors = dict(original)
    for layer in layers:
        binding = Binding(state, layer, dict(host.options))
        # read by processors diffusers rebuilds without arguments (load_ip_adapter): see BoundProcessor
        setattr(denoiser.get_submodule(layer.name.removesuffix(".processor")), BINDING_ATTR, binding)
        processors[layer.name] = host.processor(layer.name)(state, layer, **host.options)
    denoiser.set_attn_processor(processors)
    # the text length of joint sequences, for blocks that only see them concatenated (FLUX single-stream)
    hook = denoiser.register_forward_pre_hook(state.record_text_length, with_kwargs=True)
    experts = host.experts if denoiser is host.denoiser else ()
    setattr(denoiser, _STATE_ATTR, (state, original, hook, experts))


def installed_state(denoiser) -> ConsistencyState | None:
    """The state :func:`install` put on ``denoiser`` (a ``torch.compile``'d one: its module's), or None."""
    installed = getattr(getattr(denoiser, "_orig_mod", denoiser), _STATE_ATTR, None)
    return None if installed is None else installed[0]


def replaced(denoiser) -> list[str]:
    """Consistent layers whose processor something else replaced after :func:`install` (e.g. FLUX's
    ``load_ip_adapter`` puts its own on the double-stream blocks): consistency is off there."""
    installed = getattr(denoiser, _STATE_ATTR, None)
    if installed is None:
        return []
    processors = denoiser.attn_processors
    return [
        layer.name for layer in installed[0].layers if not isinstance(processors[layer.name], BoundProcessor)
    ]


def uninstall(denoiser) -> None:
    """Undo :func:`install`: the layers it installed on get back the processors they had before; every
    other layer keeps what it has now (e.g. the IP-Adapter processors ``load_ip_adapter`` put on the
    cross-attention layers since)."""
    installed = getattr(denoiser, _STATE_ATTR, None)
    if installed is None:
        return
    state, original, hook, experts = installed
    for expert in experts:
        uninstall(expert)
    processors = dict(denoiser.attn_processors)
    for layer in state.layers:
        if isinstance(processors[layer.name], BoundProcessor):  # ours, or diffusers' rebuild of ours
            processors[layer.name] = original[layer.name]
        module = denoiser.get_submodule(layer.name.removesuffix(".processor"))
        if hasattr(module, BINDING_ATTR):
            delattr(module, BINDING_ATTR)
    denoiser.set_attn_processor(processors)
    hook.remove()
    delattr(denoiser, _STATE_ATTR)
