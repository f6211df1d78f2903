# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch first, pinned: the local CPU wheel; an unpinned torch would pull GBs of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
export MISLEADER_DATA ?= $(abspath ../shared/data)

.PHONY: venv demo test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m misleader demo --out demo-out

test: venv
	$(PY) -m pytest

bench: venv
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) demo-out
