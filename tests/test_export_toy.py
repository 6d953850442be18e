"""Toy (2-D) recipes end to end: every recipes/*/toy2d.yaml trains (tiny budgets), exits 0 through the CLI, and
its export (StepDistillToyPipeline: ToyMLP safetensors + config.json, the student scheduler) reloads through
diffusers, samples what the trainer's own sampler gives for the same noise and seed, and ``stepdistill sample``
draws it."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

import stepdistill  # noqa: F401  (registers the pipeline classes)
from stepdistill.cli import main
from stepdistill.pipelines import StepDistillToyPipeline, toy_model_kind
from stepdistill.train import make_trainer

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in glob.glob(str(ROOT / "recipes" / "*" / "toy2d.yaml")) if "/teacher/" not in p)


def _name(path) -> str:
    return Path(path).parent.name


def _budget(recipe) -> list[str]:
    tiny = ["checkpoint_every=0", "progress=false"]
    if _name(recipe) == "progressive":  # 8 -> 4 -> 2 -> 1: three rounds of one update
        return tiny + ["steps_per_round=1"]
    if _name(recipe) == "disback":  # one degradation iteration (one node), then two of backtracking
        return tiny + ["max_steps=3", "degradation_steps=1", "degradation_nodes=1"]
    return tiny + ["max_steps=3"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    rc = main(["train", "--config", str(ROOT / "recipes/teacher/toy2d.yaml"), "max_steps=10", f"output_dir={out}"])
    assert rc == 0
    return str(out / "model")


@pytest.fixture(scope="module")
def class_teacher(tmp_path_factory):
    """The class-conditional toy teacher (mode = class) of recipes/sfd/toy2d.yaml."""
    out = tmp_path_factory.mktemp("class_teacher")
    rc = main(["train", "--config", str(ROOT / "recipes/sfd/teacher_toy2d.yaml"), "max_steps=10", f"output_dir={out}"])
    assert rc == 0
    return str(out / "model")


def test_every_toy_recipe_is_covered():
    assert {_name(p) for p in RECIPES} == {
        "dmd2", "sim", "vsd", "progressive", "consistency", "boot", "disback", "meanflow", "scm", "sfd", "fdistill",
        "ladd", "msd",
    }


@pytest.mark.parametrize("recipe", RECIPES, ids=_name)
def test_toy_recipe_exits_0_and_its_export_reloads_and_samples(recipe, request, tmp_path, capsys):
    # SFD forgets a class: its teacher is class-conditional (sampled here without labels, as the pipeline is)
    teacher = request.getfixturevalue("class_teacher" if _name(recipe) in ("sfd", "msd") else "teacher")
    # the CLI, as the recipe's header says to run it (tiny budget): exit 0 and a pipeline folder
    cli_out = tmp_path / "cli"
    assert main(["train", "--config", recipe, f"teacher={teacher}", f"output_dir={cli_out}", *_budget(recipe)]) == 0
    assert "exported to" in capsys.readouterr().out
    folder = cli_out / "pipeline"
    index = json.loads((folder / "model_index.json").read_text())
    routed = _name(recipe) == "msd"  # K ToyMLP students behind a routing table
    unet = ["stepdistill.models.routed", "RoutedToyMLP"] if routed else ["stepdistill.models.toy", "ToyMLP"]
    assert index["_class_name"] == "StepDistillToyPipeline" and index["unet"] == unet
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((folder / "unet" / "config.json").read_text())["_class_name"] == unet[1]
    assert "With stepdistill installed (required)" in (folder / "README.md").read_text()
    assert toy_model_kind(str(folder)) == "pipeline" and toy_model_kind(teacher) == "network"

    # in process: the reloaded pipeline samples what the trainer's sampler gives for the same noise and seed
    trainer = make_trainer(recipe, [f"teacher={teacher}", f"output_dir={tmp_path / 'run'}", *_budget(recipe)])
    trainer.train()
    pipe = DiffusionPipeline.from_pretrained(trainer.export())
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, StepDistillToyPipeline)
    timesteps = [int(t) for t in trainer.export_timesteps()]
    assert list(pipe.config.trained_timesteps) == timesteps
    calls = []
    pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(float(args[1])) or None)
    points = pipe(num_samples=64, generator=torch.Generator().manual_seed(1)).samples
    assert calls == timesteps and points.shape == (64, 2)
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(64, 2, generator=generator)
    with torch.no_grad():
        if hasattr(trainer, "sample"):  # consistency: its multistep sampler
            ref = trainer.sample(noise, None, generator=generator)
        else:
            ref = trainer.generator.sample(noise, None, generator=generator)
    torch.testing.assert_close(points, ref, atol=1e-4, rtol=1e-4)

    # stepdistill sample: a scatter plot and the points, the pipeline's for that seed
    png = tmp_path / "toy.png"
    assert main(["sample", "--model", str(folder), "--num", "50", "--seed", "3", "--out", str(png)]) == 0
    saved = np.load(tmp_path / "toy.npy")
    cli_pipe = DiffusionPipeline.from_pretrained(str(folder))
    cli_pipe.set_progress_bar_config(disable=True)
    expected = cli_pipe(num_samples=50, generator=torch.Generator().manual_seed(3)).samples
    np.testing.assert_allclose(saved, expected.numpy(), atol=1e-6, rtol=0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_settings_sit_under_a_private_key_and_old_folders_still_load(teacher, tmp_path):
    recipe = str(ROOT / "recipes" / "dmd2" / "toy2d.yaml")
    overrides = [f"teacher={teacher}", f"output_dir={tmp_path}", "max_steps=1", "denoising_timesteps=[999, 499]"]
    trainer = make_trainer(recipe, overrides + ["checkpoint_every=0", "progress=false"])
    trainer.train()
    folder = Path(trainer.export())
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_stepdistill"] == {"trained_timesteps": [999, 499]} and "trained_timesteps" not in index
    # a folder written before the private key (plain config key) loads the same
    index["trained_timesteps"] = index.pop("_stepdistill")["trained_timesteps"]
    (folder / "model_index.json").write_text(json.dumps(index))
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    assert list(pipe.config.trained_timesteps) == [999, 499]
    pipe.save_pretrained(str(tmp_path / "again"))  # ... and is written back under the private key
    again = json.loads((tmp_path / "again" / "model_index.json").read_text())
    assert again["_stepdistill"] == {"trained_timesteps": [999, 499]} and "trained_timesteps" not in again


def test_sample_command_draws_a_toy_teacher(teacher, tmp_path):
    png = tmp_path / "teacher.png"
    assert main(["sample", "--model", teacher, "--num", "30", "--steps", "5", "--out", str(png)]) == 0
    points = np.load(tmp_path / "teacher.npy")
    assert points.shape == (30, 2) and np.isfinite(points).all() and png.is_file()


def test_trainer_sample_uses_the_ema_weights_the_export_writes_and_restores_its_own(teacher, tmp_path):
    recipe = str(ROOT / "recipes" / "meanflow" / "toy2d.yaml")
    trainer = make_trainer(recipe, [f"teacher={teacher}", f"output_dir={tmp_path}", *_budget(recipe), "ema_decay=0.5"])
    trainer.train()
    net = trainer._inner("generator")
    own = {k: v.detach().clone() for k, v in net.state_dict().items()}
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    with trainer.export_weights():
        assert all(torch.equal(v.float(), trainer.ema["generator"][k]) for k, v in net.state_dict().items())
    with torch.no_grad():
        ema_points = trainer.sample(noise)
        assert all(torch.equal(own[k], v) for k, v in net.state_dict().items())  # its own weights are back
        assert not torch.allclose(ema_points, trainer.generator.sample(noise), atol=1e-6)
