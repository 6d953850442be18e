"""Write a distilled generator as a diffusers pipeline folder (and a LoRA file for LoRA students).

The folder loads with ``DiffusionPipeline.from_pretrained(folder)`` (after ``import stepdistill``) and a
plain call samples with the trained timesteps; its README.md (the model card: hub metadata, then code) starts
with the seeded call that needs stock diffusers classes only and gives the same images, where one exists (not
for w-conditioned ``GuidedUNet2DModel`` students nor toy ``ToyMLP`` generators, whose cards say that they need
stepdistill). The scheduler reproduces the trained update rule (the trainer's ``export_scheduler``):

* ``"lcm"``: ``LCMScheduler`` whose own grid is the trained timesteps: predict x0, then re-noise with fresh
  noise to the next trained timestep (DMD2, LCM / consistency students);
* ``"ddim"``: ``DDIMScheduler`` with trailing spacing, deterministic (progressive distillation, multiphase
  consistency students: the trained grid is the trailing DDIM grid at the trained step count);
* ``"tcd"``: ``TCDScheduler`` on the trained timesteps (eta is a call argument, 0 = deterministic).

EDM / Karras generators get ``EDMEulerScheduler`` (the teacher's sigma_min / sigma_max / rho / sigma_data, and
diffusers' EDM "epsilon", the network output F with x0 = c_skip x + c_out F): the pipeline sets its sigmas to the
trained Karras-grid levels (``set_timesteps(sigmas=ramp)``, ramp = 1 - timestep / (T - 1)), starts from sigma_0 z,
and feeds the network ``scale_model_input`` (c_in x) at ``t`` = c_noise. Its Euler step to the next sigma is our
deterministic "ddim" step (for EDM, DDIM and Euler in sigma are the same step) and, into sigma = 0, the x0 of
one-step students; for "lcm" students (x0, then fresh noise) the pipeline re-noises itself (x0 + sigma' z,
``renoise`` in model_index.json), since neither EDM scheduler of diffusers does (EDMDPMSolverMultistepScheduler's
SDE step keeps part of x).

Flow-matching generators (SD3) get ``FlowMatchEulerDiscreteScheduler`` with ``shift=1`` and the trained
sigmas (timesteps / T) as call arguments: ``stochastic_sampling=True`` for "lcm" (x0 = x - sigma v, then
fresh noise to the next sigma) and plain Euler for "ddim" (the deterministic DDIM step of a flow model).

Generators: ``UNet2DModel`` (StepDistillClassPipeline), ``UNet2DConditionModel`` (SD / SDXL pipelines),
``DiTTransformer2DModel`` (StepDistillDiTPipeline, a DiTPipeline), ``SD3Transformer2DModel``
(StepDistillSD3Pipeline, a StableDiffusion3Pipeline) and ``ToyMLP`` (StepDistillToyPipeline).
"""

from __future__ import annotations

import copy
import os

import torch
import yaml

from .io import begin_export, finish_export
from .models.denoiser import _unwrap
from .models.loading import _HUB_ID
from .schedules import normalize_prediction_type

_DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}

# The model card (README.md of the folder): hub metadata, then the call that needs stock diffusers classes only
# (first, so that a user without stepdistill starts there), then the call through our pipeline class. Every
# snippet is seeded with the same generator and gives the same images as the others (tests/test_export_stock.py).
CARD = """---
{front_matter}---
# {title}

Distilled with stepdistill ({method}) from `{teacher}`: **{n} network evaluation(s)** per sample at timesteps
{timesteps}.

{sections}"""

STOCK_SECTION = """## With stock diffusers classes only

```python
{stock_call}
```

No stepdistill needed: {stock_note}

## With stepdistill installed

`import stepdistill` registers `{pipeline_class}` (the `_class_name` of `model_index.json`) with diffusers; its
plain call samples at the trained timesteps without guidance.

```python
{plain_call}
```
"""

NEEDS_SECTION = """## With stepdistill installed (required)

{needs_note}

```python
{plain_call}
```
"""

LOOP_SECTION = """
## The sampling loop, step by step

```python
{loop}
```
"""

LORA_SECTION = """
## The LoRA on the original teacher

`lora/` holds the generator's LoRA in diffusers' format; `unet/` above is the same LoRA fused into the teacher.

```python
{lora_call}
```
"""

_LABELS = "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]"

