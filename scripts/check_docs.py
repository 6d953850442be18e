"""Run every documented command with tiny budgets: ``make check-docs`` (``python scripts/check_docs.py``).

Commands come from README.md's code blocks (``bash`` blocks: one command per line, ``\\`` continuations joined;
``python`` blocks: run as scripts) and from every recipe's header comment (the leading ``#`` lines; a command may
start mid-line after prose, and continues over the next comment line when the line ends in ``\\``). They run in
a scratch copy of the repository's tracked files (a fresh clone: no ``outputs/``; a command such as
``cp ... stepdistill/assets/...`` changes the copy only), with that copy's ``stepdistill`` on ``PYTHONPATH``.

Budgets: ``stepdistill train`` gets ``max_steps=2`` (progressive: one update per round; multiphase consistency:
one per stage), no checkpoints or sample grids; ``demo``, ``eval``, ``fd-digits`` and ``sample`` get small sample
counts; ``make demo`` runs the command the Makefile runs (``stepdistill demo``). A python block that reads
``outputs/<run>/...`` which no command made first runs the recipe whose ``output_dir`` is ``outputs/<run>``.

A launcher line for any recipe (``accelerate launch ... --config <recipe>``) runs recipes/dmd2/digits.yaml on 2 CPU
processes (``ACCELERATE_USE_CPU=1``, ``--num_processes 2``) with the documented launcher flags / config file.

Skipped, with the reason printed: commands with other placeholders, real-model recipes (a hub-id teacher:
tests/test_real_recipes.py runs each on a tiny twin of its teacher), FSDP launcher configs (accelerate needs an
accelerator for FSDP) and ``make test`` (the test suite itself).
Exit status 1 if any command fails; ``--list`` prints the plan without running anything.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MAKE_TARGETS = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M) if (ROOT / "Makefile").is_file() else []
# where a command starts inside a line of prose (recipe headers) or of a shell block
COMMAND_START = re.compile(
    r"(?<![\w/.-])(stepdistill (?:train|eval|sample|demo|fd-digits|--help|--version)\b|accelerate launch\b"
    r"|python (?:-m )?[\w./-]+|cp -r " + "".join(f"|make {re.escape(t)}\\b" for t in MAKE_TARGETS) + ")"
)
SAMPLE_RECIPE = "recipes/dmd2/digits.yaml"  # what a launcher line's "<recipe>" runs
TINY_TRAIN = ["checkpoint_every=0", "sample_every=0", "progress=false"]
TINY_FLAGS = {
    "demo": ["--max-steps", "2", "--num-samples", "128"],
    "eval": ["--num-samples", "128", "--batch-size", "128"],
    "fd-digits": ["--steps", "1", "2", "--num-samples", "128"],
    "sample": ["--num", "8"],  # no --steps: an export samples with its own timesteps unless --steps is given
}


@dataclass
class Command:
    source: str  # "README.md:22" or "recipes/dmd2/toy2d.yaml:6"
    text: str  # as documented
    kind: str = "shell"  # "shell" or "python"
    argv: list = field(default_factory=list)  # what runs (tiny budget); empty when skipped
    skip: str = ""  # the reason, when skipped
    env: dict = field(default_factory=dict)  # extra environment for the run


# ------------------------------------------------------------------------------------------------ extraction
def _join_continuations(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    pending = None
    for lineno, text in lines:
        pending = (pending[0], pending[1] + " " + text.strip()) if pending else (lineno, text.rstrip())
        if pending[1].endswith("\\"):
            pending = (pending[0], pending[1][:-1].rstrip())
            continue
        out.append(pending)
        pending = None
    if pending is not None:
        out.append(pending)
    return out


def _strip_command(text: str) -> str:
    """Drop a shell comment and the prose punctuation after a command: ``... <recipe>).`` -> ``... <recipe>``."""
    text = re.sub(r"\s+#.*$", "", text).strip()
    while text and (text[-1] in ".,;:" or (text.endswith(")") and text.count("(") < text.count(")"))):
        text = text[:-1].rstrip()
    return text


def readme_commands(readme: Path) -> list[Command]:
    """Shell commands and python blocks of README.md's fenced code blocks."""
    lines = readme.read_text(encoding="utf-8").splitlines()
    out: list[Command] = []
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        lang, start = m.group(1), i + 1
        j = start
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        body = [(n + 1, lines[n]) for n in range(start, j)]
        if lang in ("bash", "sh", "shell"):
            for lineno, text in _join_continuations(body):
                text = _strip_command(text)
                if text and COMMAND_START.match(text):
                    out.append(Command(f"{readme.name}:{lineno}", text))
        elif lang == "python":
            out.append(Command(f"{readme.name}:{start + 1}", "\n".join(t for _, t in body), kind="python"))
        i = j + 1
    return out


