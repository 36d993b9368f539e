# `make demo` and `make test` do all the set-up on a fresh machine.
# The pins need Python 3.12: python3.12 on PATH if it runs (a pyenv shim runs only where 3.12 is
# selected), else pyenv's newest 3.12 (pyenv root: PYENV_ROOT or ~/.pyenv); or name one:
# make test PYTHON=/path/to/python3.12.
PYTHON ?= $(firstword $(shell python3.12 -c '' 2>/dev/null && echo python3.12; \
    ls -d "$${PYENV_ROOT:-$$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | sort -rV))
NO_PYTHON = $(error No Python 3.12 found (python3.12 on PATH or under pyenv): install one or pass PYTHON=/path/to/python3.12)
# The bench environment (torch and transformers, no jax) keeps Python 3.11, for which its torch 2.13.0
# CPU wheel is at hand.
BENCH_PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
BENCH_VENV := .venv-bench
# Eight simulated CPU devices, so the sharded code paths run without an accelerator.
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export TF_CPP_MIN_LOG_LEVEL ?= 3
# The make targets run on the CPU; libtpu (installed for the TPU compile tests and `make plan`) would
# otherwise probe for a TPU and log errors. On an accelerator, run the python commands directly.
export JAX_PLATFORMS ?= cpu
DEMO_DIR ?= runs/demo
COMPARE_DIR ?= runs/compare

.PHONY: setup setup-dev setup-tpu setup-bench demo compare plan test bench clean

setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev
setup-tpu: $(VENV)/.installed-tpu
setup-bench: $(BENCH_VENV)/.installed

# pyproject.toml holds every pin. `make demo` needs the package alone; the tests add the dev extra (every
# optional extra's code runs in the suite) and libtpu (the TPU compile tests); `make plan` libtpu.
# A .venv of another Python than 3.12 is made anew (its pip would refuse the pins).
$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python3.12 || { rm -rf $(VENV) && $(or $(PYTHON),$(NO_PYTHON)) -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev,tpu]'
	touch $@

$(VENV)/.installed-tpu: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[tpu]'
	touch $@

# Pretrain the tiny NoPE model, search its temperatures at 4x the length, evaluate the model as
# trained, with a uniform temperature 1.5, and with the searched temperatures, and compare them.
# A finished training run is found complete and skipped when `make demo` runs again.
demo: setup
	$(PY) -m nopejax.train --config configs/tiny.py --workdir $(DEMO_DIR)/pretrain
	$(PY) -m nopejax.train --config configs/tiny_search.py --workdir $(DEMO_DIR)/search \
	    --config.search.base=$(DEMO_DIR)/pretrain
	$(PY) -m nopejax.evaluate --workdir $(DEMO_DIR)/pretrain
	$(PY) -m nopejax.evaluate --workdir $(DEMO_DIR)/pretrain --config.model.temperature=1.5
	$(PY) -m nopejax.evaluate --workdir $(DEMO_DIR)/search
	$(PY) -m nopejax.evaluate --compare $(DEMO_DIR)/pretrain $(DEMO_DIR)/pretrain/eval_c1.5 $(DEMO_DIR)/search \
	    --out $(DEMO_DIR)/compare
	@echo "Pretraining: $(DEMO_DIR)/pretrain (metrics.jsonl, tensorboard/, checkpoints/, eval/report.md)"
	@echo "Search:      $(DEMO_DIR)/search (temperatures.json, temperatures.png, eval/report.md)"
	@echo "Comparison:  $(DEMO_DIR)/compare (table and curves of the three)"

# The PyTorch side of the benchmark lives in its own environment, never in the main one: only the
# pins of pyproject.toml's bench extra, without nopejax and jax.
$(BENCH_VENV)/.installed: pyproject.toml
	test -d $(BENCH_VENV) || $(BENCH_PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet $$($(BENCH_VENV)/bin/python -c \
	    "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['bench'])")
	touch $@

# nopejax's train step (1 and 8 simulated devices) beside transformers' LlamaForCausalLM (docs/benchmarks.md).
bench: setup setup-bench
	$(PY) bench/vs_torch.py

# Compile a config's train step for a TPU slice here and print what one chip holds (needs libtpu,
# which setup-tpu installs; no TPU): make plan PLAN_CONFIG=configs/1b_search.py TOPOLOGY=v5e-8
PLAN_CONFIG ?= configs/1b.py
TOPOLOGY ?= v5e-256
plan: setup setup-tpu
	JAX_PLATFORMS=cpu $(PY) -m nopejax.plan --config $(PLAN_CONFIG) --topology $(TOPOLOGY)

# NoPE against RoPE (+ PI, NTK, YaRN, log-n zero-shot) and ALiBi, 3 seeds of the tiny model at 600
# steps, evaluated at 1x to 16x the training length; resumes what is done (README: the comparison).
compare: setup
	$(PY) -m nopejax.compare --config configs/tiny.py --out $(COMPARE_DIR)
	@echo "Table and plot: $(COMPARE_DIR)/compare.md, $(COMPARE_DIR)/compare.png"

test: setup-dev
	$(PY) -m pytest -q -n 2

clean:
	rm -rf $(VENV) $(BENCH_VENV) runs
