"""The consistency family: the solver step against diffusers' DDIMScheduler, Heun against the exact ODE, boundary
conditions (f(x, t_min) = x exactly), the losses and curricula against hand-worked values; consistency distillation
of the 2-D mixture; exact resume with a target network; EDM / flow teachers; tiny SD / SDXL components (full LCM
with a w-embedding, LCM-LoRA, multiphase): two iterations, export, reload through diffusers and stock
``load_lora_weights``; the recipes; bad input."""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image
from tiny_models import save_tiny_pipeline, tiny_sd_components, tiny_sdxl_components

import stepdistill  # noqa: F401  (registers the StepDistill* pipelines with diffusers)
from stepdistill.config import ConfigError, build_config
from stepdistill.data import mode_coverage, sample_toy2d, sliced_wasserstein
from stepdistill.losses import consistency_loss, hinge_discriminator_loss, hinge_generator_loss, ict_huber_c
from stepdistill.models import Teacher
from stepdistill.sampling import cd_scalings, ddim_step, heun_step, lcm_scalings
from stepdistill.schedules import EDMSchedule, VPSchedule
from stepdistill.train import make_trainer
from stepdistill.trainers.consistency import (
    ConsistencyConfig,
    ConsistencyTrainer,
    ect_r,
    ict_num_scales,
    karras_sigmas,
    lcm_inference_indices,
    lognormal_index_probs,
    segment_starts,
)
from stepdistill.trainers.pcm_adversarial import renoise

ROOT = Path(__file__).resolve().parents[1]
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


# --------------------------------------------------------------------------------------------------------
# pure functions against references
# --------------------------------------------------------------------------------------------------------


