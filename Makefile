# Every target creates .venv when it is missing; nothing else needs to be installed by hand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-all demo benchmark clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, so pip's own configuration (a local wheel cache, a CUDA index) decides its build
	$(PY) -m pip install "torch>=2.3" "torchvision>=0.18"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

demo: $(STAMP)
	$(PY) train.py --config conf/demo.yaml

benchmark: $(STAMP)
	$(PY) benchmarks/decode.py

clean-venv:
	rm -rf $(VENV)
