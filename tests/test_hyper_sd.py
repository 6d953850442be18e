"""Hyper-SD's HFL and one-step stages (stepdistill/trainers/hyper_sd.py) and the rewards (stepdistill/rewards.py):
hand-worked losses and rewards, the differentiable open_clip transform against CLIPScorer's PIL path, reward
gradients reaching the student only, the reward rising on the analytic toy teacher, a zero-weight run leaving the
student unchanged, and the SD1.5 / SDXL recipes on tiny twins (LoRA: only adapters change; export + reload)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from stepdistill.cli import main
from stepdistill.config import ConfigError, build_config
from stepdistill.models.analytic import MixtureDataset, mixture_teacher, toy_mixture
from stepdistill.models.toy import ToyMLP
from stepdistill.rewards import (
    AestheticReward,
    CLIPSimilarityReward,
    DigitsLabelReward,
    RewardTerm,
    as_reward,
    build_reward,
    reward_hinge_loss,
)
from stepdistill.trainers.hyper_sd import HyperSDConfig, HyperSDTrainer

ROOT = Path(__file__).resolve().parents[1]
TINY_CLIP = "tiny-clip-hyper-sd"


# --------------------------------------------------------------------------------------------------------
# losses and rewards, hand-worked
# --------------------------------------------------------------------------------------------------------


def test_reward_hinge_loss_hand_worked():
    r = torch.tensor([-0.5, 0.1, 2.5])
    # ReFL: relu(-r + 2) = [2.5, 1.9, 0] -> mean 4.4 / 3
    torch.testing.assert_close(reward_hinge_loss(r, 2.0), torch.tensor(4.4 / 3))
    assert reward_hinge_loss(r, -1.0) == 0  # every sample above the margin: no gradient


def test_digits_reward_is_the_log_confidence_in_the_label():
    from stepdistill.eval.fd_digits import DigitsClassifier

    clf = DigitsClassifier()
    with torch.no_grad():
        clf.head.weight.zero_()
        clf.head.bias.zero_()
        clf.head.bias[0] = math.log(3.0)  # p = 3 / 12 for class 0, 1 / 12 for the others
    r = DigitsLabelReward(classifier=clf)
    out = r(torch.zeros(2, 1, 16, 16), {"label": torch.tensor([0, 7])})
    torch.testing.assert_close(out, torch.tensor([math.log(0.25), math.log(1 / 12)]))
    assert not any(p.requires_grad for p in clf.parameters())
    with pytest.raises(ConfigError, match="labels"):
        r(torch.zeros(1, 1, 16, 16), {"caption": ["a"]})


def test_plain_callables_and_entry_errors():
    term = build_reward({"fn": lambda x: x.sum(-1), "weight": 2.0, "margin": 1.0})
    loss, scores = term.loss(torch.tensor([[0.25, 0.25], [1.0, 1.0]]), {"label": torch.tensor([0, 1])})
    torch.testing.assert_close(scores, torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(loss, torch.tensor(2.0 * 0.25))  # 2 * mean(relu(1 - [0.5, 2])) = 2 * 0.25
    two = as_reward(lambda x, batch: x.sum(-1) + batch["label"])
    torch.testing.assert_close(two(torch.ones(1, 2), {"label": torch.tensor([3])}), torch.tensor([5.0]))
    for entry, match in (
        ({"kind": "imagereward"}, r"rewards\[0\]\.kind must be one of"),
        ({"kind": "clip", "model": "ViT-B-32"}, r"rewards\[0\]: kind clip needs 'pretrained'"),
        ({"kind": "digits", "head": "x"}, r"rewards\[0\]: unknown keys \['head'\]"),
        ({"kind": "digits", "weight": "high"}, r"rewards\[0\]\.weight: expected a number"),
    ):
        with pytest.raises(ConfigError, match=match):
            build_reward(entry)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny open_clip architecture (JSON config) and random weights saved as a local file."""
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("clip")
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    config = root / f"{TINY_CLIP}.json"
    config.write_text(json.dumps(cfg))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP)
    weights = root / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    head = root / "head.safetensors"
    save_file({"weight": torch.linspace(-1, 1, 16)[None], "bias": torch.tensor([0.5])}, str(head))
    return {"config": str(config), "weights": str(weights), "head": str(head)}