_PIXEL_LOOP = """import torch
from diffusers import {imports}

unet = {unet_class}.from_pretrained("{folder}", subfolder="unet").eval()
scheduler = {scheduler_class}.from_pretrained("{folder}", subfolder="scheduler")
scheduler.set_timesteps({set_timesteps})
{batch}
generator = torch.Generator().manual_seed(0)
size = unet.config.sample_size
x = torch.randn(n, unet.config.in_channels, size, size, generator=generator){w_setup}
with torch.no_grad():
    for t in scheduler.timesteps:
        out = unet(x, t{unet_args}).sample
        x = scheduler.step(out, t, x, generator=generator).prev_sample  # generator: the seeded re-noising
images = (x / 2 + 0.5).clamp(0, 1)  # (N, C, H, W) in [0, 1]"""

_EDM_PIXEL_LOOP = """import torch
from diffusers import EDMEulerScheduler, UNet2DModel

unet = UNet2DModel.from_pretrained("{folder}", subfolder="unet").eval()
scheduler = EDMEulerScheduler.from_pretrained("{folder}", subfolder="scheduler")
# the trained noise levels: timesteps {timesteps} of the teacher's {T}-level Karras grid (sigmas= takes ramp
# positions, 0 = sigma_max; needs diffusers >= 0.33)
scheduler.set_timesteps({n}, sigmas=1 - torch.tensor({timesteps}, dtype=torch.float64) / {T_1})
{batch}
generator = torch.Generator().manual_seed(0)
size = unet.config.sample_size
x = torch.randn(n, unet.config.in_channels, size, size, generator=generator) * scheduler.sigmas[0]
with torch.no_grad():
    for i, t in enumerate(scheduler.timesteps):
        out = unet(scheduler.scale_model_input(x, t), t{unet_args}).sample  # EDM's F at c_noise = t
        step = scheduler.step(out, t, x)
        if i + 1 == len(scheduler.timesteps):  # x0 (the Euler step into sigma = 0, up to rounding)
            x = step.pred_original_sample
        else:
            x = {next_x}
images = (x / 2 + 0.5).clamp(0, 1)  # (N, C, H, W) in [0, 1]"""

# the trained rule of "lcm" students: x0, then fresh noise at the next sigma
_EDM_RENOISE = "step.pred_original_sample + scheduler.sigmas[i + 1] * torch.randn(x.shape, generator=generator)"

_W_SETUP = """
# a w-conditioned student: the guidance scale is an input (one network evaluation per step)
w_emb = guidance_scale_embedding(torch.full((n,), {w} - 1.0), unet.config.time_cond_proj_dim)"""

_STOCK_DIT = """import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel, {scheduler_class}

transformer = DiTTransformer2DModel.from_pretrained("{folder}", subfolder="transformer").eval()
vae = AutoencoderKL.from_pretrained("{folder}", subfolder="vae").eval()
scheduler = {scheduler_class}.from_pretrained("{folder}", subfolder="scheduler")
scheduler.set_timesteps({set_timesteps})
labels = torch.tensor([0, 1, 2, 3])
channels, size = transformer.config.in_channels, transformer.config.sample_size
generator = torch.Generator().manual_seed(0)
x = torch.randn(len(labels), channels, size, size, generator=generator)
with torch.no_grad():
    for t in scheduler.timesteps:
        # learned sigma: the first half of the output channels is the noise prediction
        out = transformer(x, timestep=t.reshape(1).expand(len(labels)), class_labels=labels).sample[:, :channels]
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    images = vae.decode(x / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)).sample
images = (images / 2 + 0.5).clamp(0, 1)  # (N, 3, H, W) in [0, 1]"""

_BIND_GENERATOR = """
# StableDiffusion3Pipeline does not pass `generator` to the scheduler's step, whose re-noising would then draw from
# torch's global RNG: bind it, so that the seeded call is reproducible (stepdistill's pipeline does the same)
pipe.scheduler.step = functools.partial(pipe.scheduler.step, generator=generator)"""

_STOCK_TEXT = """{imports}from diffusers import {stock_class}

pipe = {stock_class}.from_pretrained("{folder}"{load_args})
generator = torch.Generator().manual_seed(0){bind}
image = pipe("a photo of a cat", {steps_args}, guidance_scale={w}, generator=generator).images[0]"""

_STOCK_LORA = """{imports}from diffusers import {scheduler_class}, {stock_class}

pipe = {stock_class}.from_pretrained("{teacher}"{load_args})
pipe.load_lora_weights("{folder}/lora")
pipe.scheduler = {scheduler_class}.from_pretrained("{folder}", subfolder="scheduler")
generator = torch.Generator().manual_seed(0){bind}
image = pipe("a photo of a cat", {steps_args}, guidance_scale={w}, generator=generator).images[0]"""

