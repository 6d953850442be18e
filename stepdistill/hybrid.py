"""Diversity distillation (Gandikota & Bau 2025, arXiv 2503.10637): hybrid sampling, teacher first, student after.

Distilled students lose sample diversity, and their structure is fixed by their first step. Running the teacher
for the first ``k`` steps (with its classifier-free guidance) and handing the latent to the student restores the
teacher's diversity at nearly the student's cost.

**The hand-over rule.** Times are the teacher's discrete timesteps (0 .. T-1; for EDM students the Karras-grid
index the export stores). With the student's trained timesteps tau_0 > ... > tau_{N-1} and the teacher's grid
g_0 > g_1 > ... (by default the student's own trained timesteps; else the teacher's ``M``-step trailing DDIM grid,
cut to the points below tau_0 and started at tau_0):

* the teacher evaluates at g_0 .. g_{k-1} (deterministic DDIM steps, x0 and eps from its own prediction);
* where its k-th step would end, at g_k (or at x0 when the grid has no g_k), the student takes over at its first
  trained timestep at or below it: j = min{ i : tau_i <= g_k }, and the teacher's k-th step lands exactly on
  tau_j (a DDIM step from g_{k-1} to tau_j). The student then runs its own trained steps tau_j .. tau_{N-1} with
  its own update rule (re-noising or deterministic), exactly as its plain call would from there.

So the latent the student receives is at the noise level of a trained timestep, never re-noised up nor evaluated
off its grid. (The official scripts pick the hand-over by the nearest base timestep, which with some scheduler
pairs runs no base step at all; see shared/reference/seed_methods_2.md section 5.) ``k = 0`` is the student alone,
bit for bit. A 1-step student has no trained timestep below tau_0, so any ``k >= 1`` is refused (with a
ValueError naming the timesteps): hybrid sampling needs a multi-step student.

A LoRA student shares its base with the teacher: :func:`lora_teacher` wraps the student's own network as the
teacher (every adapter switched off for the teacher's calls), so no second copy of the weights is loaded.
"""

from __future__ import annotations

import inspect
import json
from contextlib import contextmanager

import torch

from .sampling import ddim_step


def handover(trained, k: int, teacher_grid=None) -> tuple[list[float], int]:
    """The hand-over rule (module docstring). ``trained``: the student's trained timesteps, noisiest first;
    ``teacher_grid``: the teacher's timesteps (default: ``trained``). Returns ``(times, j)``: the teacher
    evaluates at ``times[:-1]`` and its last step lands on ``times[-1] == trained[j]``; the student runs from
    index ``j``. ``k = 0`` returns ``([], 0)``."""
    trained = [float(t) for t in trained]
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"teacher steps must be an integer >= 0, got {k!r}")
    if any(b >= a for a, b in zip(trained, trained[1:])):
        raise ValueError(f"trained timesteps must be decreasing, got {trained}")
    if k == 0:
        return [], 0
    grid = trained if teacher_grid is None else [float(g) for g in teacher_grid]
    path = [trained[0]] + sorted({g for g in grid if g < trained[0]}, reverse=True)
    stop = path[k] if k < len(path) else float("-inf")  # where the teacher's k-th step would end
    later = [i for i, tau in enumerate(trained) if tau <= stop + 1e-9]
    if not later:
        where = f"timestep {stop:g}" if k < len(path) else "x0"
        shown = [round(t, 4) if t % 1 else int(t) for t in trained]
        raise ValueError(
            f"{k} teacher step(s) end at {where}, below the student's last trained timestep {trained[-1]:g} "
            f"(trained timesteps {shown}): no student step is left; use fewer teacher steps (at most "
            f"{_max_steps(trained, path)})"
        )
    j = later[0]
    return path[:k] + [trained[j]], j


def _max_steps(trained, path) -> int:
    return sum(1 for g in path[1:] if g >= trained[-1] - 1e-9)


def teacher_grid_timesteps(teacher, num_steps: int) -> list[float]:
    """The teacher's ``num_steps``-step trailing DDIM grid as teacher timesteps (for ``teacher_timesteps=``)."""
    sched = teacher.schedule
    return [float(v) for v in sched.t_to_timestep(sched.timesteps(num_steps))]


