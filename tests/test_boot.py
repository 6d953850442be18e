"""BOOT (data-free distillation by bootstrapping): the loss against hand-worked values and a teacher DDIM step, the
boundary condition, an exact Gaussian-mixture teacher (x0 and eps), which weights move, resume, export and bad
input."""

import os
import re

import pytest
import torch
from torch import nn

import stepdistill  # noqa: F401  (registers the pipelines)
from stepdistill.config import ConfigError, build_config
from stepdistill.data import gmm_centers, mode_coverage, sliced_wasserstein
from stepdistill.data.toy2d import GMM_STD
from stepdistill.models import Teacher
from stepdistill.sampling import ddim_step, sample
from stepdistill.trainers.boot import BOOTConfig, BOOTTrainer, boot_delta, boot_loss, boot_target

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TOY = dict(
    dataset="toy2d:gmm8",
    max_steps=1000,
    global_batch=256,
    learning_rate=1e-3,
    warmup_steps=0,
    num_steps=20,
    checkpoint_every=0,
    progress=False,
)


def toy(teacher, out, **kw):
    return BOOTTrainer(build_config(BOOTConfig, {**TOY, "output_dir": str(out), "teacher": teacher, **kw}))


class MixtureTeacher(nn.Module):
    """The exact x0 (or eps) prediction of gmm8 noised by ``schedule``: a posterior-weighted mix of the per-mode
    posterior means mu_k + alpha s^2 / (alpha^2 s^2 + sigma^2) (x - alpha mu_k). A plain model(x, timestep, cond)."""

    def __init__(self, schedule, pred="x0"):
        super().__init__()
        self.schedule, self.pred = schedule, pred

    def forward(self, x, timestep, cond=None):
        t = self.schedule.timestep_to_t(timestep.double())
        a, s = self.schedule.alpha(t).reshape(-1, 1, 1), self.schedule.sigma(t).reshape(-1, 1, 1)
        x, mu, v = x.double()[:, None, :], gmm_centers("gmm8").double()[None], GMM_STD["gmm8"] ** 2
        var = a * a * v + s * s
        w = torch.softmax(-((x - a * mu) ** 2).sum(-1, keepdim=True) / (2 * var), dim=1)
        x0 = (w * (mu + a * v / var * (x - a * mu))).sum(1)
        if self.pred == "eps":
            return ((x[:, 0] - a[:, 0] * x0) / s[:, 0]).float()
        return x0.float()


class LinearTeacher(nn.Module):
    """x0 = 0.5 x + 0.25 (a tiny linear teacher whose DDIM step is worked out by ddim_step below)."""

    def forward(self, x, timestep, cond=None):
        return 0.5 * x + 0.25


# ------------------------------------------------------------------------------------------------ the loss
def test_loss_and_target_on_hand_worked_values():
    # alpha_t, sigma_t = 0.6, 0.8 -> alpha_s, sigma_s = 0.8, 0.6: delta = 1 - 0.36 / 0.64 = 0.4375
    d = boot_delta(torch.tensor([0.6]), torch.tensor([0.8]), torch.tensor([0.8]), torch.tensor([0.6]))
    torch.testing.assert_close(d, torch.tensor([0.4375]))
    target = boot_target(torch.ones(1, 2), torch.full((1, 2), 2.0), d)  # 1 + 0.4375 (2 - 1)
    torch.testing.assert_close(target, torch.full((1, 2), 1.4375))
    y_s = torch.full((1, 2), 1.5)  # error 0.0625 = delta / 7: weighted (1/7)^2
    torch.testing.assert_close(boot_loss(y_s, target, d), torch.tensor(1 / 49))
    torch.testing.assert_close(boot_loss(y_s, target, d, "constant"), torch.tensor(0.0625**2))
    # onto clean data (sigma_s = 0) and from the zero-SNR end (alpha_t = 0) the step is the teacher's x0 itself
    one = boot_delta(
        torch.tensor([0.6, 0.0]), torch.tensor([0.8, 1.0]), torch.tensor([1.0, 0.3]), torch.tensor([0.0, 0.9])
    )
    assert torch.equal(one, torch.ones(2))
    with pytest.raises(ValueError, match="weighting"):
        boot_loss(y_s, target, d, "snr")


