# Every target creates .venv when it is missing; nothing else needs to be installed by hand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-all demo benchmark drill clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, so pip's own configuration (a local wheel cache, a CUDA index) decides its build
	$(PY) -m pip install "torch>=2.3" "torchvision>=0.18"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# the optional SAM 2 family (docs/sam2.md): an sdist built against the installed torch, no CUDA extension
install-sam2: $(STAMP)
	SAM2_BUILD_CUDA=0 $(PY) -m pip install --no-build-isolation -e ".[sam2]"

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

demo: $(STAMP)
	$(PY) train.py --config conf/demo.yaml

benchmark: $(STAMP)
	$(PY) benchmarks/decode.py

# The drill (issue 12): every real task config (conf/*.yaml) through train.py, evaluate.py and
# evaluate.py predict, on ViT-B stand-in checkpoints (random weights, official formats) and tiny
# trees in the real dataset layouts; 20-35 min on the shared 2-core CPU. On a GPU:
# ALIGNSAM_DRILL_ACCELERATOR=gpu make drill. Extra pytest options: DRILL_ARGS="-s -k voc".
drill: $(STAMP)
	$(PY) -m pytest -q -m slow tests/drill $(DRILL_ARGS)

clean-venv:
	rm -rf $(VENV)
