"""LoRA adapters through peft: add one, switch adapters off (to reuse the frozen base as the teacher),
choose the active adapter, read / merge adapter weights.

peft's layer toggles also flip ``requires_grad`` on adapter weights; every context manager here restores
the flags it found, so the trainer's per-phase freezing is never undone by a teacher call."""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

# attention, projection, feed-forward, resnet and sampler convolutions, time embedding: the module names
# LCM-LoRA / DMD2 target in diffusers UNets and transformers (present names only are used)
DIFFUSERS_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)


def default_target_modules(net: torch.nn.Module) -> list[str]:
    """LoRA targets present in ``net``: the diffusers names above, else every Linear / Conv2d leaf."""
    names = [n for n, _ in net.named_modules()]
    found = sorted({t for t in DIFFUSERS_LORA_TARGETS if any(n == t or n.endswith("." + t) for n in names)})
    if found:
        return found
    leaves = [n for n, m in net.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    if not leaves:
        raise ValueError(f"{type(net).__name__} has no Linear or Conv2d layer to put LoRA on")
    return leaves


def tuner_layers(net: torch.nn.Module):
    return [m for m in net.modules() if isinstance(m, BaseTunerLayer)]


def adapter_names(net: torch.nn.Module) -> set[str]:
    names: set[str] = set()
    for m in tuner_layers(net):
        for layer_name in m.adapter_layer_names:
            names |= set(getattr(m, layer_name).keys())
    return names


def add_lora(
    net: torch.nn.Module,
    rank: int = 64,
    alpha: float | None = None,
    *,
    adapter_name: str = "default",
    target_modules=None,
    dropout: float = 0.0,
    init_lora_weights=True,
) -> torch.nn.Module:
    """Inject a LoRA adapter (peft) into ``net`` in place; only the new adapter's weights are trainable
    afterwards if the base was frozen. ``alpha`` defaults to ``rank`` (scale 1)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if adapter_name in adapter_names(net):
        raise ValueError(f"adapter {adapter_name!r} already exists on {type(net).__name__}")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        target_modules=list(target_modules or default_target_modules(net)),
        init_lora_weights=init_lora_weights,
    )
    flags = {p: p.requires_grad for p in net.parameters()}
    inject_adapter_in_model(config, net, adapter_name=adapter_name)
    _forget(net)
    set_active_adapter(net, adapter_name)
    # peft's layer toggles freeze every other adapter: put back the flags of everything that was already there
    # (the base and earlier adapters); the new adapter's weights are trainable
    for p in net.parameters():
        p.requires_grad_(flags[p] if p in flags else True)
    if not hasattr(net, "peft_config"):
        net.peft_config = {}
    net.peft_config[adapter_name] = config
    return net


class _AdapterState:
    """What the switches below need of a network, gathered once: its LoRA layers, their adapter weights (the only
    parameters peft's toggles touch), and the state the switches last set (active adapter, adapters off)."""

    def __init__(self, net: torch.nn.Module):
        self.layers = tuner_layers(net)
        self.params = [
            p for m in self.layers for n in m.adapter_layer_names for p in getattr(m, n).parameters()
        ]
        active = {tuple(m.active_adapters) for m in self.layers}
        self.active = next(iter(active)) if len(active) == 1 else None  # None: mixed, unknown
        off = {m.disable_adapters for m in self.layers}
        self.disabled = next(iter(off)) if len(off) == 1 else None


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _state(net: torch.nn.Module) -> _AdapterState:
    st = _STATES.get(net)
    if st is None:
        st = _STATES[net] = _AdapterState(net)
    return st


def _forget(net: torch.nn.Module) -> None:
    """Drop the cached state of ``net`` (call after adding, merging or removing adapter layers)."""
    _STATES.pop(net, None)


def _flags(st: _AdapterState):
    return [p.requires_grad for p in st.params]


def _restore(st: _AdapterState, flags) -> None:
    for p, f in zip(st.params, flags):
        if p.requires_grad != f:
            p.requires_grad_(f)


def set_active_adapter(net: torch.nn.Module, name: str) -> None:
    if name not in adapter_names(net):
        raise ValueError(f"no adapter named {name!r} on {type(net).__name__}; have {sorted(adapter_names(net))}")
    st = _state(net)
    for m in st.layers:
        m.set_adapter(name)
    st.active = (name,)


@contextmanager
def adapters_disabled(net: torch.nn.Module):
    """Run the bare base network: every LoRA adapter off (exactly the base's outputs), flags restored. Switches
    nothing when the adapters are off already."""
    st = _state(net)
    if st.disabled is True or not st.layers:
        yield net
        return
    flags = _flags(st)
    before = [m.disable_adapters for m in st.layers]
    try:
        for m in st.layers:
            m.enable_adapters(False)
        st.disabled = True
        yield net
    finally:
        for m, was_disabled in zip(st.layers, before):
            m.enable_adapters(not was_disabled)
        st.disabled = before[0] if len(set(before)) == 1 else None
        _restore(st, flags)


@contextmanager
def adapter_active(net: torch.nn.Module, name: str):
    """Make ``name`` the active adapter inside the block (grad flags and previous adapter restored). Switches
    nothing when ``name`` is the active adapter already."""
    st = _state(net)
    if st.active == (name,):
        yield net
        return
    flags = _flags(st)
    previous = [list(m.active_adapters) for m in st.layers]
    prev_state = st.active
    try:
        set_active_adapter(net, name)
        yield net
    finally:
        for m, prev in zip(st.layers, previous):
            m.set_adapter(prev)
        st.active = prev_state
        _restore(st, flags)


def lora_state_dict(net: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights in peft's naming (keys without the adapter name)."""
    if adapter_name not in adapter_names(net):
        raise ValueError(f"no adapter named {adapter_name!r} on {type(net).__name__}")
    return get_peft_model_state_dict(net, adapter_name=adapter_name)


def lora_parameters(net: torch.nn.Module, adapter_name: str) -> list[torch.nn.Parameter]:
    return [p for n, p in net.named_parameters() if f".{adapter_name}." in n and "lora_" in n]


@torch.no_grad()
def merge_lora(net: torch.nn.Module, adapter_name: str | None = None) -> torch.nn.Module:
    """Fold the adapter weights into the base layers and remove the adapter layers (in place).

    With several adapters on one base (a LoRA generator and a LoRA fake score), merging one would change
    what the others are applied to: merge a copy of the network instead (``copy.deepcopy``)."""
    present = adapter_names(net)
    if adapter_name is not None and adapter_name not in present:
        raise ValueError(f"no adapter named {adapter_name!r} on {type(net).__name__}; have {sorted(present)}")
    others = present - {adapter_name} if adapter_name else set()
    if others:
        raise ValueError(
            f"cannot merge {adapter_name!r} in place: the network also carries {sorted(others)}; "
            "merge a deep copy and delete the other adapters there"
        )
    for m in tuner_layers(net):
        m.merge(adapter_names=sorted(present))
    for key, _ in list(net.named_modules()):
        parent_key, _, child = key.rpartition(".")
        try:
            target = net.get_submodule(key)
        except AttributeError:
            continue
        if isinstance(target, BaseTunerLayer):
            parent = net.get_submodule(parent_key) if parent_key else net
            setattr(parent, child, target.get_base_layer())
    _forget(net)
    for attr in ("peft_config",):
        if hasattr(net, attr):
            delattr(net, attr)
    if hasattr(net, "_hf_peft_config_loaded"):
        net._hf_peft_config_loaded = False
    return net


@torch.no_grad()
def fold_lora_into_base(net: torch.nn.Module, adapter_name: str) -> int:
    """Add the adapter's update (scale * B @ A) into the base weights in place and restart the adapter at
    zero (B = 0, a fresh A): the network computes the same function afterwards, and the next round of
    LoRA training starts on the merged base (LoRA-enhanced progressive distillation). Returns the number
    of layers folded."""
    n = 0
    for m in tuner_layers(net):
        if adapter_name not in getattr(m, "lora_A", {}):
            continue
        if adapter_name in getattr(m, "merged_adapters", []):
            raise ValueError(f"adapter {adapter_name!r} is merged already; unmerge it before folding")
        base = m.get_base_layer()
        base.weight.data += m.get_delta_weight(adapter_name).to(base.weight.dtype)
        flags = {id(p): p.requires_grad for p in m.parameters()}
        m.reset_lora_parameters(adapter_name, True)
        for p in m.parameters():
            p.requires_grad_(flags.get(id(p), p.requires_grad))
        n += 1
    if n == 0:
        raise ValueError(f"no LoRA layer carries adapter {adapter_name!r}")
    return n
