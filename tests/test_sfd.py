"""SFD (score forgetting distillation, stepdistill.trainers.sfd): the forgetting term and remapping by hand, the
trainer on the analytic class-conditional mixture (the forgotten class moves to the remap target's mode, the
other classes stay, the teacher is untouched), SFD with zero forget weights equal to SIM-l2 on the remaining
data, one-line config errors, the text-conditional path on tiny SD1.5 components, and the forgetting report."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from stepdistill.cli import main
from stepdistill.config import ConfigError
from stepdistill.eval.forget import forget_fractions, remaining_labels
from stepdistill.models.analytic import GaussianMixture, MixtureDataset, mixture_teacher
from stepdistill.models.toy import ToyMLP
from stepdistill.trainers.sfd import SFDConfig, SFDTrainer, remap_labels, remap_prompt, sfd_forget_term
from stepdistill.trainers.sim import SIMConfig, SIMTrainer
from stepdistill.trainers.student import PlainLabels

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "recipes" / "sfd" / "digits.yaml")


def test_digits_recipe_uses_the_official_class_conditional_forget_weights():
    # tqch/score-forgetting-distillation DDPM/configs/cifar10_sfd.yml: sg/g_remain_coef 1.0, sg/g_forget_coef 0.01
    # (the class-conditional setting; SD/run_sfd.sh's 1.0 is the text one); SFDConfig's defaults are those values
    with open(DIGITS) as f:
        recipe = yaml.safe_load(f)
    for key in ("fake_remain_weight", "fake_forget_weight", "gen_remain_weight", "gen_forget_weight"):
        assert recipe[key] == getattr(SFDConfig, key), key
    assert (SFDConfig.fake_forget_weight, SFDConfig.gen_forget_weight) == (0.01, 0.01)


# ---------------------------------------------------------------- pure pieces, by hand


def test_forget_term_by_hand():
    # sample 1: D_r - D_f = (1, 0), (D_r - x) - 1.2 (D_r - D_f) = (-0.2, 1): dot -0.2, mean|x - D_r| = 1 -> -0.2
    # sample 2: D_r - D_f = (2, 0), (D_r - x) - 1.2 (D_r - D_f) = (-0.4, 0): dot -0.8, mean|x - D_r| = 1 -> -0.8
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    d_override = torch.tensor([[2.0, 1.0], [2.0, 0.0]])  # the teacher at the override condition
    d_fake = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # the fake score at the forget condition
    torch.testing.assert_close(sfd_forget_term(x, d_override, d_fake, alpha=1.2), torch.tensor(-0.5))
    # alpha 1: (D_r - D_f) . (D_f - x) / w: sample 1 (1, 0) . (0, 1) = 0; sample 2 (2, 0) . (0, 0) = 0
    torch.testing.assert_close(sfd_forget_term(x, d_override, d_fake, alpha=1.0), torch.tensor(0.0))
    # the gradient w.r.t. x (D's constant here): -(D_r - D_f) / w per sample, over the batch of 2
    x.requires_grad_(True)
    sfd_forget_term(x, d_override, d_fake, alpha=1.2).backward()
    torch.testing.assert_close(x.grad, torch.tensor([[-0.5, 0.0], [-1.0, 0.0]]))


def test_remap_labels_and_prompts():
    labels = torch.tensor([0, 3, 1, 0, 2])
    assert remap_labels(labels, [0], [1]).tolist() == [1, 3, 1, 1, 2]
    assert remap_labels(labels, [0, 2], [5, 6]).tolist() == [5, 3, 1, 5, 6]
    assert remap_labels(labels, [0, 2], [7]).tolist() == [7, 3, 1, 7, 7]
    assert remap_prompt("A photo of Brad Pitt smiling", "brad pitt", "a middle aged man") == (
        "A photo of a middle aged man smiling"
    )
    assert remap_prompt("a cat", "brad pitt", "a man") == "a cat"


def test_forget_fractions_and_remaining_labels():
    out = forget_fractions(torch.tensor([0, 1, 1, 3, 0, 1, 1, 1]), 0, 1, 4)
    assert out == {"forget_fraction": 0.25, "forget_predictions": [2, 5, 0, 1], "remap_fraction": 0.625}
    assert "remap_fraction" not in forget_fractions(torch.tensor([2]), 0, None, 4)
    assert remaining_labels(7, 4, 1).tolist() == [0, 2, 3, 0, 2, 3, 0]


# ---------------------------------------------------------------- the trainer on the analytic mixture

MIX = GaussianMixture([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.0]], 0.1)  # class k = mode k


class TeacherPlusResidual(nn.Module):
    """The analytic denoiser plus a class-conditional MLP whose output starts at 0: a network that starts as the
    teacher (as a generator / fake score copied from it), which the trainer can move."""

    def __init__(self, teacher_net, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.teacher_net = teacher_net
        self.residual = ToyMLP(dim=2, hidden=32, layers=2, num_class_embeds=3)
        nn.init.zeros_(self.residual.out[1].weight)
        nn.init.zeros_(self.residual.out[1].bias)

    def forward(self, x, timestep, cond=None):
        return self.teacher_net(x, timestep, cond) + self.residual(x, timestep, cond)


def analytic_trainer(cls, config_cls, out, dataset, **kw):
    teacher = mixture_teacher(MIX)
    gen = TeacherPlusResidual(copy.deepcopy(teacher.net), seed=1)
    fake = TeacherPlusResidual(copy.deepcopy(teacher.net), seed=2)
    base = dict(output_dir=str(out), global_batch=64, learning_rate=3e-3, ema_decay=0.0, checkpoint_every=0,
                progress=False, denoising_timesteps=[999], generator_input="noise", seed=0)
    cfg = config_cls(**{**base, **kw})
    return cls(cfg, teacher=teacher, generator=gen, fake_score=fake, dataset=dataset), teacher


def labels(label: int, n: int):
    return PlainLabels(3)(torch.full((n,), label))


def generate(trainer, label: int, n: int = 256):
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(n, 2, generator=g)
    with torch.no_grad():
        return trainer.generator.sample(noise, labels(label, n), generator=g)


def test_forgotten_class_moves_to_the_remap_mode_and_the_others_stay(tmp_path):
    trainer, teacher = analytic_trainer(
        SFDTrainer, SFDConfig, tmp_path, MixtureDataset(MIX, 600), max_steps=80, learning_rate=5e-3, forget_labels=[0],
        remap_labels=[1], gen_forget_weight=1.0, fake_forget_weight=1.0,
    )
    before = {k: MIX.assign(generate_untrained(trainer, teacher, k)) for k in range(3)}
    assert all((before[k] == k).float().mean() > 0.95 for k in range(3))  # it starts as the teacher
    trainer.train()
    assert (MIX.assign(generate(trainer, 0)) == 1).float().mean() > 0.9  # label 0 now draws mode 1
    for k in (1, 2):
        assert (MIX.assign(generate(trainer, k)) == k).float().mean() > 0.9  # the other classes stay
    # the remaining batches never held the forgotten label; the teacher is exactly the analytic mixture
    assert 0 not in trainer.remain.labels.tolist()
    assert teacher.net.mixture is MIX and not list(teacher.net.parameters())
    x_t = torch.randn(8, 2)
    t = torch.full((8,), 0.3, dtype=torch.float64)
    want = MIX.posterior_mean(x_t, teacher.schedule.alpha(t), teacher.schedule.sigma(t), torch.zeros(8).long())
    got = teacher.predict(x_t, t, labels(0, 8), target="x0")
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def generate_untrained(trainer, teacher, label: int, n: int = 256):
    """What the generator (teacher + zero residual) draws before training: the teacher's one-step x0."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 2, generator=g)
    t = teacher.schedule.timestep_to_t(torch.full((n,), 999.0, dtype=torch.float64))
    return teacher.predict(x, t, labels(label, n), target="x0")