_PLAIN = """import torch
{imports}from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{folder}")
{call}"""

SCHEDULERS = ("lcm", "ddim", "tcd")
FLOW_SCHEDULERS = ("lcm", "ddim")


def flow_scheduler_for(kind: str, teacher_schedule_config: dict):
    """``FlowMatchEulerDiscreteScheduler`` that reproduces a flow-matching student's trained steps when called
    with ``sigmas`` = trained timesteps / T: ``shift`` 1 keeps those sigmas as given (the teacher's shift is
    already in the trained timesteps); "lcm" re-noises with fresh noise (``stochastic_sampling``), "ddim" is the
    deterministic Euler step (for a flow model the DDIM step)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if kind not in FLOW_SCHEDULERS:
        raise ValueError(f"export scheduler {kind!r} has no flow-matching form; expected one of {FLOW_SCHEDULERS}")
    if teacher_schedule_config.get("use_dynamic_shifting"):
        raise ValueError("a teacher scheduler with use_dynamic_shifting=True cannot be reproduced by fixed sigmas")
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=teacher_schedule_config.get("num_train_timesteps", 1000),
        shift=1.0,
        stochastic_sampling=kind == "lcm",
    )


def lcm_scheduler_for(teacher_schedule_config: dict, timesteps: list[int]):
    """An LCMScheduler on the teacher's betas whose own grid is the trained timesteps."""
    from diffusers import LCMScheduler

    keys = (
        "num_train_timesteps",
        "beta_start",
        "beta_end",
        "beta_schedule",
        "trained_betas",
        "prediction_type",
        "rescale_betas_zero_snr",
    )
    cfg = {k: teacher_schedule_config[k] for k in keys if teacher_schedule_config.get(k) is not None}
    T = cfg.get("num_train_timesteps", 1000)
    steps = len(timesteps)
    # LCMScheduler's own grid is k * i - 1 with k = T // original_inference_steps: equal to the trained
    # timesteps when they are evenly spaced down from T - 1 (DMD2's [999], [999, 749, 499, 249])
    # steps_offset is unused by LCMScheduler; 1 keeps StableDiffusionPipeline from warning that it is "outdated"
    return LCMScheduler(
        **cfg,
        original_inference_steps=steps if T % steps == 0 else 50,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1,
    )


EDM_SCHEDULERS = ("lcm", "ddim")


def edm_scheduler_for(kind: str, teacher_schedule_config: dict):
    """``EDMEulerScheduler`` with the teacher's Karras levels for an EDM student (see the module docstring); its
    step is the "ddim" rule, and the pipeline adds the fresh noise of "lcm" students."""
    from diffusers import EDMEulerScheduler

    if kind not in EDM_SCHEDULERS:
        raise ValueError(f"export scheduler {kind!r} has no EDM form; expected one of {EDM_SCHEDULERS}")
    cfg = teacher_schedule_config
    if cfg.get("sigma_schedule", "karras") != "karras":
        raise ValueError(f"an EDM teacher with sigma_schedule={cfg['sigma_schedule']!r} is not supported (karras only)")
    return EDMEulerScheduler(
        sigma_min=cfg.get("sigma_min", 0.002),
        sigma_max=cfg.get("sigma_max", 80.0),
        sigma_data=cfg.get("sigma_data", 0.5),
        rho=cfg.get("rho", 7.0),
        num_train_timesteps=cfg.get("num_train_timesteps", 1000),
        prediction_type="epsilon",  # diffusers' EDM "epsilon" is EDM's F (x0 = c_skip x + c_out F)
    )


def student_scheduler(kind: str, teacher_schedule_config: dict, timesteps: list[int]):
    """The diffusers scheduler that reproduces a student's trained steps (see the module docstring)."""
    if kind == "lcm":
        return lcm_scheduler_for(teacher_schedule_config, timesteps)
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
    cfg = {k: teacher_schedule_config[k] for k in keys if teacher_schedule_config.get(k) is not None}
    zero_snr = bool(teacher_schedule_config.get("rescale_betas_zero_snr", False))
    if kind == "ddim":
        from diffusers import DDIMScheduler

        sched = DDIMScheduler(
            **cfg,
            rescale_betas_zero_snr=zero_snr,
            timestep_spacing="trailing",
            clip_sample=False,
            set_alpha_to_one=True,
            steps_offset=1,  # unused by trailing spacing; 1 keeps StableDiffusionPipeline from calling it outdated
        )
        sched.set_timesteps(len(timesteps))
        grid = [int(t) for t in sched.timesteps]
        if grid != list(timesteps):
            raise ValueError(
                f"trained timesteps {timesteps} are not DDIMScheduler's trailing grid at {len(timesteps)} steps "
                f"({grid}); export with the 'lcm' or 'tcd' scheduler instead"
            )
        return sched
    if kind == "tcd":
        from diffusers import TCDScheduler

        T = cfg.get("num_train_timesteps", 1000)
        steps = len(timesteps)
        return TCDScheduler(
            **cfg,
            rescale_betas_zero_snr=zero_snr,
            original_inference_steps=steps if T % steps == 0 else 50,
            clip_sample=False,
            set_alpha_to_one=True,
            steps_offset=1,  # unused by TCDScheduler; 1 keeps StableDiffusionPipeline from calling it outdated
        )
    raise ValueError(f"unknown export scheduler {kind!r}; expected one of {SCHEDULERS}")


