"""The training hot path does no per-step Python work that changes nothing (issue 17): random draws through
explicit generators (no torch-function interception), adapter and train/eval switches only on a change, and the
draws of a step served by the step's global-batch generator, never by torch's global one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from stepdistill.config import build_config
from stepdistill.models.adapters import adapter_active, adapters_disabled, add_lora
from stepdistill.models.teacher import Teacher
from stepdistill.models.toy import ToyMLP
from stepdistill.schedules import VPSchedule
from stepdistill.train import trainer_classes
from stepdistill.trainers import randomness as rnd
from stepdistill.trainers.randomness import GlobalBatchRandom


# ------------------------------------------------------------------------------------------------ random draws
def _draws():
    x = torch.zeros(3, 5, dtype=torch.float64)
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    return [
        rnd.randn(3, 4),
        rnd.rand((3, 2), dtype=torch.float64),
        rnd.randint(7, (3,)),
        rnd.randint(2, 9, size=(3, 2)),
        rnd.randn_like(x),
        rnd.rand_like(x),
        rnd.multinomial(probs, 3, replacement=True),
        rnd.rand(()),  # shared: not a per-sample draw
        rnd.randint(5, (2,)),  # shared: first dimension is not the per-process batch
    ]


def test_global_batch_draws_give_each_process_its_rows_of_the_global_draw():
    with GlobalBatchRandom(11, 0, 1, 6):  # one process holding the global batch of 6
        one = [rnd.randn(6, 4), rnd.rand((6, 2), dtype=torch.float64), rnd.randint(7, (6,))]
    for rank in range(2):
        with GlobalBatchRandom(11, rank, 2, 3):
            two = [rnd.randn(3, 4), rnd.rand((3, 2), dtype=torch.float64), rnd.randint(7, (3,))]
        for a, b in zip(one, two):
            assert torch.equal(a[rank::2], b)
    # every process draws the same shared values, and the sequence is reproducible
    runs = []
    for rank in range(2):
        with GlobalBatchRandom(5, rank, 2, 3):
            runs.append(_draws())
    for a, b in zip(runs[0][-2:], runs[1][-2:]):
        assert torch.equal(a, b)
    with GlobalBatchRandom(5, 0, 2, 3):
        again = _draws()
    assert all(torch.equal(a, b) for a, b in zip(runs[0], again))
    assert runs[0][4].dtype == torch.float64 and runs[0][0].shape == (3, 4) and runs[0][6].shape == (3,)


def test_draws_outside_a_step_are_torchs_own():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert rnd.active() is None
    assert torch.equal(rnd.randn(2, 3, generator=g1), torch.randn(2, 3, generator=g2))
    assert torch.equal(rnd.randint(1, 9, (4,), generator=g1), torch.randint(1, 9, (4,), generator=g2))
    torch.manual_seed(0)
    a = rnd.rand(4)
    torch.manual_seed(0)
    assert torch.equal(a, torch.rand(4))
    # an explicit generator wins inside a step too, and the step's generator is restored when nested blocks end
    with GlobalBatchRandom(1, 0, 1, 2) as outer:
        with GlobalBatchRandom(2, 0, 1, 2):
            pass
        assert rnd.active() is outer
        assert torch.equal(rnd.randn(2, generator=g1), torch.randn(2, generator=g2))
    assert rnd.active() is None


# ------------------------------------------------------------------------------------------------ trainers
def _trainer(method, teacher, tmp_path, **extra):
    cls = trainer_classes()[method]
    config = dict(
        teacher=teacher,
        dataset="toy2d:gmm8",
        output_dir=str(tmp_path / method),
        max_steps=3,
        global_batch=8,
        checkpoint_every=0,
        progress=False,
    )
    config.update(extra)
    return cls(build_config(cls.config_class, config))


CASES = [
    ("dmd2", dict(dfake_gen_update_ratio=1, denoising_timesteps=[999, 499])),
    ("sim", dict(dfake_gen_update_ratio=1)),
    ("vsd", dict(dfake_gen_update_ratio=1, real_guidance_scale=1.0, fake_score_mode="full")),
    ("progressive", dict(start_steps=4, final_steps=2, steps_per_round=3, max_steps=0)),
    ("boot", dict(num_steps=5)),
    ("consistency", dict(mode="lcm", num_ddim_timesteps=10)),
    ("consistency", dict(mode="lcm", num_ddim_timesteps=10, generator_mode="lora", lora_rank=4)),
    ("consistency", dict(mode="ict", init="teacher", loss="pseudo_huber", huber_c="ict")),
    ("consistency", dict(mode="ect", init="teacher", loss="pseudo_huber", huber_c="ict")),
]


@pytest.mark.parametrize("method,extra", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_a_training_step_draws_from_the_step_generator_only(method, extra, toy_teacher, tmp_path):
    """Every draw of a step goes through the step's generator (what makes a DDP run equal a 1-process run):
    torch's global generator is left untouched, and no torch-function mode intercepts the step's torch calls."""
    trainer = _trainer(method, toy_teacher, tmp_path, **extra)
    trainer.setup()
    modes = []
    compute = trainer.compute_loss

    def spy(batch, group):
        modes.append(torch._C._is_torch_function_mode_enabled())
        assert rnd.active() is not None
        return compute(batch, group)

    trainer.compute_loss = spy
    state = torch.get_rng_state()
    trainer.train()
    assert modes and not any(modes)
    assert torch.equal(torch.get_rng_state(), state), "a step drew from torch's global generator"


def test_lora_student_steps_switch_nothing_that_is_already_set(toy_teacher, tmp_path, monkeypatch):
    """LCM-LoRA on a shared base: after the first step no module-tree train() / eval() walk, and the student's
    adapter is not re-selected (it is the only one, already active); the teacher's adapters-off switch happens
    (that is a real change) and puts every flag back."""
    trainer = _trainer(
        "consistency", toy_teacher, tmp_path, mode="lcm", num_ddim_timesteps=10, generator_mode="lora", lora_rank=4
    )
    trainer.setup()
    calls = {"train": 0, "set_adapter": 0}
    steps = []
    module_train, set_adapter = torch.nn.Module.train, BaseTunerLayer.set_adapter

    def count(name, fn):
        def wrapped(self, *a, **k):
            if len(steps) > 1:
                calls[name] += 1
            return fn(self, *a, **k)

        return wrapped

    monkeypatch.setattr(torch.nn.Module, "train", count("train", module_train))
    monkeypatch.setattr(BaseTunerLayer, "set_adapter", count("set_adapter", set_adapter))
    end = trainer.on_step_end
    trainer.on_step_end = lambda step: (steps.append(step), end(step))
    flags = {n: [p.requires_grad for p in ps] for n, ps in trainer.params.items()}
    trainer.train()
    assert len(steps) == 3
    assert calls["train"] == 0, "train() / eval() walked a module tree in a step"
    # enable_adapters(True) re-selects through set_adapter once per LoRA layer per teacher call: nothing else
    layers = [m for m in trainer.generator.net.modules() if isinstance(m, BaseTunerLayer)]
    assert calls["set_adapter"] == len(layers)
    assert {n: [p.requires_grad for p in ps] for n, ps in trainer.params.items()} == flags


# ------------------------------------------------------------------------------------------------ adapters
def _lora_net():
    torch.manual_seed(0)
    net = ToyMLP(dim=2, hidden=16, layers=2, time_dim=8)
    net.requires_grad_(False)
    targets = ["inp", "time_proj", "blocks.0.1", "blocks.1.1", "out.1"]
    add_lora(net, 4, adapter_name="a", target_modules=targets)
    add_lora(net, 4, adapter_name="b", target_modules=targets)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return net


def _flags(net):
    return {n: p.requires_grad for n, p in net.named_parameters()}


def test_adapter_switches_only_when_the_state_changes(monkeypatch):
    net = _lora_net()
    x, t = torch.randn(4, 2), torch.full((4,), 500.0)
    with adapter_active(net, "a"):
        out_a = net(x, t)
    with adapter_active(net, "b"):
        out_b = net(x, t)
    with adapters_disabled(net):
        out_0 = net(x, t)
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, out_0)
    active = [list(m.active_adapters) for m in net.modules() if isinstance(m, BaseTunerLayer)]
    flags = _flags(net)

    calls = []
    for name in ("set_adapter", "enable_adapters"):
        fn = getattr(BaseTunerLayer, name)
        monkeypatch.setattr(
            BaseTunerLayer, name, lambda self, *a, _fn=fn, _n=name, **k: (calls.append(_n), _fn(self, *a, **k))[1]
        )
    with adapter_active(net, "b"):  # "b" is active (the last one added)
        assert torch.equal(net(x, t), out_b)
        with adapter_active(net, "b"):
            pass
    assert calls == []
    with adapters_disabled(net):
        n_off = len(calls)
        with adapters_disabled(net):  # off already: no switch
            assert torch.equal(net(x, t), out_0)
        assert len(calls) == n_off
    assert calls  # a real change switches
    with adapter_active(net, "a"):  # a real change, undone on exit
        assert torch.equal(net(x, t), out_a)
    assert torch.equal(net(x, t), out_b)
    assert [list(m.active_adapters) for m in net.modules() if isinstance(m, BaseTunerLayer)] == active
    assert _flags(net) == flags


def test_shared_base_teacher_runs_dropout_in_eval_and_restores_modes():
    net = _lora_net()
    net.blocks[0].append(torch.nn.Dropout(0.5))
    net.train()
    schedule = VPSchedule(torch.linspace(0.999, 0.01, 1000))
    teacher = Teacher(net, schedule, "eps", shares_base=True)
    x, t = torch.randn(64, 2), torch.full((64,), 0.5)
    a, b = teacher.raw(x, t), teacher.raw(x, t)
    assert torch.equal(a, b)  # dropout off for the teacher's call
    net.eval()
    with adapters_disabled(net):
        ref = teacher.net(schedule.model_input(x, t), schedule.model_time(t))
    net.train()
    torch.testing.assert_close(a, ref)
    assert all(m.training for m in net.modules())
    with torch.no_grad():  # and the student still runs its dropout in train mode
        assert not torch.equal(net(x, schedule.model_time(t)), net(x, schedule.model_time(t)))


# ------------------------------------------------------------------------------------------------ GAN features
def _backbone(name):
    import tiny_models as tm

    b = 2
    if name == "unet2d":
        return tm.tiny_unet2d(), {"class_labels": torch.tensor([1, 3])}, 3
    if name == "sdxl":
        added = {"text_embeds": torch.randn(b, 32), "time_ids": torch.rand(b, 6)}
        return tm.tiny_sdxl_unet(), dict(encoder_hidden_states=torch.randn(b, 5, 64), added_cond_kwargs=added), 4
    if name == "dit":
        return tm.tiny_dit(), {"class_labels": torch.tensor([0, 2])}, 4
    return (
        tm.tiny_sd3_transformer(),
        dict(encoder_hidden_states=torch.randn(b, 5, 96), pooled_projections=torch.randn(b, 64)),
        4,
    )


@pytest.mark.parametrize("name", ["unet2d", "sdxl", "dit", "sd3"])
def test_gan_features_stop_at_the_tapped_layer_and_equal_the_full_forwards_tap(name):
    from types import SimpleNamespace

    from stepdistill.models.fake_score import FakeScore
    from stepdistill.trainers.dmd2 import bottleneck_module

    schedule = VPSchedule(torch.linspace(0.999, 0.01, 1000))
    net, kwargs, ch = _backbone(name)
    fake = FakeScore(net.eval(), schedule, "eps")  # eval: DiT's label dropout draws at random in train mode
    module = bottleneck_module(net)
    cond = SimpleNamespace(kwargs=kwargs)
    x = torch.randn(2, ch, 8, 8, requires_grad=True)
    t = torch.tensor([0.3, 0.8])
    seen = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out))
    out = fake.raw(x, t, cond)  # the full forward and its tap
    handle.remove()
    full = seen[-1][-1] if isinstance(seen[-1], tuple) else seen[-1]
    (g_full,) = torch.autograd.grad(full.square().sum(), x)

    ran_after = []  # the network's last layer (after the tapped one) must not run
    tail = [m for m in net.modules() if m is not module and m is not net and not _inside(m, module)][-1]
    hook = tail.register_forward_hook(lambda *a: ran_after.append(1))
    got = fake.bottleneck(x, t, cond, module)
    hook.remove()
    got = got[-1] if isinstance(got, tuple) else got
    assert torch.equal(got, full)
    (g_got,) = torch.autograd.grad(got.square().sum(), x)
    assert torch.equal(g_got, g_full)
    assert not ran_after, "the forward ran past the tapped layer"
    assert out.shape == x.shape


def _inside(m, module):
    return any(m is sub for sub in module.modules())


# ------------------------------------------------------------------------------------------------ compile
def _compiled(net) -> bool:
    return getattr(net, "_compiled_call_impl", None) is not None


def _inner_nets(trainer):
    from stepdistill.models.denoiser import _unwrap

    return {n: _unwrap(getattr(trainer, n).net) for n in ("generator", "fake", "teacher") if hasattr(trainer, n)}


def _train_both(make, **compile_keys):
    """The same run eager and with ``compile: true``: (eager trainer, compiled trainer)."""
    out = []
    for keys in ({}, dict(compile=True, **compile_keys)):
        trainer = make(**keys)
        trainer.setup()
        before = {n: {k: v.clone() for k, v in net.state_dict().items()} for n, net in _inner_nets(trainer).items()}
        trainer.train()
        trainer.weights_before = before
        out.append(trainer)
    return out


def _check_same_run(eager, comp, trained=("generator", "fake")):
    assert all(_compiled(net) for net in _inner_nets(comp).values())
    assert not any(_compiled(net) for net in _inner_nets(eager).values())
    assert len(comp.history) == len(eager.history) > 0
    for a, b in zip(eager.history, comp.history):
        for key, value in a.items():
            if key.startswith("loss"):
                torch.testing.assert_close(float(b[key]), float(value), rtol=1e-5, atol=1e-7)
    for name, net in _inner_nets(comp).items():
        mine, ref = net.state_dict(), _inner_nets(eager)[name].state_dict()
        assert list(mine) == list(ref)  # parameter names / checkpoint keys unchanged
        for k in ref:
            torch.testing.assert_close(mine[k], ref[k], rtol=1e-4, atol=1e-6)
        if name in trained:
            assert any(not torch.equal(mine[k], comp.weights_before[name][k]) for k in mine), f"{name} did not train"
    # the export of a compiled run: the same files, the same weights
    folders = [Path(t.export()) for t in (eager, comp)]
    files = [sorted(p.relative_to(f) for p in f.rglob("*.safetensors")) for f in folders]
    assert files[0] == files[1] and files[0]
    for rel in files[0]:
        ref, got = (load_file(f / rel) for f in folders)
        assert list(got) == list(ref)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6)


COMPILE_CASES = [
    ("dmd2", dict(dfake_gen_update_ratio=1, denoising_timesteps=[999, 499])),
    ("dmd2", dict(dfake_gen_update_ratio=1, generator_mode="lora", lora_rank=4)),
    ("consistency", dict(mode="lcm", num_ddim_timesteps=10, generator_mode="lora", lora_rank=4)),
]


@pytest.mark.parametrize("method,extra", COMPILE_CASES, ids=["dmd2", "dmd2-lora", "lcm-lora"])
def test_compile_trains_like_eager_on_the_toy(method, extra, toy_teacher, tmp_path):
    """``compile: true`` (backend aot_eager: no C++ toolchain needed, and seconds instead of minutes of inductor
    compilation on CPU) gives the eager run's losses and weights; a LoRA student on the teacher's base switches
    adapters (on for the student, off for the teacher) between calls of the one compiled network."""

    def make(**keys):
        return _trainer(method, toy_teacher, tmp_path / str(len(keys)), **extra, **keys)

    eager, comp = _train_both(make, compile_backend="aot_eager")
    _check_same_run(eager, comp, trained=("generator", "fake") if method == "dmd2" else ("generator",))


def _tiny_unet_teacher(folder):
    """A class-conditional tiny UNet2DModel (tests/tiny_models.py) on 16 x 16 one-channel digits."""
    from diffusers import DDIMScheduler
    from tiny_models import tiny_unet2d

    tiny_unet2d(in_channels=1, sample_size=16).save_pretrained(folder / "unet")
    DDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction").save_pretrained(folder / "scheduler")
    return str(folder)


def test_compile_trains_like_eager_on_a_tiny_unet_with_the_gan_and_gradient_checkpointing(tmp_path):
    """A diffusers UNet compiled (aot_eager) under DMD2 with the GAN on (the head's forward stops at the mid block
    from a hook: a graph break, not a wrong result) and gradient checkpointing: the eager run's losses and weights."""
    teacher = _tiny_unet_teacher(tmp_path / "teacher")
    extra = dict(
        dataset="digits",
        dfake_gen_update_ratio=1,
        denoising_timesteps=[999, 499],
        gan_generator_weight=0.05,
        gradient_checkpointing=True,
        global_batch=4,
    )

    def make(**keys):
        return _trainer("dmd2", teacher, tmp_path / str(len(keys)), **extra, **keys)

    eager, comp = _train_both(make, compile_backend="aot_eager")
    _check_same_run(eager, comp)