@torch.no_grad()
def teacher_prefix(
    teacher,
    x: torch.Tensor,
    trained,
    k: int,
    class_labels=None,
    guidance_scale: float = 1.0,
    teacher_timesteps=None,
    trace: list | None = None,
) -> tuple[torch.Tensor, int]:
    """Run the teacher's ``k`` steps from ``x`` (the student's initial sample at ``trained[0]``) and return the
    latent at the hand-over timestep and the student's index ``j`` there (:func:`handover`). ``teacher`` is a
    :class:`stepdistill.models.Teacher`; ``class_labels`` (B,) int labels (UNet2DModel or DiT teacher), a
    :class:`~stepdistill.models.conditioning.Cond` (text: :class:`~stepdistill.models.conditioning.TextConditioner`)
    or None; ``guidance_scale`` the teacher's CFG scale. ``trace`` (a list) receives the teacher's predicted x0
    at each of its steps."""
    from .models.conditioning import Cond

    times, j = handover(trained, k, teacher_timesteps)
    if not times:
        return x, 0
    cond = class_labels
    if class_labels is not None and not isinstance(class_labels, Cond):
        cond = class_cond(teacher.net, torch.as_tensor(class_labels).to(x.device))
    sched = teacher.schedule
    ts = sched.timestep_to_t(torch.tensor(times, dtype=torch.float64)).to(x.device)
    b = x.shape[0]
    for i in range(len(ts) - 1):
        t, t_next = ts[i].expand(b), ts[i + 1].expand(b)
        pred = teacher.raw(x, t, cond, guidance_scale)
        x0, eps = sched.to_x0_eps(pred, x, t, teacher.prediction_type)
        if trace is not None:
            trace.append(x0.detach().float().cpu())
        x = ddim_step(sched, x0, eps, t, t_next).to(x.dtype)
    return x, j


def class_cond(net, labels):
    """The :class:`~stepdistill.models.conditioning.Cond` of int ``labels`` for a class-conditional UNet2DModel or
    DiT (null class: the network's extra row, for CFG)."""
    from .models.conditioning import ClassConditioner
    from .models.denoiser import _DIT_CLASSES, _unwrap

    inner = _unwrap(net)
    make = ClassConditioner.for_dit if type(inner).__name__ in _DIT_CLASSES else ClassConditioner.for_unet2d
    return make(inner)(labels)


# text-to-image pipelines: keyword arguments whose meaning the teacher's prefix would not share
_TEXT_REFUSED = (
    "prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3", "prompt_embeds",
    "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds", "ip_adapter_image",
    "ip_adapter_image_embeds", "original_size", "crops_coords_top_left", "target_size", "denoising_end",
)
_TEXT_KIND = {"StepDistillSDPipeline": "sd", "StepDistillSDXLPipeline": "sdxl", "StepDistillSD3Pipeline": "sd3"}


