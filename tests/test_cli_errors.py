"""The bad-input table: every expected user error of the command line is one line ``error: ...`` on stderr that
names the key / path / value, exit code 2, no traceback, and no file outside the run's folder changes.

Each row runs ``stepdistill.cli.main`` in this process (so the table stays fast) with the working directory,
TORCH_HOME, the hub cache and the stepdistill cache inside the test's folder, so the snapshot of that folder
covers every file the command could have touched."""

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from stepdistill.cli import main

RUN = "run"  # the run's own folder inside the workspace: the only place a failed command may write


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A workspace: cwd, caches and inputs live here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "sd_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def snapshot(root):
    """{relative path: sha256} of every file under ``root`` except the run's folder."""
    out = {}
    for dirpath, _, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel == RUN or rel.startswith(RUN + os.sep):
            continue
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def write_png(path, size=16, mode="RGB", seed=0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    channels = 3 if mode == "RGB" else 1
    arr = torch.randint(0, 256, (size, size, channels), generator=g, dtype=torch.uint8).squeeze(-1).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def recipe(ws, method="dmd2", **keys):
    keys = {"method": method, "output_dir": RUN, "max_steps": 1, "global_batch": 2, "progress": "false", **keys}
    lines = [f"{k}: {v}" for k, v in keys.items()]
    path = ws / f"{method}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def pixel_teacher(ws, in_channels=3):
    """A tiny unconditional pixel-space UNet2DModel teacher folder with a DDIM scheduler."""
    from diffusers import DDIMScheduler
    from tiny_models import tiny_unet2d

    folder = ws / f"teacher{in_channels}"
    tiny_unet2d(class_conditional=False, in_channels=in_channels, sample_size=8).save_pretrained(folder / "unet")
    DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing").save_pretrained(folder / "scheduler")
    return str(folder)


def checkpointed_dsm_run(ws):
    """A 2-step toy DSM run with checkpoints, its recipe; the latest checkpoint's weights zeroed inside."""
    path = recipe(
        ws,
        "dsm",
        dataset="toy2d:gmm8",
        block_out_channels="[16, 16]",
        attention_levels="[false, false]",
        checkpoint_every=1,
        max_steps=2,
    )
    assert main(["train", "--config", path]) == 0
    ckpt = ws / RUN / "checkpoints" / "step_0000002" / "model.safetensors"
    data = bytearray(ckpt.read_bytes())
    data[8:64] = b"\0" * 56  # the safetensors header
    ckpt.write_bytes(bytes(data))
    return path


def digit_folder_with_a_truncated_file(ws, n=65):
    for i in range(n):
        path = write_png(ws / "gen" / f"{i:03d}.png", mode="L", seed=i)
    truncate(path)
    return str(ws / "gen")


# Each row: (id, setup(ws) -> argv, words the one-line message must contain). A setup may create inputs.
ROWS = [
    ("recipe missing", lambda ws: ["train", "--config", "nope.yaml"], ["nope.yaml", "does not exist"]),
    (
        "duplicate yaml key",
        lambda ws: ["train", "--config", recipe(ws, learning_rate="1e-4\nlearning_rate: 2e-4")],
        ["duplicate key 'learning_rate'"],
    ),
    ("unknown method", lambda ws: ["train", "--config", recipe(ws, method="dmd3")], ["method", "dmd3"]),
    ("unknown key", lambda ws: ["train", "--config", recipe(ws), "learning_rat=1"], ["learning_rat", "learning_rate"]),
    ("missing dataset", lambda ws: ["train", "--config", recipe(ws), "dataset=no_such_dir"], ["dataset", "no_such"]),
    ("bad toy name", lambda ws: ["train", "--config", recipe(ws), "dataset=toy2d:gmm9"], ["dataset", "gmm9"]),
    (
        "empty prompt file",
        lambda ws: (ws.joinpath("p.txt").write_text("\n \n"), ["train", "--config", recipe(ws), "dataset=p.txt"])[1],
        ["empty prompt file", "p.txt"],
    ),
    (
        "image folder without images",
        lambda ws: (ws.joinpath("imgs").mkdir(), ["train", "--config", recipe(ws), "dataset=imgs"])[1],
        ["dataset", "no images", "imgs"],
    ),
    (
        "channel mismatch between data and teacher",
        lambda ws: (write_png(ws / "rgb" / "a.png"), ["train", "--config", recipe(ws), "dataset=rgb"])[1],
        ["dataset", "rgb", "3 channels", "in_channels=1"],
    ),
    (
        "toy data with an image teacher",
        lambda ws: ["train", "--config", recipe(ws, method="sim"), "dataset=toy2d:gmm8"],
        ["dataset", "toy2d:gmm8", "teacher"],
    ),
    (
        "truncated image",
        lambda ws: (
            write_png(ws / "imgs" / "a.png"),
            truncate(write_png(ws / "imgs" / "b.png", seed=1)),
            ["train", "--config", recipe(ws), "dataset=imgs", f"teacher={pixel_teacher(ws)}"],
        )[-1],
        ["b.png", "skip_unreadable_images"],
    ),
    ("nan learning rate", lambda ws: ["train", "--config", recipe(ws), "learning_rate=.nan"], ["learning_rate", "nan"]),
    ("zero learning rate", lambda ws: ["train", "--config", recipe(ws), "learning_rate=0"], ["learning_rate", "> 0"]),
    ("negative learning rate", lambda ws: ["train", "--config", recipe(ws), "learning_rate=-1e-4"], ["learning_rate"]),
    ("negative fake_lr", lambda ws: ["train", "--config", recipe(ws), "fake_lr=-1"], ["fake_lr", "-1"]),
    ("negative warm-up", lambda ws: ["train", "--config", recipe(ws), "warmup_steps=-5"], ["warmup_steps", "-5"]),
    ("negative clipping", lambda ws: ["train", "--config", recipe(ws), "max_grad_norm=-1"], ["max_grad_norm", "-1"]),
    (
        "checkpoint_every=-1",
        lambda ws: ["train", "--config", recipe(ws), "checkpoint_every=-1"],
        ["checkpoint_every", "-1"],
    ),
    (
        "resume of a missing checkpoint",
        lambda ws: ["train", "--config", recipe(ws), "resume=run/checkpoints/step_0000099"],
        ["resume", "step_0000099"],
    ),
    (
        "resume latest without a checkpoint",
        lambda ws: ["train", "--config", recipe(ws), "resume=latest"],
        ["no checkpoint", "checkpoints"],
    ),
    (
        "corrupt checkpoint",  # (resume=latest would fall back to the intact step 1, and say so)
        lambda ws: ["train", "--config", checkpointed_dsm_run(ws), "resume=run/checkpoints/step_0000002"],
        ["step_0000002", "damaged"],
    ),
    (
        "teacher path missing",
        lambda ws: ["train", "--config", recipe(ws), "teacher=./no_teacher"],
        ["teacher", "no_teacher", "does not exist"],
    ),
    (
        "teacher folder without a network",
        lambda ws: (ws.joinpath("empty_teacher").mkdir(), ["train", "--config", recipe(ws), "teacher=empty_teacher"])[
            1
        ],
        ["empty_teacher", "config.json"],
    ),
    (
        "teacher hub id offline",
        lambda ws: ["train", "--config", recipe(ws), "teacher=no-org/no-model"],
        ["teacher", "no-org/no-model", "not in the local hub cache", "HF_HUB_OFFLINE"],
    ),
    (
        "teacher hub id, downloads off",
        lambda ws: ["train", "--config", recipe(ws), "teacher=no-org/no-model", "allow_download=false"],
        ["teacher", "no-org/no-model", "allow_download"],
    ),
    ("sample --num 0", lambda ws: ["sample", "--num", "0"], ["--num", "0"]),
    ("sample missing model", lambda ws: ["sample", "--model", "./nowhere"], ["--model", "nowhere", "does not exist"]),
    (
        "eval missing reference",
        lambda ws: ["eval", "--pipeline", str(write_png(ws / "gen" / "a.png").parent), "--reference", "noref"],
        ["--reference", "noref", "does not exist"],
    ),
    (
        "eval truncated image",
        lambda ws: ["eval", "--pipeline", digit_folder_with_a_truncated_file(ws), "--num-samples", "65"],
        ["064.png", "cannot read image"],
    ),
    (
        "eval hub-id pipeline offline",
        lambda ws: ["eval", "--pipeline", "no-org/no-pipe", "--reference", "digits"],
        ["--pipeline", "no-org/no-pipe", "not in the local hub cache"],
    ),
    (
        "eval FID with too few samples",
        lambda ws: [
            "eval",
            "--pipeline",
            str(write_png(ws / "gen" / "a.png").parent),
            "--reference",
            str(write_png(ws / "ref" / "a.png").parent),
            "--metrics",
            "fid",
            "--num-samples",
            "1",
        ],
        ["2049", "reference"],
    ),
    (
        "eval CLIP without pretrained weights",
        lambda ws: [
            "eval",
            "--pipeline",
            str(write_png(ws / "gen" / "a.png").parent),
            "--reference",
            "digits",
            "--metrics",
            "clip",
            "--prompts",
            str((ws.joinpath("p.txt").write_text("a cat\n"), ws / "p.txt")[1]),
            "--clip-model",
            "ViT-B-32",
        ],
        ["ViT-B-32", "random weights"],
    ),
    (
        "eval CLIP pretrained tag without --allow-download",
        lambda ws: [
            "eval",
            "--pipeline",
            str(write_png(ws / "gen" / "a.png").parent),
            "--metrics",
            "clip",
            "--prompts",
            str((ws.joinpath("p.txt").write_text("a cat\n"), ws / "p.txt")[1]),
            "--clip-model",
            "ViT-B-32",
            "--clip-pretrained",
            "openai",
        ],
        ["openai", "--allow-download"],
    ),
    (
        "eval Inception weights that are not plain tensors",
        lambda ws: [
            "eval",
            "--pipeline",
            str(write_png(ws / "gen" / "a.png").parent),
            "--reference",
            str(write_png(ws / "ref" / "a.png").parent),
            "--metrics",
            "pr",
            "--num-samples",
            "1",
            "--inception-weights",
            str((torch.save({"w": torch.zeros(1), "code": print}, ws / "w.pth"), ws / "w.pth")[1]),
        ],
        ["w.pth", "plain tensors"],
    ),
]


@pytest.mark.parametrize("setup, words", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_one_error_line(ws, capsys, setup, words):
    argv = setup(ws)
    capsys.readouterr()
    before = snapshot(ws)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors (after the same one-line message)
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in err
    assert snapshot(ws) == before


def test_argparse_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", "--num", "0"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and "--num" in err


def test_debug_shows_the_traceback(ws):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        main(["--debug", "sample", "--model", "./nowhere"])
    out = subprocess.run(
        [sys.executable, "-m", "stepdistill.train", "--config", "missing.yaml", "--debug"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))},
    )
    assert out.returncode == 1 and "Traceback" in out.stderr and "missing.yaml" in out.stderr


def test_unreadable_images_can_be_skipped_and_are_counted(ws, capsys):
    write_png(ws / "imgs" / "a.png")
    write_png(ws / "imgs" / "c.png", seed=2)
    truncate(write_png(ws / "imgs" / "b.png", seed=1))
    argv = ["train", "--config", recipe(ws), "dataset=imgs", f"teacher={pixel_teacher(ws)}"]
    assert main(argv + ["skip_unreadable_images=true", "denoising_timesteps=[999]"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 unreadable image(s)" in out and "b.png" in out
