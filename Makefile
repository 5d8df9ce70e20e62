# hvdsgd: two commands from a fresh machine.
#   make demo   set up .venv (dependencies, patched Horovod, hvdsgd), then train on 4 ranks
#   make test   the same set-up, then the whole test suite
# Each step leaves a stamp in .venv; a second run skips what is done and takes seconds.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
NP     ?= 4
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup demo test bench-throughput bench-hogwild bench-occupancy bench-kfold clean distclean

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
	horovodrun -np $(NP) python -m hvdsgd.train --out runs/demo

test: setup
	$(PY) -m pytest

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
