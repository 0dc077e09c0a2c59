# Entry points. Each target sets itself up on a fresh machine: a virtualenv in .venv, the
# pinned packages of requirements.txt and, when the venv has no torch yet, $(TORCH_SPEC)
# (the CPU build torch==2.13.0 that pip finds locally). GPU users: install a CUDA torch into
# .venv first (`python3 -m venv .venv && .venv/bin/pip install torch`), or run
# `make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" setup`.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)

.PHONY: setup demo lint test clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install $(TORCH_SPEC)
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/snakemake --cores all
	$(BIN)/snakemake --cores all --report results/report.html

# Lint first (pyproject.toml [tool.ruff] and [tool.snakefmt]), then the test suite.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/snakefmt --check Snakefile rules/

test: lint
	$(BIN)/python -m pytest -n 2 --dist loadfile tests

# The docs site (docs/ + mkdocs.yml): render the measured figures and the generated tables
# (tools/render_docs.py), then build site/ with warnings as errors.
.PHONY: docs
docs: $(STAMP)
	$(BIN)/python tools/render_docs.py
	$(BIN)/mkdocs build --strict

# Benchmarks (none is part of `make test`). Each bench-* target writes one measurement file,
# docs/measurements/<name>.json: its figures plus command, date (UTC), machine and package versions
# (nullcov/measurement.py); tools/render_docs.py renders docs/performance.md's tables from them.
# Side files (tables, profiles, scratch, model folders) go to benchmarks/ (ignored by git) or /tmp.

# Speed/memory: bare pipeline vs nullcov vs the legacy method in one invocation, tiny model and
# SD-1.5 architecture (random weights, no download); docs/measurements/bench-cpu.json (-gpu.json),
# table and profile in benchmarks/. CPU: ~5 min.
.PHONY: bench bench-gpu
bench: $(STAMP)
	$(BIN)/python tools/benchmark.py --device cpu --profile

bench-gpu: $(STAMP)
	$(BIN)/python tools/benchmark.py --device cuda --profile

# A feature job held to mem_mb below its unchunked need (SD-1.5 architecture, CPU, ~5 min, ~8 GB
# RAM and disk under /tmp): peak RSS and bit-equality with the unchunked run;
# docs/measurements/feature-memory.json.
.PHONY: bench-feature-memory
bench-feature-memory: $(STAMP)
	$(BIN)/python tools/feature_memory.py --mem-mb 5600 6000

# Storage side at SD-1.5 scale: merge peak RSS at 3/12/48 shards, merge GB/s vs the disk's
# sequential read, shard scratch, 100k/600k-prompt dry-runs. Writes ~5 GB under
# benchmarks/bench-scale-tmp (deleted after); docs/measurements/bench-scale.json.
.PHONY: bench-scale
bench-scale: $(STAMP)
	$(BIN)/python tools/bench_scale.py

# The merge, projection and eigh at FLUX.1 size from synthetic statistics (about 18 GB of scratch in
# benchmarks/bench-mmdit-scale-tmp, deleted after; 14 GB of memory for the merge; ~35 min), on one core:
# the eigh seconds are per core, what the plan's projection_cpu_seconds_at_3072 means;
# docs/measurements/bench-mmdit-scale.json.
.PHONY: bench-mmdit-scale
bench-mmdit-scale: $(STAMP)
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(BIN)/python tools/bench_mmdit_scale.py --proj-out

# How much of SD3's and FLUX's text stream is T5 padding, on the tiny built-ins (~1 min);
# docs/measurements/text-tokens.json.
.PHONY: text-tokens
text-tokens: $(STAMP)
	$(BIN)/python tools/bench_text_tokens.py

# Collection at SD3-medium size on the CPU (the real 2.0 B-parameter transformer, random weights, built
# once into benchmarks/sd3-medium-random, 8 GB) against the bare pipeline; ~16 GB of memory, ~10 min;
# docs/measurements/bench-sd3-collection.json.
.PHONY: bench-sd3-collection
bench-sd3-collection: $(STAMP)
	$(BIN)/python tools/bench_sd3_collection.py

# Text-only k/v statistics vs the whole-pipeline k/v-only job, SD-1.5 dims on the CPU (~4 min);
# docs/measurements/bench-text-only.json.
.PHONY: bench-text-only
bench-text-only: $(STAMP)
	$(BIN)/python tools/bench_text_only.py

# Overhead of nullcov.training.constraint's projection per training step, SD-1.5 architecture (CPU, random
# weights); docs/measurements/bench-training-128.json (~3 min), -512.json (~10 min, 7 GB RAM).
.PHONY: bench-training bench-training-512
bench-training: $(STAMP)
	$(BIN)/python tools/bench_training.py --resolution 128