def edm_renoise(scheduler, kind: str):
    """The pipeline's ``renoise`` setting: True for an EDM "lcm" student (the pipeline adds the fresh noise that
    diffusers' EDM step lacks), None (not written) otherwise."""
    from .pipelines import is_edm_scheduler

    return True if is_edm_scheduler(scheduler) and kind == "lcm" else None


def _set_timesteps_arg(kind: str, timesteps: list[int]) -> str:
    return f"{len(timesteps)}" if kind == "ddim" else f"timesteps={timesteps}"


def _steps_args(kind: str, timesteps: list[int], flow_T: int | None = None) -> str:
    n = len(timesteps)
    if flow_T:  # flow matching: the trained sigmas
        return f"num_inference_steps={n}, sigmas={[t / flow_T for t in timesteps]}"
    return f"num_inference_steps={n}" if kind == "ddim" else f"num_inference_steps={n}, timesteps={timesteps}"


def _generator_unet(trainer):
    """A plain diffusers network with the generator's weights (EMA if kept; LoRA merged into a copy)."""
    from .models.adapters import adapter_names, merge_lora

    acc = trainer.accelerator
    module = trainer.specs["generator"].module
    net = _unwrap(acc.unwrap_model(module))
    adapter = getattr(trainer.generator, "adapter_name", None)
    if trainer._sharded():  # FSDP: gather the full weights to rank 0 into a plain copy of the network
        if adapter is not None:
            raise ValueError("exporting a LoRA generator trained under FSDP is not supported; train LoRA with DDP")
        full = acc.get_state_dict(module)
        if not acc.is_main_process:
            return net
        plain = type(net).from_config(net.config)
        plain.load_state_dict(full)
        net = plain
    if adapter is not None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        net = copy.deepcopy(net)
        for other in sorted(adapter_names(net) - {adapter}):  # e.g. a LoRA fake score on the same base
            for m in net.modules():
                if isinstance(m, BaseTunerLayer):
                    m.set_adapter(adapter)
                    m.delete_adapter(other)
            getattr(net, "peft_config", {}).pop(other, None)
        net = merge_lora(net, adapter)
    ema = trainer.ema_state_dict("generator")
    if ema is not None and adapter is None:
        net = copy.deepcopy(net)
        dtype = getattr(net, "dtype", None)  # a plain nn.Module (a generator object) has none: copy_ casts
        net.load_state_dict({k: v.to(dtype=dtype or v.dtype) if v.is_floating_point() else v for k, v in ema.items()})
    return net.eval()


