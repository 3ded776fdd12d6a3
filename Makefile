# Quick start:  make train   (embedded default, CPU)   |   make test   (the test suite)
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.installed
# The Triton interpreter runs kernels on the CPU when no CUDA device is present; decided when
# the test recipe runs (after the environment exists), not when make starts.
INTERP  = $$($(PY) -c "import torch; print('' if torch.cuda.is_available() else 'TRITON_INTERPRET=1')")

.PHONY: venv envs train test test-fast lint-py38 bench clean test-torch20
# pytest-xdist workers: one per core (each takes one intra-op thread, tests/conftest.py)
JOBS    ?= auto

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt constraints-build.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -c constraints.txt -e '.[test]'
	$(PIP) install -q -c constraints.txt --no-build-isolation 'deepspeed==0.19.8'
	# mmcv 1.x, a test oracle: pure Python (no compiled ops), its setup.py needs setuptools < 81
	MMCV_WITH_OPS=0 $(PIP) install -q -c constraints.txt --build-constraint constraints-build.txt 'mmcv==1.7.2'
	# DeepSpeed's CPU collective op, built now (while the other environment downloads) with this
	# environment's ninja, where the ZeRO tests load it (tests/conftest.py); they build it if this fails.
	env PATH="$(abspath $(VENV))/bin:$$PATH" DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$(CURDIR)/build/torch_extensions" \
		$(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()" >/dev/null 2>&1 || \
		echo "DeepSpeed's CPU op did not build now; the ZeRO tests will try again"
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/vit-accel train --config vit-ti-digits

lint-py38: $(STAMP)
	$(PY) tools/check_py38.py

# Both test environments build at once (each mostly waits on downloads and disk), then the suite
# runs on every core, then the IPU tests under torch 2.0.1.
envs:
	$(MAKE) -j2 $(STAMP) $(STAMP20)

# Python writes its bytecode caches (gitignored __pycache__ folders; pytest's rewritten test modules
# among them) in the test runs even where the environment turns them off: otherwise every test
# process compiles the package, and every pytest process rewrites every test module, again.
test test-fast test-torch20: export PYTHONDONTWRITEBYTECODE :=

LOG20 ?= build/test-torch20.log

# The torch 2.0.1 pass (one process in its own interpreter, one intra-op thread as each xdist worker)
# runs beside the main pass, its output in $(LOG20), printed after the main pass; either failing
# fails the recipe. (Its commands are spelled out, not `$(MAKE) test-torch20`: make runs a line
# naming $(MAKE) even under `make -n`.) The IPU backend's own tests run in that pass only: PopTorch
# pins torch 2.0.1, so it is the IPU's environment (`make test-fast` runs them in this one). The main
# pass holds every other test, the cluster tests' torchrun and SLURM jobs among them; the heavy modules
# start the workers' shares (tests/conftest.py).
test: envs lint-py38
	@mkdir -p $(dir $(LOG20)); rm -f $(LOG20) $(LOG20).rc; \
	{ export OMP_NUM_THREADS=1; { $(TEST20_IPU) && $(TEST20_TRUST); } > $(LOG20) 2>&1; echo $$? > $(LOG20).rc; } & \
	env $(INTERP) $(PY) -m pytest -q -rs -n $(JOBS) --dist worksteal --durations=25 \
		$(addprefix --ignore=,$(IPU_ONLY_TESTS)) tests; \
	main=$$?; wait; echo "== torch 2.0.1 pass (make test-torch20, beside the main pass):"; cat $(LOG20); \
	test $$main -eq 0 && test "$$(cat $(LOG20).rc)" = 0

# The inner loop: everything but the multi-process and end-to-end runs (marker `slow`).
test-fast: $(STAMP)
	env $(INTERP) $(PY) -m pytest -q -rs -n $(JOBS) --dist worksteal -m "not slow and not bench" tests

# The IPU path under torch 2.0.1, the torch PopTorch 3.3/3.4 pin: Python 3.8 (pyenv's, else
# python3.8, else python3), PyPI's torch 2.0.1 (CUDA 11.7 build: 2.3 min, 4.5 GB cold), the IPU
# tests with the PopTorch double, the op coverage check and the digits recipe end to end, and the
# strict checkpoint reader against every generated pickle attack (its in-process tests).
PY38    ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.8.*/bin/python3.8) $(shell command -v python3.8) python3)
VENV20  ?= .venv-torch20
STAMP20 := $(VENV20)/.installed
IPU_ONLY_TESTS := tests/test_ipu.py tests/test_ipu_ops.py tests/test_ipu_resume.py tests/test_ipu_feed.py tests/test_ipu_poprun.py
IPU_TESTS := $(IPU_ONLY_TESTS) tests/test_distributed_exit.py

$(STAMP20): constraints-torch20.txt
	test -x $(VENV20)/bin/python || $(PY38) -m venv $(VENV20)
	$(VENV20)/bin/pip install -q --upgrade 'pip<25'
	$(VENV20)/bin/pip install -q -c constraints-torch20.txt torch==2.0.1 numpy pillow pyyaml scikit-learn \
		matplotlib tqdm safetensors webdataset pytest
	touch $(STAMP20)

TEST20_IPU   = env PYTHONPATH=$(CURDIR) $(VENV20)/bin/python -m pytest -q -p no:cacheprovider $(IPU_TESTS)
TEST20_TRUST = env PYTHONPATH=$(CURDIR) $(VENV20)/bin/python -m pytest -q -p no:cacheprovider -m "not slow" tests/test_trust.py

test-torch20: $(STAMP20)
	$(TEST20_IPU)
	$(TEST20_TRUST)

bench: $(STAMP)
	$(PY) -m pytest -q tests/bench -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
