"""Exported folders without stepdistill: every kind's model card, run where ``import stepdistill`` fails.

For each exported kind (class-conditional digits, SD, SDXL, SD3, DiT, a LoRA generator) a tiny export is made from
a real recipe (tiny twins of tests/test_real_recipes.py, one training step). Its model card's FIRST code block is
the stock-diffusers one; one subprocess, whose ``sitecustomize`` makes ``import stepdistill`` raise, runs every
card's stock blocks (the LoRA block too) and saves the images; they equal what the card's stepdistill block gives
in this process for the same seed, to 1e-5. The subprocess also checks that the stock classes load the folders
without "not expected" warnings (stepdistill's settings sit under model_index.json's private ``_stepdistill`` key).

A w-conditioned digits student (GuidedUNet2DModel) has no stock path: its card says so first, and the blocked
process cannot load it. Model-card metadata (library, base model, license, pipeline tag, tags) is checked on its
own. Toy exports: tests/test_export_toy.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from test_real_recipes import (
    _dataset_for,
    _overrides,
    _save_dit,
    _save_sd,
    _save_sd3,
    _save_sdxl,
    _shrink,
    make_tiny_data,
)

import stepdistill  # noqa: F401  (registers the pipeline classes)
from stepdistill.export import model_card
from stepdistill.train import make_trainer

ROOT = Path(__file__).resolve().parents[1]
PROMPT_CALL = 'pipe("a photo of a cat", '

# kind -> (recipe, twin saver or None for the bundled digits teacher, extra overrides)
KINDS = {
    "class": ("dmd2/digits.yaml", None, {"denoising_timesteps": [999, 749, 499, 249]}),
    "sd": ("dmd2/sd15.yaml", _save_sd, {}),
    "sdxl": ("dmd2/sdxl_4step.yaml", _save_sdxl, {}),
    "sd3": ("dmd2/sd3_medium.yaml", _save_sd3, {}),
    "dit": ("dmd2/dit_xl2.yaml", _save_dit, {"denoising_timesteps": [999, 499]}),
    "lora": ("dmd2/sdxl_4step_lora.yaml", _save_sdxl, {"lora_rank": 4}),
}

BLOCKER = '''import sys


class _NoStepdistill:
    """This test's stand-in for a machine without stepdistill: importing it fails."""

    def find_spec(self, name, path=None, target=None):
        if name == "stepdistill" or name.startswith("stepdistill."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoStepdistill())
