"""The command line a newcomer meets: instant help that lists every method and a method's keys, an export
sampled with its own trained timesteps, hub ids served from the local cache offline, every eval metric in the
printed summary, and non-finite steps reported."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from stepdistill.cli import main
from stepdistill.train import METHODS, trainer_classes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT}


def run_python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT)


def test_help_and_argument_errors_import_no_torch():
    """`stepdistill --help` answers without importing torch or diffusers (it used to take ~10 s to import them)."""
    code = (
        "import sys\n"
        "from stepdistill.cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['train', '--config', 'recipes/dmd2/digits.yaml', '--help'],"
        " ['eval', '--help'], ['sample', '--num', '0']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout


def test_help_lists_every_method_and_command():
    out = subprocess.run(
        [sys.executable, "-m", "stepdistill.cli", "--help"], capture_output=True, text=True, env=ENV, cwd=ROOT
    )
    assert out.returncode == 0
    for name in METHODS:
        assert f"  {name} " in out.stdout
    for command in ("train", "sample", "demo", "eval", "fd-digits"):
        assert command in out.stdout
    assert set(METHODS) == set(trainer_classes())


@pytest.mark.parametrize(
    "recipe, keys",
    [
        ("recipes/dmd2/digits.yaml", ["DMD2Config", "StudentConfig", "TrainConfig", "denoising_timesteps", "teacher"]),
        ("recipes/consistency/digits_lcm.yaml", ["ConsistencyConfig", "num_ddim_timesteps", "learning_rate"]),
        ("recipes/teacher/digits.yaml", ["DSMConfig", "label_dropout", "checkpoint_every"]),
    ],
)
def test_train_help_lists_the_methods_keys(recipe, keys, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", os.path.join(ROOT, recipe), "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for key in keys:
        assert key in out


def test_pipelines_register_in_either_import_order():
    """`import stepdistill` is light (no torch / diffusers) and still registers the pipeline classes with
    diffusers, whether diffusers is imported after it or before it."""
    out = run_python(
        "import sys, stepdistill\n"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules\n"
        "import diffusers\n"
        "print(diffusers.StepDistillClassPipeline.__name__, stepdistill.GuidedUNet2DModel.__name__)\n"
    )
    assert out.returncode == 0, out.stderr
    assert "StepDistillClassPipeline GuidedUNet2DModel" in out.stdout
    out = run_python("import diffusers, stepdistill\nprint(diffusers.StepDistillClassPipeline.__name__)\n")
    assert out.returncode == 0 and "StepDistillClassPipeline" in out.stdout, out.stderr
    # an availability check (find_spec, as transformers / accelerate do) before the import keeps the hook
    out = run_python(
        "import importlib.util, stepdistill\nassert importlib.util.find_spec('diffusers') is not None\n"
        "import diffusers\nprint(diffusers.StepDistillClassPipeline.__name__)\n"
    )
    assert out.returncode == 0 and "StepDistillClassPipeline" in out.stdout, out.stderr


# ----------------------------------------------------------------------------------------------------------
# sample / eval with a one-step export and with hub ids from the local cache
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_step_export(tmp_path_factory):
    """A one-step class-conditional export (the digits teacher's unet at t=999 with an LCMScheduler)."""
    from diffusers import UNet2DModel

    from stepdistill.assets import digits_teacher_path
    from stepdistill.export import student_scheduler
    from stepdistill.pipelines import StepDistillClassPipeline

    teacher = digits_teacher_path()
    with open(os.path.join(teacher, "scheduler", "scheduler_config.json")) as f:
        sched_cfg = json.load(f)
    unet = UNet2DModel.from_pretrained(teacher, subfolder="unet")
    pipe = StepDistillClassPipeline(
        unet=unet, scheduler=student_scheduler("lcm", sched_cfg, [999]), trained_timesteps=[999]
    )
    out = tmp_path_factory.mktemp("export") / "pipeline"
    pipe.save_pretrained(out)
    return str(out)


def test_sample_uses_the_exports_own_timesteps(one_step_export, tmp_path, capsys):
    from diffusers import DiffusionPipeline
    from PIL import Image

    out = tmp_path / "s.png"
    assert main(["sample", "--model", one_step_export, "--num", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 step(s) at timesteps [999]" in printed and "DDIM" not in printed
    pipe = DiffusionPipeline.from_pretrained(one_step_export)
    ref = pipe(class_labels=torch.arange(4), generator=torch.Generator().manual_seed(0), output_type="pt").images
    from stepdistill.utils import save_image_grid

    save_image_grid(ref * 2 - 1, str(tmp_path / "ref.png"), nrow=10, scale=4)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "ref.png")))
    # an explicit --steps samples the export's network with DDIM instead, and says so
    assert main(["sample", "--model", one_step_export, "--num", "2", "--steps", "2", "--out", str(out)]) == 0
    assert "2 DDIM steps" in capsys.readouterr().out