def test_clip_reward_sees_what_clip_scorer_sees_and_is_differentiable(tiny_clip):
    from stepdistill.eval.clip_score import CLIPScorer

    reward = CLIPSimilarityReward.from_files(TINY_CLIP, tiny_clip["weights"], model_config=tiny_clip["config"])
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 256, (3, 3, 32, 32), generator=g).float() / 255 * 2 - 1).requires_grad_()
    captions = ["a cat", "a dog", "a red dog"]
    scores = reward(x, {"caption": captions})
    # the torch transform of [-1, 1] images = open_clip's PIL transform of their uint8 values
    ref = CLIPScorer(TINY_CLIP, tiny_clip["weights"]).cosines(x.detach(), captions)
    torch.testing.assert_close(scores.double(), ref, atol=1e-5, rtol=0)
    scores.sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in reward.parameters())
    # labels through label_template; 1-channel images at another size go through resize + crop
    by_label = CLIPSimilarityReward.from_files(TINY_CLIP, tiny_clip["weights"], label_template="digit {label}")
    assert by_label.texts({"label": torch.tensor([3])}, 1) == ["digit 3"]
    assert by_label(torch.zeros(2, 1, 16, 24), {"label": torch.tensor([1, 2])}).shape == (2,)


def test_aesthetic_reward_is_the_linear_head_on_normalised_embeddings(tiny_clip):
    reward = AestheticReward.from_files(tiny_clip["head"], TINY_CLIP, tiny_clip["weights"], tiny_clip["config"])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        emb = reward.model.encode_image(((x + 1) / 2 - reward.mean) / reward.std)
    expected = (emb / emb.norm(dim=-1, keepdim=True)) @ torch.linspace(-1, 1, 16) + 0.5
    torch.testing.assert_close(reward(x), expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------
# the trainer on the analytic toy teacher
# --------------------------------------------------------------------------------------------------------

TARGET = torch.tensor([2.0, 0.0])


class PullTo(nn.Module):
    """A reward model with parameters: -|x - c|^2 (c trainable were it not frozen by the trainer)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(TARGET.clone())

    def forward(self, x, batch=None):
        return -((x - self.c) ** 2).sum(-1)


def toy_hfl(out, rewards, perception=None, **kw):
    mix = toy_mixture("gmm8")
    cfg = dict(
        output_dir=str(out),
        denoising_timesteps=[999, 499],
        max_steps=20,
        global_batch=32,
        learning_rate=1e-2,
        checkpoint_every=0,
        progress=False,
    )
    cfg.update(kw)
    torch.manual_seed(0)
    gen = ToyMLP(dim=2, hidden=32, layers=2, num_class_embeds=8)
    return HyperSDTrainer(
        build_config(HyperSDConfig, cfg),
        teacher=mixture_teacher(mix),
        generator=gen,
        dataset=MixtureDataset(mix, 256),
        rewards=rewards,
        perception=perception,
    )


@torch.no_grad()
def mean_reward(trainer, fn, n=256):
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(5))
    cond = trainer.conditioner(torch.arange(n) % 8)
    return float(fn(trainer.generator.sample(noise, cond)).mean())


def test_hfl_reward_gradient_reaches_only_the_generator_and_the_reward_rises(tmp_path):
    reward = PullTo()
    trainer = toy_hfl(tmp_path / "run", [reward])
    trainer.setup()
    assert trainer.reward_step_indices == [1]  # the later half of 2 steps: ReFL's late step
    assert not reward.c.requires_grad  # frozen by the trainer
    before = mean_reward(trainer, reward)
    # one loss by hand: the gradient lands on the generator, not on the reward model
    batch = next(iter(trainer.loader))
    out = trainer.compute_loss(batch, ("generator",))
    out["loss"].backward()
    assert all(p.grad is not None for p in trainer.generator.net.parameters() if p.requires_grad)
    assert reward.c.grad is None
    trainer.generator.net.zero_grad(set_to_none=True)
    trainer.train()
    assert mean_reward(trainer, reward) > before + 0.5
    assert [h["step"] for h in trainer.history] == list(range(20))
    assert {"loss", "loss_reward", "reward_PullTo"} <= set(trainer.history[0])


def test_hfl_with_zero_reward_weight_leaves_the_student_unchanged(tmp_path):
    trainer = toy_hfl(tmp_path / "run", [RewardTerm("pull", PullTo(), weight=0.0)], max_steps=3, weight_decay=0.0)
    trainer.setup()
    start = {k: v.clone() for k, v in trainer.generator.net.state_dict().items()}
    trainer.train()
    for k, v in trainer.generator.net.state_dict().items():
        torch.testing.assert_close(v, start[k], atol=0, rtol=0)


def test_hfl_starts_from_init_generator(tmp_path):
    first = toy_hfl(tmp_path / "a", [PullTo()], max_steps=2, checkpoint_every=2)
    first.train()
    trained = {k: v.clone() for k, v in first.generator.net.state_dict().items()}
    ckpt = tmp_path / "a" / "checkpoints" / "step_0000002"
    second = toy_hfl(tmp_path / "b", [PullTo()], init_generator=str(ckpt))
    second.setup()
    for k, v in second.generator.net.state_dict().items():
        torch.testing.assert_close(v, trained[k], atol=0, rtol=0)


@torch.no_grad()
def test_rollout_is_the_students_own_ddim_sampler(tmp_path):
    """The no-grad steps before the differentiable one are the student's deterministic DDIM chain: the last
    step's x0 from the rollout equals Generator.sample from the same noise."""
    trainer = toy_hfl(tmp_path / "run", [PullTo()], denoising_timesteps=[999, 749, 499, 249])
    trainer.setup()
    assert trainer.generator.sampler == "ddim" and trainer.export_scheduler == "ddim"
    batch = next(iter(trainer.loader))
    cond = trainer._cond_batch(batch)
    torch.manual_seed(3)
    x_t = trainer._generator_input(batch, cond, 3)
    x0 = trainer.generator(x_t, cond, trainer.gen_times[3].expand(len(x_t)))
    torch.manual_seed(3)
    noise = torch.randn(len(x_t), 2)
    torch.testing.assert_close(x0, trainer.generator.sample(noise, cond))


@torch.no_grad()
def distance_to_start(trainer, start):
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(5))
    cond = trainer.conditioner(torch.arange(256) % 8)
    return float((trainer.generator.sample(noise, cond) - start.sample(noise, cond)).pow(2).mean())


