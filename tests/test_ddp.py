"""Data-parallel training on CPU (gloo): a 2-process DDP run, launched as users launch it
(``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2``), leaves identical parameters on
both ranks, equal to a 1-process run of the same global batch within 1e-5. This needs every random draw of a
step to be the same for a sample wherever it runs (stepdistill.trainers.randomness) and the shared step index
of backward simulation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _launch_two(spec_file: str, out: str, worker: str = "ddp_worker.py"):
    # the checkout under test first (an installed stepdistill may be another copy)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE + os.pathsep + ROOT}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(29500 + os.getpid() % 1000),
        os.path.join(HERE, worker), spec_file,
    ]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]


def _spec(tmp_path, name, method, config):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"method": method, "config": config}))
    return str(path)


def _check_parity(tmp_path, method, config, networks):
    sys.path.insert(0, HERE)
    from ddp_worker import run

    one = dict(config, output_dir=str(tmp_path / "one"))
    two = dict(config, output_dir=str(tmp_path / "two"))
    os.makedirs(one["output_dir"]), os.makedirs(two["output_dir"])
    _launch_two(_spec(tmp_path, "two", method, two), two["output_dir"])
    ref = run(_spec(tmp_path, "one", method, one))
    assert json.load(open(os.path.join(two["output_dir"], "history.json")))["world"] == 2
    teacher = load_file(os.path.join(config["teacher"], "unet", "diffusion_pytorch_model.safetensors"))
    for name in networks:
        r0 = load_file(os.path.join(two["output_dir"], f"{name}_rank0.safetensors"))
        r1 = load_file(os.path.join(two["output_dir"], f"{name}_rank1.safetensors"))
        for k, v in ref[name].items():
            assert torch.equal(r0[k], r1[k]), f"{name}.{k} differs between the ranks"
            torch.testing.assert_close(r0[k], v, atol=1e-5, rtol=0, msg=lambda m, k=k, n=name: f"{n}.{k}: {m}")
        # and training moved them away from the teacher they started from
        assert any(not torch.allclose(r0[k], teacher[k]) for k in r0 if k in teacher), f"{name} did not train"


def test_dmd2_ddp_matches_one_process(toy_teacher, tmp_path):
    config = dict(
        teacher=toy_teacher,
        dataset="toy2d:gmm8",
        max_steps=4,
        global_batch=16,
        learning_rate=1e-4,  # Adam turns float-order noise of near-zero gradients into lr-sized steps
        dfake_gen_update_ratio=2,
        denoising_timesteps=[999, 499],  # backward simulation: the step index must be shared
        checkpoint_every=0,
        progress=False,
    )
    _check_parity(tmp_path, "dmd2", config, ["generator", "fake_score"])


def test_progressive_ddp_matches_one_process(toy_teacher, tmp_path):
    config = dict(
        teacher=toy_teacher,
        dataset="toy2d:gmm8",
        start_steps=4,
        final_steps=1,
        steps_per_round=2,
        global_batch=16,
        learning_rate=1e-4,  # Adam turns float-order noise of near-zero gradients into lr-sized steps
        checkpoint_every=0,
        progress=False,
    )
    _check_parity(tmp_path, "progressive", config, ["generator"])


@pytest.mark.parametrize("mode", ["lcm", "ict"])
def test_consistency_ddp_matches_one_process(toy_teacher, tmp_path, mode):
    config = dict(
        teacher=toy_teacher,
        dataset="toy2d:gmm8",
        mode=mode,
        num_ddim_timesteps=20,
        target_ema_decay=0.95 if mode == "lcm" else 0.0,  # the EMA target is updated identically on every rank
        max_steps=3,
        global_batch=16,
        learning_rate=1e-4,  # Adam turns float-order noise of near-zero gradients into lr-sized steps
        checkpoint_every=0,
        progress=False,
    )
    if mode == "ict":
        config.update(init="teacher", loss="pseudo_huber", huber_c="ict")  # lognormal index: torch.multinomial
        del config["num_ddim_timesteps"]
    _check_parity(tmp_path, "consistency", config, ["generator"])
