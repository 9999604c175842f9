# trecsys — the commands a person runs. `make demo` and `make test` are the README's quick start.
#
# The project installs into ./.venv, or into the virtual environment you have activated
# (VIRTUAL_ENV), so a CUDA build of torch you installed yourself is left alone.
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PY := $(VENV)/bin/python
TREC := $(VENV)/bin/trec
STAMP := $(VENV)/.trecsys-installed
# 2.13.0 is the build CI machines install from local disk in seconds; other specs download gigabytes.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-fast demo bench bench-scale bench-quality study lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,tracking]"
	@touch $(STAMP)

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# The whole pipeline on the embedded shop; ends with the evaluation table and a few users' lists.
demo: install
	$(TREC) run -c configs/demo.yaml --show 3

bench: install
	$(PY) scripts/bench.py $(BENCH)

# Every stage on generated Amazon-2023-shaped reviews (scripts/gen_amazon2023.py): wall, CPU, peak RSS per
# stage. N = 1M by default; SCALE="--n 1e7" when the machine is otherwise idle. See README "At scale".
bench-scale: install
	$(PY) scripts/bench_scale.py $(SCALE)

# Quality tables per dataset (popularity, item-kNN, RecBole SASRec when RECBOLE_PYTHON is set, trecsys
# scratch/transfer/fusion, the same pretraining on the target alone where there is a source, and what
# `auto` keeps), both evaluation rules, 95% CIs; the schedule is an option:
# BENCH_QUALITY="--schedule full --datasets office"; a lever: --set DATASET:KEY=VALUE.
bench-quality: install
	$(PY) scripts/bench_quality.py $(BENCH_QUALITY)

# Transfer study on the shared Kitchen→Food data (skips when absent): one table of test NDCG@10 and
# Recall@10 per variant in runs/kitchen_to_food_study/study/. CPU-sized caps; e.g. STUDY="--epochs 20 device=cuda".
# Its own run folder: its teacher reads Kitchen alone, the config's run pretrains on Kitchen and Food.
study: install
	$(PY) scripts/study_transfer.py run_dir=runs/kitchen_to_food_study $(STUDY)

lint: install
	$(PY) -m ruff check trecsys tests scripts

clean:
	rm -rf runs .pytest_cache .ruff_cache