def test_keep_term_holds_the_student_near_its_start(tmp_path):
    dist = {}
    for w in (0.0, 50.0):
        trainer = toy_hfl(tmp_path / f"w{w}", [PullTo()], keep_weight=w, max_steps=10)
        trainer.setup()
        start = trainer.generator.with_net(copy.deepcopy(trainer.generator.net))
        trainer.train()
        dist[w] = distance_to_start(trainer, start)
        if w:
            assert trainer.history[0]["loss_keep"] == 0  # the student is its start at the first step
            assert trainer.history[-1]["loss_keep"] > 0
            assert not any(p.requires_grad for p in trainer.start_generator.net.parameters())
    assert dist[50.0] < 0.5 * dist[0.0]


def test_perceptual_term_trains_the_student_on_noised_real_images(tmp_path):
    """Hyper-SD's perceptual term: real images noised to a trained step's time, the student's x0 from there, the
    perception model's per-sample loss against the batch's annotation (here the real label's mode centre)."""
    mix = toy_mixture("gmm8")
    centres = mix.means.float()
    seen = []

    class ModeLoss(nn.Module):  # a "perception model" with a parameter: |x0 - centre(label)|^2
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x, batch):
            seen.append(batch["label"].clone())
            return self.scale * ((x - centres[batch["label"]]) ** 2).sum(-1)

    percep = ModeLoss()
    trainer = toy_hfl(tmp_path / "run", [], percep, perception_weight=1.0, max_steps=15, reward_steps=[0, 1])
    trainer.train()
    assert not percep.scale.requires_grad and percep.scale.grad is None
    first, last = trainer.history[0]["loss_percep"], trainer.history[-1]["loss_percep"]
    assert last < 0.5 * first and "loss_reward" not in trainer.history[0]
    assert all(len(b) == 32 for b in seen)


