# Every target installs what it needs into a local venv ($(VENV)) by itself.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision are pinned here (not in pyproject, which declares ranges) to a pair that
# imports together; override e.g. `make test TORCH="torch torchvision"`.
TORCH ?= torch==2.14.1 torchvision==0.29.1
SEED ?= 0
PYTEST_ARGS ?=

.PHONY: install test test-slow demo bench lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev,onnx]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/p4q demo --seed $(SEED)

bench: install
	PY=$(abspath $(PY)) benchmarks/run_all.sh

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info
