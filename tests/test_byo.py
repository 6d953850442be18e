"""Bring your own teacher / student / data: every student trainer built from objects (a Teacher around a
callable or module, generator and fake-score modules, a tensor / Dataset / iterable), the contract checks with
one-line errors naming the argument, the round teacher and DMD v1 pairs following the current teacher, the
export of such students, and the README example run as written."""

from __future__ import annotations

import copy
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from stepdistill.config import ConfigError, ObjectError, UserError
from stepdistill.io import EXPORT_MARKER
from stepdistill.models import Teacher
from stepdistill.schedules import VPSchedule
from stepdistill.trainers.boot import BOOTConfig, BOOTTrainer
from stepdistill.trainers.consistency import ConsistencyConfig, ConsistencyTrainer
from stepdistill.trainers.dmd2 import DMD2Config, DMD2Trainer
from stepdistill.trainers.progressive import ProgressiveConfig, ProgressiveTrainer
from stepdistill.trainers.sim import SIMConfig, SIMTrainer
from stepdistill.trainers.vsd import VSDConfig, VSDTrainer

ROOT = Path(__file__).resolve().parents[1]
SCHEDULE = VPSchedule.from_config({"num_train_timesteps": 1000})
CENTRES = 1.5 * torch.tensor([[math.cos(k * math.pi / 4), math.sin(k * math.pi / 4)] for k in range(8)])
STD = 0.1


def mixture_x0(x_t, timestep, cond):
    """E[x0 | x_t] of the 8-mode ring mixture under SCHEDULE (timestep: t (T - 1))."""
    t = SCHEDULE.timestep_to_t(timestep.double())
    a = SCHEDULE.alpha(t).to(x_t)[:, None, None]
    s = SCHEDULE.sigma(t).to(x_t)[:, None, None]
    mu = CENTRES.to(x_t)[None]
    var = a**2 * STD**2 + s**2
    r = (-((x_t[:, None] - a * mu) ** 2).sum(-1, keepdim=True) / (2 * var)).softmax(1)
    return (r * (mu + a * STD**2 / var * (x_t[:, None] - a * mu))).sum(1)


class MLP(nn.Module):
    def __init__(self, width: int = 32, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(3, width), nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x_t, timestep, cond=None):
        return self.body(torch.cat([x_t, timestep[:, None] / 1000], 1))


