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
	$(CIESS) compress --plan runs/smoke/plans/c0.90 --checkpoint runs/smoke/models/c0.90 --dtype int8 \
		--out runs/smoke/artifact-c0.90-int8
	$(CIESS) export --artifact runs/smoke/artifact-c0.90-int8 --format onnx --out runs/smoke/c0.90-int8.onnx

lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	$(VENV)/bin/pytest -q

bench-ml1m: setup
	$(PY) bench/ml1m_baselines.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