def export_generator(trainer, path: str) -> str:
    """Export a trainer's generator (a distribution-matching or consistency student) to ``path``."""
    acc = trainer.accelerator
    net = _generator_unet(trainer)
    if not acc.is_main_process:
        return path
    teacher_path = trainer._teacher_path()
    sched_cfg = _teacher_json(teacher_path, "scheduler_config.json", "scheduler")
    pred = trainer.generator.prediction_type  # a student may output another type than its teacher
    timesteps = [t if isinstance(t, float) else int(t) for t in trainer.export_timesteps()]  # EDM: may be off-grid
    kind = getattr(trainer, "export_scheduler", "lcm")
    name = type(net).__name__
    if trainer.generator.schedule.kind == "flow":
        if pred != "flow":
            raise ValueError(f"a flow-matching generator must predict the velocity ('flow') to export, not {pred!r}")
        scheduler = flow_scheduler_for(kind, sched_cfg)
    elif trainer.generator.schedule.kind == "edm":
        if pred != "edm":
            raise ValueError(f"an EDM generator must output EDM's F ('edm') to export, not {pred!r}")
        scheduler = edm_scheduler_for(kind, sched_cfg)
    else:
        if normalize_prediction_type(sched_cfg.get("prediction_type", "epsilon")) != pred:
            sched_cfg = {**sched_cfg, "prediction_type": _DIFFUSERS_PREDICTION[pred]}
        own = getattr(trainer, "export_scheduler_for", None)  # a method whose sampler no stock grid expresses
        scheduler = own(sched_cfg) if own is not None else student_scheduler(kind, sched_cfg, timesteps)
    w = getattr(trainer, "export_guidance_scale", None)
    w_cond = bool(getattr(net.config, "time_cond_proj_dim", None))
    if w_cond and w is None:
        w = 1.0
    tmp = begin_export(path)  # beside path: a previous export stays until this one is complete
    if trainer.generator.schedule.kind == "edm" and name not in ("UNet2DModel", "ToyMLP", "RoutedToyMLP"):
        raise ValueError(f"export of a {name} generator of an EDM teacher is not supported (UNet2DModel, ToyMLP)")
    if name in ("UNet2DModel", "GuidedUNet2DModel"):
        card = _pixel_pipeline(net, scheduler, timesteps, path, kind, w)
    elif name == "RoutedUNet2DModel":  # MSD: K students and their routing table
        from .trainers.msd import routed_pipeline_card

        card = routed_pipeline_card(net, scheduler, timesteps, path, kind)
    elif name == "RoutedUNet2DConditionModel":  # MSD by prompt: K students and their k-means centres
        from .trainers.msd import routed_text_card

        card = routed_text_card(teacher_path, net, scheduler, timesteps, path, kind, w)
    elif name == "UNet2DConditionModel":
        card = _text_pipeline(teacher_path, net, scheduler, timesteps, path, kind, w)
    elif name == "DiTTransformer2DModel":
        card = _dit_pipeline(teacher_path, net, scheduler, timesteps, path, kind)
    elif name == "SD3Transformer2DModel":
        card = _sd3_pipeline(teacher_path, net, scheduler, timesteps, path, w)
    elif name == "ToyMLP":
        card = _toy_pipeline(net, scheduler, timesteps, path, kind, w if w_cond else None)
    elif name == "RoutedToyMLP":  # MSD on a class-conditional toy teacher
        from .trainers.msd import routed_toy_card

        card = routed_toy_card(net, scheduler, timesteps, path, kind, w if w_cond else None)
    else:
        raise ValueError(
            f"export of a {name} generator is not supported (UNet2DModel, UNet2DConditionModel, "
            "DiTTransformer2DModel, SD3Transformer2DModel, ToyMLP)"
        )
    pipe = card["pipe"]
    pipe.save_pretrained(tmp, safe_serialization=True)
    lora_call = ""
    lora = getattr(trainer.generator, "adapter_name", None) is not None
    if lora and getattr(trainer.generator, "w_conditioned", False):
        import warnings

        warnings.warn(
            "generator_mode='lora' with a guidance-scale input (guided distillation): the LoRA is exported fused "
            "into unet/ only; no lora/ file is written, as the teacher it would load onto has no w-projection",
            stacklevel=2,
        )
    elif lora:
        if getattr(pipe, "_stock_class", None) is None:
            import warnings

            warnings.warn(
                f"generator_mode='lora': a {name} generator is exported with the LoRA fused into unet/ only; "
                "a separate LoRA file (lora/) is written for text-to-image (SD / SDXL) generators",
                stacklevel=2,
            )
        else:
            lora_call = _save_lora(trainer, pipe, tmp, path, timesteps, kind, w)
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(model_card(trainer, card, timesteps, teacher_path, lora_call))
    finish_export(tmp, path, "pipeline")  # fsync, then swap in
    return path


def model_card(trainer, card: dict, timesteps, teacher_path, lora_call: str = "") -> str:
    """README.md of an exported folder: hub metadata (library, base model, license from the teacher's card,
    pipeline tag, tags), then the stock-diffusers call (when one exists), then stepdistill's pipeline call."""
    method = getattr(trainer, "method_name", type(trainer).__name__)
    teacher = trainer.config.teacher
    meta = {"library_name": "diffusers"}
    if isinstance(teacher, str) and _HUB_ID.match(teacher) and not teacher.startswith(("outputs/", "./")):
        meta["base_model"] = teacher
    meta.update(_teacher_license(teacher_path))
    if card.get("pipeline_tag"):
        meta["pipeline_tag"] = card["pipeline_tag"]
    meta["tags"] = ["stepdistill", "distillation", str(method).lower()] + (["lora"] if lora_call else [])
    if card.get("stock_call"):
        sections = STOCK_SECTION.format(
            stock_note=card["stock_note"],
            stock_call=card["stock_call"],
            pipeline_class=type(card["pipe"]).__name__,
            plain_call=card["plain_call"],
        )
    else:
        sections = NEEDS_SECTION.format(needs_note=card["needs_note"], plain_call=card["plain_call"])
    if card.get("loop"):
        sections += LOOP_SECTION.format(loop=card["loop"])
    if lora_call:
        sections += LORA_SECTION.format(lora_call=lora_call)
    return CARD.format(
        front_matter=yaml.safe_dump(meta, sort_keys=False),
        title=f"{len(timesteps)}-step distilled generator",
        method=method,
        teacher=teacher,
        n=len(timesteps),
        timesteps=list(timesteps),
        sections=sections,
    )


