"""The run lifecycle: output folders are never wiped or mixed between runs, every replacement is a swap,
checkpoints are verified on resume, a resume tells what it resumed and refuses settings that break it, the
per-step JSONL log, tracker windows, launcher settings, and DDP + a tracker through the command line."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_trainer_base import tiny as tiny_dsm

from stepdistill import io
from stepdistill.config import ConfigError, build_config
from stepdistill.train import make_trainer
from stepdistill.trainers.base import LOG_FILE, list_checkpoints
from stepdistill.trainers.dsm import DSMConfig, DSMTrainer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TEACHER_RECIPE = os.path.join(ROOT, "recipes", "teacher", "digits.yaml")
TINY_OVERRIDES = [
    "resolution=8",
    "block_out_channels=[8, 16]",
    "attention_levels=[false, true]",
    "norm_num_groups=4",
    "global_batch=8",
    "warmup_steps=2",
    "sample_every=0",
    "progress=false",
]


def tiny(out, **kw):
    """test_trainer_base's tiny DSM run, keeping up to five checkpoints."""
    return tiny_dsm(out, **{"checkpoints_total_limit": 5, **kw})


def _cli(*args, env=None, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "stepdistill.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def _steps(out):
    return [os.path.basename(p) for p in list_checkpoints(str(out))]


# ------------------------------------------------------------------------------------------- export folders
def test_export_refuses_a_foreign_folder_before_training_and_replaces_its_own(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"export_dir: folder .*mine.* is not empty and is not a previous"):
        tiny(tmp_path / "run", export_dir=str(foreign)).train()
    assert (foreign / "notes.txt").read_text() == "keep me" and os.listdir(foreign) == ["notes.txt"]
    assert not os.path.exists(tmp_path / "run"), "refused only after training"

    # a previous export is replaced as a whole; the new one carries the marker
    target = tmp_path / "export"
    t = tiny(tmp_path / "a", export_dir=str(target), max_steps=2, checkpoint_every=0)
    t.train()
    t.export()
    assert os.path.isfile(target / io.EXPORT_MARKER) and os.path.isfile(target / "unet" / "config.json")
    (target / "stale.txt").write_text("from the first export")
    t2 = tiny(tmp_path / "b", export_dir=str(target), max_steps=3, checkpoint_every=0)
    t2.train()
    t2.export()
    assert json.loads((target / "training.json").read_text())["max_steps"] == 3
    assert not os.path.exists(target / "stale.txt")
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "export", "mine"], "a temp folder was left"


def test_an_interrupted_export_leaves_the_previous_one(tmp_path, monkeypatch):
    target = tmp_path / "export"
    t = tiny(tmp_path / "a", export_dir=str(target), max_steps=1, checkpoint_every=0)
    t.train()
    t.export()
    before = load_file(str(target / "unet" / "diffusion_pytorch_model.safetensors"))

    def killed(*a, **k):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(io, "fsync_tree", killed)  # the new folder is written, not yet swapped in
    t2 = tiny(tmp_path / "b", export_dir=str(target), max_steps=2, checkpoint_every=0)
    t2.train()
    with pytest.raises(KeyboardInterrupt):
        t2.export()
    after = load_file(str(target / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "export"]


def test_cli_refuses_a_foreign_export_dir_with_one_line(tmp_path):
    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "img.png").write_bytes(b"x")
    r = _cli("train", "--config", TEACHER_RECIPE, *TINY_OVERRIDES, f"output_dir={tmp_path / 'run'}",
             f"export_dir={foreign}", "max_steps=1")  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: export_dir:") and str(foreign) in lines[0]
    assert os.listdir(foreign) == ["img.png"]


