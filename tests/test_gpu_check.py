"""benchmarks/gpu_check.py (``make gpu-check``): its ``--dry-run`` runs every section's code on CPU with tiny
configs, so that the GPU script cannot rot between the rare runs on a GPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def _numbers(x):
    if isinstance(x, bool):
        return
    if isinstance(x, (int, float)):
        yield x
    elif isinstance(x, str) and x in ("nan", "inf", "-inf"):  # how the report writes a non-finite float
        yield float(x)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _numbers(v)
    elif isinstance(x, list):
        for v in x:
            yield from _numbers(v)


@pytest.mark.slow  # the whole dry run: about 70 s of CPU, minutes of wall time on a loaded machine
def test_dry_run_writes_every_section_with_finite_numbers(tmp_path):
    out = tmp_path / "gpu"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    # a generous budget: a loaded CI machine must not turn items into "skipped (time budget)"
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--budget-scale", "20"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    md = (out / "gpu_check.md").read_text()
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["meta"]["dry_run"] is True and report["failed"] == []
    assert list(report["sections"]) == list(gpu_check.SECTIONS)
    for name, sec in report["sections"].items():
        assert gpu_check.TITLES[name] in md
        assert sec["status"] == "ok", (name, sec["errors"], sec["skipped"])
        assert sec["rows"], name
        numbers = list(_numbers(sec["rows"]))
        assert numbers and all(math.isfinite(v) for v in numbers), name

    kernels = report["sections"]["kernels"]["rows"]
    ops = {r["op"] for r in kernels}
    assert len(ops) == 5  # every fused op of bench_kernels.make_ops
    assert {(r["dtype"], r["latent"]) for r in kernels} == {
        (d, lat) for d in ("float32", "bfloat16") for lat in ("SD1.5", "SDXL")
    }
    for r in kernels:  # eager and compiled timings, the compiled path's error against the torch reference
        assert r["eager_gbps"] > 0 and r["compile_gbps"] > 0 and r["compile_max_err"] < 1e-2, r
    if report["meta"]["triton"] != "not installed":  # the Triton path, through its CPU interpreter
        tri = [r for r in kernels if "triton_max_err" in r]
        assert {(r["op"], r["dtype"]) for r in tri} == {(op, d) for op in ops for d in ("float32", "bfloat16")}
        assert all(r["triton_max_err"] <= (1e-3 if r["dtype"] == "float32" else 3e-2) for r in tri)

    graphs = report["sections"]["graphs"]["rows"]
    assert {(r["steps"], r["batch"]) for r in graphs} == {(1, 1), (1, 4), (4, 1), (4, 4)}
    assert all(r["finite"] and r["eager_ms"] > 0 for r in graphs)

    training = report["sections"]["training"]["rows"]
    assert [(r["recipe"], r["options"]) for r in training] == [(n, o) for n, _, o, _ in gpu_check.TRAIN_ROWS]
    for r in training:
        assert r["iterations"] == 3 and r["finite"] and r["nonfinite_skipped"] == 0, r
        assert r["s_per_it"] > 0 and r["model_state_mb"] > 0 and r["trainable_params_m"] > 0, r
    methods = {gpu_check._recipe(r["recipe"])["method"] for r in training}
    assert methods == {"dmd2", "consistency", "sim", "vsd", "progressive"}

    sampling = report["sections"]["sampling"]["rows"]
    assert {(r["steps"], r["compiled"]) for r in sampling} == {(s, c) for s in (1, 4, 3) for c in (False, True)}
    assert all(r["finite"] and r["images_per_s"] > 0 for r in sampling)


def test_a_failing_section_is_reported_and_exits_non_zero(tmp_path, monkeypatch):
    def crash(sec, ctx):
        sec.rows.append({"steps": 1, "batch": 1, "dtype": "float32", "eager_ms": 1.0})
        raise RuntimeError("boom on purpose")

    monkeypatch.setitem(gpu_check.RUNNERS, "graphs", crash)
    rc = gpu_check.main(["--dry-run", "--sections", "graphs", "--out", str(tmp_path)])
    assert rc == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failed"] == ["graphs"]
    sec = report["sections"]["graphs"]
    assert sec["status"] == "failed" and sec["rows"] and "boom on purpose" in sec["errors"][0]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "FAILED (graphs)" in md and "boom on purpose" in md


def test_unknown_section_is_a_one_line_error(tmp_path, capsys):
    assert gpu_check.main(["--dry-run", "--sections", "kernels,nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --sections") and "nope" in err[0]
    assert not (tmp_path / "gpu_check.json").exists()


def test_without_cuda_the_real_run_refuses_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no CUDA device") and "--dry-run" in err[0]
    assert not (tmp_path / "gpu_check.json").exists()


def test_the_written_configs_build_the_published_networks():
    """The real-size configs in the script give the published parameter counts (built on the meta device)."""
    import torch
    from diffusers import AutoencoderKL

    def count(net, skip=()):
        return sum(p.numel() for n, p in net.named_parameters() if not any(s in n for s in skip))

    expected = {"sd15": 859_520_964, "sd21": 865_910_724, "sdxl": 2_567_463_684}
    for kind, n in expected.items():
        assert count(gpu_check.build_net(gpu_check.ARCHS[kind]["net"], "meta")) == n, kind
    # DiT-XL/2: 675M in the paper; diffusers gives every block its own copy of the timestep / class embedding
    dit = gpu_check.build_net(gpu_check.ARCHS["dit"]["net"], "meta")
    one_copy = count(dit, skip=(".norm1.emb.",)) + count(dit.transformer_blocks[0].norm1.emb)
    assert round(one_copy / 1e6) == 675 and len(dit.transformer_blocks) == 28
    with torch.device("meta"):
        assert count(AutoencoderKL(**gpu_check.SDXL_VAE)) == 83_653_863
