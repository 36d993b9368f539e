# `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# Eight simulated CPU devices, so the sharded code paths run without an accelerator.
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export TF_CPP_MIN_LOG_LEVEL ?= 3
DEMO_DIR ?= runs/demo

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# Pretrain the tiny NoPE model, then search its temperatures at 4x the length. A finished run is
# found complete and skipped when `make demo` runs again.
demo: setup
	$(PY) -m nopejax.train --config configs/tiny.py --workdir $(DEMO_DIR)/pretrain
	$(PY) -m nopejax.train --config configs/tiny_search.py --workdir $(DEMO_DIR)/search \
	    --config.search.base=$(DEMO_DIR)/pretrain
	@echo "Pretraining: $(DEMO_DIR)/pretrain (metrics.jsonl, tensorboard/, checkpoints/)"
	@echo "Search:      $(DEMO_DIR)/search (temperatures.json, temperatures.png, search_init.json)"

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
