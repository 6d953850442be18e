"""Progressive and guided distillation: the target and weightings against hand-worked values, a halving round
on the 2-D mixture, guided students that cost one evaluation per step, LoRA rounds folded into the base,
exact resume across a round boundary, export of the DDIM-trailing pipeline (digits and a tiny SD teacher),
and bad input."""

from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline
from PIL import Image
from tiny_models import save_tiny_pipeline, tiny_sd_components

import stepdistill  # noqa: F401  (registers the pipelines)
from stepdistill.assets import digits_teacher_path
from stepdistill.config import ConfigError, build_config
from stepdistill.data import mode_coverage, sample_toy2d, sliced_wasserstein
from stepdistill.export import student_scheduler
from stepdistill.models import Teacher
from stepdistill.models.adapters import lora_parameters
from stepdistill.sampling import ddim_step
from stepdistill.schedules import VPSchedule
from stepdistill.train import make_trainer
from stepdistill.trainers.progressive import (
    ProgressiveConfig,
    ProgressiveTrainer,
    progressive_loss,
    progressive_target,
    progressive_weight,
)


def _trainer(out, **kw):
    base = dict(
        output_dir=str(out),
        teacher="digits",
        dataset="digits",
        start_steps=4,
        final_steps=2,
        steps_per_round=2,
        global_batch=4,
        learning_rate=1e-3,
        checkpoint_every=0,
        progress=False,
    )
    base.update(kw)
    return ProgressiveTrainer(build_config(ProgressiveConfig, base))


# ---------------------------------------------------------------------------------------------- pure math
def test_target_is_the_x0_whose_ddim_step_lands_on_the_two_step_result():
    sched = VPSchedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"})
    g = torch.Generator().manual_seed(0)
    z_t = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    z2 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.3], dtype=torch.float64)
    t2 = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    x_tilde = progressive_target(z_t, sched.alpha(t), sched.sigma(t), z2, sched.alpha(t2), sched.sigma(t2))
    # one DDIM step from z_t with x0 = x~ (and the eps it implies) reaches z'' exactly
    eps = sched.to_x0_eps(x_tilde, z_t, t, "x0")[1]
    torch.testing.assert_close(ddim_step(sched, x_tilde, eps, t, t2), z2, rtol=0, atol=1e-10)
    # the last step (onto data: alpha'' = 1, sigma'' = 0) targets z'' itself
    last = progressive_target(z_t, sched.alpha(t), sched.sigma(t), z2, torch.ones(3), torch.zeros(3))
    torch.testing.assert_close(last, z2)


def test_weightings_and_loss_hand_worked():
    snr = torch.tensor([0.25, 4.0])
    torch.testing.assert_close(progressive_weight(snr, "snr_trunc"), torch.tensor([1.0, 4.0]))
    torch.testing.assert_close(progressive_weight(snr, "snr"), torch.tensor([0.25, 4.0]))
    torch.testing.assert_close(progressive_weight(snr, "constant"), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(progressive_weight(snr, "v_mse"), torch.tensor([1.25, 5.0]))
    # sample 0: errors [1, 1] -> mse 1, weight 1; sample 1: errors [2, 0] -> mse 2, weight 4: mean (1 + 8) / 2
    pred = torch.tensor([[1.0, -1.0], [2.0, 0.0]])
    assert float(progressive_loss(pred, torch.zeros(2, 2), snr)) == pytest.approx(4.5)
    # snr_trunc = max(x-MSE, eps-MSE) (the paper's definition): eps error = -(alpha / sigma) x error
    a, s = torch.tensor(0.6), torch.tensor(0.8)
    x_err = torch.tensor([[0.3, -0.2]])
    eps_mse = ((a / s) * x_err).pow(2).mean()
    expected = max(float(x_err.pow(2).mean()), float(eps_mse))
    got = progressive_loss(x_err, torch.zeros_like(x_err), ((a / s) ** 2).reshape(1))
    assert float(got) == pytest.approx(expected)
    with pytest.raises(ValueError, match="unknown progressive weighting"):
        progressive_weight(snr, "bogus")


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32, 64])
def test_trained_grid_is_ddim_trailing_grid(n):
    sched = VPSchedule.from_config({"num_train_timesteps": 1000})
    ts = [int(round(float(v))) for v in sched.t_to_timestep(sched.timesteps(n, "trailing"))]
    exported = student_scheduler("ddim", {"num_train_timesteps": 1000}, ts)
    assert isinstance(exported, DDIMScheduler) and exported.config.timestep_spacing == "trailing"
    # and halving keeps every other point: the teacher's two steps end on the student's grid
    fine = [int(round(float(v))) for v in sched.t_to_timestep(sched.timesteps(2 * n, "trailing"))]
    assert fine[::2] == ts


