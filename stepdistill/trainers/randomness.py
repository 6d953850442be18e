"""Randomness that does not depend on the number of processes.

A training step draws its random numbers through this module's ``randn / rand / randint / multinomial /
randn_like / rand_like`` (torch's signatures). With ``generator=None`` inside a step they are served by the step's
:class:`GlobalBatchRandom`: one CPU generator, seeded by (seed, step, micro-batch) and identical on every
process, draws for the GLOBAL batch, and each process keeps the rows of the samples it holds (the data sampler
deals global position p to process p % world). So sample p meets the same noise, timestep and guidance scale
whether the step runs on 1 process or on N: a DDP run matches a single-process run of the same global batch (up
to the order of floating-point sums), every process stays in step with the others, and a resumed run redraws
exactly what the interrupted one drew. Outside a step (or with an explicit ``torch.Generator``) they are torch's
own functions. Nothing else is intercepted: a draw made with ``torch.randn`` directly inside a step uses torch's
global generator and breaks that parity (tests/test_hot_path.py checks that a step leaves it untouched).

A draw whose first dimension is the per-process batch is a per-sample draw; any other draw (a shared index,
a scalar) is drawn once and is the same on every process.
"""

from __future__ import annotations

import torch

_ACTIVE: GlobalBatchRandom | None = None


class GlobalBatchRandom:
    """See the module docstring. ``rank`` / ``world``: this process and the number of processes;
    ``per_device``: samples per process in a micro-batch. ``with rng:`` makes it the step's generator."""

    def __init__(self, seed: int, rank: int, world: int, per_device: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.rank, self.world, self.per_device = rank, world, per_device
        self._outer: list = []

    def __enter__(self):
        global _ACTIVE
        self._outer.append(_ACTIVE)
        _ACTIVE = self
        return self

    def __exit__(self, *exc):
        global _ACTIVE
        _ACTIVE = self._outer.pop()
        return False

    def _per_sample(self, size: tuple) -> tuple[bool, tuple]:
        per_sample = len(size) > 0 and size[0] == self.per_device
        return per_sample, ((self.per_device * self.world, *size[1:]) if per_sample else size)

    def draw(self, kind: str, size, dtype=None, device=None, low=0, high=None) -> torch.Tensor:
        per_sample, full = self._per_sample(tuple(size))
        if kind == "randint":
            out = torch.randint(low, high, full, generator=self.generator, dtype=dtype or torch.int64)
        else:
            fn = torch.randn if kind == "randn" else torch.rand
            out = fn(full, generator=self.generator, dtype=dtype or torch.get_default_dtype())
        if per_sample:
            out = out[self.rank :: self.world]
        return out.to(device) if device is not None else out

    def multinomial(self, probs: torch.Tensor, n: int, replacement: bool = False) -> torch.Tensor:
        per_sample = n == self.per_device and probs.ndim == 1 and replacement
        out = torch.multinomial(probs.cpu(), n * self.world if per_sample else n, replacement, generator=self.generator)
        return (out[self.rank :: self.world] if per_sample else out).to(probs.device)


def active() -> GlobalBatchRandom | None:
    """The step's generator, or None outside a training step."""
    return _ACTIVE


def _pick(generator):
    return _ACTIVE if generator is None else generator


def _size(size) -> tuple:
    if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
        return tuple(size[0])
    return tuple(int(s) for s in size)


def _sized(kind: str, size, generator, dtype, device, requires_grad):
    g = _pick(generator)
    if isinstance(g, GlobalBatchRandom):
        out = g.draw(kind, _size(size), dtype, device)
        return out.requires_grad_(True) if requires_grad else out
    fn = torch.randn if kind == "randn" else torch.rand
    return fn(_size(size), generator=g, dtype=dtype, device=device, requires_grad=requires_grad)


def randn(*size, generator=None, dtype=None, device=None, requires_grad=False) -> torch.Tensor:
    return _sized("randn", size, generator, dtype, device, requires_grad)


def rand(*size, generator=None, dtype=None, device=None, requires_grad=False) -> torch.Tensor:
    return _sized("rand", size, generator, dtype, device, requires_grad)


def _like(kind: str, x, generator, dtype, device):
    g = _pick(generator)
    if isinstance(g, GlobalBatchRandom):
        return g.draw(kind, x.shape, dtype or x.dtype, device or x.device)
    fn = torch.randn if kind == "randn" else torch.rand
    return fn(x.shape, generator=g, dtype=dtype or x.dtype, device=device or x.device)


def randn_like(x: torch.Tensor, *, generator=None, dtype=None, device=None) -> torch.Tensor:
    return _like("randn", x, generator, dtype, device)


def rand_like(x: torch.Tensor, *, generator=None, dtype=None, device=None) -> torch.Tensor:
    return _like("rand", x, generator, dtype, device)


def randint(*args, size=None, generator=None, dtype=None, device=None) -> torch.Tensor:
    """``randint(high, size)`` or ``randint(low, high, size)``, as torch.randint."""
    args = list(args)
    if size is None:
        size = args.pop()
    low, high = (0, args[0]) if len(args) == 1 else args
    g = _pick(generator)
    if isinstance(g, GlobalBatchRandom):
        return g.draw("randint", size, dtype, device, low=low, high=high)
    return torch.randint(low, high, tuple(size), generator=g, dtype=dtype or torch.int64, device=device)


def multinomial(probs: torch.Tensor, num_samples: int, replacement: bool = False, *, generator=None):
    g = _pick(generator)
    if isinstance(g, GlobalBatchRandom):
        return g.multinomial(probs, num_samples, replacement)
    return torch.multinomial(probs, num_samples, replacement, generator=g)
