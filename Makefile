# JointDiT front door. Every target builds .venv on first use (and again when
# requirements.txt changes) and runs through that interpreter.
#
# Extra config overrides go in ARGS, e.g.  make train CFG=configs/stage_a.yaml ARGS="train.lr=1e-4"

SHELL := /bin/bash
PY := .venv/bin/python
VENV := .venv/.installed
export PYTHONPATH := $(CURDIR)
export GRADIO_ANALYTICS_ENABLED := False

# Variables the scripts read from the environment (they name them in their errors).
export CKPT REF PROMPT NEG_PROMPT STEPS SEED WV WA WI WI_FIRST WT WNT IMAGE VIDEO AUDIO OUT MODE
export DIR PORT UI_AUTH NUM_GPUS GPU_GB HOST_GB LONG FORCE_KEEP_USER_ENVS ACCELERATE_CONFIG

.PHONY: help demo test lint synth tiny-models fetch-models cache-train cache-val train \
	final-train-a final-train-b final-train-b-keepenv plan-memory infer ui eval eval-avsync15 \
	probe bench bench-attn bench-parity docs-figures clean-venv

help:
	@echo "make demo            the whole job on the embedded synthetic default (no network, no GPU)"
	@echo "make test            the offline CPU test suite"
	@echo "make lint            ruff check + format check"
	@echo "make synth           generate the synthetic sounding-video set"
	@echo "make tiny-models     train the tiny embedded codecs on the synthetic set"
	@echo "make fetch-models    download the pretrained SVD / AudioLDM2 / CLIP parts"
	@echo "make cache-train     encode the train split to latents (CFG=configs/avsync15.yaml)"
	@echo "make cache-val       encode the val split to latents"
	@echo "make train CFG=...   train with any config"
	@echo "make final-train-a   Stage A through the memory-aware wrapper"
	@echo "make final-train-b   Stage B through the memory-aware wrapper"
	@echo "make final-train-b-keepenv   the same, keeping every JOINTDIT_* knob you set"
	@echo "make plan-memory     print the memory planner's table (GPU_GB=48 NUM_GPUS HOST_GB ACCELERATE_CONFIG)"
	@echo "make bench-planner   the planner's count vs torch's MemTracker at the published size"
	@echo "make infer CKPT=... REF=...   sample a sounding video"
	@echo "make ui              Gradio app on 127.0.0.1"
	@echo "make eval DIR=...    sync metrics of a folder of generated clips"
	@echo "make eval-avsync15 CKPT=...  JointDiT vs the cascade on a test split: FVD, FAD, ImageBind, ... (docs/evaluation.md)"
	@echo "make probe CKPT=...  does a checkpoint use the other modality? (matched vs swapped loss)"
	@echo "make bench           attention benchmark (time, peak memory)"
	@echo "make bench-parity    a fresh model vs SVD's and AudioLDM2's own pipelines"
	@echo "make docs-figures    the demo's pictures and table for README and docs/ (DIR=...)"
	@echo "make clean-venv      remove .venv (the next target rebuilds it)"

# pip byte-compiles every installed file on one core; compileall does the same on all of them
# (101 s instead of 132 s for the whole step on 2 cores). One test file in the torch wheel is
# Python 3.12 only and does not compile: ignored, as pip ignores it.
$(VENV): requirements.txt
	@test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check --no-compile -r requirements.txt
	@$(PY) -m compileall -qq -j 0 .venv/lib || true
	@touch $@

clean-venv:
	rm -rf .venv

test: $(VENV)
	$(PY) -m pytest -q tests

lint: $(VENV)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

demo: $(VENV)
	$(PY) scripts/demo.py --config $(or $(CFG),configs/demo/demo.yaml) $(ARGS)

synth: $(VENV)
	$(PY) scripts/make_synth.py --config $(or $(CFG),configs/demo/base.yaml) $(ARGS)

tiny-models: $(VENV)
	$(PY) scripts/train_tiny_codecs.py --config $(or $(CFG),configs/demo/base.yaml) $(ARGS)

fetch-models: $(VENV)
	$(PY) scripts/fetch_models.py --config $(or $(CFG),configs/avsync15.yaml) $(ARGS)

cache-train: $(VENV)
	$(PY) scripts/cache_latents.py --config $(or $(CFG),configs/avsync15.yaml) --split train $(ARGS)

cache-val: $(VENV)
	$(PY) scripts/cache_latents.py --config $(or $(CFG),configs/avsync15.yaml) --split val $(ARGS)

train: $(VENV)
	$(PY) scripts/train.py --config $(or $(CFG),configs/stage_a.yaml) $(ARGS)

final-train-a: $(VENV)
	$(PY) scripts/final_train.py --config $(or $(CFG),configs/stage_a.yaml) $(ARGS)

final-train-b: $(VENV)
	$(PY) scripts/final_train.py --config $(or $(CFG),configs/stage_b.yaml) $(ARGS)

final-train-b-keepenv: $(VENV)
	FORCE_KEEP_USER_ENVS=1 $(PY) scripts/final_train.py --config $(or $(CFG),configs/stage_b.yaml) $(ARGS)

plan-memory: $(VENV)
	$(PY) scripts/plan_memory.py --config $(or $(CFG),configs/stage_b.yaml) $(ARGS)

.PHONY: bench-planner
bench-planner: $(VENV)
	$(PY) scripts/bench_planner.py $(ARGS)

infer: $(VENV)
	$(PY) scripts/infer.py --config $(or $(CFG),configs/infer.yaml) $(ARGS)

ui: $(VENV)
	$(PY) scripts/ui.py --config $(or $(CFG),configs/infer.yaml) $(ARGS)

eval: $(VENV)
	$(PY) scripts/eval.py $(if $(CFG),--config $(CFG)) $(ARGS)

eval-avsync15: $(VENV)
	$(PY) scripts/eval_avsync15.py $(if $(CFG),--config $(CFG)) $(ARGS)

probe: $(VENV)
	$(PY) scripts/probe.py $(if $(CFG),--config $(CFG)) $(ARGS)

bench bench-attn: $(VENV)
	$(PY) scripts/bench_attn.py $(if $(CFG),--config $(CFG)) $(ARGS)

bench-parity: $(VENV)
	$(PY) scripts/bench_parity.py $(ARGS)

docs-figures: $(VENV)
	$(PY) scripts/docs_figures.py $(ARGS)

# On a GPU machine: the published architectures with random weights, measured (docs/memory.md).
.PHONY: gpu-check
gpu-check: $(VENV)
	$(PY) scripts/gpu_check.py $(ARGS)