def points(n: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return CENTRES[torch.randint(8, (n,), generator=g)] + STD * torch.randn(n, 2, generator=g)


TINY = dict(max_steps=3, global_batch=16, learning_rate=1e-3, checkpoint_every=0, progress=False)

METHODS = {
    "dmd2": (DMD2Config, DMD2Trainer, dict(dfake_gen_update_ratio=1)),
    "sim": (SIMConfig, SIMTrainer, {}),
    "vsd": (VSDConfig, VSDTrainer, dict(real_guidance_scale=1.0, lora_target_modules=[])),
    "progressive": (ProgressiveConfig, ProgressiveTrainer, dict(start_steps=4, steps_per_round=1, max_steps=0)),
    "lcm": (ConsistencyConfig, ConsistencyTrainer, dict(num_ddim_timesteps=10, inference_steps=1)),
    "ect": (ConsistencyConfig, ConsistencyTrainer, dict(mode="ect", inference_steps=1)),
    "ict": (ConsistencyConfig, ConsistencyTrainer, dict(mode="ict", inference_steps=1)),  # reinitialises
    "boot": (BOOTConfig, BOOTTrainer, dict(num_steps=5)),
}


OBJECTS = ("teacher", "generator", "fake_score", "dataset", "sample_shape")


def make(method, out, **kw):
    """A tiny trainer of ``method``: the object arguments in ``kw`` go to the trainer, the rest to its config."""
    cfg_cls, cls, extra = METHODS[method]
    objects = {k: v for k, v in kw.items() if k in OBJECTS}
    keys = {k: v for k, v in kw.items() if k not in OBJECTS}
    cfg = cfg_cls(output_dir=str(out), **{**TINY, **extra, **keys})
    if "max_steps" in extra:
        cfg.check()  # progressive derives max_steps
    return cls(cfg, **objects)


def params(module):
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("method", list(METHODS))
def test_every_trainer_trains_from_objects(method, tmp_path):
    """An analytic (parameter-free) teacher with generator / fake-score modules and a tensor dataset; then a
    module teacher whose copies are the students: teacher weights unchanged, generator weights changed."""
    fake = {"fake_score": MLP(seed=2)} if method in ("dmd2", "sim", "vsd") else {}
    gen = MLP(seed=1)
    before = params(gen)
    trainer = make(method, tmp_path / "a", teacher=Teacher(mixture_x0, SCHEDULE, "x0"), generator=gen,
                   dataset=points(), **fake)  # fmt: skip
    assert trainer.config.teacher == "<object: mixture_x0>" and trainer.config.dataset == "<object: Tensor>"
    trainer.train()
    assert trainer.generator.net is gen or trainer.accelerator.unwrap_model(trainer.generator.net) is gen
    assert any(not torch.equal(a, b) for a, b in zip(before, gen.parameters()))
    assert all(torch.isfinite(p).all() for p in gen.parameters())

    net = MLP(seed=3)
    teacher = Teacher(net, SCHEDULE, "x0")
    x, t = points(8, seed=5), torch.linspace(0.1, 0.9, 8, dtype=torch.float64)
    teacher_before = teacher.raw(x, t)
    trainer = make(method, tmp_path / "b", teacher=teacher, dataset=points())
    trainer.train()
    # the teacher never trains (VSD's LoRA fake score trains adapters on its base: the teacher runs without them)
    torch.testing.assert_close(teacher.raw(x, t), teacher_before, rtol=0, atol=0)
    assert not torch.equal(trainer.generator.raw(x, t), teacher_before)  # the copied student did
    run = json.loads((tmp_path / "b" / "config.json").read_text())
    assert run["teacher"] == "<object: MLP>"


def test_datasets_of_items_and_labels_reach_a_callable_teacher(tmp_path):
    """A Dataset of (sample, label) pairs, an iterable of dicts: the callable teacher gets the labels as cond."""
    seen = []

    def labelled_x0(x_t, timestep, cond):
        seen.append(cond)
        return mixture_x0(x_t, timestep, None)

    data = points(64)
    pairs = torch.utils.data.TensorDataset(data, torch.arange(64) % 8)
    trainer = make("lcm", tmp_path / "a", teacher=Teacher(labelled_x0, SCHEDULE, "x0"), generator=MLP(),
                   dataset=pairs)  # fmt: skip
    assert seen and seen[-1].dtype == torch.int64 and seen[-1].shape == (2,)  # checked at construction
    trainer.train()
    assert seen[-1].shape == (16,) and int(seen[-1].max()) < 8
    items = ({"image": x, "label": i % 3} for i, x in enumerate(data))  # a generator: read once
    trainer = make("dmd2", tmp_path / "b", teacher=Teacher(labelled_x0, SCHEDULE, "x0"), generator=MLP(),
                   fake_score=MLP(seed=4), dataset=items)  # fmt: skip
    trainer.setup()
    assert trainer.dataset.n == 64 and trainer.dataset.labels.tolist()[:4] == [0, 1, 2, 0]


def _error(exc, match, method="dmd2", tmp=None, **objects):
    with pytest.raises(exc, match=match) as info:
        t = make(method, tmp, **objects)
        t.setup()
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)
    return str(info.value)