def recipe_commands(recipe: Path, root: Path = ROOT) -> list[Command]:
    """Commands in a recipe's header comment (the ``#`` lines before the first key)."""
    header = []
    for n, line in enumerate(recipe.read_text(encoding="utf-8").splitlines(), 1):
        if not line.startswith("#"):
            break
        header.append((n, line[1:]))
    out = []
    for lineno, text in _join_continuations(header):
        m = COMMAND_START.search(text)
        if m:
            out.append(Command(f"{recipe.relative_to(root)}:{lineno}", _strip_command(text[m.start() :])))
    return out


def extract(root: Path = ROOT) -> list[Command]:
    """Teacher recipes' commands first (the others distil their outputs), then README's shell commands, the other
    recipes' commands, and README's python blocks last (they read what the commands wrote)."""
    readme = readme_commands(root / "README.md")
    recipes = sorted((root / "recipes").glob("*/*.yaml"), key=lambda p: (p.parent.name != "teacher", str(p)))
    from_recipes = [c for r in recipes for c in recipe_commands(r, root)]
    return (
        [c for c in from_recipes if c.source.startswith("recipes/teacher/")]
        + [c for c in readme if c.kind == "shell"]
        + [c for c in from_recipes if not c.source.startswith("recipes/teacher/")]
        + [c for c in readme if c.kind == "python"]
    )


# ------------------------------------------------------------------------------------------------ budgets
def _recipe_values(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f) or {}


def tiny_train_overrides(recipe: dict) -> list[str]:
    """key=value overrides that shrink a recipe's run to a couple of updates (sizes only)."""
    if recipe.get("method") == "progressive":  # max_steps is derived from the rounds
        out = ["steps_per_round=1"] + (["guided_steps=1"] if recipe.get("guided") else [])
    elif recipe.get("multiphase_steps"):
        stages = len(recipe["multiphase_steps"])
        out = [f"max_steps={stages}", f"multiphase_steps={[1] * stages}"]
    elif recipe.get("method") == "disback":  # two degradation iterations (two nodes), one of backtracking
        out = ["max_steps=3", "degradation_steps=2", "degradation_nodes=2", "backtrack_every=1"]
    else:
        out = ["max_steps=2"]
    if recipe.get("regression_weight"):
        out += ["regression_pairs=4", "regression_steps=2", "regression_batch=2"]
    return out + TINY_TRAIN


def plan(cmd: Command, root: Path = ROOT) -> Command:
    """Fill ``argv`` (what runs, with tiny budgets) or ``skip`` (why not)."""
    py = sys.executable
    if cmd.kind == "python":
        cmd.argv = [py, "-c", cmd.text]
        return cmd
    text = cmd.text
    if cmd.text.startswith("accelerate launch"):  # a launcher line for any recipe: run it on the digits one
        this = cmd.source.rsplit(":", 1)[0]
        text = text.replace("<recipe>", SAMPLE_RECIPE).replace("<this file>", this)
    placeholders = re.findall(r"<[^>]*>", text)
    if placeholders:
        cmd.skip = "placeholder arguments (" + ", ".join(placeholders) + ")"
        return cmd
    words = shlex.split(text)
    if words[:2] == ["make", "test"]:
        cmd.skip = "the test suite itself (run make test)"
        return cmd
    if words[:2] == ["make", "demo"]:  # what the Makefile's demo target runs, without the venv install
        words = ["stepdistill", "demo", "--out", "outputs/demo"]
    if words[0] == "make":
        cmd.skip = f"make target {words[1]!r} has no tiny-budget form here"
        return cmd
    if words[0] == "cp":
        cmd.argv = words
        return cmd
    if words[0] == "python":
        cmd.argv = [py, *words[1:]]
        return cmd
    config = _config_arg(words)
    if words[:2] == ["accelerate", "launch"] or words[1] == "train":
        if config is None:
            cmd.skip = "no --config recipe"
            return cmd
        cmd.skip = _hub_recipe(root / config)
        if cmd.skip:
            return cmd
        tiny = tiny_train_overrides(_recipe_values(root / config))
        fsdp = _launcher_config(words, root).get("distributed_type") == "FSDP"
        if words[0] == "accelerate" and fsdp:
            cmd.skip = "an FSDP launcher config: accelerate refuses FSDP without an accelerator (CUDA, XPU, ...)"
            return cmd
        if words[0] == "accelerate":  # on CPU (2 processes): the launcher and its config file, not the GPUs
            cmd.env = {"ACCELERATE_USE_CPU": "1"}
            cmd.argv = ["accelerate", "launch", "--num_processes", "2", *_drop_num_processes(words[2:]), *tiny]
        else:
            cmd.argv = [py, "-m", "stepdistill.cli", *words[1:], *tiny]
        return cmd
    cmd.argv = [py, "-m", "stepdistill.cli", *words[1:], *TINY_FLAGS.get(words[1], [])]
    return cmd


def _drop_num_processes(words: list[str]) -> list[str]:
    out, skip = [], False
    for w in words:
        if skip:
            skip = False
        elif w == "--num_processes":
            skip = True
        elif not w.startswith("--num_processes="):
            out.append(w)
    return out


