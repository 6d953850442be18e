"""CUDA graphs for one- and few-step generation (opt-in).

A one-step generator at small batch spends much of its time launching kernels from Python. Capturing the whole
call once with :class:`torch.cuda.CUDAGraph` and replaying it removes that overhead, at the price of static
shapes: the inputs are copied into buffers captured with the graph, and the outputs are buffers that the next
replay overwrites. Example with an exported class-conditional pipeline (eps-prediction teacher, one step)::

    pipe = DiffusionPipeline.from_pretrained(folder).to("cuda")
    schedule = from_diffusers(pipe.scheduler)
    timestep = pipe.config.trained_timesteps[0]
    alpha, sigma = step_coefficients(schedule, schedule.timestep_to_t(torch.full((8,), timestep)), "cuda")
    t = torch.full((8,), timestep, device="cuda")  # device tensors only: no host copies under capture
    labels = torch.arange(8, device="cuda") % 10

    def one_step(noise):
        eps = pipe.unet(noise, t, class_labels=labels).sample
        return fused_ddim_step(noise, eps, alpha, sigma, pred_type="eps")  # lands on x0

    generate = capture_generator(one_step, (torch.randn(8, 1, 16, 16, device="cuda"),))
    x0 = generate(torch.randn(8, 1, 16, 16, device="cuda")).clone()

Rules for ``fn``: only CUDA work on tensors that live as long as the returned object (inputs, captured
constants such as ``alpha`` above, module weights); no host synchronisation (``.item()``, printing tensors,
data-dependent Python branches), no CPU tensors, and no new shapes. Random numbers drawn inside ``fn`` are
redrawn at each replay (PyTorch registers the graph's generator state); passing the noise as an input is the
plainer way. Only the error path for non-CUDA inputs is covered by the CPU test suite.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["CapturedGenerator", "capture_generator"]


def _as_tuple(inputs) -> tuple:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, Sequence) and not isinstance(inputs, (str, bytes)):
        return tuple(inputs)
    raise TypeError(f"example_inputs must be a tensor or a sequence of tensors, got {type(inputs).__name__}")


class CapturedGenerator:
    """A captured static-shape callable: ``gen(*inputs)`` copies ``inputs`` into the captured buffers, replays
    the graph, and returns the captured output (overwritten by the next call; ``.clone()`` it to keep it)."""

    def __init__(self, graph: torch.cuda.CUDAGraph, static_inputs: tuple, static_output):
        self.graph = graph
        self.static_inputs = static_inputs
        self.static_output = static_output

    def __call__(self, *inputs):
        if len(inputs) != len(self.static_inputs):
            raise ValueError(f"the captured function takes {len(self.static_inputs)} inputs, got {len(inputs)}")
        for i, (new, buf) in enumerate(zip(inputs, self.static_inputs)):
            if not isinstance(new, torch.Tensor):
                raise TypeError(f"input {i} must be a tensor, got {type(new).__name__}")
            if new.shape != buf.shape or new.dtype != buf.dtype:
                raise ValueError(
                    f"input {i} has shape {tuple(new.shape)} and dtype {new.dtype}, but the graph was captured "
                    f"with shape {tuple(buf.shape)} and dtype {buf.dtype}; capture another graph for new shapes"
                )
            if new.data_ptr() != buf.data_ptr():
                buf.copy_(new)
        self.graph.replay()
        return self.static_output


def capture_generator(
    fn: Callable,
    example_inputs,
    *,
    warmup: int = 3,
    no_grad: bool = True,
    pool=None,
) -> CapturedGenerator:
    """Capture ``fn(*example_inputs)`` in a CUDA graph and return a :class:`CapturedGenerator` replaying it.

    ``example_inputs``: a CUDA tensor or a sequence of CUDA tensors fixing the shapes and dtypes of every later
    call. ``fn`` runs ``warmup`` times on a side stream first (cuDNN / Triton autotuning and lazy initialisation
    must happen outside the capture), then once under capture, under ``torch.no_grad()`` unless ``no_grad`` is
    False. ``pool``: a memory pool handle (``torch.cuda.graph_pool_handle()``) to share between graphs.
    Raises RuntimeError on CPU: CUDA graphs exist only for CUDA devices."""
    inputs = _as_tuple(example_inputs)
    if not inputs:
        raise ValueError("capture_generator needs at least one example input tensor")
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"example input {i} must be a tensor, got {type(t).__name__}")
        if not t.is_cuda:
            raise RuntimeError(
                f"capture_generator needs CUDA tensors (CUDA graphs exist only on CUDA devices); example input "
                f"{i} is on {t.device}. On CPU call the function directly."
            )
    if not torch.cuda.is_available():  # pragma: no cover - a CUDA tensor implies CUDA
        raise RuntimeError("capture_generator needs CUDA, which is not available")
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 (lazy initialisation cannot happen under capture), got {warmup}")

    static_inputs = tuple(t.detach().clone() for t in inputs)
    grad_ctx = torch.no_grad if no_grad else torch.enable_grad
    side = torch.cuda.Stream(device=static_inputs[0].device)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), grad_ctx():
        for _ in range(warmup):
            fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with grad_ctx(), torch.cuda.graph(graph, pool=pool):
        static_output = fn(*static_inputs)
    return CapturedGenerator(graph, static_inputs, static_output)
