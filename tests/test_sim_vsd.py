"""SIM and VSD on the shared distribution-matching machinery: the 2-D mixture, gradient paths, tiny SD-class
components in full and LoRA modes with export and reload, and bad input."""

import dataclasses
import os

import pytest
import torch
from test_dmd2_sd import CAPTIONS, KINDS, _config, image_folder, teachers  # noqa: F401  (fixtures below)  # noqa: F401

import stepdistill  # noqa: F401
from stepdistill.config import ConfigError, build_config
from stepdistill.data import mode_coverage, sample_toy2d, sliced_wasserstein
from stepdistill.trainers.sim import SIMConfig, SIMTrainer
from stepdistill.trainers.vsd import VSDConfig, VSDTrainer

TOY = dict(
    dataset="toy2d:gmm8",
    max_steps=500,
    global_batch=256,
    warmup_steps=0,
    checkpoint_every=0,
    progress=False,
    dfake_gen_update_ratio=5,
    learning_rate=1e-3,
    fake_lr=1e-3,
)


def toy(cls, cfg_cls, teacher, out, **kw):
    return cls(build_config(cfg_cls, {**TOY, "output_dir": str(out), "teacher": teacher, **kw}))


@pytest.mark.parametrize("method", ["sim", "vsd"])
def test_matches_a_gaussian_mixture(method, toy_teacher, tmp_path):
    if method == "sim":
        trainer = toy(SIMTrainer, SIMConfig, toy_teacher, tmp_path)
    else:
        trainer = toy(
            VSDTrainer,
            VSDConfig,
            toy_teacher,
            tmp_path,
            real_guidance_scale=1.0,
            lora_target_modules=[],
            lora_rank=16,
            max_grad_norm=10.0,
        )
    trainer.setup()
    ref, _ = sample_toy2d("gmm8", 2000, torch.Generator().manual_seed(1))
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(2))
    d0 = sliced_wasserstein(trainer.generator.sample(z), ref, generator=torch.Generator().manual_seed(0))
    trainer.train()
    x = trainer.generator.sample(z)
    d1 = sliced_wasserstein(x, ref, generator=torch.Generator().manual_seed(0))
    frac, counts = mode_coverage(x, "gmm8")
    assert d1 < 0.5 * d0, f"{method}: sliced W2 {d0:.3f} -> {d1:.3f}"
    assert frac == 1.0, f"{method}: modes missed {counts.tolist()}"


def test_sim_generator_gradient_flows_through_the_frozen_networks(toy_teacher, tmp_path):
    trainer = toy(SIMTrainer, SIMConfig, toy_teacher, tmp_path, max_steps=1)
    trainer.setup()
    with torch.no_grad():
        for p in trainer.fake.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer._set_phase(("generator",))
    x = torch.randn(64, 2, requires_grad=True)
    loss, _ = trainer.generator_loss(x, None)
    (gx,) = torch.autograd.grad(loss, x)
    assert gx.abs().sum() > 0
    # the same loss with both networks' predictions detached has a different gradient: SIM differentiates
    # through them (DMD2 / VSD do not)
    t = torch.full((64,), 0.5, dtype=torch.float64)
    x_t = trainer.schedule.add_noise(x, torch.randn_like(x), t)
    d_r = trainer.teacher.predict_with_input_grad(x_t, t)
    assert d_r.requires_grad
    assert all(p.grad is None for p in trainer.teacher.net.parameters())
    assert all(p.grad is None for p in trainer.fake.net.parameters())


def test_vsd_fake_score_is_a_lora_on_the_teacher_base(toy_teacher, tmp_path):
    trainer = toy(
        VSDTrainer,
        VSDConfig,
        toy_teacher,
        tmp_path,
        real_guidance_scale=1.0,
        lora_target_modules=[],
        lora_rank=4,
        max_steps=2,
    )
    trainer.setup()
    assert trainer.fake.net is trainer.teacher.net and trainer.teacher.shares_base
    base = {n: p.detach().clone() for n, p in trainer.teacher.net.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in trainer.teacher.net.named_parameters() if "lora_" in n}
    trainer.train()
    after = dict(trainer.teacher.net.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in base.items()), "the teacher's base moved"
    assert any(not torch.equal(after[n], v) for n, v in lora.items()), "the fake-score LoRA did not train"


