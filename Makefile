# zerotrain: `make demo` runs the whole pipeline on CPU with shipped data, `make test` runs the tests.
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

.PHONY: install test test-unit demo clean

install: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -q -ra

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit -q

# The whole pipeline on CPU with the shipped data (scripts/demo.sh), about 8 minutes on 2 cores;
# the report is runs/demo/REPORT.md. DEMO_QUICK=1: the 3-minute version the tests run;
# DEMO_DIR=DIR: write there instead of runs/demo.
demo: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash scripts/demo.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