bench-training-512: $(STAMP)
	$(BIN)/python tools/bench_training.py --resolution 512 --repeats 2 --no-interpolate

# A small run end to end (snakemake, SD-1.5 architecture, 64 px, 8 prompts x 8 steps, CPU) against
# the legacy method, each timed from start to exit; the model folder (3.9 GB) goes to
# benchmarks/small-run; docs/measurements/small-run.json. ~5 min per repeat, 3 repeats.
.PHONY: bench-small-run
bench-small-run: $(STAMP)
	$(BIN)/python tools/bench_small_run.py --repeats 3

# SLURM job arrays for the feature jobs: submit time with and without (200 one-prompt shards, node
# drained). Needs root: starts the one-node test cluster of tests/slurm_cluster.py (installs
# slurm-wlm + munge when missing); docs/measurements/slurm-arrays.json.
.PHONY: bench-slurm-arrays
bench-slurm-arrays: $(STAMP)
	$(BIN)/python tools/bench_slurm_arrays.py submit --shards 200 --jobs 200 --repeats 2

# The fault table (docs/performance.md#faults-what-a-long-run-on-a-shared-cluster-meets): time limit, memory,
# requeue, killed jobs, locks, full disks, interrupts, each caused for real and resumed to identical results
# (tests/workflow/test_faults.py, test_slurm.py with --bench-faults). Needs root (SLURM test cluster, tmpfs);
# ~15 min on 2 cores; docs/measurements/bench-faults.json.
.PHONY: bench-faults
bench-faults: $(STAMP)
	$(BIN)/python tools/bench_faults.py

# builtin:shapes, the shipped trained toy model: retrain it from scratch into nullcov/builtin/shapes
# (~25 min on 2 CPU cores; progress and ETA on stdout), and measure what it learned (evaluator
# accuracy per attribute, attention on the object; docs/measurements/bench-shapes.json).
.PHONY: train-shapes bench-shapes
train-shapes: $(STAMP)
	$(BIN)/python -m nullcov.shapes.train

bench-shapes: $(STAMP)
	$(BIN)/python tools/bench_shapes.py

# The fine-tune proof on builtin:shapes (docs/finetune-proof.md): statistics of the demo prompts, then
# every variant; writes docs/measurements/proof-shapes.json and the figures in docs/images/.
.PHONY: proof
proof: $(STAMP)
	$(BIN)/python tools/bench_proof.py

# The same, smaller (one seed, no learning-rate grid or control, 60 steps; ~5 min), for development.
.PHONY: proof-quick
proof-quick: $(STAMP)
	$(BIN)/python tools/bench_proof.py --quick

# After `make proof`: which attn2 linears of three variants change the preserved prompts, applied one
# kind at a time and all together (docs/measurements/proof-ablation.json; ~1 min).
.PHONY: proof-ablation
proof-ablation: $(STAMP)
	$(BIN)/python tools/proof_ablation.py

# The capacity hypothesis (docs/finetune-proof.md): the shapes model trained with a 256-wide text encoder
# (~35 min of 2 cores, once), then it and the shipped one through bench_shapes and the quick proof
# (~15 min; docs/measurements/proof-capacity.json).
CAPACITY_MODEL := results-capacity/width-256
.PHONY: proof-capacity
proof-capacity: $(CAPACITY_MODEL)/training.json
	$(BIN)/python tools/bench_capacity.py --wide $(CAPACITY_MODEL)

$(CAPACITY_MODEL)/training.json: | $(STAMP)
	$(BIN)/python -m nullcov.shapes.train --text-hidden-size 256 --out $(CAPACITY_MODEL)

clean:
	rm -rf results logs benchmarks resources .snakemake

# Once per user: link profiles/slurm into Snakemake's profile folder, so that
# `snakemake --profile slurm` finds it (`--profile profiles/slurm` works without this).
SNAKEMAKE_PROFILES ?= $(or $(XDG_CONFIG_HOME),$(HOME)/.config)/snakemake
.PHONY: slurm-profile
slurm-profile:
	@mkdir -p "$(SNAKEMAKE_PROFILES)"
	@if [ -e "$(SNAKEMAKE_PROFILES)/slurm" ] && [ ! -L "$(SNAKEMAKE_PROFILES)/slurm" ]; then \
		echo "$(SNAKEMAKE_PROFILES)/slurm exists and is not a link: move it away first" >&2; exit 1; fi
	ln -sfn "$(CURDIR)/profiles/slurm" "$(SNAKEMAKE_PROFILES)/slurm"
	@echo "snakemake --profile slurm now reads $(CURDIR)/profiles/slurm/config.yaml"
