"""The shared loop (through the teacher DSM trainer on a tiny UNet): exact resume, checkpoint safety,
non-finite guard, config validation, and the command line."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from stepdistill.config import ConfigError, build_config
from stepdistill.train import make_trainer
from stepdistill.trainers.base import NonFiniteLossError, list_checkpoints
from stepdistill.trainers.dsm import DSMConfig, DSMTrainer

RECIPE = os.path.join(os.path.dirname(__file__), "..", "recipes", "teacher", "digits.yaml")


def tiny(out, **kw):
    base = dict(
        output_dir=str(out),
        resolution=8,
        block_out_channels=[8, 16],
        attention_levels=[False, True],
        norm_num_groups=4,
        global_batch=8,
        max_steps=6,
        checkpoint_every=3,
        ema_decay=0.9,
        learning_rate=1e-3,
        warmup_steps=2,
        progress=False,
    )
    base.update(kw)
    return DSMTrainer(build_config(DSMConfig, base))


def test_resume_continues_the_exact_loss_curve(tmp_path):
    full = tiny(tmp_path / "a")
    full.train()
    part = tiny(tmp_path / "b", max_steps=3)
    part.train()
    resumed = tiny(tmp_path / "b", max_steps=6, resume="latest")
    resumed.train()
    losses_full = [h["loss"] for h in full.history]
    losses_resumed = [h["loss"] for h in part.history] + [h["loss"] for h in resumed.history]
    assert len(losses_resumed) == 6
    torch.testing.assert_close(torch.tensor(losses_resumed), torch.tensor(losses_full), atol=1e-6, rtol=0)
    a = load_file(os.path.join(list_checkpoints(str(tmp_path / "a"))[-1], "model.safetensors"))
    b = load_file(os.path.join(list_checkpoints(str(tmp_path / "b"))[-1], "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    # the network really trained, and EMA differs from the raw weights
    first = tiny(tmp_path / "c", max_steps=1, checkpoint_every=0)
    first.setup()
    init = {k: v.clone() for k, v in first.specs["model"].module.state_dict().items()}
    assert any(not torch.equal(init[k], a[k]) for k in a)


def test_corrupt_checkpoint_is_refused_and_latest_falls_back_to_an_intact_one(tmp_path, capsys):
    tiny(tmp_path, checkpoints_total_limit=5).train()
    ckpts = list_checkpoints(str(tmp_path))
    assert [os.path.basename(c) for c in ckpts] == ["step_0000003", "step_0000006"]
    assert not [d for d in os.listdir(tmp_path / "checkpoints") if d.startswith(".")]
    with open(os.path.join(ckpts[-1], "model.safetensors"), "r+b") as f:
        f.truncate(100)
    # an explicit damaged checkpoint is refused, naming the intact one
    with pytest.raises(ConfigError, match=r"step_0000006.*damaged.*model.safetensors.*step_0000003"):
        tiny(tmp_path, max_steps=8, checkpoints_total_limit=5, resume=ckpts[-1]).train()
    # resume=latest falls back to it and says so
    capsys.readouterr()
    t = tiny(tmp_path, max_steps=4, checkpoints_total_limit=5, resume="latest")
    t.train()
    out = capsys.readouterr().out
    assert "step_0000006 is damaged" in out and "falls back to step_0000003" in out
    assert t.global_step == 4 and t.resumed_from == ckpts[0]


def test_resume_latest_without_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="resume=latest: no checkpoint"):
        tiny(tmp_path, resume="latest").train()


class NaNTrainer(DSMTrainer):
    bad_calls = None  # which compute_loss calls return NaN (None: all)
    calls = 0

    def compute_loss(self, batch, phase):
        out = super().compute_loss(batch, phase)
        self.calls += 1
        if self.bad_calls is None or self.calls in self.bad_calls:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_nonfinite_losses_are_skipped_then_abort(tmp_path):
    cfg = build_config(
        DSMConfig,
        dict(
            output_dir=str(tmp_path),
            resolution=8,
            block_out_channels=[8, 16],
            attention_levels=[False, False],
            norm_num_groups=4,
            global_batch=4,
            max_steps=4,
            checkpoint_every=0,
            progress=False,
            max_nonfinite=3,
        ),
    )
    t = NaNTrainer(cfg)
    t.bad_calls = {2}
    t.train()
    assert t.global_step == 4 and t.nonfinite_total == 1
    t = NaNTrainer(cfg)
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        t.train()


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'learning_rat'.*learning_rate"):
        build_config(DSMConfig, {"learning_rat": 1e-4})
    with pytest.raises(ConfigError, match="max_steps: expected an integer"):
        build_config(DSMConfig, {"max_steps": "many"})
    with pytest.raises(ConfigError, match="resolution=10 .* multiple of 4"):
        build_config(DSMConfig, {"resolution": 10})
    with pytest.raises(ConfigError, match="beta_schedule|cosine_typo"):
        build_config(DSMConfig, {"beta_schedule": "cosine_typo"})
    with pytest.raises(ConfigError, match="global_batch=10"):
        tiny(tmp_path, global_batch=10, grad_accum=4).train()
    bad = tmp_path / "r.yaml"
    bad.write_text("method: nope\n")
    with pytest.raises(ConfigError, match="'method' must be one of"):
        make_trainer(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        make_trainer(str(tmp_path / "missing.yaml"))


def test_recipe_builds_and_overrides_apply():
    t = make_trainer(RECIPE, ["max_steps=7", "learning_rate=3e-4"])
    assert isinstance(t, DSMTrainer) and t.config.max_steps == 7 and t.config.learning_rate == 3e-4


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    """global_batch 8 as 2 x 4 accumulated equals 1 x 8 up to float error (same samples, same noise)."""
    a = tiny(tmp_path / "a", max_steps=1, checkpoint_every=0, ema_decay=0.0, label_dropout=0.0)
    b = tiny(tmp_path / "b", max_steps=1, checkpoint_every=0, ema_decay=0.0, label_dropout=0.0, grad_accum=2)
    for t in (a, b):
        t.setup()
        t.sampler.consumed = 0
    xs = torch.stack([a.dataset[i]["image"] for i in range(8)])
    noise = torch.randn_like(xs)
    tt = torch.linspace(0.1, 0.9, 8, dtype=torch.float64)
    grads = []
    for t, chunks in ((a, 1), (b, 2)):
        t.specs["model"].module.zero_grad()
        labels = torch.arange(8) % 10
        for xc, nc, tc, yc in zip(xs.chunk(chunks), noise.chunk(chunks), tt.chunk(chunks), labels.chunk(chunks)):
            cond = t.conditioner(yc)
            (t.model.dsm_loss(xc, cond, t=tc, noise=nc) / chunks).backward()
        grads.append(torch.cat([p.grad.flatten() for p in t.specs["model"].module.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)
    # and the loop makes one optimiser step per grad_accum micro-batches, consuming the global batch
    for t, accum in (
        (tiny(tmp_path / "c", max_steps=2, checkpoint_every=0), 1),
        (tiny(tmp_path / "d", max_steps=2, checkpoint_every=0, grad_accum=2), 2),
    ):
        t.train()
        state = t.opts["model"].optimizer.state
        assert {int(v["step"]) for v in state.values()} == {2}
        assert t.sampler.consumed == 16 and t.per_device_batch == 8 // accum


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["train", "--help"],
        ["sample", "--help"],
        ["fd-digits", "--help"],
        ["eval", "--help"],
        ["demo", "--help"],
    ],
)
def test_cli_help(args):
    out = subprocess.run([sys.executable, "-m", "stepdistill.cli", *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout


def test_cli_train_reports_bad_recipe(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("method: dsm\nlearning_rat: 1\n")
    out = subprocess.run(
        [sys.executable, "-m", "stepdistill.cli", "train", "--config", str(bad)], capture_output=True, text=True
    )
    assert out.returncode == 2 and "unknown key 'learning_rat'" in out.stderr


def test_skipped_micro_batch_keeps_accumulation_aligned(tmp_path):
    """A NaN in the first micro-batch of a step skips the whole step; the next steps still average exactly
    grad_accum fresh micro-batches (checked through AdamW's step count and the sampler position)."""
    t = NaNTrainer(build_config(DSMConfig, dict(output_dir=str(tmp_path), resolution=8, block_out_channels=[8, 16],
                                                attention_levels=[False, False], norm_num_groups=4, global_batch=4,
                                                grad_accum=2, max_steps=3, checkpoint_every=0, progress=False)))
    t.bad_calls = {1}  # the first micro-batch of the first step
    t.setup()
    at_call = []  # compute_loss calls made when each optimiser step happens
    opt = t.opts["model"]
    real_step = opt.optimizer.step

    def spy_step(*a, **k):
        at_call.append(t.calls)
        return real_step(*a, **k)

    opt.optimizer.step = spy_step
    t.train()
    assert t.nonfinite_total == 1 and t.global_step == 3
    # call 1 is the skipped NaN; each later step must use two fresh micro-batches: steps after calls 3, 5, 7
    # (misaligned accumulation would step after calls 2, 4, 6, mixing micro-batches of neighbouring steps)
    assert at_call == [3, 5, 7]
    assert t.sampler.consumed == (1 + 3 * 2) * 2


def test_yaml_bare_no_is_the_string_no():
    from stepdistill.config import build_config, parse_overrides
    from stepdistill.trainers.dsm import DSMConfig

    # YAML 1.1 (PyYAML) reads `no` as false; accelerate's and our spelling of "no mixed precision" must still work
    assert build_config(DSMConfig, parse_overrides(["mixed_precision=no"])).mixed_precision == "no"
    assert build_config(DSMConfig, {"mixed_precision": False}).mixed_precision == "no"