def dedupe(commands: list[Command]) -> list[Command]:
    """The first of identical commands (a teacher recipe's command is repeated in its students' headers)."""
    seen, out = set(), []
    for c in commands:
        if (c.kind, c.text) not in seen:
            seen.add((c.kind, c.text))
            out.append(c)
    return out


def _launcher_config(words: list[str], root: Path) -> dict:
    """The accelerate config file a launch line names (``--config_file``), read as YAML; {} without one."""
    for i, w in enumerate(words[:-1]):
        if w == "--config_file" and (root / words[i + 1]).is_file():
            return _recipe_values(root / words[i + 1])
    return {}


def _config_arg(words: list[str]) -> str | None:
    for i, w in enumerate(words):
        if w == "--config" and i + 1 < len(words):
            return words[i + 1]
        if w.startswith("--config="):
            return w.split("=", 1)[1]
    return None


def _hub_recipe(path: Path) -> str:
    teacher = str(_recipe_values(path).get("teacher", ""))
    if HUB_ID.match(teacher) and not teacher.startswith(("outputs/", "./")):
        return (
            f"real-model recipe (teacher {teacher}: hub weights and GPUs); tests/test_real_recipes.py runs it on a "
            "tiny twin of that teacher"
        )
    return ""


def producers(code: str, scratch: Path, root: Path = ROOT) -> list[Command]:
    """Training commands for the ``outputs/<run>`` folders a python block reads that do not exist yet."""
    out = []
    for run in sorted(set(re.findall(r"[\"'](outputs/[\w.-]+)/", code))):
        if (scratch / run).exists():
            continue
        for recipe in sorted((root / "recipes").glob("*/*.yaml")):
            if str(_recipe_values(recipe).get("output_dir", "")).rstrip("/") == run:
                rel = recipe.relative_to(root)
                out.append(plan(Command(f"(makes {run} for a README snippet)", f"stepdistill train --config {rel}")))
                break
    return out


# ------------------------------------------------------------------------------------------------ running
def scratch_copy(root: Path, dest: Path) -> None:
    """The repository's tracked files (a fresh clone's content), or every file but outputs / venvs / caches."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, check=True, capture_output=True, text=True)
        files = [f for f in listed.stdout.split("\0") if f and (root / f).is_file()]
    except (subprocess.CalledProcessError, FileNotFoundError):
        skip = {".git", ".venv", "outputs", "__pycache__", ".pytest_cache", ".ruff_cache"}
        files = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not skip & set(p.parts)]
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / f, dest / f)


def run(cmd: Command, scratch: Path, timeout: int) -> tuple[bool, float, str]:
    env = dict(os.environ, PYTHONPATH=str(scratch), HF_HUB_OFFLINE="1", MPLBACKEND="Agg", **cmd.env)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # the venv's scripts
    start = time.time()
    try:
        r = subprocess.run(cmd.argv, cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, time.time() - start, f"timed out after {timeout} s"
    return r.returncode == 0, time.time() - start, f"exit {r.returncode}\n" + (r.stdout + r.stderr)[-3000:]


def _first_line(c: Command) -> str:
    line = c.text.splitlines()[0] if c.text else ""
    return line if c.kind == "shell" else f"python block: {line}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--list", action="store_true", help="print the commands and what would run; run nothing")
    p.add_argument("--keep", default="", help="run in this folder (kept) instead of a temporary scratch copy")
    p.add_argument("--timeout", type=int, default=900, help="seconds per command")
    args = p.parse_args(argv)
    commands = dedupe([plan(c) for c in extract()])
    if args.list:
        for c in commands:
            what = f"SKIP ({c.skip})" if c.skip else "runs: " + shlex.join(c.argv[1:])[:160]
            print(f"{c.source}: {_first_line(c)}\n    {what}")
        return 0
    scratch = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="check_docs_"))
    scratch.mkdir(parents=True, exist_ok=True)
    scratch_copy(ROOT, scratch)
    print(f"scratch copy of the repository: {scratch}", flush=True)
    failed, skipped, passed = [], [], 0
    queue = list(commands)
    while queue:
        c = queue.pop(0)
        if c.kind == "python":
            extra = producers(c.text, scratch)
            if extra:
                queue = [*extra, c, *queue]
                continue
        if c.skip:
            skipped.append(c)
            print(f"SKIP {c.source}: {_first_line(c)}\n     ({c.skip})", flush=True)
            continue
        ok, seconds, log = run(c, scratch, args.timeout)
        print(f"{'PASS' if ok else 'FAIL'} {c.source} ({seconds:.0f} s): {_first_line(c)}", flush=True)
        if ok:
            passed += 1
        else:
            failed.append(c)
            print("     " + log.replace("\n", "\n     "), flush=True)
    print(f"\ncheck-docs: {passed} passed, {len(failed)} failed, {len(skipped)} skipped")
    for c in failed:
        print(f"  FAILED {c.source}: {_first_line(c)}")
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