# ---------------------------------------------------------------------------------------------- 2-D mixture
def test_a_round_halves_the_steps_and_keeps_the_distance(toy_teacher, tmp_path):
    trainer = _trainer(
        tmp_path,
        teacher=toy_teacher,
        dataset="toy2d:gmm8",
        start_steps=8,
        final_steps=4,
        steps_per_round=300,
        global_batch=256,
        learning_rate=1e-3,
    )
    trainer.setup()
    teacher = Teacher.from_pretrained(toy_teacher)
    ref, _ = sample_toy2d("gmm8", 2000, torch.Generator().manual_seed(1))
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(2))

    def sw(x):
        return sliced_wasserstein(x, ref, generator=torch.Generator().manual_seed(0))

    from stepdistill.sampling import sample

    def teacher_at(n):
        return sample(lambda x, t: teacher.raw(x, t), teacher.schedule, z, n, pred_type=teacher.prediction_type)

    d_teacher8, d_teacher4 = sw(teacher_at(8)), sw(teacher_at(4))
    teacher_before = [p.detach().clone() for p in trainer.teacher.net.parameters()]
    gen_before = [p.detach().clone() for p in trainer.generator.net.parameters()]
    assert len(trainer.generator.timesteps) == 4
    trainer.train()
    x = trainer.generator.sample(z)
    d_student = sw(x)
    assert d_student <= 1.5 * d_teacher8, f"student@4 {d_student:.3f} vs teacher@8 {d_teacher8:.3f}"
    assert d_student < d_teacher4, f"student@4 {d_student:.3f} not better than teacher@4 {d_teacher4:.3f}"
    assert mode_coverage(x, "gmm8")[0] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, trainer.teacher.net.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(gen_before, trainer.generator.net.parameters()))


# ---------------------------------------------------------------------------------------------- digits
def test_rounds_halve_and_the_student_becomes_the_teacher(tmp_path):
    trainer = _trainer(tmp_path, start_steps=8, final_steps=2, steps_per_round=2, save_rounds=True)
    trainer.setup()
    assert trainer.config.max_steps == 4 and len(trainer.generator.timesteps) == 4
    trainer.config.max_steps = 3  # stop inside round 1, after the hand-over
    trainer.train()
    assert len(trainer.generator.timesteps) == 2
    student = trainer.accelerator.unwrap_model(trainer.specs["generator"].module)
    assert trainer.round_teacher is not None and trainer.teacher is None  # the original teacher is released
    # the round teacher is the student as it was at the end of round 0: trained one more step since
    assert any(not torch.equal(a, b) for a, b in zip(trainer.round_teacher.net.parameters(), student.parameters()))
    assert all(not p.requires_grad for p in trainer.round_teacher.net.parameters())
    # round 0's 4-step student was exported on the way
    assert os.path.isfile(os.path.join(tmp_path, "rounds", "4_steps", "unet", "diffusion_pytorch_model.safetensors"))


def test_resume_across_a_round_boundary_is_exact(tmp_path):
    kw = dict(start_steps=8, final_steps=2, steps_per_round=3, checkpoint_every=4)
    full = _trainer(tmp_path / "a", **kw)
    full.train()
    shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns("step_0000006"))
    assert [os.path.basename(p) for p in glob.glob(str(tmp_path / "b" / "checkpoints" / "*"))] == ["step_0000004"]
    rest = _trainer(tmp_path / "b", resume="latest", **kw)
    rest.train()
    a = [h["loss"] for h in full.history[4:]]
    b = [h["loss"] for h in rest.history]
    assert len(b) == 2
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-7, rtol=0)
    for p, q in zip(full.generator.net.parameters(), rest.generator.net.parameters()):
        torch.testing.assert_close(p, q, atol=1e-7, rtol=0)


