"""Students of EDM / Karras teachers export as diffusers pipelines (EDMEulerScheduler with the trained Karras-grid
levels): ``DiffusionPipeline.from_pretrained(folder)`` with no other argument samples what the trainer's own sampler
gives for the same noise and seed, at one and at several steps (fresh noise between steps: DMD2, SIM, ECT), for the
toy MLP behind an EDM scheduler and for a class-conditional pixel UNet2DModel, whose model card's stock-diffusers
loop gives the same images. Consistency students with CD's sigma_min boundary stay network-only exports."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from test_consistency import toy as toy_consistency
from test_score_fidelity import EDM_SCHEDULER, TOY, _toy_edm_teacher, toy_dmd2
from tiny_models import tiny_unet2d

import stepdistill  # noqa: F401  (registers the pipeline classes)
from stepdistill.config import build_config
from stepdistill.pipelines import StepDistillClassPipeline, StepDistillToyPipeline
from stepdistill.trainers.dmd2 import DMD2Config, DMD2Trainer
from stepdistill.trainers.sim import SIMConfig, SIMTrainer


def _karras_sigma(timestep, T=1000, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + timestep / (T - 1) * (hi - lo)) ** rho


def _student(kind, teacher, out):
    small = dict(max_steps=2, global_batch=16, dfake_gen_update_ratio=1)
    if kind.startswith("dmd2"):
        ts = [999] if kind == "dmd2-1" else [999, 499]
        return toy_dmd2(teacher, out, denoising_timesteps=ts, **small)
    if kind == "sim":
        return SIMTrainer(build_config(SIMConfig, {**TOY, **small, "output_dir": str(out), "teacher": teacher}))
    return toy_consistency(teacher, out, mode="ect", inference_steps=2, max_steps=2, global_batch=16)


def _reference(trainer, noise, cond, generator):
    with torch.no_grad():
        if hasattr(trainer, "sample"):  # consistency: its multistep sampler
            return trainer.sample(noise, cond, generator=generator)
        return trainer.generator.sample(noise, cond, generator=generator)


@pytest.mark.parametrize("kind", ["dmd2-1", "dmd2-2", "sim", "ect"])
def test_edm_toy_student_exports_a_pipeline_that_samples_its_sampler(kind, toy_teacher, tmp_path):
    teacher = _toy_edm_teacher(toy_teacher, tmp_path)
    trainer = _student(kind, teacher, tmp_path / "run")
    trainer.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "exported as a network only" warning
        folder = trainer.export()
    index = json.loads(Path(folder, "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "EDMEulerScheduler"] and index["unet"][1] == "ToyMLP"
    assert (Path(folder) / ".stepdistill_export").is_file() and not (Path(folder) / "student.json").exists()
    timesteps = trainer.export_timesteps()
    # ECT's 2-step times are the midpoint t = 0.5 of the Karras grid: 499.5, kept exact (not rounded to 500)
    assert timesteps == {"dmd2-1": [999], "dmd2-2": [999, 499], "sim": [999], "ect": [999, 499.5]}[kind]
    assert index["_stepdistill"] == {"trained_timesteps": timesteps, "renoise": True}

    pipe = DiffusionPipeline.from_pretrained(folder)  # no other argument
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, StepDistillToyPipeline)
    seen = []
    pipe.unet.register_forward_pre_hook(lambda m, args: seen.append((args[0].std().item(), float(args[1]))) or None)
    points = pipe(num_samples=256, generator=torch.Generator().manual_seed(1)).samples
    sigmas = [_karras_sigma(t) for t in timesteps]
    # the network sees EDM's c_noise = log(sigma) / 4 of the trained levels, and c_in x (unit scale at sigma_max)
    assert [s for _, s in seen] == pytest.approx([0.25 * math.log(s) for s in sigmas], abs=1e-6)
    assert seen[0][0] == pytest.approx(1.0, abs=0.1)
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(256, 2, generator=generator)
    ref = _reference(trainer, noise, None, generator)
    torch.testing.assert_close(points, ref.float(), atol=1e-5, rtol=1e-5)
    # without the pipeline's fresh noise (EDMEulerScheduler's own Euler step), a multistep student differs
    if len(timesteps) > 1:
        pipe.register_to_config(renoise=False)
        ode = pipe(num_samples=256, generator=torch.Generator().manual_seed(1)).samples
        assert (ode - ref).abs().max() > 0.1


def _pixel_edm_teacher(root) -> str:
    folder = root / "pixel_edm_teacher"
    tiny_unet2d(sample_size=16, in_channels=1, num_class_embeds=11).save_pretrained(folder / "unet")
    (folder / "scheduler").mkdir(parents=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(EDM_SCHEDULER))
    return str(folder)


def _card_blocks(folder) -> list[tuple[str, str]]:
    out, heading = [], None
    for m in re.finditer(r"^## ([^\n]+)$|```python\n(.*?)```", Path(folder, "README.md").read_text(), re.S | re.M):
        if m.group(1):
            heading = m.group(1).strip()
        else:
            out.append((heading, m.group(2)))
    return out


def test_edm_pixel_student_pipeline_and_card_loop_match_the_sampler(tmp_path):
    """A class-conditional UNet2DModel behind EDMEulerScheduler, DMD2 at two steps: the pipeline, the card's stock
    loop (UNet2DModel + EDMEulerScheduler only) and the trainer's sampler give the same digits."""
    values = dict(
        output_dir=str(tmp_path / "run"),
        teacher=_pixel_edm_teacher(tmp_path),
        dataset="digits",
        denoising_timesteps=[999, 499],
        max_steps=1,
        global_batch=4,
        dfake_gen_update_ratio=1,
        checkpoint_every=0,
        progress=False,
    )
    trainer = DMD2Trainer(build_config(DMD2Config, values))
    trainer.train()
    folder = trainer.export()
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, StepDistillClassPipeline) and type(pipe.scheduler).__name__ == "EDMEulerScheduler"
    labels = list(range(10))
    images = pipe(class_labels=labels, generator=torch.Generator().manual_seed(0), output_type="pt").images
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(10, 1, 16, 16, generator=generator)
    cond = trainer.conditioner(torch.tensor(labels))
    ref = (_reference(trainer, noise, cond, generator).float() / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, ref, atol=1e-5, rtol=0)

    blocks = _card_blocks(folder)
    assert blocks[0][0] == "With stock diffusers classes only" and "EDMEulerScheduler" in blocks[0][1]
    assert not re.search(r"^\s*(import|from) stepdistill", blocks[0][1], re.M)
    ns: dict = {}
    exec(compile(blocks[0][1], "<card stock block>", "exec"), ns)
    torch.testing.assert_close(ns["images"], images, atol=1e-6, rtol=0)


def test_edm_consistency_student_with_cds_boundary_stays_a_network_export(toy_teacher, tmp_path):
    """CD's sigma_min boundary (the default for EDM teachers in lcm mode) is not the EDM denoiser that diffusers'
    EDM schedulers apply: that student is written as a network + student.json, with the export marker, so that a
    second export replaces the first."""
    teacher = _toy_edm_teacher(toy_teacher, tmp_path)
    trainer = toy_consistency(teacher, tmp_path / "run", inference_steps=2, max_steps=1, global_batch=16)
    trainer.train()
    assert trainer.boundary == "edm"
    for _ in range(2):
        with pytest.warns(UserWarning, match="boundary 'edm'"):
            folder = Path(trainer.export())
    assert (folder / ".stepdistill_export").is_file() and not (folder / "model_index.json").exists()
    info = json.loads((folder / "student.json").read_text())
    assert info["timesteps"] == [999, 499.5] and "boundary" in info["why_not_a_pipeline"]