def test_target_is_a_teacher_ddim_step_on_the_students_output(toy_teacher, tmp_path):
    trainer = toy(toy_teacher, tmp_path, num_steps=10, max_steps=1)
    trainer.setup()
    sched = trainer.schedule
    trainer.teacher = Teacher(LinearTeacher(), sched, "x0")
    eps = torch.randn(11, 2, generator=torch.Generator().manual_seed(0))
    i = torch.arange(11) % 10  # every step, the last one (onto clean data) included
    s, target, delta, f_top = trainer.bootstrap_targets(eps, i, None, boundary=True)
    # independently: the student's y_t -> x_t, a DDIM step of the linear teacher in x, read back as y at s
    t = trainer.times[i]
    with torch.no_grad():
        y_t = trainer.generator.predict(eps, t, None).double()
    a_t, s_t = sched.alpha(t)[:, None], sched.sigma(t)[:, None]
    x_t = a_t * y_t + s_t * eps.double()
    x0 = 0.5 * x_t.float().double() + 0.25
    eps_hat = (x_t - a_t * x0) / s_t
    last = i == 9
    x_s = ddim_step(sched, x0, eps_hat, t, torch.where(last, t, trainer.times[i + 1]))
    x_s = torch.where(last[:, None], x0, x_s)  # the last step lands on x0 (alpha = 1, sigma = 0)
    a_s = torch.where(last, 1.0, sched.alpha(trainer.times[i + 1]).double())[:, None]
    s_s = torch.where(last, 0.0, sched.sigma(trainer.times[i + 1]).double())[:, None]
    y_s = (x_s - s_s * eps.double()) / a_s
    torch.testing.assert_close(target.double(), y_s, atol=1e-6, rtol=1e-6)
    assert torch.equal(s, trainer.times[i + 1]) and torch.equal(
        delta[last], torch.ones(int(last.sum()), dtype=delta.dtype)
    )
    torch.testing.assert_close(f_top.float(), 0.5 * eps + 0.25)  # the boundary target: f(eps, t_0)


@pytest.mark.parametrize("teacher_pred", ["v", "eps"])
def test_boundary_holds_exactly_at_initialisation(teacher_pred, toy_teacher, tmp_path):
    """g(eps, t_0) = f(eps, t_0) bit for bit when the student reads its output as the teacher's type."""
    trainer = toy(toy_teacher, tmp_path, max_steps=1, student_prediction=teacher_pred)
    trainer.setup()
    if teacher_pred == "eps":  # the same network read as eps by both: an eps teacher
        trainer.teacher.prediction_type = "eps"
    eps = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    top = trainer.times[0].expand(64)
    with torch.no_grad():
        g = trainer.generator.predict(eps, top, None)
    assert torch.equal(g, trainer.teacher.predict(eps, top, None))
    assert trainer.generator.t_ref == 1.0 and float(trainer.times[-1]) == 0.0


def test_an_eps_teacher_gets_a_v_student_by_default(toy_teacher, tmp_path):
    trainer = toy(toy_teacher, tmp_path, max_steps=1)
    trainer.build_teacher = lambda: (
        BOOTTrainer.build_teacher(trainer),
        setattr(trainer.teacher, "prediction_type", "eps"),
    )
    trainer.setup()
    assert trainer.generator.prediction_type == "v"


