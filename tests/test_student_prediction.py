"""student_prediction: the student's output type for every trainer, exact at initialisation, chosen by
``auto`` where the teacher's type is badly conditioned at the generator's timesteps.

The toy teacher is an eps-prediction MLP on DDPM's linear schedule (alpha = 0.0064 at timestep 999): an eps
output's error reaches x0 amplified 157x there, which one Adam step turns into a ruined one-step student."""

import json
import os

import pytest
import torch
from diffusers import DiffusionPipeline

import stepdistill  # noqa: F401  (registers the pipeline classes)
from stepdistill.config import ConfigError, build_config
from stepdistill.data import sample_toy2d, sliced_wasserstein
from stepdistill.models import FakeScore, Generator, Teacher
from stepdistill.schedules import EDMSchedule, FlowSchedule, VPSchedule
from stepdistill.trainers.consistency import ConsistencyConfig, ConsistencyTrainer
from stepdistill.trainers.dmd2 import DMD2Config, DMD2Trainer
from stepdistill.trainers.dsm import DSMConfig, DSMTrainer
from stepdistill.trainers.progressive import ProgressiveConfig, ProgressiveTrainer
from stepdistill.trainers.sim import SIMConfig, SIMTrainer
from stepdistill.trainers.vsd import VSDConfig, VSDTrainer

LINEAR = VPSchedule.from_config(dict(num_train_timesteps=1000, beta_schedule="linear"))


@pytest.fixture(scope="module")
def eps_teacher(tmp_path_factory):
    """A toy2d eps teacher on DDPM's linear schedule (a few CPU seconds)."""
    out = tmp_path_factory.mktemp("eps_teacher")
    cfg = dict(output_dir=str(out), dataset="toy2d:gmm8", block_out_channels=[128] * 3, max_steps=600)
    cfg.update(attention_levels=[False] * 3, global_batch=256, learning_rate=2e-3, warmup_steps=50)
    cfg.update(ema_decay=0.99, checkpoint_every=0, progress=False, beta_schedule="linear", prediction_type="epsilon")
    trainer = DSMTrainer(build_config(DSMConfig, cfg))
    trainer.train()
    return trainer.export()


# ------------------------------------------------------------------------------------------------------------
# the conversion and the auto rule
# ------------------------------------------------------------------------------------------------------------


def test_amplification_and_auto_rule():
    # eps at DDPM-linear timestep 999: sigma / alpha = 157; v: sigma / (alpha^2 + sigma^2) ~ 1; x0: 1
    a, s = float(LINEAR.alpha(1.0)), float(LINEAR.sigma(1.0))
    assert float(LINEAR.amplification(1.0, "eps")) == pytest.approx(s / a, rel=1e-9)
    assert 150 < float(LINEAR.amplification(1.0, "eps")) < 160
    assert float(LINEAR.amplification(1.0, "v")) == pytest.approx(1.0, abs=1e-4)
    assert float(LINEAR.amplification(0.5, "x0")) == 1.0
    assert LINEAR.auto_prediction_type("eps", 1.0)[0] == "v"
    assert LINEAR.auto_prediction_type("eps", 0.3)[0] == "eps"  # well conditioned there: kept
    assert LINEAR.auto_prediction_type("v", 1.0)[0] == "v"
    assert LINEAR.auto_prediction_type("x0", 1.0)[0] == "x0"
    sd = VPSchedule.from_config(
        dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    )
    assert sd.auto_prediction_type("eps", 1.0)[0] == "eps"  # SD1.5 / SDXL: 14.6x, the official eps students
    assert FlowSchedule().auto_prediction_type("flow", 1.0)[0] == "flow"
    assert FlowSchedule().auto_prediction_type("eps", 1.0)[0] == "flow"  # alpha(1) = 0
    assert EDMSchedule().auto_prediction_type("edm", 1.0)[0] == "edm"


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, x, timestep, cond=None):
        return self.lin(torch.cat([x, timestep.float().reshape(-1, 1) / 1000], 1))