def _bare_trainer(schedule, net, pred, solver="ddim"):
    """A ConsistencyTrainer with only what solver_step / consistency_fn read (no setup)."""
    tr = ConsistencyTrainer.__new__(ConsistencyTrainer)
    tr.config = ConsistencyConfig()
    tr.schedule, tr.pred_type, tr.solver = schedule, pred, solver
    tr.teacher = Teacher(net, schedule, pred)
    tr.boundary = "lcm" if schedule.kind == "vp" else "edm"
    return tr


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_ddim_solver_step_equals_diffusers_ddim_step(pred):
    """The teacher step of LCM (t_{n+k} -> t_n on the 50-point DDIM grid) is DDIMScheduler.step on the same model
    output; at the bottom of the grid LCM lands on timestep 0, DDIM (set_alpha_to_one=False) on alpha_bar_0."""
    ref = DDIMScheduler(**SD_BETAS, prediction_type=pred, clip_sample=False, set_alpha_to_one=False)
    ref.set_timesteps(50)
    schedule = VPSchedule.from_config(dict(SD_BETAS, _class_name="DDIMScheduler"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    out = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    tr = _bare_trainer(schedule, lambda x_in, time, cond: out, pred)
    for ts in (999, 519, 39, 19):
        expected = ref.step(out, ts, x).prev_sample
        t = schedule.timestep_to_t(torch.full((3,), float(ts)))
        s = schedule.timestep_to_t(torch.full((3,), float(max(ts - 20, 0))))
        got = tr.solver_step(x, t, s, None, None).double()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_heun_step_matches_karras_and_beats_euler_on_a_gaussian():
    """Data N(0, c^2): D(x, sigma) = c^2 / (c^2 + sigma^2) x and the ODE solution is x sqrt((c^2 + s'^2) / (c^2 + s^2)).
    On an EDM schedule heun_step is Karras et al.'s Algorithm 1 step, written out here by hand; on a VP schedule (the
    same ODE in y = x / alpha, s = sigma / alpha) it is second order: far closer to the exact solution than DDIM."""
    c = 0.7
    edm = EDMSchedule()
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 10

    def eps_edm(x_, t_):
        s_ = edm.sigma(t_).reshape(-1, 1)
        return (x_ - c**2 / (c**2 + s_**2) * x_) / s_

    t, t_prev = torch.full((4,), 0.6, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64)
    s, s_p = float(edm.sigma(0.6)), float(edm.sigma(0.5))
    d = (x - c**2 / (c**2 + s**2) * x) / s  # Karras: d = (x - D) / sigma
    x_e = x + (s_p - s) * d
    d2 = (x_e - c**2 / (c**2 + s_p**2) * x_e) / s_p
    karras = x + (s_p - s) * 0.5 * (d + d2)
    got = heun_step(edm, x, eps_edm(x, t), t, t_prev, eps_edm)
    torch.testing.assert_close(got, karras, atol=1e-12, rtol=1e-12)

    vp = VPSchedule.from_config(dict(SD_BETAS))

    def eps_vp(x_, t_):
        a_, sg_ = vp.alpha(t_).reshape(-1, 1), vp.sigma(t_).reshape(-1, 1)
        y, lvl = x_ / a_, sg_ / a_
        return (y - c**2 / (c**2 + lvl**2) * y) / lvl

    lv, lv_p = float(vp.noise_level(0.3)), float(vp.noise_level(0.1))
    x_t = x / 10 * float(vp.alpha(0.3)) * math.sqrt(c**2 + lv**2)
    exact = x_t / float(vp.alpha(0.3)) * math.sqrt((c**2 + lv_p**2) / (c**2 + lv**2)) * float(vp.alpha(0.1))

    def errors(n):  # n steps from t = 0.3 to 0.1 with Heun and with DDIM
        ts = torch.linspace(0.3, 0.1, n + 1, dtype=torch.float64)
        xh, xd = x_t.clone(), x_t.clone()
        for i in range(n):
            t, t_prev = ts[i].expand(4), ts[i + 1].expand(4)
            xh = heun_step(vp, xh, eps_vp(xh, t), t, t_prev, eps_vp)
            e = eps_vp(xd, t)
            xd = ddim_step(vp, (xd - vp.sigma(t).reshape(-1, 1) * e) / vp.alpha(t).reshape(-1, 1), e, t, t_prev)
        return float((xh - exact).abs().max()), float((xd - exact).abs().max())

    (h4, d4), (h8, d8) = errors(4), errors(8)
    assert h4 / h8 > 3.5 and d4 / d8 < 2.5, (h4, h8, d4, d8)  # second order vs first order
    assert h8 < 0.1 * d8


def test_boundary_conditions_are_exact_at_t_min():
    # LCM's scalings are LCMScheduler's; at timestep 0: c_skip = 1, c_out = 0
    sched = LCMScheduler(**SD_BETAS)
    vp = VPSchedule.from_config(dict(SD_BETAS))
    for ts in (0, 1, 19, 259, 999):
        c_skip, c_out = lcm_scalings(vp, vp.timestep_to_t(ts))
        ref_skip, ref_out = sched.get_scalings_for_boundary_condition_discrete(ts)
        assert abs(float(c_skip) - ref_skip) < 1e-12 and abs(float(c_out) - ref_out) < 1e-12
    assert [float(v) for v in lcm_scalings(vp, 0.0)] == [1.0, 0.0]
    assert [float(v) for v in cd_scalings(0.002, 0.002)] == [1.0, 0.0]
    # through the trainer's consistency function, with a network that outputs anything: f(x, t_min) = x exactly
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    junk = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 100
    for schedule, pred in ((vp, "epsilon"), (EDMSchedule(), "epsilon"), (EDMSchedule(), "edm")):
        tr = _bare_trainer(schedule, lambda x_in, time, cond: junk, pred)
        f = tr.consistency_fn(tr.teacher, x, torch.zeros(3, dtype=torch.float64), None)
        assert torch.equal(f, x), schedule
        # ... and the boundary is not the identity elsewhere
        assert not torch.allclose(tr.consistency_fn(tr.teacher, x, torch.full((3,), 0.5), None), x)


def test_consistency_losses_hand_worked():
    pred, target = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.zeros(2, 2)
    # l2: per-sample mean of squares (1 + 4) / 2 = 2.5 and 0 -> batch mean 1.25
    torch.testing.assert_close(consistency_loss(pred, target, "l2"), torch.tensor(1.25))
    # element-wise Huber (LCM), c = 1: ((sqrt(2) - 1) + (sqrt(5) - 1)) / 2 for the first sample
    h = ((math.sqrt(2) - 1) + (math.sqrt(5) - 1)) / 2
    torch.testing.assert_close(consistency_loss(pred, target, "huber", c=1.0), torch.tensor(h / 2))
    # pseudo-Huber per sample (iCT), c = 1: sqrt(5 + 1) - 1; weights per sample
    ph = math.sqrt(6) - 1
    torch.testing.assert_close(consistency_loss(pred, target, "pseudo_huber", c=1.0), torch.tensor(ph / 2))
    w = torch.tensor([3.0, 5.0])
    torch.testing.assert_close(consistency_loss(pred, target, "pseudo_huber", 1.0, w), torch.tensor(3 * ph / 2))
    # c = 0: the L2 norm (ECT)
    torch.testing.assert_close(consistency_loss(pred, target, "pseudo_huber", 0.0), torch.tensor(math.sqrt(5) / 2))
    assert abs(ict_huber_c(256) - 0.00054 * 16) < 1e-15
    with pytest.raises(ValueError, match="unknown consistency metric"):
        consistency_loss(pred, target, "lpips")


def test_curricula_and_grids():
    # iCT: N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2(s1 / s0) + 1)) = 800 / 8 = 100
    assert [ict_num_scales(k, 800) for k in (0, 99, 100, 250, 799)] == [11, 11, 21, 41, 1281]
    sig = karras_sigmas(11, 0.002, 80.0)
    assert sig[0] == 0.002 and sig[-1] == 80.0 and (sig[1:] > sig[:-1]).all()
    p = lognormal_index_probs(sig)
    assert p.shape == (10,) and abs(float(p.sum()) - 1) < 1e-12 and int(p.argmax()) not in (0, 9)
    # ECT: r = t (1 - 2^-(stage+1) (1 + 8 sigmoid(-t))), clamped at 0; r -> t as the stage grows
    t = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    expected = (t * (1 - 0.5 * (1 + 8 * torch.sigmoid(-t)))).clamp_min(0)
    torch.testing.assert_close(ect_r(t, 0), expected)
    assert float(ect_r(t, 0)[0]) == 0.0 and torch.allclose(ect_r(t, 30), t)
    # LCMScheduler's step choice over a 50-point grid: 4 steps [999, 759, 499, 259], 2 steps [999, 499]
    grid = [20 * i - 1 for i in range(50, 0, -1)]
    for n in (1, 2, 4, 8):
        sched = LCMScheduler(**SD_BETAS, original_inference_steps=50)
        sched.set_timesteps(n)
        assert [grid[i] for i in lcm_inference_indices(50, n)] == sched.timesteps.tolist()
    # multiphase: a time's segment start is the largest edge strictly below it
    edges = torch.tensor([0.0, 249.0, 499.0, 749.0])
    starts = segment_starts(torch.tensor([999.0, 759.0, 749.0, 500.0, 259.0, 249.0, 19.0]), edges)
    assert starts.tolist() == [749.0, 749.0, 499.0, 499.0, 249.0, 0.0, 0.0]


# --------------------------------------------------------------------------------------------------------
# the 2-D mixture
# --------------------------------------------------------------------------------------------------------


def toy(teacher, out, **kw):
    base = dict(
        output_dir=str(out),
        teacher=teacher,
        dataset="toy2d:gmm8",
        mode="lcm",
        num_ddim_timesteps=20,
        inference_steps=1,
        max_steps=400,
        global_batch=256,
        learning_rate=1e-3,
        warmup_steps=0,
        weight_decay=0.0,
        checkpoint_every=0,
        progress=False,
    )
    base.update(kw)
    return ConsistencyTrainer(build_config(ConsistencyConfig, base))


def test_consistency_distillation_maps_noise_onto_every_mode(toy_teacher, tmp_path):
    trainer = toy(toy_teacher, tmp_path)
    trainer.setup()
    ref, _ = sample_toy2d("gmm8", 2000, torch.Generator().manual_seed(1))
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(2))
    teacher_before = [p.detach().clone() for p in trainer.teacher.net.parameters()]
    gen_before = [p.detach().clone() for p in trainer.generator.net.parameters()]
    sw = lambda x: sliced_wasserstein(x, ref, generator=torch.Generator().manual_seed(0))  # noqa: E731
    d0 = sw(trainer.sample(z))
    trainer.train()
    x = trainer.sample(z)  # the 1-step map f(z, T)
    d1 = sw(x)
    frac, counts = mode_coverage(x, "gmm8")
    print(f"toy CD: sliced W {d0:.3f} -> {d1:.3f}, modes hit {counts.tolist()}")
    assert d1 < 0.5 * d0, f"sliced W2 {d0:.3f} -> {d1:.3f}: not halved"
    assert frac == 1.0, f"modes missed: {counts.tolist()}"
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, trainer.teacher.net.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(gen_before, trainer.generator.net.parameters()))