def test_zero_forget_weights_equal_sim_l2_on_the_remaining_data(tmp_path):
    full = MixtureDataset(MIX, 300)
    keep = full.labels != 0
    remaining = [(full.x[i], full.labels[i]) for i in range(len(full)) if keep[i]]
    common = dict(max_steps=4, distance="l2", sid_alpha=1.2, min_step_percent=0.038, max_step_percent=0.711,
                  fake_min_step_percent=0.038, fake_max_step_percent=0.711, update_order="fake_first",
                  dfake_gen_update_ratio=1, adam_beta1=0.0, weight_decay=0.0, max_grad_norm=0.0)
    sfd, _ = analytic_trainer(SFDTrainer, SFDConfig, tmp_path / "sfd", full, forget_labels=[0], remap_labels=[1],
                              gen_forget_weight=0.0, fake_forget_weight=0.0, grad_clip_value=0.0, **common)
    sim, _ = analytic_trainer(SIMTrainer, SIMConfig, tmp_path / "sim", remaining, **common)
    sfd.train()
    sim.train()
    assert float(sfd.generator.net.residual.out[1].weight.abs().sum()) > 0  # it trained (the residual starts at 0)
    for a, b in zip(sfd.generator.net.parameters(), sim.generator.net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gradient_values_are_clipped(tmp_path):
    trainer, _ = analytic_trainer(SFDTrainer, SFDConfig, tmp_path, MixtureDataset(MIX, 100), max_steps=1,
                                  forget_labels=[2], remap_labels=[0], grad_clip_value=1e-3)
    trainer.setup()
    p = next(trainer.generator.net.residual.parameters())
    p.grad = torch.full_like(p, 5.0)
    trainer.opts["generator"].optimizer.step()  # the pre-step hook clamps first
    assert float(p.grad.abs().max()) == pytest.approx(1e-3)


def test_module_teacher_weights_are_unchanged(tmp_path):
    from stepdistill.models import Teacher
    from stepdistill.models.analytic import ddpm_schedule

    torch.manual_seed(0)
    teacher = Teacher(ToyMLP(dim=2, hidden=16, layers=2, num_class_embeds=3), ddpm_schedule(), "v")
    before = {k: v.clone() for k, v in teacher.net.state_dict().items()}
    cfg = SFDConfig(output_dir=str(tmp_path), max_steps=3, global_batch=16, learning_rate=1e-2, ema_decay=0.0,
                    checkpoint_every=0, progress=False, forget_labels=[1], remap_labels=[2], gen_forget_weight=1.0)
    trainer = SFDTrainer(cfg, teacher=teacher, dataset=MixtureDataset(MIX, 64))
    trainer.train()
    for k, v in teacher.net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    gen = trainer.accelerator.unwrap_model(trainer.generator.net)
    assert any(not torch.equal(v, before[k]) for k, v in gen.state_dict().items())


# ---------------------------------------------------------------- config errors: one line, exit 2


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["remap_labels=[0]"], "remapped to itself"),
        (["forget_labels=[0, 1]", "remap_labels=[1, 2]"], "also in forget_labels"),
        (["forget_labels=[]"], "either class labels or a text concept"),
        (["forget_concept=brad pitt"], "both are set"),
        (["remap_labels=[1, 2]"], "one override label"),
        (["forget_labels=[12]", "max_steps=1"], "label 12 is not a class of dataset 'digits'"),
    ],
)
def test_bad_forget_settings_are_one_line_errors(overrides, message, tmp_path, capsys):
    rc = main(["train", "--config", DIGITS, f"output_dir={tmp_path}", "progress=false", *overrides])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_unknown_label_in_the_config_object(tmp_path):
    trainer, _ = analytic_trainer(SFDTrainer, SFDConfig, tmp_path, MixtureDataset(MIX, 60), max_steps=1,
                                  forget_labels=[0], remap_labels=[5])
    with pytest.raises(ConfigError, match="remap_labels: label 5 is not a class"):
        trainer.train()