def fake_hub_cache(cache, repo_id, folder):
    """Put ``folder`` in a hub cache layout (models--org--name/refs/main + snapshots/<commit>/) as a download does."""
    commit = "0" * 40
    root = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return root / "snapshots" / commit


def test_hub_ids_load_from_the_local_cache_offline(one_step_export, tmp_path, monkeypatch, capsys):
    """HF_HUB_OFFLINE: a cached hub id is used from the cache (sample, eval --pipeline); a missing one is a
    one-line error at once (tested in test_cli_errors.py)."""
    cache = tmp_path / "hub"
    snapshot = fake_hub_cache(cache, "someorg/onestep", one_step_export)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    from stepdistill.models.loading import resolve_model_path

    assert resolve_model_path("someorg/onestep") == str(snapshot)
    assert main(["sample", "--model", "someorg/onestep", "--num", "2", "--out", str(tmp_path / "s.png")]) == 0
    assert "timesteps [999]" in capsys.readouterr().out
    code = main(
        ["eval", "--pipeline", "someorg/onestep", "--reference", "digits", "--num-samples", "65"]
        + ["--batch-size", "65", "--out", str(tmp_path / "eval")]
    )
    assert code == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["pipeline_kind"] == "class" and metrics["fd_digits"] > 0


def test_eval_summary_prints_every_metric(tmp_path, capsys):
    """KID (a dict: mean, std, subsets, subset size) is printed with the other metrics (it used to be dropped)."""
    from test_eval import noise_images, random_inception_weights, write_pngs

    weights = random_inception_weights(tmp_path)
    gen = write_pngs(tmp_path / "gen", noise_images(4, seed=1))
    ref = write_pngs(tmp_path / "ref", noise_images(4, seed=2))
    argv = ["eval", "--pipeline", str(gen), "--reference", str(ref), "--metrics", "kid,pr", "--num-samples", "4"]
    argv += ["--batch-size", "4"]
    argv += ["--kid-subset-size", "2", "--inception-weights", str(weights), "--cache-dir", str(tmp_path / "c")]
    assert main(argv + ["--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{") :])
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert summary == saved
    assert set(summary["kid"]) == {"mean", "std", "subsets", "subset_size"}
    assert "precision" in summary and "recall" in summary and summary["inception_resize"] == "torchmetrics"


# ----------------------------------------------------------------------------------------------------------
# non-finite steps are reported
# ----------------------------------------------------------------------------------------------------------


def test_skipped_nonfinite_steps_are_reported_at_the_end(tmp_path, capsys):
    from test_trainer_base import NaNTrainer

    from stepdistill.config import build_config
    from stepdistill.trainers.dsm import DSMConfig

    cfg = dict(output_dir=str(tmp_path), resolution=8, block_out_channels=[8, 16], attention_levels=[False, False])
    cfg.update(norm_num_groups=4, global_batch=4, max_steps=4, checkpoint_every=0, max_nonfinite=3)
    t = NaNTrainer(build_config(DSMConfig, {**cfg, "progress": True}))
    t.bad_calls = {2, 4}
    t.train()
    captured = capsys.readouterr()
    assert "2 step(s) skipped for a non-finite loss or gradient" in captured.out
    assert "nonfinite=2" in captured.err  # the progress bar's count


def test_hub_id_resolution_distinguishes_missing_path_from_unreachable_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    from stepdistill.models import loading

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(FileNotFoundError, match="path './org/name' does not exist"):
        loading.resolve_model_path("./org/name", key="teacher")
    monkeypatch.setattr(loading, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(FileNotFoundError, match="not in the local hub cache.*not reachable"):
        loading.resolve_model_path("org/name", key="teacher")
    monkeypatch.setattr(loading, "_hub_reachable", lambda timeout=3.0: True)
    assert loading.resolve_model_path("org/name") == "org/name"  # downloading is allowed and possible
    with pytest.raises(FileNotFoundError, match="allow_download: true"):
        loading.resolve_model_path("org/name", allow_download=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        loading.resolve_model_path("org/name")