def test_resume_continues_the_exact_loss_curve_with_the_target_network(toy_teacher, tmp_path):
    kw = dict(max_steps=8, checkpoint_every=4, target_ema_decay=0.9, global_batch=32)
    full = toy(toy_teacher, tmp_path / "a", **kw)
    full.train()
    part = toy(toy_teacher, tmp_path / "b", **dict(kw, max_steps=4))
    part.train()
    ckpt = sorted(glob.glob(str(tmp_path / "b" / "checkpoints" / "step_*")))[-1]
    assert os.path.isfile(os.path.join(ckpt, "extra.safetensors")), "the target network is not in the checkpoint"
    rest = toy(toy_teacher, tmp_path / "b", **dict(kw, resume="latest"))
    rest.train()
    a = [h["loss"] for h in full.history]
    b = [h["loss"] for h in part.history + rest.history]
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-7, rtol=0)
    for p, q in zip(full.target.net.parameters(), rest.target.net.parameters()):
        torch.testing.assert_close(p, q, atol=1e-7, rtol=0)
    # the target lags the student (an EMA, not a copy)
    gen = dict(full._inner("generator").named_parameters())
    assert any(not torch.equal(p, gen[n]) for n, p in full.target.net.named_parameters())


@pytest.mark.parametrize("mode", ["ict", "ect", "multiphase"])
def test_other_modes_run_on_the_toy(mode, toy_teacher, tmp_path):
    extra = {"multiphase": [4, 2], "multiphase_steps": [2, 2]} if mode == "multiphase" else {}
    trainer = toy(toy_teacher, tmp_path, mode=mode, max_steps=4, global_batch=32, inference_steps=2, **extra)
    trainer.train()
    assert len(trainer.history) == 4 and all(math.isfinite(h["loss"]) for h in trainer.history)
    x = trainer.sample(torch.randn(16, 2), steps=2)
    assert x.shape == (16, 2) and torch.isfinite(x).all()
    if mode == "ict":  # from scratch: not the teacher's weights
        t_params = dict(trainer.teacher.net.named_parameters())
        assert all(not torch.equal(p, t_params[n]) for n, p in trainer.generator.net.named_parameters())
    if mode == "multiphase":
        assert [trainer.stage(s) for s in range(4)] == [0, 0, 1, 1]
        assert trainer.export_timesteps() == [999, 499] and trainer.export_scheduler == "ddim"