def test_digits_perception_is_the_cross_entropy_against_the_label():
    from stepdistill.eval.fd_digits import DigitsClassifier
    from stepdistill.rewards import DigitsPerception

    clf = DigitsClassifier()
    x = torch.randn(3, 1, 16, 16)
    labels = torch.tensor([1, 4, 9])
    expected = nn.functional.cross_entropy(clf(x), labels, reduction="none")
    torch.testing.assert_close(DigitsPerception(classifier=clf)(x, {"label": labels}), expected)


def test_one_step_stage_regresses_on_the_starting_students_samples(tmp_path):
    """One-step stage on the toy teacher: DM + fake score + MSE to the 2-step starting student's DDIM output."""
    mix = toy_mixture("gmm8")
    cfg = build_config(
        HyperSDConfig,
        dict(
            output_dir=str(tmp_path),
            stage="one_step",
            denoising_timesteps=[999],
            generator_sampler="consistency",
            regression_weight=1.0,
            regression_source="init_generator",
            init_timesteps=[999, 499],
            regression_pairs=16,
            regression_batch=8,
            dfake_gen_update_ratio=1,
            max_steps=2,
            global_batch=8,
            checkpoint_every=0,
            progress=False,
        ),
    )
    torch.manual_seed(0)
    trainer = HyperSDTrainer(
        cfg,
        teacher=mixture_teacher(mix),
        generator=ToyMLP(dim=2, hidden=16, layers=2, num_class_embeds=8),
        fake_score=ToyMLP(dim=2, hidden=16, layers=2, num_class_embeds=8),
        dataset=MixtureDataset(mix, 64),
        rewards=[PullTo()],
    )
    trainer.setup()
    noise, images, batch = trainer.pairs
    start = trainer.generator.with_net(trainer.generator.net)
    start.timesteps, start.sampler = trainer.timesteps_to_t([999, 499], "t"), "ddim"
    torch.testing.assert_close(images[:4], start.sample(noise[:4], trainer._cond_batch(batch).index(slice(0, 4))))
    trainer.train()
    logged = trainer.history[0]
    assert {"loss_dm/generator", "loss_reg/generator", "reward_PullTo/generator", "loss_fake/fake_score"} <= set(logged)


def test_config_errors_are_one_line(tmp_path, capsys):
    recipe = str(ROOT / "recipes/hyper_sd/digits.yaml")
    for override, message in (
        ("init_generator=/no/such/tscd", "error: init_generator: folder '/no/such/tscd' does not exist"),
        ("rewards=[{kind:imagereward}]", "error: rewards[0].kind must be one of"),
        ("stage=two_step", "error: stage must be one of"),
        ("gan_generator_weight=0.1", "error: gan_generator_weight > 0 with stage: hfl"),
        ("stage=one_step keep_weight=1", "error: keep_weight is an HFL-stage term"),
    ):
        assert main(["train", "--config", recipe, f"output_dir={tmp_path}", "init_generator=", *override.split()]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(message) and "\n" not in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="stage: hfl needs rewards"):
        toy_hfl(tmp_path / "none", []).setup()
    with pytest.raises(ConfigError, match=r"reward_steps: \[2\]"):
        toy_hfl(tmp_path / "steps", [PullTo()], reward_steps=[2]).setup()


