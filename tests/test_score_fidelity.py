"""Fidelity of the score methods (DMD2, SIM / SiD-LSG, VSD / SwiftBrush) to their official code: the LR
warm-up unit, the DM timestep range, GAN options and head, flow-teacher times, two-stage DMD2 initialisation,
SiD-LSG and SwiftBrush options, and EDM teachers."""

import pytest
import torch

from stepdistill.config import ConfigError, build_config
from stepdistill.trainers.dmd2 import DMD2Config, DMD2Trainer

TOY = dict(
    dataset="toy2d:gmm8",
    global_batch=64,
    checkpoint_every=0,
    progress=False,
    learning_rate=1e-3,
)


def toy_dmd2(teacher, out, **kw):
    return DMD2Trainer(build_config(DMD2Config, {**TOY, "output_dir": str(out), "teacher": teacher, **kw}))


@pytest.mark.parametrize("unit, expected", [("iteration", 1.0), ("update", 0.3)])
def test_warmup_counts_iterations_by_default(unit, expected, toy_teacher, tmp_path):
    # DMD2 (main/train_sd.py) steps the generator's schedule every iteration: with ratio 5 and warm-up 10 the
    # generator reaches its peak lr after 10 iterations although it was updated only twice (steps 0 and 5)
    kw = {} if unit == "iteration" else {"warmup_unit": unit}
    trainer = toy_dmd2(toy_teacher, tmp_path, max_steps=10, warmup_steps=10, dfake_gen_update_ratio=5, **kw)
    trainer.train()
    for name in ("generator", "fake_score"):
        lr = trainer.opts[name].param_groups[0]["lr"]
        want = 1.0 if name == "fake_score" else expected  # the fake score updates every iteration
        assert lr == pytest.approx(want * 1e-3), (name, lr)


def test_warmup_unit_is_validated(toy_teacher, tmp_path):
    with pytest.raises(ConfigError, match="warmup_unit"):
        toy_dmd2(toy_teacher, tmp_path, warmup_unit="epoch").setup()