def _teacher_license(teacher_path) -> dict:
    """``license`` (and ``license_name`` / ``license_link`` for "other") from the YAML front matter of the
    teacher's README.md (a local folder, or a hub id through the hub cache); empty when unknown."""
    text = None
    if os.path.isdir(teacher_path):
        file = os.path.join(teacher_path, "README.md")
        if os.path.isfile(file):
            with open(file, encoding="utf-8") as f:
                text = f.read()
    else:
        try:
            from huggingface_hub import hf_hub_download

            with open(hf_hub_download(teacher_path, "README.md"), encoding="utf-8") as f:
                text = f.read()
        except Exception:  # noqa: BLE001 - no card (or offline without it in the cache): license unknown
            text = None
    if not text or not text.startswith("---"):
        return {}
    try:
        front = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return {}
    if not isinstance(front, dict):
        return {}
    return {k: front[k] for k in ("license", "license_name", "license_link") if isinstance(front.get(k), str)}


def _pixel_pipeline(net, scheduler, timesteps, path, kind, w):
    """StepDistillClassPipeline; the stock path is a loop over UNet2DModel + the scheduler, except for
    w-conditioned students (GuidedUNet2DModel has no stock diffusers class)."""
    from .pipelines import StepDistillClassPipeline, is_edm_scheduler

    w_cond = bool(getattr(net.config, "time_cond_proj_dim", None))
    edm = is_edm_scheduler(scheduler)
    pipe = StepDistillClassPipeline(
        unet=net,
        scheduler=scheduler,
        trained_timesteps=timesteps,
        default_guidance_scale=w,
        renoise=edm_renoise(scheduler, kind),
    )
    labelled = bool(net.config.num_class_embeds)
    seeded = 'generator=torch.Generator().manual_seed(0), output_type="pt"'
    call = f"pipe(class_labels={_LABELS}, {seeded})" if labelled else f"pipe(num_images=4, {seeded})"
    unet_args = ", class_labels=labels" if labelled else ""
    if w_cond:
        unet_args += ", timestep_cond=w_emb"
    batch = f"labels = torch.tensor({_LABELS})\nn = len(labels)" if labelled else "n = 4"
    if edm:
        T = scheduler.config.num_train_timesteps
        loop = _EDM_PIXEL_LOOP.format(
            folder=path,
            timesteps=list(timesteps),
            T=T,
            T_1=T - 1,
            n=len(timesteps),
            batch=batch,
            unet_args=unet_args,
            next_x=_EDM_RENOISE if edm_renoise(scheduler, kind) else "step.prev_sample  # the Euler (DDIM) step",
        )
    else:
        loop = _PIXEL_LOOP.format(
            folder=path,
            scheduler_class=type(scheduler).__name__,
            imports=type(scheduler).__name__ + ("" if w_cond else ", UNet2DModel"),
            unet_class="GuidedUNet2DModel" if w_cond else "UNet2DModel",
            set_timesteps=_set_timesteps_arg(kind, timesteps),
            batch=batch,
            w_setup=_W_SETUP.format(w=w) if w_cond else "",
            unet_args=unet_args,
        )
    plain = _plain(path, f"images = {call}.images  # (N, C, H, W) in [0, 1]: the same images as the loop")
    card = {"pipe": pipe, "plain_call": plain, "pipeline_tag": "unconditional-image-generation"}
    if not w_cond:
        card["stock_call"] = loop
        card["stock_note"] = (
            "a loop over the `UNet2DModel` and the scheduler that reproduces the trained steps (diffusers has no "
            "class-conditional pipeline for `UNet2DModel`)."
        )
        return card
    card["needs_note"] = (
        f"This student takes the guidance scale as an input (default {w}, one network evaluation per step): its "
        "network is `GuidedUNet2DModel`, diffusers' `UNet2DModel` plus a guidance-embedding projection, which "
        "ships with stepdistill (`pip install stepdistill`). No stock diffusers class has that input, so this "
        "folder does not load without stepdistill."
    )
    card["loop"] = (
        "# GuidedUNet2DModel is UNet2DModel plus the guidance input; it ships with stepdistill\n"
        "from stepdistill import GuidedUNet2DModel\n"
        "from stepdistill.guidance import guidance_scale_embedding\n" + loop
    )
    return card