@pytest.mark.parametrize(
    "method,gen_mode,fake_mode",
    [("sim", "full", "full"), ("sim", "lora", "lora"), ("vsd", "full", "lora"), ("vsd", "lora", "lora")],
)
def test_tiny_sd_two_iterations_export_reload(method, gen_mode, fake_mode, teachers, image_folder, tmp_path):  # noqa: F811
    from diffusers import DiffusionPipeline

    cls, cfg_cls = (SIMTrainer, SIMConfig) if method == "sim" else (VSDTrainer, VSDConfig)
    base = _config(
        teachers["sd"],
        image_folder,
        tmp_path,
        generator_mode=gen_mode,
        fake_score_mode=fake_mode,
        gan_generator_weight=0.0,
        denoising_timesteps=[999],
        real_guidance_scale=2.0,
        dfake_gen_update_ratio=1,
        learning_rate=1e-3,
        fake_lr=1e-3,
    )
    base = dataclasses.asdict(base)
    if method == "vsd":
        base["lora_target_modules"] = []
    trainer = cls(build_config(cfg_cls, base))
    trainer.setup()
    teacher_before = {n: p.detach().clone() for n, p in trainer.teacher.net.named_parameters() if "lora_" not in n}
    gen_params = [p for p in trainer.params["generator"]]
    gen_before = [p.detach().clone() for p in gen_params]
    trainer.train()
    after = dict(trainer.teacher.net.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in teacher_before.items())
    assert any(not torch.equal(a, b) for a, b in zip(gen_before, gen_params))
    folder = trainer.export()
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    img = pipe(CAPTIONS[0], output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert img.shape[0] == 1 and calls == [1]


def test_bad_input(toy_teacher, tmp_path):
    with pytest.raises(ConfigError, match="huber_c must be > 0"):
        build_config(SIMConfig, {"huber_c": 0.0})
    with pytest.raises(ConfigError, match="trainable fake score"):
        build_config(SIMConfig, {"learning_rate": 0.0, "fake_lr": 0.0})
    with pytest.raises(ConfigError, match="distance"):
        build_config(SIMConfig, {"distance": "l1"})
    with pytest.raises(ConfigError, match="real_guidance_scale=4.5 needs a teacher with an unconditional branch"):
        toy(VSDTrainer, VSDConfig, toy_teacher, tmp_path, real_guidance_scale=4.5).setup()


@pytest.mark.parametrize("method,name", [("sim", "digits"), ("sim", "toy2d"), ("sim", "sd15"), ("vsd", "digits"),
                                         ("vsd", "toy2d"), ("vsd", "sd21_swiftbrush")])
def test_recipes_parse(method, name, tmp_path, monkeypatch):
    from stepdistill.train import make_trainer

    root = os.path.join(os.path.dirname(__file__), "..", "recipes")
    recipe = os.path.abspath(os.path.join(root, method, f"{name}.yaml"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "teacher_toy2d" / "model").mkdir(parents=True)
    trainer = make_trainer(recipe)
    assert type(trainer) is (SIMTrainer if method == "sim" else VSDTrainer)


def test_missing_dataset_fails_before_any_model_loads(tmp_path, monkeypatch):
    from stepdistill.train import make_trainer

    recipe = os.path.join(os.path.dirname(__file__), "..", "recipes", "sim", "sd15.yaml")
    monkeypatch.chdir(tmp_path)
    trainer = make_trainer(recipe, [f"output_dir={tmp_path}"])
    loaded = []
    monkeypatch.setattr(SIMTrainer, "build", lambda self: loaded.append(1))
    with pytest.raises(ConfigError, match="dataset: path 'data/coco_prompts.txt' does not exist"):
        trainer.setup()
    assert not loaded
