# hvdsgd: two commands from a fresh machine.
#   make demo   set up .venv (dependencies, patched Horovod, hvdsgd), then train on 4 ranks
#   make test   the same set-up, the ruff gate (make lint), then every test tier (2 workers)
#   make test-fast  the unit tier only (pytest -m unit: in-process tests, at most 90 s on 2 cores)
#   make bench  every bench/ script (23 min on 2 cores), then the README's Results section
#   make bench-quick  every bench/ script in a reduced form, 2 at a time (minutes), into BENCH_OUT
#   make bench-gpu    on an NVIDIA GPU machine: throughput, techniques, occupancy on the GPU
# Each step leaves a stamp in .venv; a second run skips what is done and takes seconds.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
NP     ?= 4
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup demo lint test bench bench-quick bench-gpu bench-throughput bench-hogwild bench-occupancy bench-kfold clean distclean

setup: $(VENV)/.stamp-hvdsgd

$(PY):
	@echo "==> creating $(VENV) with $$($(PYTHON) --version)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.stamp-deps: requirements.txt | $(PY)
	@echo "==> installing Python dependencies (torch + torchvision are ~5.5 GB: about 3 min the first time)"
	$(PY) -m pip install -q -r requirements.txt
	@touch $@

$(VENV)/.stamp-horovod: $(VENV)/.stamp-deps scripts/build_horovod.sh
	@echo "==> Horovod (built once from its sdist, then reused from the cache)"
	scripts/build_horovod.sh $(PY)
	@touch $@

$(VENV)/.stamp-hvdsgd: $(VENV)/.stamp-horovod setup.py CMakeLists.txt pyproject.toml $(wildcard csrc/*)
	@echo "==> building hvdsgd (hvdsgd._C from csrc/) in editable mode"
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@touch $@

demo: setup
	@echo "==> horovodrun -np $(NP) python -m hvdsgd.train   (cnn on digits)"
	horovodrun -np $(NP) python -m hvdsgd.train --overwrite --out runs/demo

# The lint gate first (ruff, configured in pyproject.toml), then every test tier.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Two pytest-xdist workers on 2 cores (one process waits on its children a third of the time),
# a test file's tests on one worker (its module-scoped runs are made once); WORKERS=0: one process.
WORKERS ?= 2
test: lint
	$(PY) -m pytest $(if $(filter 0,$(WORKERS)),,-n $(WORKERS) --dist loadfile)

# Every bench/ script, in full (bench/results/, then the README's Results section from them), or
# in its reduced form (BENCH_OUT, default bench/results: *-quick.* files, never in the README).
BENCH     := throughput scaling techniques strategies hogwild occupancy kfold lottery elastic
BENCH_OUT ?= bench/results
# SETUP= skips the set-up (the test suite runs bench-quick with its own Python: PY=...)
SETUP     ?= setup

# The unit tier alone (README, Tests); `make test` runs every tier.
.PHONY: test-fast
test-fast: $(SETUP)
	$(PY) -m pytest -m unit

bench: $(SETUP)
	@for b in $(BENCH); do echo "==> bench/$$b.py"; $(PY) bench/$$b.py || exit 1; done
	$(PY) bench/readme.py

# The reduced forms check the scripts, not the figures: BENCH_JOBS of them at once (default 2, one
# per core), each one's output printed whole when it ends.
BENCH_JOBS ?= 2
bench-quick: $(SETUP)
	@$(MAKE) --no-print-directory -j$(BENCH_JOBS) --output-sync=target $(addprefix bench-quick-,$(BENCH))

bench-quick-%:
	@echo "==> bench/$*.py --quick"; $(PY) bench/$*.py --quick --out $(BENCH_OUT)

# On an NVIDIA GPU machine: the GPU forms (recorded as bench/results/NAME-gpu.*, beside the CPU ones).
BENCH_GPU := throughput techniques occupancy

bench-gpu: $(SETUP)
	@$(PY) -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "make bench-gpu: no CUDA GPU visible; run make bench on CPU-only machines")'
	@for b in $(BENCH_GPU); do echo "==> bench/$$b.py"; $(PY) bench/$$b.py || exit 1; done
	$(PY) bench/readme.py

bench-throughput: setup
	$(PY) bench/throughput.py

bench-hogwild: setup
	$(PY) bench/hogwild.py

bench-occupancy: setup
	$(PY) bench/occupancy.py

bench-kfold: setup
	$(PY) bench/kfold.py

clean:
	rm -rf build *.egg-info hvdsgd/_C*.so runs .pytest_cache

distclean: clean
	rm -rf $(VENV)
