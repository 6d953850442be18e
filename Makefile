# stepdistill: the README's commands. `make demo` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stepdistill-installed

.PHONY: install test test-fast lint demo bench bench-quality bench-kernels bench-exact check-docs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# every test (the slow end-to-end ones included), then the 15 slowest
test: install
	$(PY) -m pytest -q --durations=15

# the inner loop: everything but the tests marked slow (see tests/conftest.py)
test-fast: install
	$(PY) -m pytest -q -m "not slow" --durations=15

lint: install
	$(PY) -m ruff check stepdistill tests benchmarks

# DMD2 on the bundled digits teacher: one-step generator, diffusers export, samples.png and metrics.json
demo: install
	$(VENV)/bin/stepdistill demo --out outputs/demo

bench: install
	$(PY) benchmarks/bench_sampling.py --out outputs/bench/sampling.md
	$(PY) benchmarks/bench_trainers.py --out outputs/bench/trainers.md
	$(PY) benchmarks/bench_consistency.py --out outputs/bench/consistency.md
	$(PY) benchmarks/bench_memory.py --out outputs/bench/memory.md

# FD-digits vs network evaluations: teacher DDIM steps and every trainer's digits student (about 20 min on CPU)
bench-quality: install
	$(PY) benchmarks/bench_quality.py --out outputs/bench/quality

# Every method distils an exact Gaussian-mixture teacher (2-D ring, 10 modes in 64-D), two seeds: sliced Wasserstein
# ratio to the teacher's 100-step floor and per-mode shares (about 40 min on a shared 2-core CPU). ARGS=--quick: 2-D,
# one seed, a quarter of the iterations (a few minutes).
bench-exact: install
	$(PY) benchmarks/bench_exact.py --out outputs/bench/exact.md $(ARGS)

# Fused sampling kernels: eager torch vs torch.compile vs Triton (the Triton column needs CUDA; CPU reports the
# reference and compiled paths only). Add ARGS=--quick on CPU.
bench-kernels: install
	$(PY) benchmarks/bench_kernels.py --out outputs/bench/kernels.md $(ARGS)

# One prepared GPU check (about 10 min on one H200): kernels, CUDA graphs, real-size bf16 training, sampling;
# writes outputs/gpu/gpu_check.{md,json}, exits 1 if a check failed. ARGS=--dry-run checks the script on CPU.
.PHONY: gpu-check
gpu-check: install
	$(PY) benchmarks/gpu_check.py --out outputs/gpu $(ARGS)

# Every command in README.md's code blocks and in the recipes' header comments, with tiny budgets, in a scratch copy
# of the repository (real-model recipes are skipped with the reason printed). ARGS=--list prints the plan only.
check-docs: install
	$(PY) scripts/check_docs.py $(ARGS)

clean:
	rm -rf outputs