'''

STOCK_SCRIPT = r"""
import json, sys
import numpy as np, torch
try:
    import stepdistill  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("stepdistill imported: the blocker did not work")
from diffusers import DiffusionPipeline

jobs = json.loads(open(sys.argv[1]).read())
for job in jobs:
    if job.get("expect_failure"):
        try:
            DiffusionPipeline.from_pretrained(job["folder"])
        except Exception as e:  # noqa: BLE001
            print("FAILED " + json.dumps({"name": job["name"], "error": f"{type(e).__name__}: {e}"}), flush=True)
        continue
    for i, code in enumerate(job["blocks"]):
        ns = {}
        exec(compile(code, f"<{job['name']} card block {i}>", "exec"), ns)
        out = ns.get("images", ns.get("image"))
        out = out.detach().cpu().numpy() if torch.is_tensor(out) else np.asarray(out)
        np.save(f"{job['out']}_{i}.npy", out)
        print("RAN " + json.dumps({"name": job["name"], "block": i, "pipe": type(ns["pipe"]).__name__
                                   if "pipe" in ns else None}), flush=True)
"""


def _blocks(card: str) -> list[tuple[str, str]]:
    """(section heading, python code) for every python block of a model card, in order."""
    out, heading = [], None
    for m in re.finditer(r"^## ([^\n]+)$|```python\n(.*?)```", card, re.S | re.M):
        if m.group(1):
            heading = m.group(1).strip()
        else:
            out.append((heading, m.group(2)))
    return out


def _as_arrays(code: str) -> str:
    """The card's code as written, except that a text-to-image call returns arrays (output_type="np")."""
    if PROMPT_CALL in code:
        assert code.count(PROMPT_CALL) == 1, code
        code = code.replace(PROMPT_CALL, PROMPT_CALL + 'output_type="np", ')
    return code


def _export(kind, root, data) -> str:
    recipe, saver, extra = KINDS[kind]
    recipe = str(ROOT / "recipes" / recipe)
    if saver is None:  # the bundled digits teacher at its own resolution
        values = dict(max_steps=1, global_batch=4, checkpoint_every=0, sample_every=0, progress=False, **extra)
    else:
        values = {**_shrink(recipe), "max_steps": 1, **extra}
        values.update(teacher=saver(root / kind / "teacher"), dataset=_dataset_for(recipe, data))
    values["output_dir"] = str(root / kind / "run")
    trainer = make_trainer(recipe, _overrides(values))
    trainer.train()
    return trainer.export()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    data = make_tiny_data(tmp_path_factory.mktemp("data"))
    return {kind: _export(kind, root, data) for kind in KINDS}


@pytest.fixture(scope="module")
def guided_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("guided")
    recipe = str(ROOT / "recipes" / "progressive" / "digits_guided.yaml")
    values = dict(guided_steps=1, start_steps=8, max_steps=0, steps_per_round=1, global_batch=4, save_rounds=False)
    values.update(checkpoint_every=0, progress=False, output_dir=str(root / "run"))
    trainer = make_trainer(recipe, _overrides(values))
    trainer.train()
    return trainer.export()


@pytest.fixture(scope="module")
def stock_run(exports, guided_export, tmp_path_factory):
    """Run every card's stock blocks in one subprocess where ``import stepdistill`` fails."""
    root = tmp_path_factory.mktemp("stock")
    (root / "block").mkdir()
    (root / "block" / "sitecustomize.py").write_text(BLOCKER)
    jobs = []
    for kind, folder in exports.items():
        blocks = _blocks(Path(folder, "README.md").read_text())
        stock = [_as_arrays(code) for heading, code in blocks if "stepdistill" not in heading.lower()]
        jobs.append(dict(name=kind, blocks=stock, out=str(root / kind)))
    jobs.append(dict(name="guided", folder=guided_export, expect_failure=True))
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(root / "block"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run(
        [sys.executable, "-c", STOCK_SCRIPT, str(root / "jobs.json")],
        env=env,
        cwd=str(root),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-6000:]
    lines = [ln.split(" ", 1) for ln in r.stdout.splitlines() if ln.startswith(("RAN ", "FAILED "))]
    return {"root": root, "stderr": r.stderr, "events": [(tag, json.loads(rest)) for tag, rest in lines]}


def _ours(kind, folder) -> np.ndarray:
    """The card's stepdistill block, run here (stepdistill imported), as arrays."""
    blocks = _blocks(Path(folder, "README.md").read_text())
    code = [code for heading, code in blocks if heading.startswith("With stepdistill installed")]
    assert len(code) == 1, blocks
    ns: dict = {}
    exec(compile(_as_arrays(code[0]), f"<{kind} card: stepdistill block>", "exec"), ns)
    out = ns.get("images", ns.get("image"))
    assert type(ns["pipe"]).__name__.startswith("StepDistill")
    return out.detach().cpu().numpy() if torch.is_tensor(out) else np.asarray(out)


STOCK_CLASS = {
    "class": None,
    "dit": None,
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "lora": "StableDiffusionXLPipeline",
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_card_stock_blocks_run_without_stepdistill_and_match_the_pipeline(kind, exports, stock_run):
    folder = exports[kind]
    card = Path(folder, "README.md").read_text()
    blocks = _blocks(card)
    # the first code block is the stock one; it needs no stepdistill
    assert blocks[0][0] == "With stock diffusers classes only", blocks
    assert not re.search(r"^\s*(import|from) stepdistill", blocks[0][1], re.M), blocks[0][1]
    if STOCK_CLASS[kind]:
        assert f"{STOCK_CLASS[kind]}.from_pretrained(" in blocks[0][1] and "guidance_scale=0.0" in blocks[0][1]
    ran = [e for tag, e in stock_run["events"] if tag == "RAN" and e["name"] == kind]
    n_stock = sum("stepdistill" not in h.lower() for h, _ in blocks)
    assert [e["block"] for e in ran] == list(range(n_stock)) and n_stock == (2 if kind == "lora" else 1)
    if STOCK_CLASS[kind]:
        assert all(e["pipe"] == STOCK_CLASS[kind] for e in ran)
    ours = _ours(kind, folder)
    for i in range(n_stock):
        stock = np.load(stock_run["root"] / f"{kind}_{i}.npy")
        assert stock.shape == ours.shape and np.isfinite(stock).all()
        np.testing.assert_allclose(stock, ours, atol=1e-5, rtol=0, err_msg=f"{kind}: stock block {i}")


def test_stock_loading_warns_about_no_config_key(exports, stock_run):
    assert "not expected" not in stock_run["stderr"], stock_run["stderr"][-4000:]
    for folder in exports.values():
        index = json.loads(Path(folder, "model_index.json").read_text())
        assert "trained_timesteps" not in index and "default_guidance_scale" not in index
        assert index["_stepdistill"]["trained_timesteps"]


def test_multistep_cards_seed_the_renoising(exports):
    """A 4-step LCM loop must pass the generator to every scheduler step (the unseeded loop differed by 0.69)."""
    stock = _blocks(Path(exports["class"], "README.md").read_text())[0][1]
    assert "scheduler.step(out, t, x, generator=generator)" in stock
    sd3 = _blocks(Path(exports["sd3"], "README.md").read_text())[0][1]
    assert "functools.partial(pipe.scheduler.step, generator=generator)" in sd3


def test_guided_student_card_says_it_needs_stepdistill(guided_export, stock_run):
    card = Path(guided_export, "README.md").read_text()
    blocks = _blocks(card)
    assert blocks[0][0] == "With stepdistill installed (required)" and "import stepdistill" in blocks[0][1]
    assert "does not load without stepdistill" in card and "With stock diffusers classes only" not in card
    failed = [e for tag, e in stock_run["events"] if tag == "FAILED" and e["name"] == "guided"]
    assert len(failed) == 1 and "StepDistillClassPipeline" in failed[0]["error"]
    # with stepdistill, in a fresh process (only `import stepdistill` and diffusers imported, as the card does): the
    # GuidedUNet2DModel and ToyMLP components resolve (diffusers imports no component module by itself)
    code = (
        "import sys, stepdistill\nfrom diffusers import DiffusionPipeline\n"
        "print(type(DiffusionPipeline.from_pretrained(sys.argv[1]).unet).__name__)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-c", code, guided_export], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("GuidedUNet2DModel"), r.stderr[-3000:]
    # with stepdistill, the card's block runs and the loop block gives the same images
    ours = _ours("guided", guided_export)
    ns: dict = {}
    exec(compile(blocks[1][1], "<guided card: loop>", "exec"), ns)
    np.testing.assert_allclose(ns["images"].numpy(), ours, atol=1e-5, rtol=0)


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---", 2)[1])


def test_card_metadata_from_the_teacher(tmp_path, exports):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "README.md").write_text("---\nlicense: openrail++\ntags:\n- text-to-image\n---\n# SDXL\n")
    trainer = SimpleNamespace(
        method_name="DMD2", config=SimpleNamespace(teacher="stabilityai/stable-diffusion-xl-base-1.0")
    )
    card = {
        "pipe": SimpleNamespace(),
        "stock_call": "pass",
        "stock_note": "note",
        "plain_call": "pass",
        "pipeline_tag": "text-to-image",
    }
    meta = _front_matter(model_card(trainer, card, [999, 499], str(teacher), lora_call="pass"))
    assert meta == {
        "library_name": "diffusers",
        "base_model": "stabilityai/stable-diffusion-xl-base-1.0",
        "license": "openrail++",
        "pipeline_tag": "text-to-image",
        "tags": ["stepdistill", "distillation", "dmd2", "lora"],
    }
    # exported folders: no placeholder link; a local teacher is no base_model; the pipeline tag by kind
    for kind, folder in exports.items():
        text = Path(folder, "README.md").read_text()
        meta = _front_matter(text)
        assert "https://github.com/)" not in text and "base_model" not in meta
        assert meta["library_name"] == "diffusers" and "stepdistill" in meta["tags"]
        tag = "unconditional-image-generation" if kind in ("class", "dit") else "text-to-image"
        assert meta["pipeline_tag"] == tag


@pytest.mark.parametrize("kind,timesteps", [("lcm", [999, 759]), ("ddim", [999, 499]), ("tcd", [999, 759])])
def test_exported_vp_schedulers_are_not_outdated_for_stock_sd(kind, timesteps):
    """StableDiffusionPipeline calls a scheduler with ``steps_offset != 1`` outdated (a FutureWarning and a config
    rewrite on every load); each exported VP scheduler writes 1, which none of them reads."""
    from stepdistill.export import student_scheduler

    cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
               prediction_type="epsilon")
    sched = student_scheduler(kind, cfg, timesteps)
    assert sched.config.steps_offset == 1
    sched.set_timesteps(timesteps=timesteps) if kind != "ddim" else sched.set_timesteps(len(timesteps))
    assert [int(t) for t in sched.timesteps] == timesteps