def test_lora_rounds_fold_into_one_base(tmp_path):
    trainer = _trainer(tmp_path, generator_mode="lora", lora_rank=4, lora_alpha=4.0, steps_per_round=3)
    trainer.setup()
    net = trainer.generator.net
    assert trainer.round_teacher is trainer.teacher and trainer.teacher.shares_base
    assert trainer.teacher.net is net  # one copy of the base weights
    base_before = {k: v.clone() for k, v in net.state_dict().items() if "lora_" not in k}
    x = torch.randn(4, 1, 16, 16)
    t = torch.full((4,), 0.6, dtype=torch.float64)
    cond = trainer.conditioner(torch.tensor([1, 2, 3, 4]))
    trainer.config.max_steps = 3  # exactly one round
    trainer.train()
    student_out = trainer.generator.predict(x, t, cond)
    trainer._finish_stage()
    # folded: the base alone (the next round's teacher) now computes the trained student, the LoRA is reset
    torch.testing.assert_close(trainer.teacher.predict(x, t, cond), student_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(trainer.generator.predict(x, t, cond), student_out, atol=1e-5, rtol=1e-4)
    assert all(float(p.detach().abs().max()) == 0 for n, p in net.named_parameters() if "lora_B" in n)
    changed = [k for k, v in net.state_dict().items() if "lora_" not in k and not torch.equal(v, base_before[k])]
    assert changed and all(p.requires_grad for p in lora_parameters(net, "generator"))


def _eps_digits_teacher(root) -> str:
    """The digits teacher's folder with its scheduler declaring epsilon prediction (the network is unchanged:
    read as eps it is another, valid, eps teacher)."""
    path = os.path.join(root, "eps_teacher")
    shutil.copytree(digits_teacher_path(), path)
    cfg_file = os.path.join(path, "scheduler", "scheduler_config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    cfg["prediction_type"] = "epsilon"
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)
    return path


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_eps_teacher_next_round_teacher_is_the_student(tmp_path, mode):
    """An eps teacher gets a v student (student_prediction auto); after round 0 the round teacher (a copy, or the
    base with the LoRA folded in) must be read as v: its x0 equals the round-0 student's x0."""
    lora = dict(generator_mode="lora", lora_rank=4, lora_alpha=4.0) if mode == "lora" else {}
    trainer = _trainer(
        tmp_path / "run", teacher=_eps_digits_teacher(tmp_path), start_steps=8, steps_per_round=2, **lora
    )
    trainer.setup()
    assert trainer.teacher.prediction_type == "eps" and trainer.generator.prediction_type == "v"
    trainer.config.max_steps = 2  # exactly round 0
    trainer.train()
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = trainer.conditioner(torch.tensor([1, 2, 3, 4]))
    t = torch.tensor([0.3, 0.6, 0.8, 0.95], dtype=torch.float64)
    student_x0 = trainer.generator.predict(x, t, cond, target="x0")
    trainer._finish_stage()
    trainer._enter_stage(trainer.stage_at(2))
    teacher_x0 = trainer.round_teacher.predict(x, t, cond, target="x0")
    torch.testing.assert_close(teacher_x0, student_x0, atol=1e-4, rtol=1e-4)
    # a resumed run in round 1 reads the folded base the same way
    trainer._enter_stage(("round", 1))
    assert trainer.round_teacher.prediction_type == "v"


def test_guided_student_costs_one_evaluation_and_follows_w(tmp_path):
    trainer = _trainer(
        tmp_path, guided=True, guided_steps=2, w_min=1.0, w_max=5.0, w_embedding_dim=32, guidance_scale=2.0
    )
    trainer.train()
    assert len(trainer.history) == 4 and trainer.generator.w_conditioned
    path = trainer.export()
    pipe = DiffusionPipeline.from_pretrained(path)
    assert type(pipe.unet).__name__ == "GuidedUNet2DModel" and isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.config.default_guidance_scale == 2.0 and pipe.config.trained_timesteps == [999, 499]
    calls = []
    pipe.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    outs = {}
    for w in (2.0, 4.0):
        calls.clear()
        g = torch.Generator().manual_seed(0)
        outs[w] = pipe(class_labels=[3, 5], guidance_scale=w, generator=g, output_type="pt").images
        assert calls == [2, 2], f"w={w}: {calls} (one evaluation of the 2-sample batch per step)"
    assert not torch.allclose(outs[2.0], outs[4.0])
    # the default call uses the exported scale
    calls.clear()
    default = pipe(class_labels=[3, 5], generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(default, outs[2.0])
    card = open(os.path.join(path, "README.md")).read()
    assert "GuidedUNet2DModel" in card and "DDIMScheduler" in card


def test_guided_lora_one_base_projection_then_w_conditioned_rounds(tmp_path):
    """Guided + LoRA (LoRA-enhanced guided distillation): one copy of the weights; the student starts as the
    teacher's conditional branch; stage one trains the adapter and the zero-initialised w-projection while the
    teacher runs CFG on the base (doubled batch, no guidance input); the rounds read the folded base as a
    w-conditioned teacher (one evaluation of the batch per teacher step) and leave the projection frozen; the
    export is a GuidedUNet2DModel pipeline whose sampler reproduces the trainer's."""
    trainer = _trainer(tmp_path, guided=True, guided_steps=2, w_min=1.0, w_max=5.0, w_embedding_dim=32,
                       guidance_scale=2.0, generator_mode="lora", lora_rank=4, lora_alpha=4.0)  # fmt: skip
    trainer.setup()
    net = trainer.generator.net
    assert trainer.teacher.net is net and type(net).__name__ == "GuidedUNet2DModel"
    assert trainer.generator.w_conditioned and not trainer.teacher.w_conditioned
    proj = net.time_embedding.cond_proj.weight
    assert float(proj.detach().abs().max()) == 0 and any(p is proj for p in trainer.generator_params())
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.full((4,), 0.6, dtype=torch.float64)
    cond = trainer.conditioner(torch.tensor([1, 2, 3, 4]))
    teacher_cfg = trainer.teacher.raw(x, t, cond, 3.0)
    torch.testing.assert_close(trainer.generator.raw(x, t, cond, 3.0), trainer.teacher.raw(x, t, cond))

    calls, snaps = [], {}
    net.register_forward_hook(lambda m, a, kw, o: calls.append((trainer.global_step, a[0].shape[0],
                                                                 kw.get("timestep_cond") is not None)),
                              with_kwargs=True)  # fmt: skip
    end = trainer.on_step_end

    def snapshot(step):
        snaps[step] = proj.detach().clone()
        if step == 1:  # stage one is over, before the fold: the teacher's CFG output is unchanged
            torch.testing.assert_close(trainer.teacher.raw(x, t, cond, 3.0), teacher_cfg)
        end(step)

    trainer.on_step_end = snapshot
    trainer.train()
    assert not torch.equal(snaps[1], torch.zeros_like(snaps[1]))  # the projection trained in stage one
    assert torch.equal(snaps[3], snaps[1]) and not proj.requires_grad  # and is frozen in the rounds
    stage_one = [c for c in calls if c[0] < 2 and not c[2]]  # teacher calls: CFG, doubled batch
    assert stage_one and all(b == 2 * 4 for _, b, _ in stage_one)
    rounds = [c for c in calls if c[0] >= 2]  # teacher DDIM steps and the student: batch of 4, w as input
    assert len(rounds) == 3 * 2 and all(b == 4 and w for _, b, w in rounds)

    path = trainer.export()
    pipe = DiffusionPipeline.from_pretrained(path)
    assert type(pipe.unet).__name__ == "GuidedUNet2DModel" and pipe.config.trained_timesteps == [999, 499]
    labels = torch.tensor([3, 5])
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    ours = trainer.generator.sample(noise, trainer.conditioner(labels), guidance_scale=2.0)
    got = pipe(class_labels=[3, 5], guidance_scale=2.0, generator=torch.Generator().manual_seed(1), output_type="pt")
    got = got.images
    torch.testing.assert_close(got, (ours / 2 + 0.5).clamp(0, 1), atol=1e-4, rtol=1e-4)


def test_stock_ddim_call_reproduces_the_student_sampler(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.train()
    path = trainer.export()
    unet = DiffusionPipeline.from_pretrained(path).unet
    sched = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
    sched.set_timesteps(2)
    assert sched.timesteps.tolist() == [999, 499]
    labels = torch.tensor([1, 7])
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    x = noise
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t, class_labels=labels).sample, t, x).prev_sample
        ours = trainer.generator.sample(noise, trainer.conditioner(labels))
    torch.testing.assert_close(x, ours, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- tiny SD
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_tiny_sd_round_and_export(tmp_path, mode):
    teacher = save_tiny_pipeline(tiny_sd_components(tmp_path / "src"), StableDiffusionPipeline, tmp_path / "sd")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(["a cat", "a dog"]):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(caption)
    trainer = _trainer(
        tmp_path / "run",
        teacher=teacher,
        dataset=str(images),
        resolution=8,
        global_batch=2,
        guided=True,
        guided_steps=1,
        w_embedding_dim=32,
        teacher_cond_dropout=0.1,
        **(dict(generator_mode="lora", lora_rank=4, lora_alpha=4.0) if mode == "lora" else {}),
    )
    trainer.train()
    assert trainer.generator.prediction_type == "v"  # eps teacher -> v-prediction student
    path = trainer.export()
    with open(os.path.join(path, "scheduler", "scheduler_config.json")) as f:
        sc = json.load(f)
    assert sc["prediction_type"] == "v_prediction" and sc["timestep_spacing"] == "trailing"
    assert json.load(open(os.path.join(path, "unet", "config.json")))["time_cond_proj_dim"] == 32
    assert not os.path.exists(os.path.join(path, "lora"))  # a teacher + lora/ would have no w-projection
    pipe = DiffusionPipeline.from_pretrained(path)
    out = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 16, 16, 3) and np.isfinite(out.images).all()
    # the stock class loads it too and, seeing time_cond_proj_dim, feeds the guidance embedding (no CFG pass)
    stock = StableDiffusionPipeline.from_pretrained(path)
    calls = []
    stock.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    stock("a cat", num_inference_steps=2, guidance_scale=3.0, output_type="np")
    assert calls == [1, 1]


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input(tmp_path, toy_teacher):
    with pytest.raises(ConfigError, match="final_steps=3 is not reached by halving start_steps=64"):
        _trainer(tmp_path, start_steps=64, final_steps=3)
    with pytest.raises(ConfigError, match="final_steps=8 is not reached"):
        _trainer(tmp_path, start_steps=8, final_steps=8)
    with pytest.raises(ConfigError, match="steps_per_round must be >= 1"):
        _trainer(tmp_path, steps_per_round=0)
    with pytest.raises(ConfigError, match="guided_steps >= 1"):
        _trainer(tmp_path, guided=True, guided_steps=0)
    with pytest.raises(ConfigError, match="max_steps=7"):
        _trainer(tmp_path, max_steps=7)
    # a teacher without an unconditional branch cannot be guided at all
    with pytest.raises(ConfigError, match="unconditional branch"):
        _trainer(tmp_path, teacher=toy_teacher, dataset="toy2d:gmm8", guided=True, guided_steps=1).setup()
    # a teacher trained without label dropout: its null class is untrained -> warn
    no_drop = tmp_path / "no_dropout_teacher"
    shutil.copytree(digits_teacher_path(), no_drop)
    (no_drop / "training.json").write_text(json.dumps({"label_dropout": 0.0}))
    with pytest.warns(UserWarning, match="unconditional branch is undefined"):
        _trainer(tmp_path / "w", teacher=str(no_drop), guided=True, guided_steps=1).setup()
    # the bundled teacher records its 10% dropout: no warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _trainer(tmp_path / "ok", guided=True, guided_steps=1).setup()


def test_recipes_parse():
    for name in ("digits", "digits_guided", "toy2d", "sd15_guided"):
        path = os.path.join(os.path.dirname(__file__), "..", "recipes", "progressive", f"{name}.yaml")
        extra = ["teacher=digits"] if name == "toy2d" else []  # its teacher is made by another recipe
        trainer = make_trainer(path, ["output_dir=/tmp/never_written", *extra])
        assert isinstance(trainer, ProgressiveTrainer)
