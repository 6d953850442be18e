"""Fidelity of the score methods (DMD2, SIM / SiD-LSG, VSD / SwiftBrush) to their official code: the LR
warm-up unit, the DM timestep range, GAN options and head, flow-teacher times, two-stage DMD2 initialisation,
SiD-LSG and SwiftBrush options, and EDM teachers."""

import pytest
import torch

from stepdistill.config import ConfigError, build_config
from stepdistill.trainers.dmd2 import DMD2Config, DMD2Trainer

TOY = dict(
    dataset="toy2d:gmm8",
    global_batch=64,
    checkpoint_every=0,
    progress=False,
    learning_rate=1e-3,
)


def toy_dmd2(teacher, out, **kw):
    return DMD2Trainer(build_config(DMD2Config, {**TOY, "output_dir": str(out), "teacher": teacher, **kw}))


@pytest.mark.parametrize("unit, expected", [("iteration", 1.0), ("update", 0.3)])
def test_warmup_counts_iterations_by_default(unit, expected, toy_teacher, tmp_path):
    # DMD2 (main/train_sd.py) steps the generator's schedule every iteration: with ratio 5 and warm-up 10 the
    # generator reaches its peak lr after 10 iterations although it was updated only twice (steps 0 and 5)
    kw = {} if unit == "iteration" else {"warmup_unit": unit}
    trainer = toy_dmd2(toy_teacher, tmp_path, max_steps=10, warmup_steps=10, dfake_gen_update_ratio=5, **kw)
    trainer.train()
    for name in ("generator", "fake_score"):
        lr = trainer.opts[name].param_groups[0]["lr"]
        want = 1.0 if name == "fake_score" else expected  # the fake score updates every iteration
        assert lr == pytest.approx(want * 1e-3), (name, lr)


def test_warmup_unit_is_validated(toy_teacher, tmp_path):
    with pytest.raises(ConfigError, match="warmup_unit"):
        toy_dmd2(toy_teacher, tmp_path, warmup_unit="epoch").setup()


def _teacher_times(trainer, fn):
    """Integer timesteps the teacher network sees during ``fn()``."""
    seen = []
    hook = trainer.teacher.net.register_forward_hook(lambda m, i, o: seen.append(i[1].detach().reshape(-1)))
    try:
        fn()
    finally:
        hook.remove()
    return torch.cat(seen)


def test_dm_timesteps_are_dmd2s_inclusive_range(toy_teacher, tmp_path):
    # DMD2: torch.randint(int(0.02 T), min(int(0.98 T) + 1, T)) = [20, 980], every integer equally likely
    trainer = toy_dmd2(toy_teacher, tmp_path, max_steps=1)
    trainer.setup()
    torch.manual_seed(0)
    x = torch.randn(40000, 2)
    ts = _teacher_times(trainer, lambda: trainer.dm_loss(x, None)).round().long()
    assert (ts.min().item(), ts.max().item()) == (20, 980)
    counts = torch.bincount(ts, minlength=981)[20:]
    assert counts[0] > 0.5 * counts.float().mean() and counts[-1] > 0.5 * counts.float().mean()


def test_gan_max_timestep_is_validated_and_clean_gan_is_an_option(toy_teacher, tmp_path):
    with pytest.raises(ConfigError, match="gan_max_timestep must be >= 1.*gan_noise: none"):
        toy_dmd2(toy_teacher, tmp_path, gan_max_timestep=0)
    trainer = toy_dmd2(toy_teacher, tmp_path, max_steps=1, gan_generator_weight=1e-3, gan_noise="none")
    trainer.setup()
    x = torch.randn(8, 2)
    x_t, t = trainer._gan_input(x)
    assert torch.equal(x_t, x) and (t == 0).all()  # clean samples at timestep 0
    a, b = trainer.gan_logits([x, x], None)
    torch.testing.assert_close(a, b)  # no noise: the same logits twice
    # the diffusion GAN: integer timesteps in [0, gan_max_timestep)
    noisy = toy_dmd2(toy_teacher, tmp_path / "n", max_steps=1, gan_generator_weight=1e-3, gan_max_timestep=10)
    noisy.setup()
    torch.manual_seed(0)
    _, t = noisy._gan_input(torch.randn(4000, 2))
    ts = noisy.schedule.t_to_timestep(t).round().long()
    assert (ts.min().item(), ts.max().item()) == (0, 9)