def _toy_pipeline(net, scheduler, timesteps, path, kind="lcm", w=None):
    """StepDistillToyPipeline: the ToyMLP (safetensors + config.json) and the student scheduler (``w``: the constant
    ``timestep_cond`` = embed(w - 1) of a ToyMLP with that input)."""
    from .pipelines import StepDistillToyPipeline

    pipe = StepDistillToyPipeline(
        unet=net,
        scheduler=scheduler,
        trained_timesteps=timesteps,
        renoise=edm_renoise(scheduler, kind),
        default_guidance_scale=w,
    )
    plain = _plain(
        path, "points = pipe(num_samples=1000, generator=torch.Generator().manual_seed(0)).samples  # (N, 2)"
    )
    needs = (
        "A toy 2-D generator: its network is stepdistill's `ToyMLP` (`unet/`: config.json + safetensors), which "
        "has no stock diffusers class. `stepdistill sample --model <this folder>` draws a scatter plot."
    )
    return {"pipe": pipe, "plain_call": plain, "needs_note": needs}


def _teacher_json(teacher_path, name, subfolder=None) -> dict:
    """A JSON file of the teacher: a local folder or a hub id (read through the hub cache)."""
    from .models.loading import _read_json

    data = _read_json(teacher_path, name, subfolder)
    if data is None:
        where = os.path.join(teacher_path, subfolder or "", name)
        raise FileNotFoundError(f"cannot export: the teacher has no {where!r}")
    return data


def _plain(folder, call: str) -> str:
    return _PLAIN.format(folder=folder, imports="import stepdistill  # registers the pipeline class\n", call=call)


def _text_call(stock_class, folder, steps_args, w, stochastic_multistep: bool, teacher=None, scheduler_class=None):
    """The stock text-to-image snippet (the exported folder, or the teacher + ``lora/`` when ``teacher``)."""
    # SDXL: stepdistill's pipeline adds no invisible watermark (stock adds one when the package is installed)
    load_args = ", add_watermarker=False" if stock_class == "StableDiffusionXLPipeline" else ""
    bind = _BIND_GENERATOR if stochastic_multistep else ""
    imports = "import functools\n\nimport torch\n" if bind else "import torch\n"
    common = dict(stock_class=stock_class, folder=folder, load_args=load_args, bind=bind, imports=imports)
    common.update(steps_args=steps_args, w=0.0 if w is None else w)
    if teacher is None:
        return _STOCK_TEXT.format(**common)
    return _STOCK_LORA.format(**common, teacher=teacher, scheduler_class=scheduler_class)


_TEXT_PLAIN = 'image = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0)).images[0]'


def _text_pipeline(teacher_path, net, scheduler, timesteps, path, kind="lcm", w=None):
    from diffusers import DiffusionPipeline

    from .pipelines import StepDistillSDPipeline, StepDistillSDXLPipeline

    index = _teacher_json(teacher_path, "model_index.json")
    sdxl = "text_encoder_2" in index
    cls, stock_class = (
        (StepDistillSDXLPipeline, "StableDiffusionXLPipeline")
        if sdxl
        else (StepDistillSDPipeline, "StableDiffusionPipeline")
    )
    extra = {} if sdxl else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    base = DiffusionPipeline.from_pretrained(teacher_path, unet=net, scheduler=scheduler, **extra)
    comps = {k: v for k, v in base.components.items() if k in cls.__init__.__code__.co_varnames}
    comps.update(unet=net, scheduler=scheduler)
    pipe = cls(**comps, trained_timesteps=timesteps, default_guidance_scale=w)
    pipe._stock_class = stock_class
    # stock SD / SDXL pipelines pass `generator` to the scheduler's step themselves
    stock = _text_call(stock_class, path, _steps_args(kind, timesteps), w, False)
    return {
        "pipe": pipe,
        "stock_call": stock,
        "stock_note": f"`{stock_class}` with the trained timesteps and guidance off.",
        "plain_call": _plain(path, _TEXT_PLAIN),
        "pipeline_tag": "text-to-image",
    }


