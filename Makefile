# stepdistill: the README's commands. `make demo` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stepdistill-installed

.PHONY: install test lint demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check stepdistill tests benchmarks

# Until the distillation trainers land, the demo samples the bundled digits teacher and measures it.
demo: install
	$(VENV)/bin/stepdistill sample --steps 50 --guidance-scale 1.0 --num 40 --out outputs/demo/teacher_50steps.png
	$(VENV)/bin/stepdistill fd-digits --steps 1 4 10 25 50 --num-samples 1000 --out outputs/demo/metrics.json

bench: install
	$(PY) benchmarks/bench_sampling.py --out outputs/bench/sampling.md

clean:
	rm -rf outputs
