# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmguard-installed
DATA ?= ../shared/data/cifar10_jpg.tar.xz

.PHONY: demo test lint format bench-calibration bench-serving proto serve clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[calibrate,dev]'
	touch $(STAMP)

# Calibrate the embedded backdoored CIFAR-10 model, serve it, query it through tritonclient,
# print what the guard did and shut the server down (calibrate/demo.py).
demo: $(STAMP)
	$(VENV)/bin/mmguard demo --out runs/demo

test: $(STAMP)
	$(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Regenerate guard/_proto from proto/ (tests/test_proto.py checks the committed copy is current).
proto: $(STAMP)
	$(PY) scripts/gen_proto.py

# Serve the artifact `make demo` wrote: gRPC on 8001, Prometheus metrics on 8002.
serve: $(STAMP)
	$(VENV)/bin/mmguard serve runs/demo --port 8001 --metrics-port 8002

bench-calibration: $(STAMP)
	$(PY) -m benchmarks.calibration --data $(DATA)

# Guard vs unguarded serving on the artifact bench-calibration writes (.cache/bench/artifact_a).
bench-serving: $(STAMP)
	$(PY) -m benchmarks.serving

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