@pytest.mark.parametrize(
    "keys,words",
    [
        (["compile_mode=fastest"], ["compile_mode", "'fastest'", "max-autotune"]),
        (["compile_backend=nvc"], ["compile_backend", "'nvc'", "inductor"]),
        (["compile_mode=max-autotune", "compile_backend=aot_eager"], ["compile_mode", "inductor", "aot_eager"]),
    ],
)
def test_compile_settings_are_checked_before_anything_loads(keys, words, tmp_path, capsys, monkeypatch):
    from stepdistill.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text("method: dmd2\noutput_dir: run\nmax_steps: 1\nglobal_batch: 2\nprogress: false\n")
    code = main(["train", "--config", "r.yaml", "compile=true", *keys])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ shared DM / GAN
def _counted_dmd2_run(teacher, out, share: bool, force_equal_draws: bool = False, **extra):
    """A DMD2 run with the GAN on; returns (trainer, {group: [fake-score forwards per step]}). With
    ``force_equal_draws`` the GAN generator term is fed the DM loss's own noise and times (its draw is skipped)."""
    trainer = _trainer("dmd2", teacher, out, share_fake_forward=share, **extra)
    trainer.setup()
    calls, per_group = [0], {}
    fake_net = trainer.fake.net.module if hasattr(trainer.fake.net, "module") else trainer.fake.net
    fake_net.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    compute = trainer.compute_loss

    def counted(batch, group):
        start = calls[0]
        result = compute(batch, group)
        per_group.setdefault(group, []).append(calls[0] - start)
        return result

    trainer.compute_loss = counted
    if not force_equal_draws:
        trainer.train()
        return trainer, per_group
    last, forced = {}, []
    at, gan_input, randn_like = trainer._dm_loss_at, trainer._gan_input, rnd.randn_like

    def dm_at(x, x_t, t, cond, fake=None):
        forced.append((last["noise"], t))
        return at(x, x_t, t, cond, fake)

    def noise_like(x, *a, **k):
        last["noise"] = randn_like(x, *a, **k)
        return last["noise"]

    def gan_in(x):  # the generator term's draw is forced; the discriminator's are drawn as usual
        if not forced:
            return gan_input(x)
        noise, t = forced.pop()
        return trainer.schedule.add_noise(x, noise, t), t

    trainer._dm_loss_at, trainer._gan_input = dm_at, gan_in
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rnd, "randn_like", noise_like)
        trainer.train()
    return trainer, per_group