def _dit_pipeline(teacher_path, net, scheduler, timesteps, path, kind="lcm"):
    """A DiTPipeline folder: the teacher's VAE and ImageNet label names, the generator, the student scheduler."""
    import diffusers

    from .pipelines import StepDistillDiTPipeline

    index = _teacher_json(teacher_path, "model_index.json")
    vae_cls = getattr(diffusers, (index.get("vae") or [None, "AutoencoderKL"])[1])
    vae = vae_cls.from_pretrained(teacher_path, subfolder="vae").eval()
    pipe = StepDistillDiTPipeline(
        transformer=net, vae=vae, scheduler=scheduler, id2label=index.get("id2label"), trained_timesteps=timesteps
    )
    stock = _STOCK_DIT.format(
        folder=path, scheduler_class=type(scheduler).__name__, set_timesteps=_set_timesteps_arg(kind, timesteps)
    )
    call = 'images = pipe(class_labels=[0, 1, 2, 3], generator=torch.Generator().manual_seed(0), output_type="pt")'
    return {
        "pipe": pipe,
        "stock_call": stock,
        "stock_note": (
            "a loop over the stock components (`DiTPipeline`'s own call runs 50 steps with classifier-free "
            "guidance on ImageNet's null class and does not seed its scheduler's re-noising)."
        ),
        "plain_call": _plain(path, call + ".images  # (N, 3, H, W) in [0, 1]: the same images as the loop"),
        "pipeline_tag": "unconditional-image-generation",
    }


def _sd3_pipeline(teacher_path, net, scheduler, timesteps, path, w=None):
    """A StableDiffusion3Pipeline folder: the teacher's text encoders and VAE, the generator, the flow scheduler."""
    from diffusers import DiffusionPipeline

    from .pipelines import StepDistillSD3Pipeline

    base = DiffusionPipeline.from_pretrained(teacher_path, transformer=net, scheduler=scheduler)
    init = StepDistillSD3Pipeline.__init__.__code__.co_varnames
    comps = {k: v for k, v in base.components.items() if k in init}
    comps.update(transformer=net, scheduler=scheduler)
    pipe = StepDistillSD3Pipeline(**comps, trained_timesteps=timesteps, default_guidance_scale=w)
    pipe._stock_class = "StableDiffusion3Pipeline"
    T = scheduler.config.num_train_timesteps
    steps_args = _steps_args("lcm", timesteps, flow_T=T)
    stock = _text_call("StableDiffusion3Pipeline", path, steps_args, w, _sd3_needs_bind(scheduler, timesteps))
    return {
        "pipe": pipe,
        "stock_call": stock,
        "stock_note": "`StableDiffusion3Pipeline` with the trained sigmas (timesteps / T) and guidance off.",
        "plain_call": _plain(path, _TEXT_PLAIN),
        "pipeline_tag": "text-to-image",
    }


def _sd3_needs_bind(scheduler, timesteps) -> bool:
    return bool(scheduler.config.get("stochastic_sampling", False)) and len(timesteps) > 1


def _save_lora(trainer, pipe, tmp, path, timesteps, kind="lcm", w=None) -> str:
    """Write the generator's adapter as ``lora/`` (diffusers' LoRA format: ``unet.``-prefixed peft keys plus
    the adapter's rank / alpha / targets as metadata), loadable by ``load_lora_weights`` on the teacher."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    net = _unwrap(trainer.accelerator.unwrap_model(trainer.specs["generator"].module))
    sd = get_peft_model_state_dict(net, adapter_name=trainer.generator.adapter_name)
    sd = {k: v.detach().to(torch.float32).cpu().contiguous() for k, v in sd.items()}
    stock_class = pipe._stock_class
    saver = getattr(diffusers, stock_class)
    rank = trainer.config.lora_rank
    alpha = trainer.config.lora_alpha
    metadata = {
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(net.peft_config[trainer.generator.adapter_name].target_modules),
    }
    prefix = "transformer" if stock_class == "StableDiffusion3Pipeline" else "unet"
    saver.save_lora_weights(
        os.path.join(tmp, "lora"),
        **{f"{prefix}_lora_layers": sd, f"{prefix}_lora_adapter_metadata": metadata},
        safe_serialization=True,
    )
    flow_T = pipe.scheduler.config.num_train_timesteps if prefix == "transformer" else None
    bind = prefix == "transformer" and _sd3_needs_bind(pipe.scheduler, timesteps)
    steps_args = _steps_args(kind, timesteps, flow_T=flow_T)
    return _text_call(
        stock_class,
        path,
        steps_args,
        w,
        bind,
        teacher=trainer.config.teacher,
        scheduler_class=type(pipe.scheduler).__name__,
    )