def test_eval_forget_errors_are_one_line(tmp_path, capsys):
    rc = main(["eval", "--pipeline", "digits", "--remap-label", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == "error: --remap-label needs --forget-label (the class that was forgotten)"
    rc = main(["eval", "--pipeline", "digits", "--forget-label", "3", "--remap-label", "3", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "is the forget label" in err and len(err.strip().splitlines()) == 1
    rc = main(["eval", "--pipeline", "digits", "--forget-label", "10", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "--forget-label 10 is not a class" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- text-conditional: tiny SD1.5 components


def test_prompt_forgetting_on_tiny_sd15(tmp_path):
    """The remaining batches never hold the concept; the forget batches reach the fake score as written and the
    teacher with the concept replaced (recipes/sfd/sd15.yaml on a tiny SD1.5)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from diffusers import StableDiffusionPipeline
    from tiny_models import save_tiny_pipeline, tiny_sd_components

    from stepdistill.train import make_trainer

    teacher = save_tiny_pipeline(tiny_sd_components(tmp_path / "src"), StableDiffusionPipeline, tmp_path / "sd")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\nBrad Pitt on a horse\na red dog\n")
    overrides = [f"teacher={teacher}", f"dataset={prompts}", "forget_prompts=", f"output_dir={tmp_path / 'run'}",
                 "resolution=8", "global_batch=2", "max_steps=2", "checkpoint_every=0", "progress=false"]
    trainer = make_trainer(str(ROOT / "recipes" / "sfd" / "sd15.yaml"), overrides)
    trainer.setup()
    assert trainer.remain.captions == ["a cat", "a dog", "a red dog"]
    assert trainer.override_prompt_list == ["a middle aged man on a horse"]
    seen = {"teacher": [], "fake": []}
    for name, net in (("teacher", trainer.teacher.net), ("fake", trainer.fake.net)):
        net.register_forward_pre_hook(
            lambda m, args, kwargs, name=name: seen[name].append(kwargs["encoder_hidden_states"].detach().clone()),
            with_kwargs=True,
        )
    trainer.train()
    encode = trainer.conditioner
    override = encode(["a middle aged man on a horse"]).kwargs["encoder_hidden_states"][0]
    forget = encode(["Brad Pitt on a horse"]).kwargs["encoder_hidden_states"][0]
    hit = lambda calls, e: any(torch.equal(c[i], e) for c in calls for i in range(len(c)))  # noqa: E731
    assert hit(seen["teacher"], override) and not hit(seen["teacher"], forget)
    assert hit(seen["fake"], forget)