def test_shared_fake_forward_saves_a_fake_forward_and_equals_two_forwards_at_equal_draws(toy_teacher, tmp_path):
    """``share_fake_forward``: one fake-score forward per generator update instead of two (DM + GAN generator
    term); forcing the unshared GAN term onto the DM loss's timesteps and noise gives the same losses and weights."""
    from stepdistill.models.denoiser import _unwrap

    extra = dict(dfake_gen_update_ratio=1, denoising_timesteps=[999, 499], gan_generator_weight=0.1, max_steps=4)
    plain, plain_calls = _counted_dmd2_run(toy_teacher, tmp_path / "a", False, force_equal_draws=True, **extra)
    shared, shared_calls = _counted_dmd2_run(toy_teacher, tmp_path / "b", True, **extra)
    gen = ("generator",)
    assert plain_calls[gen] == [2] * 4 and shared_calls[gen] == [1] * 4  # DM + GAN term -> one forward
    fake_group = ("fake_score", "head")
    assert plain_calls[fake_group] == shared_calls[fake_group] == [2] * 4  # DSM + the discriminator: unchanged
    for a, b in zip(plain.history, shared.history):
        assert set(a) == set(b)
        for key in a:
            torch.testing.assert_close(float(b[key]), float(a[key]), rtol=1e-6, atol=1e-9)
    for name in ("generator", "fake", "head"):
        ref, got = (_unwrap(getattr(getattr(t, name), "net", getattr(t, name))).state_dict() for t in (plain, shared))
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7)


def test_shared_fake_forward_is_refused_where_there_is_nothing_to_share(tmp_path):
    from stepdistill.config import ConfigError
    from stepdistill.trainers.dmd2 import DMD2Config

    for keys in (
        dict(),
        dict(gan_generator_weight=0.01, gan_noise="none"),
        dict(gan_generator_weight=0.01, fake_guidance_scale=2.0),
    ):
        with pytest.raises(ConfigError, match="share_fake_forward"):
            build_config(DMD2Config, dict(share_fake_forward=True, **keys))
    build_config(DMD2Config, dict(share_fake_forward=True, gan_generator_weight=0.01))