def _toy_with_scheduler(toy_teacher, root, scheduler_config):
    folder = root / "teacher"
    shutil.copytree(os.path.join(toy_teacher, "unet"), folder / "unet")
    (folder / "scheduler").mkdir(parents=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config))
    return str(folder)


@pytest.mark.parametrize(
    "scheduler, solver, boundary",
    [
        (
            {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0, "prediction_type": "epsilon"},
            "heun",
            "edm",
        ),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0}, "euler", "none"),
    ],
    ids=["edm-heun", "flow-euler"],
)
def test_edm_and_flow_teachers(scheduler, solver, boundary, toy_teacher, tmp_path):
    teacher = _toy_with_scheduler(toy_teacher, tmp_path, scheduler)
    trainer = toy(teacher, tmp_path / "run", max_steps=2, global_batch=16)
    calls = []
    trainer.setup()
    trainer.teacher.net.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    trainer.train()
    assert (trainer.solver, trainer.boundary) == (solver, boundary)
    assert all(math.isfinite(h["loss"]) for h in trainer.history)
    # Heun: two teacher evaluations per iteration (except at zero noise), Euler one
    assert len(calls) == (4 if solver == "heun" else 2)
    x = torch.randn(5, 2)
    f = trainer.consistency_fn(trainer.generator, x, torch.zeros(5, dtype=torch.float64), None)
    assert torch.equal(f, x) if boundary == "edm" else torch.allclose(f, x, atol=1e-6)


# --------------------------------------------------------------------------------------------------------
# tiny SD / SDXL components
# --------------------------------------------------------------------------------------------------------

CAPTIONS = ["a cat", "a dog", "the cat", "a red dog"]
SIDE = 8


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i_teachers")
    return {
        "sd": save_tiny_pipeline(tiny_sd_components(root / "sd_src"), StableDiffusionPipeline, root / "sd"),
        "sdxl": save_tiny_pipeline(tiny_sdxl_components(root / "sdxl_src"), StableDiffusionXLPipeline, root / "sdxl"),
    }


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(caption)
    return str(root)


def _t2i(teacher, images, out, **kw):
    base = dict(
        output_dir=str(out),
        teacher=teacher,
        dataset=images,
        resolution=SIDE,
        max_steps=2,
        global_batch=2,
        learning_rate=1e-3,
        warmup_steps=0,
        lora_rank=4,
        lora_alpha=4.0,
        w_min=2.0,
        w_max=4.0,
        inference_steps=2,
        checkpoint_every=0,
        progress=False,
    )
    base.update(kw)
    return ConsistencyTrainer(build_config(ConsistencyConfig, base))


def _base_weights(net):
    return {n.replace(".base_layer", ""): p.detach().clone() for n, p in net.named_parameters() if "lora_" not in n}


def _run(pipe, **kw):
    return pipe("a cat", output_type="np", generator=torch.Generator().manual_seed(0), **kw).images