def test_bad_objects_give_one_line_errors_naming_the_argument(tmp_path):
    teacher = Teacher(mixture_x0, SCHEDULE, "x0")
    gen, fake, data = MLP(), MLP(seed=1), points(64)
    ok = dict(teacher=teacher, generator=gen, fake_score=fake, dataset=data)
    d = tmp_path
    _error(ObjectError, "^teacher: expected stepdistill.models.Teacher", tmp=d, **{**ok, "teacher": mixture_x0})
    _error(ObjectError, "^generator: expected an nn.Module", tmp=d, **{**ok, "generator": lambda x, t, c: x})
    _error(ObjectError, "^generator: Identity has no parameters", tmp=d, **{**ok, "generator": nn.Identity()})
    # a parameter-free teacher cannot be copied into a student or a fake score
    _error(ObjectError, "^generator: the teacher's net <object: mixture_x0> has no parameters to copy", tmp=d,
           **{**ok, "generator": None})  # fmt: skip
    _error(ObjectError, "^fake_score: the teacher's net <object: mixture_x0> has no parameters", tmp=d,
           **{**ok, "fake_score": None})  # fmt: skip
    # LoRA needs layers: a plain callable has none, nor has a module without Linear / Conv2d
    _error(ConfigError, "^fake_score_mode=lora: the teacher's net <object: mixture_x0> is a plain callable", "vsd",
           d, teacher=teacher, generator=gen, dataset=data)  # fmt: skip

    _error(ConfigError, "^generator_mode=lora: the teacher's net <object: mixture_x0> is a plain callable",
           "progressive", d, teacher=teacher, dataset=data, generator_mode="lora")  # fmt: skip

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, x, t, c):
            return self.w * x

    _error(ConfigError, "^fake_score_mode=lora: the teacher's net <object: Scale> has no Linear or Conv2d", "vsd",
           d, teacher=Teacher(Scale(), SCHEDULE, "x0"), dataset=data)  # fmt: skip
    # the call contract: shape, dtype, finite values, a call that fails
    wrong = Teacher(lambda x, t, c: x[:, :1], SCHEDULE, "x0")
    msg = _error(
        ObjectError, r"^teacher: <object: <lambda>> returned shape \(2, 1\)", tmp=d, **{**ok, "teacher": wrong}
    )
    assert "prediction (x0)" in msg
    ints = Teacher(lambda x, t, c: x.long(), SCHEDULE, "x0")
    _error(ObjectError, "^teacher: .* returned shape \\(2, 2\\) torch.int64", tmp=d, **{**ok, "teacher": ints})
    nan = Teacher(lambda x, t, c: x * float("nan"), SCHEDULE, "x0")
    _error(ObjectError, "^teacher: .* returned non-finite values", tmp=d, **{**ok, "teacher": nan})
    _error(ObjectError, r"^generator: calling <object: MLP> on x_t \(2, 3\).*failed \(RuntimeError", tmp=d,
           **{**ok, "dataset": torch.randn(8, 3), "teacher": Teacher(lambda x, t, c: x, SCHEDULE, "x0")})  # fmt: skip
    # sharing weights with the teacher would train the teacher
    net = MLP(seed=5)
    _error(ObjectError, "^generator: shares parameters with the teacher's net", tmp=d,
           **{**ok, "teacher": Teacher(net, SCHEDULE, "x0"), "generator": net})  # fmt: skip
    _error(ObjectError, "^fake_score: shares parameters with the generator", tmp=d, **{**ok, "fake_score": gen})
    _error(ObjectError, "^fake_score: ProgressiveTrainer has no fake score", "progressive", d, **ok)
    # datasets
    _error(ObjectError, "^dataset: item 1 has keys \\['image'\\], but item 0 has \\['image', 'label'\\]", tmp=d,
           **{**ok, "dataset": [(data[0], 1), {"image": data[1]}]})  # fmt: skip
    _error(ObjectError, "^dataset: item 0 has keys \\['x'\\]", tmp=d, **{**ok, "dataset": [{"x": data[0]}]})
    _error(ObjectError, "^dataset: item 0's label must be a non-negative int", tmp=d,
           **{**ok, "dataset": [(data[0], 0.5)]})  # fmt: skip
    _error(ObjectError, "^dataset: a tensor dataset holds float samples", tmp=d, **{**ok, "dataset": torch.arange(4)})
    _error(ObjectError, "^dataset: expected a tensor, a torch Dataset", tmp=d, **{**ok, "dataset": "toy2d:gmm8"})
    _error(ObjectError, "^dataset: it has no items", tmp=d, **{**ok, "dataset": []})
    # nothing tells the sample shape: the unconditional label-only dataset of a callable teacher
    _error(ObjectError, "^sample_shape: cannot tell the shape", tmp=d, **{**ok, "dataset": [{"label": 1}] * 4})
    _error(ObjectError, "^sample_shape: expected a tuple of positive ints", tmp=d, **ok, sample_shape=(2, 0))
    # a callable has no weights to cast or offload
    with pytest.raises(ConfigError, match="^teacher_dtype=bf16: the teacher's net <object: mixture_x0> is a plain"):
        DMD2Trainer(DMD2Config(output_dir=str(d), teacher_dtype="bf16"), **ok)
    # the Teacher's own parts
    with pytest.raises(ObjectError, match="^Teacher: net must be a network or a callable"):
        Teacher(3, SCHEDULE, "x0")
    with pytest.raises(ObjectError, match="^Teacher: schedule must be a stepdistill.schedules.NoiseSchedule"):
        Teacher(mixture_x0, {"num_train_timesteps": 1000}, "x0")
    with pytest.raises(ObjectError, match="^Teacher: .*prediction type 'velocity'"):
        Teacher(mixture_x0, SCHEDULE, "velocity")


