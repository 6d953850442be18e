"""Run a network only as far as one of its layers (the GAN head's input: a UNet's mid block, a transformer's
configured block) and return that layer's output, skipping everything after it: the output is the very tensor
a full forward computes there (same code path, same autograd graph), at the cost of the layers before it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .denoiser import Denoiser


class _Reached(Exception):
    def __init__(self, value):
        super().__init__()
        self.value = value


def run_to(module: nn.Module, call: Callable[[], object]):
    """Call ``call()`` (a forward of a network containing ``module``) and stop it as soon as ``module`` has
    returned: returns ``module``'s output. Raises RuntimeError when the forward never runs ``module``."""

    def stop(m, args, out):
        raise _Reached(out)

    handle = module.register_forward_hook(stop)
    try:
        call()
    except _Reached as reached:
        value, reached.value = reached.value, None
        return value
    finally:
        handle.remove()
    raise RuntimeError(f"the forward never reached {type(module).__name__}")


def can_stop_early(net: nn.Module) -> bool:
    """Whether a forward of ``net`` may be cut short: a plain module or a DDP one (called unwrapped; the grads of
    the layers it runs reach DDP's reducer with those of the full forwards of the same backward). Sharded
    wrappers (FSDP) gather their weights in forward hooks that a cut-short forward would leave unbalanced."""
    return (
        not isinstance(net, nn.Module)
        or getattr(net, "module", None) is None
        or isinstance(net, DistributedDataParallel)
    )


def _block_feature(out):
    """A block's output as one tensor: a UNet down block's hidden states (not its skip tuple), an SD3 block's
    image stream (the last of its pair), else the output itself."""
    if isinstance(out, (tuple, list)):
        out = out[0] if torch.is_tensor(out[0]) and out[0].ndim == 4 else out[-1]
    return out


class _Tapped(Exception):
    pass


def teacher_features(teacher: Denoiser, modules: list[nn.Module], x_t, t, cond) -> list[torch.Tensor]:
    """Outputs of ``modules`` (blocks of the teacher's net, in forward order) in one teacher forward at
    (x_t, t, cond), with the gradient w.r.t. x_t (the teacher's weights are frozen; a teacher sharing its base
    with a LoRA student runs with the adapters off). The forward stops after the last of them when the network
    allows it (:func:`can_stop_early`). The feature networks of LADD's and PCM's discriminators."""
    feats: dict[int, torch.Tensor] = {}
    last = len(modules) - 1
    early = can_stop_early(teacher.net)

    def hook(i):
        def keep(module, inputs, output):
            feats[i] = _block_feature(output)
            if early and len(feats) == len(modules) and i == last:
                raise _Tapped

        return keep

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        with torch.enable_grad():
            Denoiser.raw(teacher, x_t, t, cond)
    except _Tapped:
        pass
    finally:
        for h in handles:
            h.remove()
    return [feats[i] for i in range(len(modules))]