@pytest.mark.parametrize(
    "teacher_type, student_type", [("eps", "v"), ("eps", "x0"), ("v", "eps"), ("v", "x0"), ("x0", "v")]
)
@pytest.mark.parametrize("kind", ["generator", "fake_score"])
def test_converted_student_equals_the_teacher_at_initialisation(teacher_type, student_type, kind):
    torch.manual_seed(0)
    teacher = Teacher(_Net(), LINEAR, teacher_type)
    cls = Generator if kind == "generator" else FakeScore
    student = cls.from_teacher(teacher, "full")
    student.reinterpret(teacher, student_type)
    assert student.prediction_type == student_type
    x = torch.randn(5, 2)
    for t in (1.0, 0.9, 0.5, 0.1, 0.01):
        for target in ("x0", "eps", "v"):
            torch.testing.assert_close(
                student.predict(x, t, target=target, float64=True),
                teacher.predict(x, t, target=target, float64=True),
                atol=5e-5,  # the teacher term is added in the network's float32
                rtol=1e-5,
            )
    # the network's own output now reaches x0 with the student type's amplification: a change d of the
    # output layer's bias moves x0 by amplification(t) * d (eps at timestep 999: 157 d; v: d)
    with torch.no_grad():
        before = student.predict(x, 1.0, float64=True)
        student.net.lin.bias += 0.01
        after = student.predict(x, 1.0, float64=True)
    moved = float((after - before).abs().max())
    assert moved == pytest.approx(0.01 * float(LINEAR.amplification(1.0, student_type)), rel=1e-3)


def test_teacher_term_fades_and_carries_input_gradients():
    torch.manual_seed(0)
    teacher = Teacher(_Net(), LINEAR, "eps")
    gen = Generator.from_teacher(teacher, "full")
    weight = [1.0]
    gen.reinterpret(teacher, "v", lambda: weight[0])
    x = torch.randn(4, 2, requires_grad=True)
    plain = gen.schedule.convert(gen.net(x, torch.full((4,), 999.0)), x, 1.0, "v", "x0")
    weight[0] = 0.0  # faded out: the network alone, read as v
    torch.testing.assert_close(gen.predict(x, 1.0), plain)
    # SiD / SIM differentiate the fake score w.r.t. x_t: the teacher term must pass that gradient
    fake = FakeScore.from_teacher(teacher, "full").reinterpret(teacher, "v")
    (g_fake,) = torch.autograd.grad(fake.predict(x, 0.7).sum(), x)
    (g_teacher,) = torch.autograd.grad(teacher.predict_with_input_grad(x, 0.7).sum(), x)
    torch.testing.assert_close(g_fake, g_teacher)


def test_bad_student_prediction_is_a_config_error(eps_teacher, tmp_path):
    with pytest.raises(ConfigError, match="student_prediction must be auto, eps, v, x0 or flow"):
        build_config(DMD2Config, dict(student_prediction="velocity"))
    with pytest.raises(ConfigError, match="student_prediction_warmup must be an integer"):
        build_config(DMD2Config, dict(student_prediction_warmup=-2))
    trainer = _trainer("dmd2", eps_teacher, tmp_path, student_prediction="flow")
    with pytest.raises(ConfigError, match="student_prediction='flow' cannot be expressed by the teacher's VPSch"):
        trainer.setup()
    long = _trainer("dmd2", eps_teacher, tmp_path / "d", student_prediction_warmup=61)
    with pytest.raises(ConfigError, match="student_prediction_warmup=61 is longer than max_steps=60"):
        long.setup()
    prog = _trainer("progressive", eps_teacher, tmp_path / "p", student_prediction_warmup=50)
    with pytest.raises(ConfigError, match="student_prediction_warmup=50 is longer than 30 updates"):
        prog.setup()


# ------------------------------------------------------------------------------------------------------------
# every trainer on the eps teacher
# ------------------------------------------------------------------------------------------------------------