def test_data_free_dmd2_with_sample_shape_and_label_only_items(tmp_path):
    """DMD2 reads no samples: a dataset of labels (or empty items) with ``sample_shape`` is enough."""
    trainer = make("dmd2", tmp_path, teacher=Teacher(mixture_x0, SCHEDULE, "x0"), generator=MLP(),
                   fake_score=MLP(seed=1), dataset=[{}] * 32, sample_shape=(2,))  # fmt: skip
    trainer.train()
    assert trainer.sample_shape == (2,) and not trainer.dataset.has_images


def test_object_runs_resume_and_refuse_another_object(tmp_path):
    teacher = Teacher(mixture_x0, SCHEDULE, "x0")

    def run(out, teacher, **kw):
        cfg = DMD2Config(output_dir=str(out), **{**TINY, "max_steps": 4, "checkpoint_every": 2, **kw})
        return DMD2Trainer(cfg, teacher=teacher, generator=MLP(), fake_score=MLP(seed=1), dataset=points(64))

    full = run(tmp_path / "a", teacher)
    full.train()
    run(tmp_path / "b", teacher, max_steps=2).train()
    rest = run(tmp_path / "b", teacher, resume="latest")
    rest.train()
    for a, b in zip(full.generator.net.parameters(), rest.generator.net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    def other_x0(x_t, timestep, cond):
        return mixture_x0(x_t, timestep, cond)

    with pytest.raises(ConfigError, match="teacher: '<object: mixture_x0>' -> '<object: other_x0>'"):
        run(tmp_path / "b", Teacher(other_x0, SCHEDULE, "x0"), resume="latest", max_steps=6).setup()
    # the recorded label without an object: refused with what to pass
    cfg = DMD2Config(output_dir=str(tmp_path / "c"), teacher="<object: mixture_x0>")
    cfg.check()
    with pytest.raises(ConfigError, match="^teacher: '<object: mixture_x0>' records a teacher object"):
        DMD2Trainer(cfg).setup()
    with pytest.raises(ConfigError, match="^teacher: the config names"):
        DMD2Trainer(DMD2Config(output_dir=str(tmp_path / "d"), teacher=str(tmp_path)), teacher=teacher)


def test_round_teacher_and_regression_pairs_follow_a_swapped_teacher(tmp_path):
    """Replacing ``trainer.teacher`` after setup(): progressive's round-0 teacher and DMD v1's regression pairs
    are read from the teacher in place when used, not from the one captured at build()."""
    prog = make("progressive", tmp_path / "p", teacher=Teacher(mixture_x0, SCHEDULE, "x0"), generator=MLP(),
                dataset=points())  # fmt: skip
    prog.setup()
    shifted = Teacher(lambda x, t, c: mixture_x0(x, t, c) + 1.0, SCHEDULE, "x0")
    prog.teacher = shifted
    assert prog.round_teacher is shifted
    x = points(16)
    _, _, target = prog._two_step_target(x, torch.randn_like(x), None, None, 2)
    assert target.mean() > 0.5  # the shifted teacher's targets (the mixture's mean is 0)

    dmd = make("dmd2", tmp_path / "d", teacher=Teacher(mixture_x0, SCHEDULE, "x0"), generator=MLP(),
               fake_score=MLP(seed=1), dataset=points(), regression_weight=0.5, regression_pairs=32,
               regression_steps=4)  # fmt: skip
    dmd.setup()
    before = dmd.pairs[1].clone()
    dmd.teacher = shifted
    after = dmd.pairs[1]
    assert (after - before).mean() > 0.5  # remade from the shifted teacher
    assert dmd.pairs[1] is after  # and kept while the teacher stays
    dmd.train()  # the regression term runs on the current teacher's pairs
    assert all("loss_reg/generator" in h for h in dmd.history if "loss_dm/generator" in h)


def test_export_of_an_object_student_saves_the_generator_weights(tmp_path):
    from safetensors.torch import load_file

    trainer = make("dmd2", tmp_path / "run", teacher=Teacher(mixture_x0, SCHEDULE, "x0"), generator=MLP(),
                   fake_score=MLP(seed=1), dataset=points(), ema_decay=0.5)  # fmt: skip
    trainer.train()
    with pytest.warns(UserWarning, match="network only .*generator.safetensors.*the teacher was given as an object"):
        out = trainer.export()
    info = json.loads(Path(out, "student.json").read_text())
    assert info["network"] == "generator.safetensors" and info["network_class"].endswith("MLP")
    assert info["timesteps"] == [999] and info["prediction_type"] == "x0"
    assert info["alphas"][0] == pytest.approx(float(SCHEDULE.alpha(1.0)))
    assert json.loads(Path(out, "scheduler", "scheduler_config.json").read_text())["num_train_timesteps"] == 1000
    reloaded = MLP(seed=9)
    reloaded.load_state_dict(load_file(os.path.join(out, "generator.safetensors")))
    z = torch.randn(8, 2)
    t = torch.full((8,), 999.0)
    for k, v in reloaded.state_dict().items():  # the generator's EMA weights, as for every export
        torch.testing.assert_close(v, trainer.ema["generator"][k])
    assert not torch.equal(reloaded(z, t), trainer.generator.net(z, t))
    assert os.path.isfile(os.path.join(out, EXPORT_MARKER))  # marked as ours: a second export replaces it
    os.remove(os.path.join(out, "student.json"))
    with pytest.warns(UserWarning, match="network only"):
        trainer.export()
    assert os.path.isfile(os.path.join(out, "student.json"))


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Bring your own teacher", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the section holds one python example"
    return blocks[0]


def test_readme_bring_your_own_teacher_example_runs(tmp_path, monkeypatch):
    """The README example as written: DMD2 and LCM students of the analytic mixture end closer to its modes
    than they started."""
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_readme_example(), "README.md:bring-your-own-teacher", "exec"), scope)
    results = scope["results"]
    assert set(results) == {"dmd2", "lcm"}
    for name, (before, after) in results.items():
        assert after < 0.75 * before, f"{name}: mean distance to the nearest mode {before:.3f} -> {after:.3f}"