def text_prefix(pipe, args, kwargs, teacher, k: int, guidance_scale: float = 1.0, teacher_timesteps=None):
    """Hybrid sampling of a text-to-image export (StepDistillSD / SDXL / SD3 pipeline): the teacher's ``k``
    steps (CFG ``guidance_scale`` against the empty prompt, as the stock pipelines' default negative prompt) from
    the call's initial latent, then the call's keyword arguments for the student's part: ``latents`` = the
    hand-over latent and the trained timesteps from the hand-over on (``timesteps`` for LCM / TCD schedulers,
    ``sigmas`` for SD3's flow scheduler). Returns ``(kwargs, cut)``: a scheduler without custom timesteps
    (trailing DDIM) gets the full step count and is run from index ``cut`` with :func:`scheduler_from_index`
    (``cut`` is 0 for the others). ``kwargs`` are the call's, after
    the pipeline's trained-step defaults; the prompt embeddings come from the pipeline's own text encoders (an
    export carries its teacher's), through :class:`~stepdistill.models.conditioning.TextConditioner`, which
    equals the stock ``encode_prompt``."""
    from diffusers.utils.torch_utils import randn_tensor

    from .models.conditioning import TextConditioner

    kind = _TEXT_KIND[type(pipe).__name__]
    kwargs = dict(kwargs)
    if args:
        if len(args) > 1 or "prompt" in kwargs:
            raise ValueError("hybrid sampling takes the prompt as its only positional argument (or prompt=)")
        kwargs["prompt"] = args[0]
    prompt = kwargs.get("prompt")
    if prompt is None:
        raise ValueError("hybrid sampling of a text-to-image pipeline needs prompt= (the teacher encodes it)")
    refused = [key for key in _TEXT_REFUSED if kwargs.get(key) is not None]
    if refused:
        raise ValueError(f"hybrid sampling does not take {', '.join(refused)} (the teacher conditions on prompt only)")
    trained = [float(t) for t in pipe.config.trained_timesteps]
    custom = kwargs.get("sigmas" if kind == "sd3" else "timesteps")
    steps = kwargs.get("num_inference_steps")
    if (custom is not None and [float(v) for v in custom] != _trained_grid(pipe, kind)) or steps not in (
        None, len(trained)
    ):
        raise ValueError("hybrid sampling runs the student at its trained timesteps: drop timesteps / sigmas / "
                         "num_inference_steps")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    n = kwargs.get("num_images_per_prompt") or 1
    rows = [p for p in prompts for _ in range(n)]  # the stock order: each prompt's images together
    net = pipe.transformer if kind == "sd3" else pipe.unet
    size = getattr(pipe, "default_sample_size", None) or net.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    height = kwargs.get("height") or size[0] * pipe.vae_scale_factor
    width = kwargs.get("width") or size[1] * pipe.vae_scale_factor
    kwargs.update(height=height, width=width)
    device = pipe._execution_device
    x = kwargs.get("latents")
    if x is None:  # as the stock prepare_latents (init_noise_sigma is 1 for the students' schedulers)
        shape = (len(rows), net.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        x = randn_tensor(shape, generator=kwargs.get("generator"), device=device, dtype=net.dtype)
    if kind == "sd3":
        encoders = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
        tokenizers = [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3]
        extra = {"max_sequence_length": kwargs.get("max_sequence_length") or 256}
        extra["joint_attention_dim"] = net.config.joint_attention_dim
    elif kind == "sdxl":
        encoders, tokenizers = [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2]
        extra = {"resolution": (int(height), int(width))}
    else:
        encoders, tokenizers, extra = [pipe.text_encoder], [pipe.tokenizer], {}
    cond = TextConditioner(kind, tokenizers, encoders, cache_size=0, **extra).encode(rows, device)
    x, j = teacher_prefix(teacher, x.to(device), trained, k, cond, guidance_scale, teacher_timesteps)
    kwargs["latents"] = x
    rest = trained[j:]
    if kind == "sd3":
        T = pipe.scheduler.config.num_train_timesteps
        kwargs.update(sigmas=[t / T for t in rest], num_inference_steps=len(rest))
    elif "timesteps" in inspect.signature(pipe.scheduler.set_timesteps).parameters:
        kwargs.update(timesteps=[int(t) for t in rest], num_inference_steps=len(rest))
    else:
        return kwargs, j
    return kwargs, 0


def _trained_grid(pipe, kind) -> list[float]:
    trained = [float(t) for t in pipe.config.trained_timesteps]
    return [t / pipe.scheduler.config.num_train_timesteps for t in trained] if kind == "sd3" else trained


@contextmanager
def scheduler_from_index(scheduler, j: int):
    """Inside the block, ``scheduler.set_timesteps`` keeps its grid from index ``j`` on: a scheduler whose step
    size comes from its step count (trailing DDIM: prev = t - T / N) then runs the trained steps j .. N-1 exactly
    as its full call would. No-op for ``j = 0``."""
    if not j:
        yield scheduler
        return
    original = scheduler.set_timesteps

    def set_timesteps(*args, **kwargs):
        original(*args, **kwargs)
        scheduler.timesteps = scheduler.timesteps[j:]

    scheduler.set_timesteps = set_timesteps
    try:
        yield scheduler
    finally:
        del scheduler.set_timesteps


def lora_teacher(net, schedule, prediction_type: str):
    """The teacher of a LoRA student on the same weights: ``net`` (the student's network, carrying the LoRA)
    with every adapter switched off for the teacher's calls; no copy of the base is made."""
    from .models import Teacher

    return Teacher(net, schedule, prediction_type, shares_base=True)


def load_lora_student(export: str, teacher):
    """A text-to-image LoRA export (its ``lora/`` folder, diffusers' LoRA format) as a hybrid student on its
    teacher's own weights: returns ``(pipe, lora_teacher)``, the export's pipeline whose network is ``teacher``'s
    (a :class:`stepdistill.models.Teacher` of the LoRA's base) carrying the adapter, and that same network with
    every adapter off as the teacher. The export's fused network is not loaded: one copy of the weights."""
    import os

    from diffusers import DiffusionPipeline

    import stepdistill  # noqa: F401  (registers the pipeline classes)

    with open(os.path.join(export, "model_index.json")) as f:
        sub = "transformer" if "transformer" in json.load(f) else "unet"
    pipe = DiffusionPipeline.from_pretrained(export, **{sub: teacher.net})
    pipe.load_lora_weights(os.path.join(export, "lora"))
    return pipe, lora_teacher(teacher.net, teacher.schedule, teacher.prediction_type)


def step_x0(scheduler, step_output, model_output, t, x) -> torch.Tensor:
    """The predicted x0 of one scheduler step (for x0 traces): the step's ``pred_original_sample`` (DDIM, EDM)
    or ``denoised`` (LCM), else (TCD) converted from the model output with the scheduler's alphas."""
    for name in ("pred_original_sample", "denoised"):
        value = getattr(step_output, name, None)
        if value is not None:
            return value
    ab = scheduler.alphas_cumprod.to(x.device)[int(t)].to(x.dtype)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (x - s * model_output) / a
    if kind == "v_prediction":
        return a * x - s * model_output
    return model_output


def hybrid_sample(pipe, teacher, k: int, **call_kwargs):
    """Sample a stepdistill class / toy pipeline (an export) with the teacher for its first ``k`` steps:
    ``pipe(..., teacher=teacher, teacher_steps=k)``. ``teacher`` is a :class:`stepdistill.models.Teacher`
    (``Teacher.from_pretrained(folder)``, or :func:`lora_teacher` for a LoRA student)."""
    return pipe(teacher=teacher, teacher_steps=k, **call_kwargs)


def save_trace_grid(trace, path: str, max_samples: int = 8, scale: int = 4) -> str:
    """The predicted-x0 trace as an image grid: one row per sample (the first ``max_samples``), one column per
    sampler step (the paper's DT-visualisation). ``trace``: a list of (B, C, H, W) tensors in [-1, 1]."""
    from .utils import save_image_grid

    if not trace:
        raise ValueError("the trace is empty: no sampler step was recorded")
    steps = torch.stack([x[:max_samples].float().cpu() for x in trace], dim=1)  # (B, S, C, H, W)
    save_image_grid(steps.flatten(0, 1), path, nrow=len(trace), scale=scale)
    return path


def structure_cosine(trace) -> float:
    """Mean cosine between each sample's x0 after the first step and its last x0 (1: the structure is fixed
    by the first step, as for distilled students; lower for teachers that keep changing it)."""
    first, last = trace[0].flatten(1).double(), trace[-1].flatten(1).double()
    return float(torch.nn.functional.cosine_similarity(first, last, dim=1).mean())


# --------------------------------------------------------------------------------------------------------
# control transfer: a LoRA trained on the teacher applied to the student, and vice versa
# --------------------------------------------------------------------------------------------------------


def transfer_lora(target, source, adapter_name: str = "default", *, new_name: str | None = None, fuse: bool = False):
    """Apply the LoRA ``adapter_name`` of ``source`` to ``target`` (Gandikota & Bau 2025, section 5.3): a LoRA
    (a style, a concept slider) trained on the teacher works unchanged on a distilled student, and vice versa,
    because a full-copy student (or a LoRA student merged into the base) has the teacher's module names and
    shapes.

    ``source``: a network carrying the adapter (peft, e.g. :func:`stepdistill.models.adapters.add_lora`), or a
    ``(peft LoraConfig, state dict in peft naming)`` pair (:func:`~stepdistill.models.adapters.lora_state_dict`).
    The adapter is injected into ``target`` under ``new_name`` (default ``adapter_name``) and its weights copied;
    ``fuse=True`` folds it into ``target``'s weights instead (no adapter left). Mismatched module names or shapes
    raise a ValueError naming them. Returns ``target``."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    from .models.adapters import _forget, adapter_names, lora_state_dict, merge_lora, set_active_adapter

    if isinstance(source, torch.nn.Module):
        if adapter_name not in adapter_names(source):
            raise ValueError(f"the source carries no adapter {adapter_name!r}; have {sorted(adapter_names(source))}")
        config, state = source.peft_config[adapter_name], lora_state_dict(source, adapter_name)
    else:
        config, state = source
    name = new_name or adapter_name
    if name in adapter_names(target):
        raise ValueError(f"{type(target).__name__} already carries an adapter named {name!r}; pass new_name=")
    if fuse and adapter_names(target):
        raise ValueError(f"merge the adapters {sorted(adapter_names(target))} of the target first, then fuse")
    modules = dict(target.named_modules())
    bad = []
    for key, value in state.items():  # e.g. "down_blocks.0.attentions.0.to_q.lora_A.weight"
        module_key, _, rest = key.partition(".lora_")
        base = modules.get(module_key)
        weight = getattr(base, "weight", None)
        if weight is None:
            bad.append(f"{module_key} (missing)")
            continue
        axis = 1 if rest.startswith("A") else 0  # lora_A: (r, in), lora_B: (out, r) for linear layers
        if value.shape[axis] != weight.shape[axis]:
            bad.append(f"{key} {tuple(value.shape)} vs base {tuple(weight.shape)}")
    if bad:
        raise ValueError(f"the LoRA does not fit {type(target).__name__}: " + "; ".join(bad[:5]))
    inject_adapter_in_model(config, target, adapter_name=name)
    _forget(target)
    result = set_peft_model_state_dict(target, state, adapter_name=name)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(f"LoRA weights not loaded into {type(target).__name__}: {missing[:5]}")
    if not hasattr(target, "peft_config"):
        target.peft_config = {}
    target.peft_config[name] = config
    set_active_adapter(target, name)
    return merge_lora(target, name) if fuse else target
