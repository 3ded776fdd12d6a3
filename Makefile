# Quick start:  make train   (embedded default, CPU)   |   make test   (the test suite)
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.installed
# The Triton interpreter runs kernels on the CPU when no CUDA device is present; decided when
# the test recipe runs (after the environment exists), not when make starts.
INTERP  = $$($(PY) -c "import torch; print('' if torch.cuda.is_available() else 'TRITON_INTERPRET=1')")

.PHONY: venv train test test-fast lint-py38 bench clean

venv: $(STAMP)

$(STAMP): setup.py constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -c constraints.txt -e '.[test]'
	$(PIP) install -q -c constraints.txt --no-build-isolation 'deepspeed==0.19.8'
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/vit-accel train --config vit-ti-digits

lint-py38: $(STAMP)
	$(PY) tools/check_py38.py

test: $(STAMP) lint-py38
	env $(INTERP) $(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m pytest -q tests/bench -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