# ------------------------------------------------------------------------------------------- reused output_dir
def test_a_fresh_run_over_another_runs_checkpoints_is_refused_unless_overwrite(tmp_path):
    tiny(tmp_path, seed=0, max_steps=6, checkpoint_every=3).train()
    assert _steps(tmp_path) == ["step_0000003", "step_0000006"]
    run1 = load_file(str(tmp_path / "checkpoints" / "step_0000006" / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"output_dir .* holds checkpoints of an earlier run .*step_0000006"):
        tiny(tmp_path, seed=1, max_steps=4, checkpoint_every=2).train()
    assert _steps(tmp_path) == ["step_0000003", "step_0000006"]

    # overwrite: the new run rotates only its own checkpoints; resume=latest resumes the new run
    tiny(tmp_path, seed=1, max_steps=4, checkpoint_every=2, checkpoints_total_limit=1, overwrite=True).train()
    assert _steps(tmp_path) == ["step_0000003", "step_0000004", "step_0000006"]
    kept = load_file(str(tmp_path / "checkpoints" / "step_0000006" / "model.safetensors"))
    assert all(torch.equal(run1[k], kept[k]) for k in run1)
    t = tiny(tmp_path, seed=1, max_steps=5, checkpoint_every=2, checkpoints_total_limit=1, resume="latest")
    t.setup()
    assert os.path.basename(t.resumed_from) == "step_0000004" and t.global_step == 4


# ------------------------------------------------------------------------------------------- atomic swaps
def test_replacing_a_checkpoint_never_leaves_nothing(tmp_path, monkeypatch):
    t = tiny(tmp_path, max_steps=3, checkpoint_every=3)
    t.train()
    final = str(tmp_path / "checkpoints" / "step_0000003")
    real_replace = os.replace

    def killed_on_final(src, dst):  # a kill at the moment the new folder would be renamed into place
        if os.path.abspath(dst) == os.path.abspath(final):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_on_final)
    try:
        t.save_checkpoint()  # step 3 again
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(os, "replace", real_replace)
    assert os.path.isfile(os.path.join(final, "trainer_state.json")) and os.path.isfile(
        os.path.join(final, "model.safetensors")
    )


def test_swap_dir_without_rename_exchange(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    final = tmp_path / "out"
    with io.staged_dir(str(final)) as tmp:
        open(os.path.join(tmp, "a"), "w").write("1")
    with io.staged_dir(str(final)) as tmp:
        open(os.path.join(tmp, "b"), "w").write("2")
    assert os.listdir(final) == ["b"] and os.listdir(tmp_path) == ["out"]


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "config.json"
    io.write_json(str(path), {"a": 1})

    def half(tmp):
        open(tmp, "w").write('{"a": ')
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        io.atomic_write(str(path), half)
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["config.json"]


# ------------------------------------------------------------------------------------------- checksums
def test_zeros_inside_the_weights_are_caught_on_resume(tmp_path, capsys):
    tiny(tmp_path).train()
    state = json.load(open(tmp_path / "checkpoints" / "step_0000006" / "trainer_state.json"))
    assert set(state["files"]) >= {"model.safetensors", "model_ema.safetensors", "model_optim.pt", "rng_0.pt"}
    weights = tmp_path / "checkpoints" / "step_0000006" / "model.safetensors"
    size = os.path.getsize(weights)
    with open(weights, "r+b") as f:  # the file still parses: only the checksum can tell
        f.seek(size // 2)
        f.write(b"\0" * min(65536, size // 3))
    assert os.path.getsize(weights) == size
    with pytest.raises(ConfigError, match=r"step_0000006.*model.safetensors fails its sha256 checksum.*step_0000003"):
        tiny(tmp_path, max_steps=8, resume=str(tmp_path / "checkpoints" / "step_0000006")).train()
    capsys.readouterr()
    t = tiny(tmp_path, max_steps=8, resume="latest")
    t.setup()
    out = capsys.readouterr().out
    assert "step_0000006 is damaged (model.safetensors fails its sha256 checksum)" in out
    assert "falls back to step_0000003" in out and t.global_step == 3


def test_a_missing_state_file_is_reported_not_skipped(tmp_path, capsys):
    tiny(tmp_path).train()
    os.remove(tmp_path / "checkpoints" / "step_0000006" / "trainer_state.json")
    capsys.readouterr()
    t = tiny(tmp_path, max_steps=8, resume="latest")
    t.setup()
    assert "step_0000006 is damaged (no trainer_state.json" in capsys.readouterr().out and t.global_step == 3
    # every checkpoint damaged: refused, each one named
    os.remove(tmp_path / "checkpoints" / "step_0000003" / "model_optim.pt")
    with pytest.raises(ConfigError, match=r"no intact checkpoint.*step_0000006: no trainer_state.*step_0000003: "):
        tiny(tmp_path, max_steps=8, resume="latest").train()


# ------------------------------------------------------------------------------------------- resume truthfulness
def test_resume_refuses_settings_that_break_it_and_prints_the_safe_ones(tmp_path, capsys):
    tiny(tmp_path, max_steps=3).train()
    with pytest.raises(ConfigError) as e:
        tiny(tmp_path, max_steps=6, resume="latest", learning_rate=2e-3, seed=1, global_batch=4).train()
    msg = str(e.value)
    for part in ("learning_rate: 0.001 -> 0.002", "seed: 0 -> 1", "global_batch: 8 -> 4", "exact resume"):
        assert part in msg, msg
    capsys.readouterr()
    t = tiny(tmp_path, max_steps=6, resume="latest", log_every=2, checkpoint_every=6)
    t.train()
    out = capsys.readouterr().out
    assert f"resuming from {tmp_path / 'checkpoints' / 'step_0000003'} (step 3)" in out
    assert "checkpoint_every: 3 -> 6" in out and "log_every: 10 -> 2" in out and "max_steps: 3 -> 6" in out
    assert t.global_step == 6


def test_resume_below_max_steps_is_refused_and_at_max_steps_says_so(tmp_path, capsys):
    tiny(tmp_path, max_steps=6).train()
    with pytest.raises(ConfigError, match=r"max_steps=4 is below the step of checkpoint .*step_0000006.* \(6\)"):
        tiny(tmp_path, max_steps=4, resume="latest").train()
    capsys.readouterr()
    tiny(tmp_path, max_steps=6, resume="latest").train()
    assert "nothing left to train" in capsys.readouterr().out


class KilledAt(DSMTrainer):
    kill_at = None

    def on_step_end(self, step):
        super().on_step_end(step)
        if step == self.kill_at:
            raise KeyboardInterrupt("kill -9")


def test_the_jsonl_log_is_the_uninterrupted_curve_after_a_kill_and_resume(tmp_path):
    full = tiny(tmp_path / "a")
    full.train()
    cfg = build_config(DSMConfig, dict(tiny(tmp_path / "b").config.__dict__))
    killed = KilledAt(cfg)
    killed.kill_at = 4  # steps 1..4 logged, the last checkpoint is step 3
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    killed._close_log()
    logged = [json.loads(x)["step"] for x in open(tmp_path / "b" / LOG_FILE)]
    assert logged == [1, 2, 3, 4]
    tiny(tmp_path / "b", resume="latest").train()
    a = [json.loads(x) for x in open(tmp_path / "a" / LOG_FILE)]
    b = [json.loads(x) for x in open(tmp_path / "b" / LOG_FILE)]
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6] == [r["step"] for r in a]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in b]), torch.tensor([r["loss"] for r in a]))


