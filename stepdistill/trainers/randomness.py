"""Randomness that does not depend on the number of processes.

Inside a training step, every ``torch.randn / rand / randint / multinomial`` (and ``*_like``) call without an explicit
generator is served by :class:`GlobalBatchRandom`: one CPU generator, seeded by (seed, step, micro-batch) and
identical on every process, draws for the GLOBAL batch, and each process keeps the rows of the samples it
holds (the data sampler deals global position p to process p % world). So sample p meets the same noise,
timestep and guidance scale whether the step runs on 1 process or on N: a DDP run matches a single-process
run of the same global batch (up to the order of floating-point sums), every process stays in step with the
others, and a resumed run redraws exactly what the interrupted one drew.

A draw whose first dimension is the per-process batch is a per-sample draw; any other draw (a shared index,
a scalar) is drawn once and is the same on every process.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_SIZED = {torch.randn, torch.rand}
_LIKE = {torch.randn_like, torch.rand_like}


def _size(args, kwargs):
    if "size" in kwargs:
        return tuple(kwargs["size"])
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        return tuple(args[0])
    return tuple(int(a) for a in args)


class GlobalBatchRandom(TorchFunctionMode):
    """See the module docstring. ``rank`` / ``world``: this process and the number of processes;
    ``per_device``: samples per process in a micro-batch."""

    def __init__(self, seed: int, rank: int, world: int, per_device: int):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)
        self.rank, self.world, self.per_device = rank, world, per_device

    def _draw(self, kind: str, size, dtype, device, low=0, high=None):
        size = tuple(size)
        per_sample = len(size) > 0 and size[0] == self.per_device
        full = (self.per_device * self.world, *size[1:]) if per_sample else size
        if kind == "randint":
            out = torch.randint(low, high, full, generator=self.generator, dtype=dtype or torch.int64)
        else:
            fn = torch.randn if kind == "randn" else torch.rand
            out = fn(full, generator=self.generator, dtype=dtype or torch.get_default_dtype())
        if per_sample:
            out = out[self.rank :: self.world]
        return out.to(device) if device is not None else out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("generator") is None and kwargs.get("out") is None:
            if func in _SIZED:
                kind = "randn" if func is torch.randn else "rand"
                out = self._draw(kind, _size(args, kwargs), kwargs.get("dtype"), kwargs.get("device"))
                return out.requires_grad_(True) if kwargs.get("requires_grad") else out
            if func in _LIKE:
                x = args[0]
                kind = "randn" if func is torch.randn_like else "rand"
                return self._draw(kind, x.shape, kwargs.get("dtype") or x.dtype, kwargs.get("device") or x.device)
            if func is torch.multinomial:
                probs, n = args[0], (args[1] if len(args) > 1 else kwargs["num_samples"])
                replacement = args[2] if len(args) > 2 else kwargs.get("replacement", False)
                per_sample = n == self.per_device and probs.ndim == 1 and replacement
                full = n * self.world if per_sample else n
                out = torch.multinomial(probs.cpu(), full, replacement, generator=self.generator)
                return (out[self.rank :: self.world] if per_sample else out).to(probs.device)
            if func is torch.randint:
                rest = dict(kwargs)
                pos = list(args)
                size = rest.pop("size", None)
                if size is None:
                    size = pos.pop()
                if len(pos) == 2:
                    low, high = pos
                elif len(pos) == 1:
                    low, high = rest.pop("low", 0), pos[0]
                else:
                    low, high = rest.pop("low", 0), rest.pop("high")
                return self._draw("randint", size, rest.get("dtype"), rest.get("device"), low=low, high=high)
        return func(*args, **kwargs)