def test_gan_head_is_dmd2s_cls_pred_branch():
    from stepdistill.trainers.dmd2 import DiscriminatorHead

    # SD1.5's 8x8 bottleneck: Conv 4x4 s2 p1 (8 -> 4), Conv 4x4 s4 p0 (4 -> 1), Conv 1x1 -> 1 logit
    head = DiscriminatorHead(64, 8)
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    shape = [(m.kernel_size, m.stride, m.padding, m.out_channels) for m in convs]
    assert shape == [((4, 4), (2, 2), (1, 1), 64), ((4, 4), (4, 4), (0, 0), 64), ((1, 1), (1, 1), (0, 0), 1)]
    # SDXL's 32x32: three stride-2 convs, then the stride-4 one
    strides = [m.stride[0] for m in DiscriminatorHead(64, 32).modules() if isinstance(m, torch.nn.Conv2d)]
    assert strides == [2, 2, 2, 4, 1]
    assert DiscriminatorHead(64, 8)(torch.randn(3, 64, 8, 8)).shape == (3,)
    pooled = [
        m.kernel_size[0] for m in DiscriminatorHead(64, 8, kind="pooled").modules() if isinstance(m, torch.nn.Conv2d)
    ]
    assert pooled == [4, 4, 1, 1]


def _toy_flow_teacher(toy_teacher, root):
    import json
    import os
    import shutil

    folder = root / "flow_teacher"
    shutil.copytree(os.path.join(toy_teacher, "unet"), folder / "unet")
    (folder / "scheduler").mkdir(parents=True)
    cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0, "prediction_type": "flow"}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    return str(folder)


def test_flow_teacher_generator_starts_at_t_1(toy_teacher, tmp_path):
    teacher = _toy_flow_teacher(toy_teacher, tmp_path)
    trainer = toy_dmd2(teacher, tmp_path / "a", max_steps=1)
    trainer.setup()
    # the generator is fed pure noise: its first time is t = 1 (timestep 1000 = sigma 1), not 0.999
    assert trainer.gen_times.tolist() == [1.0] and trainer.export_timesteps() == [1000]
    with pytest.raises(ConfigError, match="999 on a flow-matching teacher is t = 0.999.*use 1000"):
        toy_dmd2(teacher, tmp_path / "b", max_steps=1, denoising_timesteps=[999]).setup()
    ok = toy_dmd2(teacher, tmp_path / "c", max_steps=1, denoising_timesteps=[1000, 500])
    ok.setup()
    assert ok.gen_times.tolist() == [1.0, 0.5]


DIGITS = dict(
    teacher="digits",
    dataset="digits",
    global_batch=4,
    dfake_gen_update_ratio=2,
    learning_rate=1e-3,
    progress=False,
)


