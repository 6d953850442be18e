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


# ------------------------------------------------------------------------------------------------------------
# The `slow` marker (registered in pyproject.toml): `make test` runs every test, `make test-fast` runs
# `-m "not slow"`. Whole modules of end-to-end checks, and single tests measured as slow with --durations.
# ------------------------------------------------------------------------------------------------------------

SLOW_MODULES = {
    "test_notebooks.py": "executes every notebook in a kernel",
    "test_real_recipes.py": "every real-model recipe on tiny twins of its networks",
    "test_ddp.py": "launches 2-process runs",
    "test_demo.py": "`make demo` end to end",
}
SLOW_TESTS = {
    # "module.py::test_name": why (wall seconds from --durations on the shared 2-core machine, load ~10)
    "test_consistency.py::test_consistency_distillation_maps_noise_onto_every_mode": "toy quality run, 21 s",
    "test_dmd2.py::test_dmd2_matches_a_gaussian_mixture": "toy quality run, 24 s",
    "test_sim_vsd.py::test_matches_a_gaussian_mixture": "toy quality runs, 24-28 s each",
    "test_progressive.py::test_a_round_halves_the_steps_and_keeps_the_distance": "toy quality run, 17 s",
    "test_boot.py::test_one_step_student_of_an_exact_mixture_teacher": "toy quality runs, 1000 steps, 50-90 s each",
    "test_sfd.py::test_forgotten_class_moves_to_the_remap_mode_and_the_others_stay": "toy forgetting run, 16 s",
    "test_dmd2_sd.py::test_hub_id_teacher_trains_and_exports": "hub-id teacher end to end, 30 s",
    "test_trainer_base.py::test_cli_train_reports_bad_recipe": "a subprocess that imports the trainers, 26 s",
    "test_cli.py::test_pipelines_register_in_either_import_order": "two subprocesses that import diffusers",
    "test_lifecycle.py::test_ddp_with_a_tracker_through_the_command_line_exits_0": "a 2-process launch",
    "test_lifecycle.py::test_kill_9_during_a_checkpoint_then_resume_is_bit_exact": "subprocess runs, killed, resumed",
    "test_lifecycle.py::test_cli_refusals_are_one_line_exit_2_and_change_nothing": "one subprocess per refusal",
    "test_lifecycle.py::test_cli_refuses_a_foreign_export_dir_with_one_line": "a subprocess that imports the trainers",
    "test_data_scale.py::test_two_processes_with_two_workers_each_read_every_sample_once": "a 2-process launch, 50 s",
    "test_data_scale.py::test_host_memory_while_training_from_shards_does_not_grow_with_the_dataset": "2 subprocesses",
    "test_data_scale.py::test_the_cache_command_on_two_processes_writes_the_same_cache": "a 2-process launch",
    "test_hot_path.py::test_compile_trains_like_eager_on_a_tiny_unet_with_the_gan_and_gradient_checkpointing": (
        "torch.compile (aot_eager) of a diffusers UNet in 5 call kinds, 150 s at load 12"
    ),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        key = f"{item.path.name}::{getattr(item, 'originalname', item.name)}"
        if item.path.name in SLOW_MODULES or key in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
