# LENS — common entry points. `make test` and `make demo` set up .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

.PHONY: setup test demo bench-train clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch/torchvision first, pinned to the builds that lie on this workplace's disk
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) -m lens_train.demo_core --out demo

# Stage-2 step at the real dimensions (d=4096 head + SAM ViT-H decoder, bf16); meant for a GPU.
bench-train: setup
	$(PY) benchmarks/bench_train_step.py --preset official --batch-size 2 --steps 20

clean:
	rm -rf demo .pytest_cache