def _state(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_dmd2_two_stages_on_digits(tmp_path):
    """Stage 1 (DM only) -> stage 2 (GAN on) from its checkpoint or its export, DMD2's --ckpt_only_path: the
    generator and fake score start from stage 1, the head fresh, the real score is the original teacher, the
    step counter and optimisers are new."""
    from stepdistill.models import Teacher

    s1 = DMD2Trainer(build_config(DMD2Config, {**DIGITS, "output_dir": str(tmp_path / "s1"), "max_steps": 3}))
    s1.train()
    ckpt = s1.save_checkpoint()
    export = s1.export()
    gen1, fake1 = _state(s1.generator.net), _state(s1.fake.net)
    original = _state(Teacher.from_pretrained(s1._teacher_path()).net)
    assert any(not torch.equal(gen1[k], original[k]) for k in gen1), "stage 1 did not train"

    for source in (ckpt, export):
        out = tmp_path / ("s2_ckpt" if source == ckpt else "s2_export")
        stage2 = dict(
            DIGITS,
            output_dir=str(out),
            max_steps=2,
            gan_generator_weight=1e-3,
            learning_rate=5e-4,
            init_generator=source,
            init_fake_score=ckpt,
        )
        s2 = DMD2Trainer(build_config(DMD2Config, stage2))
        s2.setup()
        for k, v in _state(s2.generator.net).items():
            torch.testing.assert_close(v, gen1[k], rtol=0, atol=0)
        for k, v in _state(s2.fake.net).items():
            torch.testing.assert_close(v, fake1[k], rtol=0, atol=0)
        for k, v in _state(s2.teacher.net).items():  # the real score is the original teacher, not stage 1's student
            torch.testing.assert_close(v, original[k], rtol=0, atol=0)
        assert "head" in s2.specs and s2.global_step == 0
        assert all(not o.state for o in s2.opts.values()), "stage 2 starts with fresh optimisers"
        s2.train()
        assert s2.global_step == 2 and len(s2.history) == 2
        assert any("loss_gan_g" in k for k in s2.history[0])
        # stage 2's own checkpoint resumes as usual with the init keys still set
        s2.save_checkpoint()
        again = DMD2Trainer(build_config(DMD2Config, {**stage2, "max_steps": 3, "resume": "latest"}))
        again.train()
        assert again.global_step == 3


def test_init_keys_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="init_generator: folder"):
        build_config(DMD2Config, {**DIGITS, "init_generator": str(tmp_path / "missing")})
    (tmp_path / "pipe").mkdir()
    with pytest.raises(ConfigError, match="init_fake_score: .* is not a checkpoint folder"):
        build_config(DMD2Config, {**DIGITS, "init_fake_score": str(tmp_path / "pipe")})
    with pytest.raises(ConfigError, match="LoRA generator cannot start from"):
        build_config(DMD2Config, {**DIGITS, "generator_mode": "lora", "init_generator": str(tmp_path / "pipe")})


# --------------------------------------------------------------------------------------------------------
# SiD-LSG and SwiftBrush options
# --------------------------------------------------------------------------------------------------------


def _sim(out, **kw):
    from stepdistill.trainers.sim import SIMConfig, SIMTrainer

    return SIMTrainer(build_config(SIMConfig, {**DIGITS, "output_dir": str(out), "max_steps": 1, **kw}))


def _calls(net, record):
    """Record (batch size, timesteps) of every forward of a diffusers UNet."""
    return net.register_forward_pre_hook(lambda m, args: record.append((args[0].shape[0], args[1].detach().clone())))


def test_sid_lsg_fake_guidance_time_range_and_order(tmp_path):
    trainer = _sim(
        tmp_path,
        fake_guidance_scale=1.5,
        real_guidance_scale=1.5,
        fake_cond_dropout=0.1,
        fake_min_step_percent=0.02,
        fake_max_step_percent=0.979,
        update_order="fake_first",
        dfake_gen_update_ratio=1,
    )
    trainer.setup()
    assert trainer.phase(0) == [("fake_score",), ("generator",)]
    fake, gen = [], []
    h1, h2 = _calls(trainer.fake.net, fake), _calls(trainer.generator.net, gen)
    trainer.train()
    h1.remove(), h2.remove()
    n = trainer.per_device_batch
    # fake first: its update generates its own samples (no grad), then the generator generates again (grad)
    assert [b for b, _ in gen] == [n, n]
    # the fake score runs guided (doubled batch) where it is fitted and where the generator loss reads it
    assert [b for b, _ in fake] == [2 * n, 2 * n]
    t_fit = fake[0][1]
    T = trainer.schedule.num_train_timesteps
    assert ((t_fit >= 20) & (t_fit <= 979)).all() and T == 1000


