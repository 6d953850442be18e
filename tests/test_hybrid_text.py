"""Hybrid sampling of the latent exports (SD / SDXL / SD3 text-to-image, DiT) on tiny components: which network
runs at which step with which timestep and batch (CFG doubles the teacher's), the latent handed to the student
against a teacher step computed by hand from the stock pipeline's own prompt embeddings, k = 0 = the plain call,
and LoRA students on the teacher's own weights."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from tiny_models import (
    build_tiny_pipeline,
    save_tiny_pipeline,
    tiny_dit,
    tiny_sd3_components,
    tiny_sd_components,
    tiny_sd_unet,
    tiny_sdxl_components,
    tiny_sdxl_unet,
    tiny_vae,
)

from stepdistill.export import flow_scheduler_for, student_scheduler
from stepdistill.hybrid import load_lora_student, lora_teacher
from stepdistill.models import Teacher
from stepdistill.models.adapters import add_lora, tuner_layers
from stepdistill.pipelines import (
    StepDistillDiTPipeline,
    StepDistillSD3Pipeline,
    StepDistillSDPipeline,
    StepDistillSDXLPipeline,
)
from stepdistill.schedules import FlowSchedule, VPSchedule

SD_VP = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}
DIT_VP = {**SD_VP, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
FOUR = [999, 749, 499, 249]
PROMPT = "a cat"


def _record(net, name, calls):
    """Forward hook: (network, timestep, batch, adapters off?, input, kwargs) of every call."""

    def hook(module, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        t = round(float(torch.as_tensor(t).reshape(-1)[0]), 2)
        layers = tuner_layers(module)
        off = bool(layers) and all(m.disable_adapters for m in layers)
        calls.append((name, t, x.shape[0], off, x.detach().clone(), kwargs))

    return net.register_forward_hook(hook, with_kwargs=True)


def _hooked(nets: dict):
    calls = []
    return calls, [_record(net, name, calls) for name, net in nets.items()]


def _seq(calls):
    return [(name, t, b) for name, t, b, *_ in calls]


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _sd(tmp_path, student, kind="lcm"):
    comps = {**tiny_sd_components(tmp_path), "unet": student, "scheduler": student_scheduler(kind, SD_VP, FOUR)}
    return build_tiny_pipeline({**comps, "trained_timesteps": FOUR}, StepDistillSDPipeline)


# --------------------------------------------------------------------------------------------------------
# SD 1.5: LCM / TCD students, the hand-over latent by hand
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,k", [("lcm", 1), ("lcm", 2), ("tcd", 1)])
def test_sd_student_hooks_and_the_handed_over_latent(tmp_path, kind, k):
    teacher_net, student_net = tiny_sd_unet(seed=1).eval(), tiny_sd_unet(seed=2).eval()
    pipe = _sd(tmp_path, student_net, kind)
    teacher = Teacher(teacher_net, VPSchedule.from_config(SD_VP), "eps")
    calls, hooks = _hooked({"teacher": teacher_net, "student": student_net})
    pipe(PROMPT, num_images_per_prompt=2, generator=_g(), output_type="pt", teacher=teacher, teacher_steps=k,
         teacher_guidance_scale=3.0)
    for h in hooks:
        h.remove()
    assert _seq(calls) == [("teacher", float(t), 4) for t in FOUR[:k]] + [("student", float(t), 2) for t in FOUR[k:]]
    # by hand: the stock encode_prompt's embeddings, CFG 3, DDIM steps on the scheduler's own alphas_cumprod
    cond, null = pipe.encode_prompt(PROMPT, "cpu", 2, True)
    ab = pipe.scheduler.alphas_cumprod.double()
    x = torch.randn(2, 4, 8, 8, generator=_g())
    for t, t_next in zip(FOUR[:k], FOUR[1 : k + 1]):
        with torch.no_grad():
            both = teacher_net(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([cond, null])).sample
        out_c, out_u = both.chunk(2)
        eps = (out_u + 3.0 * (out_c - out_u)).double()
        x0 = (x - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()
        x = (ab[t_next].sqrt() * x0 + (1 - ab[t_next]).sqrt() * eps).float()
    first_student_input = next(c[4] for c in calls if c[0] == "student")
    torch.testing.assert_close(first_student_input, x, atol=1e-4, rtol=1e-4)


def test_sd_k0_is_the_plain_call_and_the_refusals(tmp_path):
    pipe = _sd(tmp_path, tiny_sd_unet(seed=2).eval())
    teacher = Teacher(tiny_sd_unet(seed=1).eval(), VPSchedule.from_config(SD_VP), "eps")
    def run(**kw):
        return pipe(PROMPT, generator=_g(), output_type="pt", **kw).images

    plain = run()
    assert torch.equal(plain, run(teacher=teacher, teacher_steps=0))
    assert not torch.equal(plain, run(teacher=teacher, teacher_steps=1))
    with pytest.raises(ValueError, match="negative_prompt"):
        pipe(PROMPT, negative_prompt="dog", teacher=teacher, teacher_steps=1)
    with pytest.raises(ValueError, match="trained timesteps"):
        pipe(PROMPT, num_inference_steps=2, teacher=teacher, teacher_steps=1)
    with pytest.raises(ValueError, match="no student step is left"):
        pipe(PROMPT, teacher=teacher, teacher_steps=4)
    with pytest.raises(ValueError, match="needs a teacher"):
        pipe(PROMPT, teacher_steps=1)


# --------------------------------------------------------------------------------------------------------
# SDXL: trailing-DDIM student (no custom timesteps: run from the hand-over index), the teacher's conditions
# --------------------------------------------------------------------------------------------------------


def test_sdxl_ddim_student_runs_its_grid_from_the_handover_and_the_teacher_gets_the_stock_conditions(tmp_path):
    comps = tiny_sdxl_components(tmp_path)
    teacher_net, student_net = tiny_sdxl_unet(seed=1).eval(), tiny_sdxl_unet(seed=2).eval()
    comps.update(unet=student_net, scheduler=student_scheduler("ddim", SD_VP, FOUR), trained_timesteps=FOUR)
    pipe = build_tiny_pipeline(comps, StepDistillSDXLPipeline)
    teacher = Teacher(teacher_net, VPSchedule.from_config(SD_VP), "eps")
    calls, hooks = _hooked({"teacher": teacher_net, "student": student_net})
    pipe(PROMPT, generator=_g(), output_type="pt", teacher=teacher, teacher_steps=1, teacher_guidance_scale=2.0)
    for h in hooks:
        h.remove()
    assert _seq(calls) == [("teacher", 999.0, 2), ("student", 749.0, 1), ("student", 499.0, 1), ("student", 249.0, 1)]
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True)
    kw = calls[0][5]
    torch.testing.assert_close(kw["encoder_hidden_states"], torch.cat([embeds, neg]))
    torch.testing.assert_close(kw["added_cond_kwargs"]["text_embeds"], torch.cat([pooled, neg_pooled]))
    assert kw["added_cond_kwargs"]["time_ids"].tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2
    # the scheduler is whole again afterwards: a plain call runs all four trained steps
    calls.clear()
    hook = _record(student_net, "student", calls)
    pipe(PROMPT, generator=_g(), output_type="pt")
    hook.remove()
    assert [t for _, t, *_ in calls] == [float(t) for t in FOUR]


# --------------------------------------------------------------------------------------------------------
# SD3: flow student (re-noising), the hand-over latent by hand (an Euler step = DDIM for a flow)
# --------------------------------------------------------------------------------------------------------


def test_sd3_student_hooks_and_the_handed_over_latent(tmp_path):
    comps = tiny_sd3_components(tmp_path)
    teacher_net = comps["transformer"].eval()
    student_net = tiny_sd3_components(tmp_path)["transformer"]
    with torch.no_grad():
        for p in student_net.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=_g(5)))
    comps.update(transformer=student_net.eval(), scheduler=flow_scheduler_for("lcm", {}), trained_timesteps=FOUR)
    pipe = build_tiny_pipeline(comps, StepDistillSD3Pipeline)
    teacher = Teacher(teacher_net, FlowSchedule(1000, shift=3.0), "flow")
    calls, hooks = _hooked({"teacher": teacher_net, "student": student_net})
    pipe(PROMPT, generator=_g(), output_type="pt", teacher=teacher, teacher_steps=2, teacher_guidance_scale=2.0)
    for h in hooks:
        h.remove()
    assert _seq(calls) == [("teacher", 999.0, 2), ("teacher", 749.0, 2), ("student", 499.0, 1), ("student", 249.0, 1)]
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPT, None, None, device="cpu")
    x = torch.randn(1, 4, 8, 8, generator=_g())
    for t, t_next in ((0.999, 0.749), (0.749, 0.499)):
        with torch.no_grad():
            u_c, u_u = teacher_net(
                hidden_states=torch.cat([x, x]),
                timestep=torch.full((2,), t * 1000),
                encoder_hidden_states=torch.cat([embeds, neg]),
                pooled_projections=torch.cat([pooled, neg_pooled]),
            ).sample.chunk(2)
        x = x + (t_next - t) * (u_u + 2.0 * (u_c - u_u))
    torch.testing.assert_close(next(c[4] for c in calls if c[0] == "student"), x, atol=1e-4, rtol=1e-4)
    plain = pipe(PROMPT, generator=_g(), output_type="pt").images
    assert torch.equal(plain, pipe(PROMPT, generator=_g(), output_type="pt", teacher=teacher, teacher_steps=0).images)


# --------------------------------------------------------------------------------------------------------
# DiT
# --------------------------------------------------------------------------------------------------------


def _dit(net):
    pipe = StepDistillDiTPipeline(
        transformer=net, vae=tiny_vae(), scheduler=student_scheduler("lcm", DIT_VP, FOUR), trained_timesteps=FOUR
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_dit_student_hooks_and_k0():
    teacher_net, student_net = tiny_dit(seed=1).eval(), tiny_dit(seed=2).eval()
    pipe = _dit(student_net)
    teacher = Teacher(teacher_net, VPSchedule.from_config(DIT_VP), "eps")
    labels = [0, 3, 1]
    plain = pipe(class_labels=labels, generator=_g(), output_type="pt").images
    same = pipe(class_labels=labels, generator=_g(), output_type="pt", teacher=teacher, teacher_steps=0).images
    assert torch.equal(plain, same)
    calls, hooks = _hooked({"teacher": teacher_net, "student": student_net})
    trace = []
    pipe(class_labels=labels, generator=_g(), output_type="pt", teacher=teacher, teacher_steps=3,
         teacher_guidance_scale=4.0, trace=trace)
    for h in hooks:
        h.remove()
    assert _seq(calls) == [("teacher", 999.0, 6), ("teacher", 749.0, 6), ("teacher", 499.0, 6), ("student", 249.0, 3)]
    assert calls[0][5]["class_labels"].tolist() == labels + [4, 4, 4]  # the null class: DiT's extra row
    assert len(trace) == 4


# --------------------------------------------------------------------------------------------------------
# LoRA students: the teacher is the same network with its adapters off
# --------------------------------------------------------------------------------------------------------


def test_lora_text_student_shares_the_base(tmp_path):
    net = tiny_sd_unet(seed=1).eval()
    add_lora(net, rank=2, init_lora_weights=False)
    n_params = sum(p.numel() for p in net.parameters())
    pipe = _sd(tmp_path, net)
    calls, hooks = _hooked({"net": net})
    pipe(PROMPT, generator=_g(), output_type="pt", teacher=lora_teacher(net, VPSchedule.from_config(SD_VP), "eps"),
         teacher_steps=2, teacher_guidance_scale=2.0)
    hooks[0].remove()
    assert [(t, b, off) for _, t, b, off, *_ in calls] == [
        (999.0, 2, True), (749.0, 2, True), (499.0, 1, False), (249.0, 1, False)
    ]
    assert sum(p.numel() for p in net.parameters()) == n_params


@pytest.fixture()
def lora_export(tmp_path):
    """A tiny SD teacher folder and an LCM student export with lora/ (a random LoRA on the teacher's UNet)."""
    from peft.utils import get_peft_model_state_dict

    comps = tiny_sd_components(tmp_path)
    comps["unet"] = tiny_sd_unet(seed=1)
    comps["scheduler"] = student_scheduler("ddim", SD_VP, FOUR)  # any VP scheduler config for the teacher
    teacher_dir = save_tiny_pipeline(comps, StableDiffusionPipeline, tmp_path / "teacher")
    lora_net = tiny_sd_unet(seed=1)
    add_lora(lora_net, rank=2, init_lora_weights=False)
    export = _sd(tmp_path, tiny_sd_unet(seed=2))
    export.save_pretrained(tmp_path / "export")
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "export" / "lora", unet_lora_layers=get_peft_model_state_dict(lora_net), safe_serialization=True
    )
    return teacher_dir, tmp_path / "export", lora_net