def test_folder_teacher_with_a_generator_object_and_a_dataset_object(tmp_path):
    """The bundled digits teacher (a folder) with a student network of one's own: it gets the teacher's class
    labels as the UNet does; a dataset object must have the teacher's sample shape."""
    from stepdistill.assets import digits_teacher_path

    net = Teacher.from_pretrained(digits_teacher_path()).net
    student = copy.deepcopy(net)  # frozen by Teacher: made trainable
    cfg = DMD2Config(output_dir=str(tmp_path / "a"), **{**TINY, "max_steps": 1, "global_batch": 2})
    trainer = DMD2Trainer(cfg, generator=student)
    trainer.train()
    assert trainer.config.teacher == "digits" and trainer.generator.net is student
    assert any(not torch.equal(a, b) for a, b in zip(net.parameters(), student.parameters()))  # it trained
    with pytest.raises(ObjectError, match=r"^dataset: its samples have shape \(2,\), but the teacher's samples"):
        DMD2Trainer(DMD2Config(output_dir=str(tmp_path / "b"), **TINY), dataset=[(x, 1) for x in points(8)]).setup()
    with pytest.raises(ConfigError, match="^dataset: '<object: Tensor>' has no class labels, but the teacher is class"):
        DMD2Trainer(DMD2Config(output_dir=str(tmp_path / "b"), **TINY), dataset=points(8)).setup()
    with pytest.raises(ConfigError, match="^gan_generator_weight > 0: MLP has no mid_block"):
        make("dmd2", tmp_path / "c", teacher=Teacher(mixture_x0, SCHEDULE, "x0"), generator=MLP(),
             fake_score=MLP(seed=1), dataset=points(), gan_generator_weight=0.1).setup()  # fmt: skip