# ------------------------------------------------------------------------------------------------ quality
@pytest.mark.parametrize("pred", ["x0", "eps"])
def test_one_step_student_of_an_exact_mixture_teacher(pred, toy_teacher, tmp_path):
    """The student starts as the trained toy network; the teacher is the exact mixture posterior (x0 or eps). After
    1000 steps its one-step samples are within 1.5x of the teacher's own sampling-noise floor (sliced W2 between two
    100-step DDIM sample sets) from the teacher's 100-step samples, and cover all 8 modes (1000 steps: 1.26x / 1.27x
    here; after 500 steps the eps case was at 1.51x)."""
    trainer = toy(toy_teacher, tmp_path)
    trainer.setup()
    sched = trainer.schedule
    trainer.teacher = Teacher(MixtureTeacher(sched, pred), sched, pred)

    def teacher_samples(seed):
        z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(seed))
        return sample(lambda x, t: trainer.teacher.raw(x, t), sched, z, 100, pred_type=pred)

    ref, other = teacher_samples(1), teacher_samples(2)
    floor = sliced_wasserstein(other, ref, generator=torch.Generator().manual_seed(0))
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(3))
    d0 = sliced_wasserstein(trainer.generator.sample(z), ref, generator=torch.Generator().manual_seed(0))
    trainer.train()
    x = trainer.generator.sample(z)
    d1 = sliced_wasserstein(x, ref, generator=torch.Generator().manual_seed(0))
    frac, counts = mode_coverage(x, "gmm8")
    assert d1 < 1.5 * floor, f"sliced W2 {d0:.3f} -> {d1:.3f}, teacher floor {floor:.3f}"
    assert frac == 1.0, f"modes missed: {counts.tolist()}"


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_generator_weights_move_and_the_teacher_does_not(mode, toy_teacher, tmp_path):
    extra = dict(generator_mode="lora", lora_rank=4, lora_target_modules=[]) if mode == "lora" else {}
    trainer = toy(toy_teacher, tmp_path, max_steps=3, global_batch=16, **extra)
    trainer.setup()
    teacher = {n: p.detach().clone() for n, p in trainer.teacher.net.named_parameters() if "lora_" not in n}
    gen = [p.detach().clone() for p in trainer.params["generator"]]
    trainer.train()
    now = dict(trainer.teacher.net.named_parameters())
    assert all(torch.equal(now[n], v) for n, v in teacher.items()), "the teacher moved"
    assert any(not torch.equal(a, b) for a, b in zip(gen, trainer.params["generator"])), "the student did not train"
    assert all({"loss", "loss_bs", "loss_bc"} <= set(h) for h in trainer.history)


def test_resume_continues_the_exact_loss_curve(toy_teacher, tmp_path):
    kw = dict(max_steps=8, checkpoint_every=4, global_batch=16)
    full = toy(toy_teacher, tmp_path / "a", **kw)
    full.train()
    toy(toy_teacher, tmp_path / "b", **{**kw, "max_steps": 4}).train()
    rest = toy(toy_teacher, tmp_path / "b", **kw, resume="latest")
    rest.train()
    a = [h["loss"] for h in full.history[4:]]
    b = [h["loss"] for h in rest.history]
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-6, rtol=0)
    for p, q in zip(full.generator.net.parameters(), rest.generator.net.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ export
def test_toy_export_samples_in_one_call_like_the_student(toy_teacher, tmp_path):
    from diffusers import DiffusionPipeline

    trainer = toy(toy_teacher, tmp_path, max_steps=2, global_batch=16)
    trainer.train()
    pipe = DiffusionPipeline.from_pretrained(trainer.export())
    calls = []
    pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(float(args[1])))
    points = pipe(num_samples=500, generator=torch.Generator().manual_seed(0)).samples
    z = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    # the scheduler's float32 beta rounds the cosine alpha_bar(999) = 2.4e-9 to 0: x0 moves by 4.9e-5 * noise
    torch.testing.assert_close(points, trainer.generator.sample(z), atol=3e-4, rtol=0)
    assert calls == [0.0]  # one network evaluation, at the student's clean end


