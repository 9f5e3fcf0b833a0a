# The two commands a newcomer runs: `make demo` (the pipeline end to end on embedded data) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
CIESS := $(PY) -m ciess_prod.cli

.PHONY: setup demo test lint bench-ml1m clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

demo: setup
	$(CIESS) train --config configs/demo.yaml
	$(CIESS) evaluate --checkpoint runs/demo/checkpoint --split test
	$(CIESS) search --config configs/smoke.yaml

lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	$(VENV)/bin/pytest -q

bench-ml1m: setup
	$(PY) bench/ml1m_baselines.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