_COMMON = dict(dataset="toy2d:gmm8", global_batch=256, warmup_steps=0, checkpoint_every=0, progress=False)
_SCORE = dict(gan_generator_weight=0.0, real_guidance_scale=1.0, max_grad_norm=10.0, learning_rate=1e-3)
_CONS = dict(generator_mode="full", num_ddim_timesteps=20, loss="l2", inference_steps=1, learning_rate=1e-3)
METHODS = {
    "dmd2": (DMD2Config, DMD2Trainer, dict(_SCORE, max_steps=60)),
    "sim": (SIMConfig, SIMTrainer, dict(_SCORE, max_steps=60)),
    "vsd": (VSDConfig, VSDTrainer, dict(_SCORE, max_steps=60, fake_score_mode="full", lora_target_modules=[])),
    "lcm": (ConsistencyConfig, ConsistencyTrainer, dict(_CONS, mode="lcm", max_steps=60)),
    "pcm": (ConsistencyConfig, ConsistencyTrainer, dict(_CONS, mode="multiphase", multiphase=[2], max_steps=120)),
    "ect": (ConsistencyConfig, ConsistencyTrainer, dict(_CONS, mode="ect", max_steps=60, sigma_data=3.0)),
    "ict": (ConsistencyConfig, ConsistencyTrainer, dict(_CONS, mode="ict", max_steps=60)),
    "progressive": (
        ProgressiveConfig,
        ProgressiveTrainer,
        dict(start_steps=4, steps_per_round=30, learning_rate=1e-3, max_grad_norm=1.0),
    ),
}


def _trainer(method, teacher, out, **kw):
    cfg_cls, cls, base = METHODS[method]
    return cls(build_config(cfg_cls, {**_COMMON, **base, "output_dir": str(out), "teacher": teacher, **kw}))


def _distance(trainer):
    ref, _ = sample_toy2d("gmm8", 2000, torch.Generator().manual_seed(1))
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(2))
    x = trainer.generator.sample(z, generator=torch.Generator().manual_seed(4))
    return sliced_wasserstein(x, ref, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("method", list(METHODS))
def test_auto_student_of_an_eps_teacher_ends_no_worse_than_it_starts(method, eps_teacher, tmp_path, capsys):
    trainer = _trainer(method, eps_teacher, tmp_path)
    trainer.setup()
    assert trainer.teacher.prediction_type == "eps"
    assert trainer.generator.prediction_type == "v"
    assert "student_prediction: auto -> v" in capsys.readouterr().out
    fake = getattr(trainer, "fake", None)
    if fake is not None:  # the fake score, a copy of the teacher, is converted the same way, for good
        assert fake.prediction_type == "v" and fake.anchor is trainer.teacher and fake.anchor_weight is None
    start = _distance(trainer)
    if method != "ict":  # iCT trains from scratch: no teacher to start from
        x = torch.randn(64, 2, generator=torch.Generator().manual_seed(5))
        t0 = trainer.generator.timesteps[0]
        torch.testing.assert_close(
            trainer.generator.predict(x, t0, target="x0", float64=True),
            trainer.teacher.predict(x, t0, target="x0", float64=True),
            atol=1e-5,
            rtol=1e-5,
        )
    trainer.train()
    assert trainer.generator.anchor_weight_now() == 0.0  # the exported network alone is the student
    end = _distance(trainer)
    assert end < start, f"{method}: sliced W2 {start:.3f} at initialisation -> {end:.3f}"


def test_forced_eps_one_step_student_diverges_where_auto_does_not(eps_teacher, tmp_path):
    """The conditioning difference, measured: the same DMD2 run (60 updates at lr 1e-3) with the teacher's eps
    output ends far worse than its start; the auto (v) student ends better than the same start."""
    runs = {}
    for pred in ("eps", "auto"):
        trainer = _trainer("dmd2", eps_teacher, tmp_path / pred, student_prediction=pred)
        trainer.setup()
        start = _distance(trainer)
        trainer.train()
        runs[pred] = (start, _distance(trainer))
    (s_eps, e_eps), (s_auto, e_auto) = runs["eps"], runs["auto"]
    assert s_eps == pytest.approx(s_auto, rel=1e-4)  # both start as the teacher
    assert e_eps > 2 * s_eps, runs
    assert e_auto < s_auto, runs


def test_export_of_a_v_student_of_an_eps_teacher_samples_like_the_student(eps_teacher, tmp_path):
    trainer = _trainer("dmd2", eps_teacher, tmp_path, max_steps=10, denoising_timesteps=[999, 499])
    trainer.train()
    path = trainer.export()
    with open(os.path.join(path, "scheduler", "scheduler_config.json")) as f:
        assert json.load(f)["prediction_type"] == "v_prediction"
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    points = pipe(num_samples=64, generator=torch.Generator().manual_seed(1)).samples
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(64, 2, generator=generator)
    ref = trainer.generator.sample(noise, None, generator=generator)
    torch.testing.assert_close(points, ref, atol=1e-4, rtol=1e-4)