def test_digits_export_and_its_stock_diffusers_loop(tmp_path):
    """The bundled digits teacher (v prediction, class labels, no images read): the exported pipeline's plain call
    and the model card's stock-diffusers loop give the student's one-step samples."""
    from diffusers import DiffusionPipeline

    trainer = BOOTTrainer(
        build_config(
            BOOTConfig,
            dict(output_dir=str(tmp_path / "run"), max_steps=1, global_batch=4, checkpoint_every=0, progress=False),
        )
    )
    trainer.train()
    folder = trainer.export()
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[3, 1, 4], generator=torch.Generator().manual_seed(0), output_type="pt").images
    noise = torch.randn(3, *trainer.sample_shape, generator=torch.Generator().manual_seed(0))
    ref = trainer.generator.sample(noise, trainer.conditioner(torch.tensor([3, 1, 4])))
    torch.testing.assert_close(images, (ref / 2 + 0.5).clamp(0, 1), atol=2e-4, rtol=0)  # float32 beta, as above
    card = open(os.path.join(folder, "README.md")).read()
    stock = re.findall(r"```python\n(.*?)```", card, re.S)[0]
    assert "import stepdistill" not in stock
    scope = {}
    exec(stock, scope)  # noqa: S102 - the card's own snippet
    loop = pipe(class_labels=list(range(10)), generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(scope["images"], loop, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input(toy_teacher, tmp_path):
    with pytest.raises(ConfigError, match="weighting"):
        build_config(BOOTConfig, {"weighting": "snr"})
    with pytest.raises(ConfigError, match="boundary_weight"):
        build_config(BOOTConfig, {"boundary_weight": -1.0})
    with pytest.raises(ConfigError, match="student_prediction"):
        build_config(BOOTConfig, {"student_prediction": "flow"})
    with pytest.raises(ConfigError, match="num_steps=1000: the trailing grid reaches timestep 0"):
        toy(toy_teacher, tmp_path / "a", num_steps=1000).setup()
    with pytest.raises(ConfigError, match="guidance_scale=3.0 needs a teacher with an unconditional branch"):
        toy(toy_teacher, tmp_path / "b", guidance_scale=3.0).setup()


def test_an_image_folder_is_refused_before_anything_loads(tmp_path, monkeypatch):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "a.txt").write_text("a cat")
    trainer = BOOTTrainer(
        build_config(BOOTConfig, dict(output_dir=str(tmp_path / "run"), dataset=str(tmp_path / "imgs")))
    )
    monkeypatch.setattr(BOOTTrainer, "build", lambda self: pytest.fail("a model loaded"))
    with pytest.raises(ConfigError, match="is an image folder, but BOOT is data-free"):
        trainer.setup()


@pytest.mark.parametrize("name", ["digits", "toy2d", "sd15"])
def test_recipes_parse(name, tmp_path, monkeypatch):
    from stepdistill.train import make_trainer

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "teacher_toy2d" / "model").mkdir(parents=True)
    trainer = make_trainer(os.path.join(ROOT, "recipes", "boot", f"{name}.yaml"))
    assert type(trainer) is BOOTTrainer


def test_a_flow_teacher_is_refused(toy_teacher, tmp_path):
    from stepdistill.schedules import FlowSchedule

    trainer = toy(toy_teacher, tmp_path, max_steps=1)
    trainer.build_teacher = lambda: (BOOTTrainer.build_teacher(trainer), setattr(trainer, "schedule", FlowSchedule()))
    with pytest.raises(ConfigError, match="BOOT here supports discrete VP teachers"):
        trainer.setup()


class TimeMLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 2))

    def forward(self, x, timestep, cond=None):
        return self.body(torch.cat([x, timestep[:, None].to(x) / 1000], 1))


def test_an_object_student_exports_how_to_take_its_one_step(tmp_path):
    """Teacher and generator given as objects: a network-only export whose student.json says how the one call reads
    its output (as v at the grid's top time with x = the noise, for an eps teacher)."""
    import json

    from safetensors.torch import load_file

    from stepdistill.schedules import VPSchedule

    schedule = VPSchedule.from_config({"num_train_timesteps": 1000})
    cfg = BOOTConfig(output_dir=str(tmp_path / "run"), dataset="toy2d:gmm8", num_steps=5, max_steps=2, global_batch=8,
                     checkpoint_every=0, progress=False)  # fmt: skip
    teacher = Teacher(MixtureTeacher(schedule, "eps"), schedule, "eps")
    trainer = BOOTTrainer(cfg, teacher=teacher, generator=TimeMLP(), sample_shape=(2,))
    trainer.train()
    with pytest.warns(UserWarning, match="exported as a network only"):
        folder = trainer.export()
    info = json.loads(open(os.path.join(folder, "student.json")).read())
    assert info["sampler"] == "boot" and info["timesteps"] == [0] and info["prediction_type"] == "v"
    net = TimeMLP()
    net.load_state_dict(load_file(os.path.join(folder, "generator.safetensors")))
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = net(z, torch.zeros(16))
    x0 = info["alpha_ref"] * z - info["sigma_ref"] * v  # v read at the top time with x = z
    torch.testing.assert_close(trainer.generator.sample(z), x0)