def test_fake_time_range_is_drawn_as_configured(tmp_path):
    trainer = _sim(tmp_path / "r", fake_min_step_percent=0.02, fake_max_step_percent=0.979)
    trainer.setup()
    seen = []
    h = _calls(trainer.fake.net, seen)
    torch.manual_seed(0)
    trainer.fake_loss(torch.randn(256, *trainer.sample_shape), trainer.conditioner(torch.arange(256) % 10))
    h.remove()
    ts = seen[0][1]
    assert ((ts >= 20) & (ts <= 979)).all() and len(ts.unique()) > 100
    # the draw itself: integers in [int(lo T), int(hi T)], both ends reached; DMD2's fake default [0, 999]
    torch.manual_seed(0)
    drawn = trainer.schedule.t_to_timestep(trainer.draw_t(200000, 0.02, 0.979)).round().long()
    assert (drawn.min().item(), drawn.max().item()) == (20, 979)
    drawn = trainer.schedule.t_to_timestep(trainer.draw_t(200000, 0.0, 1.0)).round().long()
    assert (drawn.min().item(), drawn.max().item()) == (0, 999)
    assert (DMD2Config.fake_min_step_percent, DMD2Config.fake_max_step_percent) == (0.0, 1.0)


def test_fake_condition_dropout_per_batch_or_per_sample(tmp_path):
    from stepdistill.trainers.vsd import VSDConfig

    assert VSDConfig.fake_cond_dropout_mode == "batch"  # SwiftBrush: random.random() < 0.1 for the batch
    trainer = _sim(tmp_path, fake_cond_dropout=0.5, fake_cond_dropout_mode="batch")
    trainer.setup()
    cond = trainer.conditioner(torch.arange(10) % 10)
    null = trainer.conditioner.null_class if hasattr(trainer.conditioner, "null_class") else 10
    torch.manual_seed(0)
    kinds = set()
    for _ in range(40):
        labels = trainer.fake_cond(cond).kwargs["class_labels"]
        dropped = (labels == null).sum().item()
        assert dropped in (0, 10)
        kinds.add(dropped)
    assert kinds == {0, 10}
    trainer.config.fake_cond_dropout_mode = "sample"
    torch.manual_seed(0)
    counts = {(trainer.fake_cond(cond).kwargs["class_labels"] == null).sum().item() for _ in range(40)}
    assert any(0 < k < 10 for k in counts)


def test_scaled_generator_input_and_its_export(tmp_path):
    import json
    import os

    with pytest.raises(ConfigError, match="one-step full generators"):
        _sim(tmp_path / "x", generator_input="scaled", denoising_timesteps=[625, 300])
    trainer = _sim(tmp_path, generator_input="scaled", denoising_timesteps=[625])
    trainer.setup()
    scale = float((1 - trainer.schedule.alphas_cumprod[625]).sqrt())  # add_noise(0, z, 625)
    assert trainer.generator.input_scale == pytest.approx(scale)
    z = torch.randn(3, *trainer.sample_shape)
    torch.testing.assert_close(trainer.generator.initial_noise(z), z * scale)
    # the generator network sees scale * z at its first step
    seen = []
    hook = trainer.generator.net.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    trainer.generator.sample(z, trainer.conditioner(torch.tensor([1, 2, 3])))
    hook.remove()
    torch.testing.assert_close(seen[0], z * scale)
    # stock pipelines start from z: the export is the network with student.json (input_scale), not a pipeline
    trainer.train()
    with pytest.warns(UserWarning, match="network only"):
        out = trainer.export()
    info = json.load(open(os.path.join(out, "student.json")))
    assert info["input_scale"] == pytest.approx(scale) and info["timesteps"] == [625]
    assert not os.path.exists(os.path.join(out, "model_index.json"))


