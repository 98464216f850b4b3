# deepfield — the two set-up commands: `make demo` and `make test`.
#
# PyTorch: the CPU build is installed first, pinned by TORCH_SPEC, so that the plain `torch`
# requirement in pyproject.toml does not pull a multi-GB CUDA build. GPU users override it, e.g.
#   make demo TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu126"
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
DEMO_DIR    ?= demo
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed

.PHONY: demo test install clean bench

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml Makefile
	$(PY) -m pip install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,eval]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/deepfield demo --out $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) tests/benchmarks/bench_simulate.py
	$(VENV)/bin/deepfield simulate --out bench-out/sim --size 2048 --fields 2
	$(PY) tests/benchmarks/bench_ingest.py --sim bench-out/sim
	$(PY) tests/benchmarks/bench_process.py --sim bench-out/sim
	$(PY) tests/benchmarks/bench_stages.py --sim bench-out/sim

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache bench-out
