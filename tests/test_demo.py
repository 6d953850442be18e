"""`make demo` end to end at toy size: train, export, reload through DiffusionPipeline, metrics and grid."""

import json
import os

from stepdistill.demo import run_demo


def test_demo_pipeline_runs_end_to_end(tmp_path):
    metrics = run_demo(str(tmp_path), max_steps=3, num_samples=100)
    with open(tmp_path / "metrics.json") as f:
        saved = json.load(f)
    assert saved["fd_digits"] == metrics["fd_digits"]
    assert set(saved["fd_digits"]) == {"teacher@50", "teacher@1", "student@1"}
    assert saved["train_steps"] == 3
    # the student costs one network evaluation instead of fifty
    assert saved["speedup_teacher50_over_student1"] > 5
    assert all(v > 0 for v in saved["fd_digits"].values())
    assert os.path.getsize(tmp_path / "samples.png") > 0
    assert os.path.isfile(tmp_path / "pipeline" / "model_index.json")