def test_ema_schedules(tmp_path):
    # diffusers' EMAModel (SwiftBrush): decay 0 at the first update, then (1 + s) / (10 + s), capped
    trainer = _sim(tmp_path / "w", ema_decay=0.9999, ema_warmup=True, dfake_gen_update_ratio=1)
    got = []
    for step in (0, 1, 2, 100):
        trainer.global_step = step
        got.append(trainer.ema_decay_now())
    assert got == pytest.approx([0.0, 2 / 11, 3 / 12, 101 / 110])
    trainer.global_step = 10**6
    assert trainer.ema_decay_now() == 0.9999
    # SiD: half-life 0.05 Mimg with ramp-up 0.05: h = min(50000, images x 0.05), decay 0.5 ** (batch / h)
    sid = _sim(tmp_path / "s", ema_halflife_mimg=0.05, global_batch=512)
    assert sid.config.ema_decay > 0  # the EMA is on
    sid.global_step = 0
    assert sid.ema_decay_now() == 0.0
    sid.global_step = 10
    assert sid.ema_decay_now() == pytest.approx(0.5 ** (512 / (10 * 512 * 0.05)))
    sid.global_step = 10**5
    assert sid.ema_decay_now() == pytest.approx(0.5 ** (512 / 50000))
    # the first update copies the weights (decay 0)
    run = _sim(tmp_path / "r", ema_decay=0.9999, ema_warmup=True, dfake_gen_update_ratio=1)
    run.train()
    for k, v in run._inner("generator").state_dict().items():
        torch.testing.assert_close(run.ema["generator"][k], v.float())


def test_score_recipes_carry_the_official_values():
    from stepdistill.config import read_yaml

    sim = read_yaml("recipes/sim/sd15.yaml")
    assert {k: sim[k] for k in ("real_guidance_scale", "fake_guidance_scale", "fake_cond_dropout")} == {
        "real_guidance_scale": 1.5,
        "fake_guidance_scale": 1.5,
        "fake_cond_dropout": 0.1,
    }
    assert (sim["generator_input"], sim["update_order"], sim["max_grad_norm"], sim["ema_halflife_mimg"]) == (
        "noise",  # SiD-LSG: scaled; a stock pipeline export needs plain z (the recipe says so)
        "fake_first",
        0.0,
        0.05,
    )
    assert (sim["fake_min_step_percent"], sim["fake_max_step_percent"], sim["mixed_precision"]) == (0.02, 0.979, "no")
    vsd = read_yaml("recipes/vsd/sd21_swiftbrush.yaml")
    assert (vsd["ema_warmup"], vsd["fake_cond_dropout_mode"], vsd["max_step_percent"]) == (True, "batch", 0.98)
    assert read_yaml("recipes/dmd2/sdxl_4step_lora.yaml")["max_steps"] == 16000


# --------------------------------------------------------------------------------------------------------
# EDM teachers
# --------------------------------------------------------------------------------------------------------


# an EDM-preconditioned teacher's scheduler (diffusers' EDMEulerScheduler with EDM's defaults)
EDM_SCHEDULER = {
    "_class_name": "EDMEulerScheduler",
    "sigma_min": 0.002,
    "sigma_max": 80.0,
    "sigma_data": 0.5,
    "rho": 7.0,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
}


def _toy_edm_teacher(toy_teacher, root):
    """The toy MLP behind a diffusers EDMEulerScheduler config: an EDM-preconditioned network (c_in-scaled
    input, c_noise time, output F with x0 = c_skip x + c_out F: what diffusers calls "epsilon" for EDM)."""
    import json
    import os
    import shutil

    folder = root / "edm_teacher"
    if not folder.exists():
        shutil.copytree(os.path.join(toy_teacher, "unet"), folder / "unet")
        (folder / "scheduler").mkdir(parents=True)
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(EDM_SCHEDULER))
    return str(folder)