# --------------------------------------------------------------------------------------------------------
# the SD1.5 / SDXL recipes on tiny twins
# --------------------------------------------------------------------------------------------------------


def _twin(root, kind):
    from diffusers import PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from tiny_models import save_tiny_pipeline, tiny_sd_components, tiny_sdxl_components

    if kind == "sd":
        comps = tiny_sd_components(root / "src")
        comps["scheduler"] = PNDMScheduler.from_config(comps["scheduler"].config, skip_prk_steps=True)
        return save_tiny_pipeline(comps, StableDiffusionPipeline, root / "pipe")
    return save_tiny_pipeline(tiny_sdxl_components(root / "src"), StableDiffusionXLPipeline, root / "pipe")


def _tiny_recipe_trainer(recipe, tmp_path, tiny_clip, kind, **extra):
    from stepdistill.train import make_trainer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    model = dict(model=TINY_CLIP, pretrained=tiny_clip["weights"], model_config=tiny_clip["config"])
    rewards = [
        {"kind": "aesthetic", "weight": 0.001, "margin": 7.0, "head": tiny_clip["head"], **model},
        {"kind": "clip", "weight": 0.001, "margin": 0.4, **model},
    ]
    values = dict(
        teacher=_twin(tmp_path / "twin", kind),
        dataset=str(prompts),
        output_dir=str(tmp_path / "run"),
        init_generator="",
        rewards=rewards,
        resolution=8,
        global_batch=2,
        max_steps=2,
        checkpoint_every=0,
        progress=False,
        mixed_precision="no",
        **extra,
    )
    return make_trainer(str(ROOT / "recipes/hyper_sd" / recipe), [f"{k}={json.dumps(v)}" for k, v in values.items()])


def _export_reloads_and_samples_like_the_trainer(trainer):
    from diffusers import DiffusionPipeline

    folder = trainer.export()
    assert (Path(folder) / "lora").is_dir()  # a LoRA student exports its adapter for the original teacher
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert list(pipe.config.trained_timesteps) == trainer.export_timesteps()
    latents = pipe("a cat", generator=torch.Generator().manual_seed(1), output_type="latent").images
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, *trainer.sample_shape, generator=g)
    with torch.no_grad():
        ref = trainer.generator.sample(noise, trainer.conditioner(["a cat"]), generator=g)
    torch.testing.assert_close(latents.float(), ref.float(), atol=2e-4, rtol=2e-4)


def test_sd15_recipe_hfl_lora_on_a_tiny_twin(tmp_path, tiny_clip):
    trainer = _tiny_recipe_trainer("sd15.yaml", tmp_path, tiny_clip, "sd")
    c = trainer.config
    assert (c.stage, c.generator_mode, c.generator_sampler, c.reward_steps) == ("hfl", "lora", "ddim", [])
    trainer.setup()
    assert trainer.reward_step_indices == [2, 3]
    net = trainer.generator.net
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.history)
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".generator." in k for k in changed)  # the LoRA adapter only: the teacher's base is intact
    assert all(p.grad is None for t in trainer.reward_terms for p in t.fn.parameters())
    assert all(p.grad is None for p in trainer.vae.parameters())
    _export_reloads_and_samples_like_the_trainer(trainer)


@pytest.mark.slow
def test_sdxl_recipe_one_step_lora_on_a_tiny_twin(tmp_path, tiny_clip):
    extra = dict(regression_pairs=2, regression_batch=2, dfake_gen_update_ratio=1)
    trainer = _tiny_recipe_trainer("sdxl.yaml", tmp_path, tiny_clip, "sdxl", **extra)
    c = trainer.config
    assert (c.stage, c.generator_mode, c.fake_score_mode, c.regression_source) == (
        "one_step",
        "lora",
        "lora",
        "init_generator",
    )
    trainer.train()
    assert {"loss_dm/generator", "loss_reg/generator", "reward_aesthetic/generator"} <= set(trainer.history[0])
    _export_reloads_and_samples_like_the_trainer(trainer)
