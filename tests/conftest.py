"""Shared fixtures: a small MLP teacher trained on the 8-Gaussian mixture (about 10 s on one core)."""

import pytest

from stepdistill.config import build_config
from stepdistill.trainers.dsm import DSMConfig, DSMTrainer


@pytest.fixture(scope="session")
def toy_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_teacher")
    cfg = build_config(
        DSMConfig,
        dict(
            output_dir=str(out),
            dataset="toy2d:gmm8",
            block_out_channels=[128] * 3,
            attention_levels=[False] * 3,
            max_steps=1500,
            global_batch=256,
            learning_rate=2e-3,
            warmup_steps=50,
            ema_decay=0.99,
            checkpoint_every=0,
            progress=False,
        ),
    )
    trainer = DSMTrainer(cfg)
    trainer.train()
    return trainer.export()
