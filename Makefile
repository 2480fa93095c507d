# zerotrain: `make demo` runs the whole pipeline on CPU with shipped data, `make test` runs the tests
# (`make test-fast`: the fast tier).
# Both create .venv on first use.

PYTHON ?= python3.11
VENV   ?= .venv
# torch is installed first, so nothing else pulls another build. On this kind of machine
# torch==2.13.0 resolves to a CPU wheel; on a CUDA machine PyPI's Linux wheel of the same
# version is the CUDA 12 build. Pick another CUDA build with, e.g.,
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cu126
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=
PIP    = $(VENV)/bin/pip
PY     = $(VENV)/bin/python
STAMP  = $(VENV)/.installed

.PHONY: install test test-fast test-unit demo clean

install: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install --quiet -e '.[test]'
	touch $(STAMP)

# The tiers (README, "Tests"): `test` runs everything (what .ci/run runs); `test-fast` the unit
# tests and the `smoke` cases of the other tiers (one case of each matrix, one 2-rank run), a few
# minutes; `test-unit` the unit tests alone. A run that selects no test fails (pytest exits 5).
NOT_UNIT = slow or distributed or faults or system

test: $(STAMP)
	$(PY) -m pytest tests -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest tests -q -ra -m "smoke or not ($(NOT_UNIT))"

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit -q -m "not ($(NOT_UNIT))"

# The whole pipeline on CPU with the shipped data (scripts/demo.sh), about 8 minutes on 2 cores;
# the report is runs/demo/REPORT.md. DEMO_QUICK=1: the 3-minute version the tests run;
# DEMO_DIR=DIR: write there instead of runs/demo.
demo: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash scripts/demo.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