def _dmd2_karras_sigmas(n=1000, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """DMD2's main/edm/edm_guidance.py: get_sigmas_karras flipped, small sigma first."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.flip((hi + ramp * (lo - hi)) ** rho, dims=[0])


@pytest.mark.parametrize("method", ["dmd2", "sim", "vsd"])
def test_edm_teacher_trains_every_score_method(method, toy_teacher, tmp_path):
    from stepdistill.models import Teacher
    from stepdistill.trainers.sim import SIMConfig, SIMTrainer
    from stepdistill.trainers.vsd import VSDConfig, VSDTrainer

    teacher = _toy_edm_teacher(toy_teacher, tmp_path)
    assert Teacher.from_pretrained(teacher).prediction_type == "edm"
    cls, cfg_cls = {"dmd2": (DMD2Trainer, DMD2Config), "sim": (SIMTrainer, SIMConfig), "vsd": (VSDTrainer, VSDConfig)}[
        method
    ]
    extra = dict(lora_target_modules=[], lora_rank=4, real_guidance_scale=1.0) if method == "vsd" else {}
    trainer = cls(
        build_config(
            cfg_cls,
            {
                **TOY,
                "output_dir": str(tmp_path / method),
                "teacher": teacher,
                "max_steps": 2,
                "global_batch": 16,
                "dfake_gen_update_ratio": 1,
                **extra,
            },
        )
    )
    trainer.setup()
    # the generator starts at sigma_max: timestep 999 of DMD2's 1000-level Karras grid, input 80 z
    assert trainer.gen_times.tolist() == [1.0]
    z = torch.randn(4, 2)
    torch.testing.assert_close(trainer.generator.initial_noise(z), 80.0 * z)
    # the generator loss's noise levels are DMD2's karras_sigmas[20 .. 980], the network sees c_noise
    seen = []
    hook = trainer.teacher.net.register_forward_hook(lambda m, i, o: seen.append(i[1].detach().reshape(-1)))
    torch.manual_seed(0)
    trainer.generator_loss(torch.randn(20000, 2), None)
    hook.remove()
    sigma = torch.exp(4 * torch.cat(seen).double())
    karras = _dmd2_karras_sigmas()
    torch.testing.assert_close(sigma.min(), karras[20], rtol=1e-5, atol=0)
    torch.testing.assert_close(sigma.max(), karras[980], rtol=1e-5, atol=0)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(v)) for h in trainer.history for k, v in h.items() if k != "step")
    out = trainer.export()
    import json
    import os

    # a diffusers pipeline with EDMEulerScheduler (sampling checked in tests/test_export_edm.py)
    index = json.load(open(os.path.join(out, "model_index.json")))
    assert index["scheduler"] == ["diffusers", "EDMEulerScheduler"]
    assert index["_stepdistill"]["trained_timesteps"] == [999]
    assert os.path.isfile(os.path.join(out, "unet", "config.json"))


def test_edm_fake_score_loss_is_dmd2s(toy_teacher, tmp_path):
    """DMD2's EDM fake loss: mean((sigma^-2 + sigma_data^-2) (D_fake(x + sigma n) - x)^2) over sigma on the grid."""
    teacher = _toy_edm_teacher(toy_teacher, tmp_path)
    trainer = toy_dmd2(teacher, tmp_path / "r", max_steps=1)
    trainer.setup()
    x = torch.randn(64, 2)
    torch.manual_seed(3)
    got = trainer.fake_loss(x, None)
    torch.manual_seed(3)
    t = trainer.draw_t(64, 0.0, 1.0)
    n = torch.randn_like(x)
    s = trainer.schedule.sigma(t).float()[:, None]
    d = trainer.fake.predict(x + s * n, t, None, target="x0")
    want = ((s**-2 + 0.5**-2) * (d - x) ** 2).mean()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


# --------------------------------------------------------------------------------------------------------
# SiD's EDM settings (mingyuanzhou/SiD sid_train.py, training/sid_loss.py)
# --------------------------------------------------------------------------------------------------------


def toy_sim(teacher, out, **kw):
    from stepdistill.trainers.sim import SIMConfig, SIMTrainer

    values = {**TOY, "output_dir": str(out), "teacher": teacher, "max_steps": 2, "global_batch": 16, **kw}
    return SIMTrainer(build_config(SIMConfig, values))


def test_sid_init_sigma_feeds_the_generator_2_5_z_at_sigma_2_5_and_exports_it(toy_teacher, tmp_path):
    """SiD: G(init_sigma z, init_sigma) with init_sigma 2.5, not sigma_max z at timestep 999; the exported pipeline
    starts from the same level (an off-grid position of the Karras grid) and samples what the trainer does."""
    from diffusers import DiffusionPipeline

    teacher = _toy_edm_teacher(toy_teacher, tmp_path)
    trainer = toy_sim(teacher, tmp_path / "run", init_sigma=2.5, distance="l2")
    trainer.setup()
    torch.testing.assert_close(trainer.schedule.sigma(trainer.gen_times), torch.tensor([2.5], dtype=torch.float64))
    z = torch.randn(4, 2)
    torch.testing.assert_close(trainer.generator.initial_noise(z), 2.5 * z)
    seen = []
    hook = trainer.generator.net.register_forward_hook(lambda m, i, o: seen.append(i[1].detach().reshape(-1)))
    trainer.generate({"_n": list(range(8))}, None, 0, grad=False)
    hook.remove()
    torch.testing.assert_close(torch.exp(4 * torch.cat(seen).double()), torch.full((8,), 2.5, dtype=torch.float64))
    trainer.train()
    timestep = trainer.export_timesteps()
    assert len(timestep) == 1 and 0 < timestep[0] < 999 and timestep[0] != round(timestep[0])
    pipe = DiffusionPipeline.from_pretrained(trainer.export())
    pipe.set_progress_bar_config(disable=True)
    points = pipe(num_samples=64, generator=torch.Generator().manual_seed(0)).samples
    assert float(pipe.scheduler.sigmas[0]) == pytest.approx(2.5, rel=1e-6)  # the level of the call
    g = torch.Generator().manual_seed(0)
    ref = trainer.generator.sample(torch.randn(64, 2, generator=g), None, generator=g)
    torch.testing.assert_close(points, ref.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(init_sigma=2.5, denoising_timesteps=[999]), "denoising_timesteps"),
        (dict(init_sigma=2.5, generator_input="scaled"), "generator_input"),
        (dict(init_sigma=-1.0), "init_sigma"),
        (dict(fake_noise="normal"), "fake_noise"),
        (dict(fake_p_std=0.0), "fake_p_std"),
    ],
)
def test_sid_options_are_validated(kw, match, toy_teacher, tmp_path):
    with pytest.raises(ConfigError, match=match):
        toy_sim(toy_teacher, tmp_path, **kw)


