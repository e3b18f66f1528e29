# LENS — common entry points. `make test` and `make demo` set up .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

.PHONY: setup test test-fast demo demo-core pretrain-toy reproduce-table1 reproduce-table2 reproduce-table3 bench-train bench-train-memory bench-cache bench-loader bench-gpu probe-features probe-grounding probe-referent clean

# reproduce-table1/2/3: the default PRESET=toy needs nothing (synthetic data, the shipped toy backbones,
# CPU), as every command's default; PRESET=paper is the paper's setting and needs DATA_ROOT, MLLM, SAM.
# SEEDS=0,1,2 repeats Table 2's runs per seed.
PRESET    ?= toy
SEEDS     ?= 0
DATA_ROOT ?=
MLLM      ?=
SAM       ?=
DEVICE    ?=
REPRO_ARGS = --preset $(PRESET) --data-root "$(DATA_ROOT)" --mllm "$(MLLM)" --sam "$(SAM)" $(if $(DEVICE),--device $(DEVICE))

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch/torchvision first, pinned to the builds that lie on this workplace's disk
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

test: setup
	sh tests/setup_browser.sh
	$(PY) -m pytest -q tests

# The suite without the tests marked slow (the end-to-end runs of a minute or more); its time: RESULTS.md, Test suite.
test-fast: setup
	sh tests/setup_browser.sh
	$(PY) -m pytest -q -m "not slow" tests

# The whole pipeline on the synthetic world with the shipped toy backbones: cache -> train -> eval on
# held-out synthetic:val -> results/demo.md + figures.
demo: setup
	$(PY) -m lens_train.reproduction demo

# Remake the shipped toy backbones (cache/lens_cache/backbones/toy_weights) with lens-toy (toy/lens_toy):
# SAM, then LLaVA's three stages, then export.
# Resumable: rerun after a kill. TOY_WORK keeps checkpoints and logs.
TOY_WORK ?= toy_work
pretrain-toy: setup
	$(VENV)/bin/lens-toy pretrain-sam --work $(TOY_WORK)
	$(VENV)/bin/lens-toy pretrain-llava --work $(TOY_WORK)
	$(VENV)/bin/lens-toy export --work $(TOY_WORK) --command "make pretrain-toy"

# The LENS core alone on planted synthetic tensors (no cache): a one-minute sanity check of the model.
demo-core: setup
	$(PY) -m lens_train.reproduction.demo_core --out demo

# Table 1 (general abilities kept vs a LISA-style fine-tune): PRESET=toy (results/table1-toy.md, CPU), or
# PRESET=paper with DATA_ROOT, MLLM, SAM as for Table 2 plus MME_ROOT (and LISA_MLLM, a llava-hf folder, optional).
MME_ROOT  ?=
LISA_MLLM ?=
reproduce-table1: setup
	$(PY) -m lens_train.reproduction table1 $(REPRO_ARGS) $(if $(MME_ROOT),--mme-root "$(MME_ROOT)") $(if $(LISA_MLLM),--lisa-mllm "$(LISA_MLLM)")

reproduce-table2: setup
	$(PY) -m lens_train.reproduction table2 $(REPRO_ARGS) --seeds $(SEEDS)

reproduce-table3: setup
	$(PY) -m lens_train.reproduction table3 $(REPRO_ARGS)

# Stage-2 step at the real dimensions (d=4096 head + SAM ViT-H decoder, bf16); meant for a GPU.
bench-train: setup
	$(PY) benchmarks/bench_train_step.py --preset official --batch-size 2 --steps 20

# Peak memory of the stage-2 step at the real dimensions by batch size, counted on the CPU (no GPU needed;
# ~10 min on 2 cores): which batch sizes fit 10, 24, 40 and 80 GB.
bench-train-memory: setup
	$(PY) benchmarks/bench_train_memory.py --preset official --preset official-fp32master --batch-sizes 1,2,8

# Every real-dimension benchmark on one H100/H200 in at most 8 minutes (bench-cache, bench-train at batch 2
# and 8, bench-loader with 1 and 8 workers): JSON lines in work/bench-gpu (or $OUT), summary printed.
bench-gpu: setup
	bash benchmarks/bench_gpu.sh

# Loader throughput from a Zarr store at d=4096 (fake backbone, real store and loader).
bench-loader: setup
	$(PY) benchmarks/bench_loader.py --hidden-size 4096 --images 64 --workers 8 --batch-size 2 --batches 200

# Stage-1 cache build at the real dimensions (LLaVA-1.5-7B + SAM ViT-H, random weights, bf16) vs a naive
# per-query baseline and the GPU's FLOP ceiling; needs a GPU. BACKBONE=llava-1.5 (default)|qwen2vl-2b|onevision-7b.
# CPU=1: the same build path on the CPU in float32 (this CPU has no fast bf16), only the decoder layers the build
# runs, 2 images after 1 untimed, one thread (~20 GB peak, ~15 min for LLaVA-1.5-7B: BENCHMARKS.md).
bench-cache: setup
	$(PY) benchmarks/bench_cache.py --scale real $(if $(BACKBONE),--backbone $(BACKBONE)) $(if $(CPU),\
	  --device cpu --dtype float32 --truncate --baseline-queries 0 --images 2 --warmup-images 1 --batch-size 1 \
	  --threads 1,--images 32)

# Diagnostics (RESULTS.md, "What learns on CPU"): patch colour recoverable from the cached features, by layer;
# whether the head alone learns grounding from the demo's stores (run `make demo` first).
probe-features: setup
	$(PY) benchmarks/probes/probe_features.py $(if $(MLLM),--mllm "$(MLLM)") $(if $(SAM),--sam "$(SAM)")

probe-grounding: setup
	$(PY) benchmarks/probes/probe_grounding.py

# Does the frozen MLLM's last prompt token know which object the question picks out? A linear probe by
# layer and task on held-out scenes (toy/README.md, "The referent probe"); MLLM=... for another backbone,
# TOKEN=mean for the mean of the question's tokens instead of the last one.
probe-referent: setup
	$(VENV)/bin/lens-toy probe-referent $(if $(MLLM),--mllm "$(MLLM)") $(if $(TOKEN),--token $(TOKEN)) --out results/probe-referent$(if $(TOKEN),-$(TOKEN))

clean:
	rm -rf demo work .pytest_cache
