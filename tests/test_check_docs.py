"""scripts/check_docs.py (``make check-docs``) finds the documented commands and plans tiny runs of them; the
runs themselves are ``make check-docs``, not this test."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def check_docs():
    spec = importlib.util.spec_from_file_location("check_docs", ROOT / "scripts" / "check_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_docs"] = module
    spec.loader.exec_module(module)
    return module


def _by_text(commands):
    return {c.text: c for c in commands}


def test_readme_code_blocks(check_docs):
    found = _by_text(check_docs.readme_commands(ROOT / "README.md"))
    for text in (
        "make demo",
        "make test",
        "stepdistill train --config recipes/teacher/digits.yaml",
        "cp -r outputs/teacher_digits/model/. stepdistill/assets/digits_teacher/",
        "stepdistill eval --pipeline outputs/demo/pipeline --reference digits --out outputs/eval",
        "stepdistill train --config recipes/dmd2/digits.yaml",
    ):
        assert text in found and found[text].kind == "shell", text
    # a backslash continuation is one command; a trailing "# comment" is dropped
    assert any(
        t.startswith("stepdistill eval --pipeline <folder or hub id>") and "--clip-pretrained <file>" in t
        for t in found
    )
    python = [c for c in found.values() if c.kind == "python"]
    assert any('from_pretrained("outputs/dmd2_digits/pipeline")' in c.text for c in python)
    assert all(c.source.startswith("README.md:") for c in found.values())


def test_recipe_headers(check_docs, tmp_path):
    found = _by_text(c for r in sorted((ROOT / "recipes").glob("*/*.yaml")) for c in check_docs.recipe_commands(r))
    for recipe in ("dmd2", "sim", "vsd", "consistency"):
        assert f"stepdistill train --config recipes/{recipe}/digits.yaml" in found or recipe == "consistency"
    assert "stepdistill train --config recipes/dmd2/toy2d.yaml" in found
    assert "stepdistill train --config recipes/teacher/toy2d.yaml" in found
    assert "stepdistill eval --pipeline outputs/consistency_digits_lcm/pipeline --reference digits" in found
    # a command after prose on the same line, and one continued on the next comment line
    assert found["stepdistill train --config recipes/teacher/toy2d.yaml"].source.startswith("recipes/")
    sd3 = "accelerate launch --config_file recipes/accelerate/fsdp2.yaml -m stepdistill.train --config " + (
        "recipes/dmd2/sd3_medium.yaml"
    )
    assert sd3 in found
    # prose that starts like a command word is not one
    assert not any(t.startswith("make it") for t in found)

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "# Title. Make the teacher first: stepdistill train --config recipes/teacher/toy2d.yaml\n"
        "# then (long):\n#   stepdistill train --config recipes/dmd2/toy2d.yaml \\\n#     max_steps=10\nmethod: dmd2\n"
        "# stepdistill train --config not/a/header.yaml\n"
    )
    got = [(c.source, c.text) for c in check_docs.recipe_commands(recipe, root=tmp_path)]
    assert got == [
        ("r.yaml:1", "stepdistill train --config recipes/teacher/toy2d.yaml"),
        ("r.yaml:3", "stepdistill train --config recipes/dmd2/toy2d.yaml max_steps=10"),
    ]


def test_plan_gives_tiny_budgets_and_reasons(check_docs):
    plans = {c.text: c for c in check_docs.dedupe([check_docs.plan(c) for c in check_docs.extract(ROOT)])}
    toy = plans["stepdistill train --config recipes/dmd2/toy2d.yaml"]
    assert not toy.skip and toy.argv[1:5] == ["-m", "stepdistill.cli", "train", "--config"]
    assert "max_steps=2" in toy.argv and "checkpoint_every=0" in toy.argv
    assert "steps_per_round=1" in check_docs.tiny_train_overrides({"method": "progressive"})
    assert "guided_steps=1" in check_docs.tiny_train_overrides({"method": "progressive", "guided": True})
    tscd = plans["stepdistill train --config recipes/consistency/digits_tscd.yaml"]
    assert "multiphase_steps=[1, 1]" in tscd.argv and "max_steps=2" in tscd.argv
    demo = plans["make demo"]
    assert demo.argv[1:5] == ["-m", "stepdistill.cli", "demo", "--out"] and "--max-steps" in demo.argv
    assert "test suite" in plans["make test"].skip
    hub = [c for c in plans.values() if "recipes/sim/sd15.yaml" in c.text]
    assert hub and all("real-model recipe" in c.skip and "test_real_recipes" in c.skip for c in hub)
    ddp = plans["accelerate launch --config_file recipes/accelerate/ddp.yaml -m stepdistill.train --config <recipe>"]
    assert ddp.argv[:4] == ["accelerate", "launch", "--num_processes", "2"] and ddp.env == {"ACCELERATE_USE_CPU": "1"}
    assert "recipes/dmd2/digits.yaml" in ddp.argv
    fsdp1 = plans[
        "accelerate launch --config_file recipes/accelerate/fsdp1.yaml -m stepdistill.train --config <recipe>"
    ]
    assert "FSDP" in fsdp1.skip  # accelerate refuses FSDP on a machine without an accelerator
    placeholder = [c for c in plans.values() if "<folder or hub id>" in c.text]
    assert placeholder and "placeholder" in placeholder[0].skip
    # every command either runs or says why not; identical commands run once
    assert all(bool(c.argv) != bool(c.skip) for c in plans.values())
    assert sum(c.text == "stepdistill train --config recipes/teacher/toy2d.yaml" for c in plans.values()) == 1