@pytest.mark.parametrize("kw", [dict(init_sigma=2.5), dict(init_sigma=100.0), dict(fake_noise="lognormal")])
def test_sid_edm_options_need_an_edm_teacher(kw, toy_teacher, tmp_path):
    key = next(iter(kw))
    teacher = toy_teacher if kw != dict(init_sigma=100.0) else _toy_edm_teacher(toy_teacher, tmp_path)
    trainer = toy_sim(teacher, tmp_path / "run", **kw)
    with pytest.raises(ConfigError, match=key):
        trainer.setup()
        trainer.fake_loss(torch.randn(4, 2), None)


def test_sid_lognormal_fake_noise_is_sids_draw_unclamped(toy_teacher, tmp_path):
    """SiD's fake-score loss: sigma = exp(P_mean + P_std n), weight (sigma^2 + sd^2) / (sigma sd)^2, no clamp to
    [sigma_min, sigma_max] (a P_mean of 5 puts most levels above sigma_max = 80)."""
    teacher = _toy_edm_teacher(toy_teacher, tmp_path)
    for p_mean in (-1.2, 5.0):
        trainer = toy_sim(teacher, tmp_path / f"r{p_mean}", fake_noise="lognormal", fake_p_mean=p_mean)
        trainer.setup()
        x = torch.randn(64, 2)
        seen = []
        hook = trainer.fake.net.register_forward_hook(lambda m, i, o, seen=seen: seen.append(i[1].detach().reshape(-1)))
        torch.manual_seed(3)
        got = trainer.fake_loss(x, None)
        hook.remove()
        torch.manual_seed(3)
        sigma = torch.exp(p_mean + 1.2 * torch.randn(64, dtype=torch.float64))
        n = torch.randn_like(x)
        torch.testing.assert_close(torch.exp(4 * torch.cat(seen).double()), sigma, rtol=1e-5, atol=0)
        s = sigma.float()[:, None]
        t = trainer.schedule.t_from_noise_level(sigma) if p_mean < 0 else None
        if t is not None:  # within the grid: the wrapper's x0 at the same level
            d = trainer.fake.predict(x + s * n, t, None, target="x0")
            want = ((s**-2 + 0.5**-2) * (d - x) ** 2).mean()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
        else:
            assert float(sigma.max()) > 80 and torch.isfinite(got)