CASES = {
    "sd-full-lcm-w": dict(kind="sd", generator_mode="full", w_embedding_dim=32, guidance_scale=3.0),
    "sdxl-lcm-lora": dict(kind="sdxl", generator_mode="lora", w_embedding_dim=0),
    "sd-multiphase-lora": dict(
        kind="sd",
        generator_mode="lora",
        mode="multiphase",
        multiphase=[4, 2],
        multiphase_steps=[1, 1],
        num_ddim_timesteps=40,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_text_to_image_train_export_reload(case, teachers, image_folder, tmp_path):
    spec = dict(CASES[case])
    kind = spec.pop("kind")
    teacher = teachers[kind]
    stock_cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    trainer = _t2i(teacher, image_folder, tmp_path / "run", **spec)
    trainer.setup()
    lora = trainer.config.generator_mode == "lora"
    on_disk = _base_weights(DiffusionPipeline.from_pretrained(teacher).unet)
    gen_before = [p.detach().clone() for p in trainer.params["generator"]]
    trainer.train()

    assert [h["step"] for h in trainer.history] == [0, 1] and all(math.isfinite(h["loss"]) for h in trainer.history)
    # weights: the generator (its adapter) trained; the teacher did not move
    assert any(not torch.equal(a, b) for a, b in zip(gen_before, trainer.params["generator"]))
    teacher_now = _base_weights(trainer.teacher.net)
    assert all(torch.equal(teacher_now[k], on_disk[k]) for k in on_disk), "teacher weights changed"
    if lora:  # one copy of the base: the teacher's network carries the adapter, no target copy
        assert trainer.generator.net is trainer.teacher.net and trainer.target is None
    else:
        assert trainer.target is not None and trainer.generator.w_conditioned

    # export; DiffusionPipeline.from_pretrained; a plain call samples at the trained steps, one UNet call each
    folder = trainer.export()
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    trained = trainer.export_timesteps()
    assert list(pipe.config.trained_timesteps) == trained
    if trainer.config.mode == "multiphase":
        assert trained == [999, 499] and isinstance(pipe.scheduler, DDIMScheduler)
        assert pipe.scheduler.config.timestep_spacing == "trailing"
    else:
        assert trained == [999, 499] and isinstance(pipe.scheduler, LCMScheduler)
        assert pipe.scheduler.config.original_inference_steps == 50  # the solver grid: stock step counts fit it
    calls = []
    pipe.unet.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((int(args[1]), args[0].shape[0])) or None, with_kwargs=True
    )
    images = _run(pipe)
    assert calls == [(t, 1) for t in trained], calls  # no CFG pass: w is an input or distilled in
    assert images.shape == (1, 2 * SIDE, 2 * SIDE, 3) and np.isfinite(images).all()
    # the exported UNet is the trained generator (w-embedding / fused LoRA included)
    x = torch.randn(1, *trainer.sample_shape, generator=torch.Generator().manual_seed(3))
    cond = trainer.conditioner(["a cat"])
    w = trainer.export_guidance_scale
    with torch.no_grad():
        ref = trainer.generator.raw(x, trainer.generator.timesteps[0], cond, w if w is not None else None)
        kw = {}
        if pipe.unet.config.time_cond_proj_dim:
            from stepdistill.guidance import guidance_scale_embedding

            kw["timestep_cond"] = guidance_scale_embedding(torch.tensor([w - 1.0]), pipe.unet.config.time_cond_proj_dim)
        out = pipe.unet(x, trained[0], **cond.kwargs, **kw).sample
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    if not lora:
        assert pipe.config.default_guidance_scale == 3.0
        assert not os.path.exists(os.path.join(folder, "lora"))
        return
    # LoRA: stock load_lora_weights on the ORIGINAL teacher + the exported scheduler gives our pipeline's image
    stock = stock_cls.from_pretrained(teacher)
    stock.load_lora_weights(os.path.join(folder, "lora"))
    assert stock.get_list_adapters().get("unet"), "load_lora_weights loaded nothing into the UNet"
    stock.scheduler = type(pipe.scheduler).from_pretrained(folder, subfolder="scheduler")
    stock.set_progress_bar_config(disable=True)
    args = {"num_inference_steps": len(trained), "guidance_scale": 0.0}
    if isinstance(stock.scheduler, LCMScheduler):
        args["timesteps"] = trained
    np.testing.assert_allclose(_run(stock, **args), images, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------------------
# recipes and bad input
# --------------------------------------------------------------------------------------------------------

RECIPES = sorted(glob.glob(str(ROOT / "recipes" / "consistency" / "*.yaml")))


def test_the_expected_recipes_exist():
    names = {Path(p).name for p in RECIPES}
    expected = {"digits_lcm.yaml", "toy2d.yaml", "digits_ict.yaml", "lcm_sd15.yaml", "lcm_lora_sdxl.yaml"}
    assert expected | {"pcm_sdxl_4phase.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: Path(p).stem)
def test_recipes_parse(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # local teachers / image folders are named relative to the working directory
    (tmp_path / "outputs" / "teacher_toy2d" / "model").mkdir(parents=True)
    for folder in ("data/laion_aesthetic_6plus_images", "data/laion_aesthetic_6.25_images"):
        (tmp_path / folder).mkdir(parents=True)
    trainer = make_trainer(recipe)
    assert type(trainer) is ConsistencyTrainer and isinstance(trainer.config, ConsistencyConfig)


def test_recipe_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for folder in ("data/laion_aesthetic_6plus_images", "data/laion_aesthetic_6.25_images"):
        (tmp_path / folder).mkdir(parents=True)

    def cfg(name):
        return make_trainer(str(ROOT / "recipes" / "consistency" / name)).config

    sd = cfg("lcm_sd15.yaml")
    assert (sd.mode, sd.generator_mode, sd.w_embedding_dim, sd.w_min, sd.w_max) == ("lcm", "full", 256, 6.0, 16.0)
    assert (sd.num_ddim_timesteps, sd.target_ema_decay, sd.loss, sd.huber_c) == (50, 0.95, "huber", 0.001)
    assert (sd.learning_rate, sd.weight_decay, sd.max_grad_norm, sd.max_steps) == (1e-6, 0.0, 1.0, 1000)
    xl = cfg("lcm_lora_sdxl.yaml")
    assert (xl.generator_mode, xl.w_embedding_dim, xl.lora_rank, xl.lora_alpha) == ("lora", 0, 64, 64.0)
    assert (xl.w_min, xl.w_max, xl.learning_rate, xl.target_ema_decay) == (4.0, 16.0, 1e-4, 0.0)
    pcm = cfg("pcm_sdxl_4phase.yaml")
    assert (pcm.mode, pcm.multiphase, pcm.learning_rate, pcm.weight_decay) == ("multiphase", [4], 2e-6, 0.0)
    assert (pcm.w_min, pcm.w_max, pcm.global_batch, pcm.max_steps, pcm.num_ddim_timesteps) == (7.0, 8.0, 10, 20000, 40)
    assert (pcm.lora_rank, pcm.lora_alpha, pcm.adv_weight, pcm.adv_lr, pcm.loss) == (64, 8.0, 0.1, 1e-5, "huber")


def test_bad_input(toy_teacher, tmp_path):
    with pytest.raises(ConfigError, match="w_embedding_dim=256 with generator_mode=lora.*cannot add"):
        build_config(ConsistencyConfig, dict(generator_mode="lora", w_embedding_dim=256))
    with pytest.raises(ConfigError, match=r"w_min=8.0 > w_max=4.0"):
        build_config(ConsistencyConfig, dict(w_min=8.0, w_max=4.0))
    with pytest.raises(ConfigError, match="skip_step=30 does not divide the teacher's 1000 timesteps"):
        toy(toy_teacher, tmp_path, skip_step=30, num_ddim_timesteps=0).setup()
    with pytest.raises(ConfigError, match="num_ddim_timesteps=30 does not divide the teacher's 1000 timesteps"):
        toy(toy_teacher, tmp_path, num_ddim_timesteps=30).setup()
    with pytest.raises(ConfigError, match="multiphase: 64 segments is more than the 50 solver steps"):
        toy(toy_teacher, tmp_path, mode="multiphase", multiphase=[64], num_ddim_timesteps=50).setup()
    with pytest.raises(ConfigError, match=r"multiphase_steps=\[10\] must give the iterations of each stage"):
        build_config(ConsistencyConfig, dict(mode="multiphase", multiphase=[8, 4], multiphase_steps=[10]))
    with pytest.raises(ConfigError, match="target_ema_decay=0.95 with generator_mode=lora"):
        build_config(ConsistencyConfig, dict(generator_mode="lora", target_ema_decay=0.95))
    with pytest.raises(ConfigError, match="prompts.txt.*prompt file"):
        build_config(ConsistencyConfig, dict(dataset="prompts.txt"))
    with pytest.raises(ConfigError, match="mode must be one of"):
        build_config(ConsistencyConfig, dict(mode="cm"))
    with pytest.raises(ConfigError, match="needs a teacher with an unconditional branch"):
        toy(toy_teacher, tmp_path, w_min=2.0, w_max=3.0).setup()
    with pytest.raises(ConfigError, match="w_embedding_dim=64: .* not ToyMLP"):
        toy(toy_teacher, tmp_path, w_embedding_dim=64).setup()


# --------------------------------------------------------------------------------------------------------
# fidelity to PCM (multiphase) and ECT
# --------------------------------------------------------------------------------------------------------


def test_multiphase_edges_are_training_inputs_and_the_export_steps(toy_teacher, tmp_path):
    trainer = toy(
        toy_teacher,
        tmp_path,
        mode="multiphase",
        num_ddim_timesteps=40,
        multiphase=[8, 4],
        multiphase_steps=[2, 2],
        max_steps=4,
        global_batch=256,
    )
    trainer.setup()
    seen = set()
    student_call = trainer.consistency_fn

    def record(model, x_t, t, *args, **kwargs):
        if model is trainer.generator:
            seen.update(round(float(v)) for v in trainer.schedule.t_to_timestep(t))
        return student_call(model, x_t, t, *args, **kwargs)

    trainer.consistency_fn = record
    batch = next(iter(trainer.loader))
    for step in (0, 2):  # a stage-0 (8 segments) and a stage-1 (4 segments) iteration
        trainer.global_step = step
        for _ in range(4):
            trainer.compute_loss(batch, ("generator",))
    assert seen == {25 * i - 1 for i in range(1, 41)}  # the 40-point solver grid, nothing else
    for m, edges in zip((8, 4), trainer.stage_edges):
        steps = [round(float(v)) for v in trainer.schedule.t_to_timestep(edges)]
        assert steps == [0] + [1000 * j // m - 1 for j in range(1, m)]
        assert set(steps[1:]) <= seen  # every edge above 0 is a time the student trains at
    # the exported sampler steps from the top and from each edge of the last stage
    assert trainer.export_timesteps() == [999, 749, 499, 249]
    last = [round(float(v)) for v in trainer.schedule.t_to_timestep(trainer.stage_edges[-1])]
    assert trainer.export_timesteps() == [999] + last[1:][::-1]


def test_multiphase_refuses_edges_off_the_solver_grid(toy_teacher, tmp_path):
    # 50 solver steps (skip 20: 19, 39, ..., 999) do not contain the 4-segment edges 249 and 749 (PCM#14)
    with pytest.raises(ConfigError, match=r"segment edges \[249.0, 749.0\] are not points of the 50-step solver grid"):
        toy(toy_teacher, tmp_path, mode="multiphase", multiphase=[4], num_ddim_timesteps=50).setup()
    with pytest.raises(ConfigError, match=r"edges \[124.0, 374.0, 624.0, 874.0\] .* 20-step .*e\.g\. .*\b40\b"):
        toy(toy_teacher, tmp_path, mode="multiphase", multiphase=[8, 4], multiphase_steps=[200, 200]).setup()


def test_lowest_pcm_segment_jumps_to_alpha_0():
    """PCM's online prediction is the DDIM jump to the segment start for every segment (c_skip = 0, c_out = 1),
    the lowest one included: a jump to timestep 0 (alpha_0), not LCM's boundary form."""
    vp = VPSchedule.from_config(dict(SD_BETAS))
    out = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    tr = _bare_trainer(vp, lambda x_in, time, cond: out, "epsilon")
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = vp.timestep_to_t(torch.tensor([239.0, 99.0, 19.0]))
    start = torch.zeros(3, dtype=torch.float64)
    f = tr.consistency_fn(tr.teacher, x, t, None, None, start)
    x0, eps = vp.to_x0_eps(out, x, t, "eps")
    jump = ddim_step(vp, x0, eps, t, start)
    torch.testing.assert_close(f, jump.float())
    a0 = float(vp.alpha(0.0))
    assert a0 < 1 and torch.allclose(f, a0 * x0 + float(vp.sigma(0.0)) * eps, atol=1e-5)
    assert not torch.allclose(f, tr.consistency_fn(tr.teacher, x, t, None), atol=1e-3)  # LCM's boundary form


def _edm_toy(toy_teacher, tmp_path, **kw):
    teacher = _toy_with_scheduler(
        toy_teacher, tmp_path, {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0}
    )
    trainer = toy(teacher, tmp_path / "run", mode="ect", max_steps=8, global_batch=16, **kw)
    trainer.setup()
    return trainer


def test_ect_defaults_levels_and_mask(toy_teacher, tmp_path):
    trainer = _edm_toy(toy_teacher, tmp_path)
    assert trainer.boundary == "none"  # ECT's f is the plain EDM denoiser
    x = torch.randn(5, 2)
    t = torch.full((5,), 0.3, dtype=torch.float64)
    torch.testing.assert_close(
        trainer.consistency_fn(trainer.generator, x, t, None), trainer.generator.predict(x, t, None, target="x0")
    )
    trainer.global_step = 3  # stage 3 (ect_double_every = 8 // 8 = 1): r = t (1 - 2^-4 (1 + 8 sigmoid(-t)))
    torch.manual_seed(0)
    sig_t, sig_r, t, r, clean = trainer.ect_levels(200_000)
    # no clamping to [sigma_min, sigma_max] = [0.002, 80]: the times reproduce every drawn level
    assert float(sig_t.min()) < 0.002 and float(sig_t.max()) > 80
    torch.testing.assert_close(trainer.schedule.sigma(t), sig_t, rtol=1e-9, atol=0)
    expected_r = ect_r(sig_t, 3)
    torch.testing.assert_close(sig_r, expected_r)
    # ECT's mask: the clean sample is the target where r = 0 only, not where 0 < r <= sigma_min
    assert torch.equal(clean, sig_r == 0)
    small = (sig_r > 0) & (sig_r <= 0.002)
    assert int(small.sum()) > 100 and not clean[small].any()
    torch.testing.assert_close(trainer.schedule.sigma(r[small]), sig_r[small], rtol=1e-9, atol=0)
    # a training step on those levels is finite
    batch = next(iter(trainer.loader))
    assert math.isfinite(float(trainer.compute_loss(batch, ("generator",))["loss"].detach()))


def test_ect_noise_levels_scale_with_sigma_data(toy_teacher, tmp_path):
    draws = {}
    for sd in (0.5, 1.5):
        trainer = _edm_toy(toy_teacher, tmp_path / str(sd), sigma_data=sd)
        trainer.global_step = 2
        torch.manual_seed(0)
        draws[sd] = trainer.ect_levels(1000)
    for a, b in zip(draws[0.5][:2], draws[1.5][:2]):  # sigma_t, sigma_r
        torch.testing.assert_close(b, 3.0 * a)
    assert torch.equal(draws[0.5][4], draws[1.5][4])


def test_ect_on_a_vp_teacher_keeps_the_table_range(toy_teacher, tmp_path):
    trainer = toy(toy_teacher, tmp_path, mode="ect", max_steps=8, global_batch=16)
    trainer.setup()
    lo, hi = trainer.levels
    trainer.global_step = 3
    torch.manual_seed(0)
    sig_t, sig_r, t, r, clean = trainer.ect_levels(100_000)
    assert float(sig_t.min()) == lo and float(sig_t.max()) <= hi  # a discrete network has no other level
    assert torch.equal(clean, (sig_r == 0) | (sig_t <= lo))  # r = 0, or r and t collapsed at the lowest level
    assert ((sig_r > 0) & (sig_r < lo) & ~clean).any()  # r below the table, t above: target f(x at t = 0)
    assert bool((r[~clean] < t[~clean]).all())


def test_hinge_losses_and_renoise_hand_worked():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # D: mean relu(1 + fake) + mean relu(1 - real) = (0 + 1.5) / 2 + (0 + 0.5) / 2 = 1; G: mean relu(1 - fake) = 1.75
    assert float(hinge_discriminator_loss([real], [fake])) == 1.0
    assert float(hinge_generator_loss([fake])) == 1.75
    # two heads: averaged
    assert float(hinge_discriminator_loss([real, real + 10], [fake, fake - 10])) == 0.5
    assert float(hinge_generator_loss([fake, fake + 10])) == 0.875
    # PCM's noise_travel: sqrt(a_u / a_s) x_s + sqrt(1 - a_u / a_s) z, a = alpha_bar
    vp = VPSchedule.from_config(dict(SD_BETAS))
    s, u = vp.timestep_to_t(torch.tensor([249.0, 0.0])), vp.timestep_to_t(torch.tensor([400.0, 249.0]))
    x, z = torch.randn(2, 3), torch.randn(2, 3)
    ab = vp.alphas_cumprod
    ratio = torch.stack([ab[400] / ab[249], ab[249] / ab[0]]).reshape(2, 1)
    torch.testing.assert_close(renoise(vp, x, z, s, u), (ratio.sqrt() * x + (1 - ratio).sqrt() * z).float())


def test_pcm_adversarial_loss_alternates_and_reaches_the_student(teachers, image_folder, tmp_path):
    trainer = _t2i(
        teachers["sd"],
        image_folder,
        tmp_path / "run",
        generator_mode="lora",
        mode="multiphase",
        multiphase=[2],
        adv_weight=0.1,
        max_steps=2,
    )
    trainer.setup()
    unet = trainer.teacher.net
    assert len(trainer.disc_heads.heads) == len(unet.down_blocks) + 1  # every down block and the mid block
    assert [trainer.phase(s) for s in range(4)] == [("discriminator",), ("generator",)] * 2
    heads = [p.detach().clone() for p in trainer.params["discriminator"]]
    lora = [p.detach().clone() for p in trainer.params["generator"]]
    base = _base_weights(unet)
    trainer.config.max_steps = 1
    trainer.train()  # iteration 0: the discriminator only
    assert any(not torch.equal(a, b) for a, b in zip(heads, trainer.params["discriminator"]))
    assert all(torch.equal(a, b) for a, b in zip(lora, trainer.params["generator"]))
    heads = [p.detach().clone() for p in trainer.params["discriminator"]]
    trainer.config.max_steps = 2
    trainer.train()  # iteration 1: the student only, consistency + 0.1 x the generator's hinge term
    assert all(torch.equal(a, b) for a, b in zip(heads, trainer.params["discriminator"]))
    assert any(not torch.equal(a, b) for a, b in zip(lora, trainer.params["generator"]))
    assert all(torch.equal(v, base[k]) for k, v in _base_weights(unet).items())  # the teacher stays frozen
    logs = trainer.history
    assert "loss_adv_d/discriminator" in logs[0] and "loss_adv_g/generator" in logs[1]
    # the generator term's gradient reaches the student's output through the frozen teacher's encoder
    pred = torch.randn(2, *trainer.sample_shape, requires_grad=True)
    start = torch.full((2,), float(trainer.stage_edges[0][1]), dtype=torch.float64)
    cond = trainer._cond_batch(trainer.dataset.example(2))
    zero = torch.zeros(())
    out = trainer.adversarial_loss(pred, torch.randn(2, *trainer.sample_shape), start, cond, zero, ("generator",))
    torch.testing.assert_close(out["loss"], 0.1 * out["loss_adv_g"])
    (grad,) = torch.autograd.grad(out["loss"], pred)
    assert grad.abs().sum() > 0
    d_out = trainer.adversarial_loss(pred, torch.randn_like(pred), start, cond, zero, ("discriminator",))
    assert not d_out["loss"].requires_grad or torch.autograd.grad(d_out["loss"], pred, allow_unused=True)[0] is None


def test_adversarial_options_are_checked(toy_teacher, tmp_path):
    with pytest.raises(ConfigError, match="adv_weight=0.1 with mode=lcm"):
        build_config(ConsistencyConfig, dict(mode="lcm", adv_weight=0.1))
    with pytest.raises(ConfigError, match="needs a UNet teacher .* not ToyMLP"):
        toy(toy_teacher, tmp_path, mode="multiphase", multiphase=[2], adv_weight=0.1).setup()