def test_load_lora_student_puts_lora_on_the_teachers_network(lora_export):
    teacher_dir, export, lora_net = lora_export
    teacher = Teacher.from_pretrained(teacher_dir)
    pipe, shared = load_lora_student(str(export), teacher)
    assert pipe.unet is teacher.net and shared.net is teacher.net and shared.shares_base
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    ehs = torch.randn(1, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, ehs).sample, lora_net(x, t, ehs).sample, atol=1e-5, rtol=1e-5)
    calls, hooks = _hooked({"net": pipe.unet})
    pipe(PROMPT, generator=_g(), output_type="pt", teacher=shared, teacher_steps=1)
    hooks[0].remove()
    assert [(t, off) for _, t, _, off, *_ in calls] == [(999.0, True), (749.0, False), (499.0, False), (249.0, False)]


def test_cli_samples_a_text_export_with_the_teacher_first(lora_export, tmp_path, capsys):
    from stepdistill.cli import main

    teacher_dir, export, _ = lora_export
    out = tmp_path / "s.png"
    args = ["sample", "--model", str(export), "--prompt", PROMPT, "--num", "2", "--out", str(out)]
    capsys.readouterr()
    assert main(args + ["--hybrid-teacher-steps", "1", "--teacher", teacher_dir]) == 0
    io = capsys.readouterr()
    assert out.is_file() and "the first 1 run by the teacher" in io.out and "lora/ on the teacher's network" in io.out
    for extra, message in (([], "pass --prompt"), (["--prompt", PROMPT, "--hybrid-teacher-steps", "1"], "--teacher")):
        code = main(["sample", "--model", str(export), "--out", str(out), *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1


def test_cli_samples_a_dit_export_with_the_teacher_first(tmp_path, capsys):
    from diffusers import DDPMScheduler

    from stepdistill.cli import main

    _dit(tiny_dit(seed=2)).save_pretrained(tmp_path / "export")
    tiny_dit(seed=1).save_pretrained(tmp_path / "teacher" / "transformer")
    DDPMScheduler(**DIT_VP).save_pretrained(tmp_path / "teacher" / "scheduler")
    out = tmp_path / "s.png"
    args = ["sample", "--model", str(tmp_path / "export"), "--num", "3", "--out", str(out), "--hybrid-teacher-steps"]
    capsys.readouterr()
    assert main(args + ["2", "--teacher", str(tmp_path / "teacher"), "--teacher-guidance-scale", "2"]) == 0
    assert out.is_file() and "the first 2 run by the teacher" in capsys.readouterr().out
    assert main(args + ["1", "--trace", str(tmp_path / "t.png"), "--teacher", str(tmp_path / "teacher")]) == 2
    assert "--trace draws pixel-space exports only" in capsys.readouterr().err