# ------------------------------------------------------------------------------------------- launcher settings
def _recipe_trainer(tmp_path, *extra):
    return make_trainer(TEACHER_RECIPE, [*TINY_OVERRIDES, f"output_dir={tmp_path}", "checkpoint_every=0", *extra])


def test_launcher_mixed_precision_is_used_when_the_recipe_leaves_it_unset(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    t = _recipe_trainer(tmp_path, "max_steps=1")
    t.setup()
    assert t.accelerator.mixed_precision == "bf16" and t.config.mixed_precision == "bf16"
    assert "mixed_precision=bf16 (accelerate launch: ACCELERATE_MIXED_PRECISION)" in capsys.readouterr().out
    # an explicit recipe / command-line value that differs is refused, naming both
    with pytest.raises(ConfigError, match=r"mixed_precision='no' in the recipe .* conflicts with 'bf16'"):
        _recipe_trainer(tmp_path / "b", "max_steps=1", "mixed_precision=no").setup()
    # the launcher's default ("no") is no request: the recipe's value is used
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    t = _recipe_trainer(tmp_path / "c", "max_steps=1", "mixed_precision=bf16")
    t.setup()
    assert t.accelerator.mixed_precision == "bf16"
    assert "mixed_precision=bf16 (recipe)" in capsys.readouterr().out


def test_launcher_gradient_accumulation_drives_the_step_count(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    t = _recipe_trainer(tmp_path, "max_steps=3")
    t.train()
    assert t.config.grad_accum == 2 and t.per_device_batch == 4
    opt_state = t.opts["model"].optimizer.state
    assert all(int(s["step"]) == 3 for s in opt_state.values()), "8 trainer steps must be 8 optimiser steps"
    assert t.sampler.consumed == 3 * 2 * 4
    assert "grad_accum=2 (accelerate launch: ACCELERATE_GRADIENT_ACCUMULATION_STEPS)" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"grad_accum=1 in the recipe .* conflicts with 2"):
        _recipe_trainer(tmp_path / "b", "max_steps=1", "grad_accum=1").setup()


# ------------------------------------------------------------------------------------------- trackers
def _scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for f in glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(f)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_two_time_scale_generator_loss_reaches_tensorboard(toy_teacher, tmp_path):
    from stepdistill.trainers.dmd2 import DMD2Config, DMD2Trainer

    cfg = dict(output_dir=str(tmp_path), teacher=toy_teacher, dataset="toy2d:gmm8", max_steps=20, global_batch=32)
    cfg.update(dfake_gen_update_ratio=5, log_every=10, report_to="tensorboard", checkpoint_every=0, progress=False)
    t = DMD2Trainer(build_config(DMD2Config, cfg))
    t.train()
    scalars = _scalars(str(tmp_path))
    gen = [k for k in scalars if k.endswith("/generator") and not k.startswith("window_steps")]
    assert "loss/generator" in gen, sorted(scalars)
    assert sorted(s for s, _ in scalars["loss/generator"]) == [10, 20]
    # the mean over the window, with its count: 2 generator and 10 fake-score updates per window of 10 steps
    assert [v for _, v in sorted(scalars["window_steps/generator"])] == [2, 2]
    assert [v for _, v in sorted(scalars["window_steps/fake_score"])] == [10, 10]
    by_step = {h["step"]: h for h in t.history}
    window = [by_step[s]["loss/generator"] for s in range(10) if "loss/generator" in by_step[s]]
    assert len(window) == 2
    assert abs(dict(scalars["loss/generator"])[10] - sum(window) / 2) < 1e-5


def test_ddp_with_a_tracker_through_the_command_line_exits_0(tmp_path):
    """accelerate launch --multi_gpu -m stepdistill.train with report_to=tensorboard: exit 0, one export."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(29700 + os.getpid() % 200),
        "-m", "stepdistill.train", "--config", os.path.join(ROOT, "recipes", "dmd2", "digits.yaml"),
        f"output_dir={tmp_path / 'run'}", "max_steps=2", "global_batch=4", "report_to=tensorboard", "log_every=1",
        "checkpoint_every=2", "sample_every=0", "progress=false",
    ]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("exported to") == 1
    assert os.path.isfile(tmp_path / "run" / "pipeline" / "model_index.json")
    assert [p for p in os.listdir(tmp_path / "run") if "pipeline" in p] == ["pipeline"]
    assert _steps(tmp_path / "run") == ["step_0000002"]
    assert "loss/generator" in _scalars(str(tmp_path / "run"))


def _snapshot(root):
    return {
        os.path.relpath(os.path.join(d, f), root): io.sha256_file(os.path.join(d, f))
        for d, _, files in os.walk(root)
        for f in files
    }


def test_cli_refusals_are_one_line_exit_2_and_change_nothing(tmp_path):
    run = tmp_path / "run"
    make_trainer(TEACHER_RECIPE, [*TINY_OVERRIDES, f"output_dir={run}", "max_steps=2", "checkpoint_every=2"]).train()
    before = _snapshot(tmp_path)
    cases = [
        ([], {}, r"output_dir .* holds checkpoints of an earlier run \(step_0000002\)"),
        (["resume=latest", "seed=1"], {}, r"resume: settings differ .*seed: 0 -> 1"),
        (["resume=latest", "max_steps=1"], {}, r"max_steps=1 is below the step of checkpoint"),
        (["mixed_precision=no"], {"ACCELERATE_MIXED_PRECISION": "bf16"}, r"mixed_precision='no' .* conflicts with"),
    ]
    for extra, env, pattern in cases:
        args = [*TINY_OVERRIDES, f"output_dir={run}", "max_steps=2", "checkpoint_every=2", *extra]
        r = _cli("train", "--config", TEACHER_RECIPE, *args, env=env)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (extra, r.stderr[-3000:])
        assert re.search(pattern, lines[0]), (pattern, lines[0])
        assert _snapshot(tmp_path) == before, f"{extra} changed files"


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from stepdistill import io
from test_trainer_base import tiny

real = io.fsync_tree
def fsync_then_die(root):  # step 6's checkpoint is written but not yet swapped in: SIGKILL
    if "step_0000006" in root:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(root)
io.fsync_tree = fsync_then_die
tiny({out!r}, checkpoints_total_limit=5).train()
"""


def test_kill_9_during_a_checkpoint_then_resume_is_bit_exact(tmp_path):
    full = tiny(tmp_path / "a")
    full.train()
    script = KILL_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), out=str(tmp_path / "b"))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == -9, r.stderr[-3000:]
    assert _steps(tmp_path / "b") == ["step_0000003"]
    rest = tiny(tmp_path / "b", resume="latest")
    rest.train()
    a = load_file(str(tmp_path / "a" / "checkpoints" / "step_0000006" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step_0000006" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run is not bit-exact"
    log_a = [json.loads(x) for x in open(tmp_path / "a" / LOG_FILE)]
    log_b = [json.loads(x) for x in open(tmp_path / "b" / LOG_FILE)]
    assert [r["step"] for r in log_b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in log_b] == [r["loss"] for r in log_a]
    assert not [d for d in os.listdir(tmp_path / "b" / "checkpoints") if d.startswith(".")]
