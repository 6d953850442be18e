"""Run a network only as far as one of its layers (the GAN head's input: a UNet's mid block, a transformer's
configured block) and return that layer's output, skipping everything after it: the output is the very tensor
a full forward computes there (same code path, same autograd graph), at the cost of the layers before it."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.nn.parallel import DistributedDataParallel


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
