"""The notebooks run as shipped: each is executed top to bottom with nbclient in a kernel on this interpreter,
from the repository root, writing its outputs to a temporary folder; no cell may fail and the sample grid must
be among the outputs (an image/png display)."""

from __future__ import annotations

import base64
import json
import sys
import time
from pathlib import Path

import nbclient  # the [dev] extra installs nbclient, nbformat and ipykernel
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["quickstart.ipynb", "text_to_image.ipynb"]
# seconds per cell, generous for a shared machine: each notebook takes about a minute on 2 idle cores
CELL_TIMEOUT = 900
KERNEL = "stepdistill-test-python"


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    """A kernel spec that starts ipykernel on this very interpreter (not whatever ``python`` is on PATH or a user's
    own ``python3`` kernel)."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    return root


def _run(path: Path):
    nb = nbformat.read(path, as_version=4)
    # the kernel reports its interpreter and working directory first, so the test can check both
    nb.cells.insert(0, nbformat.v4.new_code_cell("import os, sys\nprint(sys.executable)\nprint(os.getcwd())"))
    client = nbclient.NotebookClient(
        nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT, allow_errors=False, resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()
    return nb


def _outputs(nb):
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, kernel_dir, tmp_path, monkeypatch):
    path = ROOT / "notebooks" / name
    committed = path.read_text()
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))  # the kernel spec above comes first
    # the kernel inherits this environment: the notebooks write under $STEPDISTILL_NOTEBOOK_OUT
    monkeypatch.setenv("STEPDISTILL_NOTEBOOK_OUT", str(tmp_path))
    start = time.perf_counter()
    nb = _run(path)
    seconds = time.perf_counter() - start

    outputs = _outputs(nb)
    assert not [out for out in outputs if out.output_type == "error"]
    executable, cwd = "".join(out.get("text", "") for out in nb.cells[0].outputs).split()
    assert executable == sys.executable, f"the kernel ran {executable}, not {sys.executable}"
    assert Path(cwd) == ROOT
    # the sample grid the notebook wrote is the image it displayed
    stem = name.removesuffix(".ipynb")
    grid = tmp_path / stem / "samples.png"
    assert grid.is_file() and (tmp_path / stem / "pipeline" / "model_index.json").is_file()
    pngs = [out["data"]["image/png"].strip() for out in outputs if "image/png" in out.get("data", {})]
    assert base64.b64encode(grid.read_bytes()).decode() in pngs, "the sample grid was not displayed as image/png"
    assert path.read_text() == committed, "executing the notebook changed the repository copy"
    print(f"{name}: {seconds:.0f} s")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_clean(name):
    """The repository copy has no outputs (it is reproduced by running it) and a tagged parameter cell first."""
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])
