# deepfield — the two set-up commands: `make demo` and `make test`.
#
# PyTorch: the CPU build is installed first, pinned by TORCH_SPEC, so that the plain `torch`
# requirement in pyproject.toml does not pull a multi-GB CUDA build. GPU users override it, e.g.
#   make demo TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu126"
#
# Everything else is installed with requirements/lock.txt as constraints (pip install -c), so a fresh machine
# gets the versions that passed the tests, not whatever is newest. torch is kept out of the lock so that a GPU
# override never conflicts with it; the torch just installed is pinned instead for the second step, so that
# pip stops with an error rather than swap it for another build (a torch of another version than the default
# may need other versions of its own requirements, sympy and the like: then add CONSTRAINTS=).
# `make lock` rewrites the lock from this environment: the requirements of deepfield[test,eval], transitively,
# at their installed versions. A requirement added to pyproject.toml: `make lock` installs it (newest allowed)
# and pins it; then `make test`. A pin to move: edit pyproject.toml, `make install CONSTRAINTS=` (installs
# without the lock), `make test`, `make lock`. tests/test_packaging.py checks that the lock, pyproject.toml and
# the environment agree.
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
LOCK        := requirements/lock.txt
CONSTRAINTS ?= -c $(LOCK)
EXTRAS      := test,eval
DEMO_DIR    ?= demo
# pytest-xdist workers for `make test`, each with its own test session (its own simulated survey, Ray and Prefect
# API); test files are spread whole over the workers (--dist loadfile), so a file's shared fixtures are made once,
# heaviest first (tests/conftest.py's HEAVY_FIRST; --no-loadscope-reorder keeps that order).
# Two keeps a 2-core machine busy while one worker waits on a subprocess; TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed

.PHONY: demo test install lock clean bench

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml Makefile $(LOCK)
	$(PY) -m pip install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > $(VENV)/torch-pin.txt
	$(PY) -m pip install --quiet $(CONSTRAINTS) -c $(VENV)/torch-pin.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

# the environment is then the lock, so the stamp is touched: the next `make test` does not reinstall
lock: $(STAMP)
	$(PY) tests/test_packaging.py --write-lock $(LOCK)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/deepfield demo --out $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

bench: $(STAMP)
	$(PY) tests/benchmarks/bench_simulate.py
	$(VENV)/bin/deepfield simulate --out bench-out/sim --size 2048 --fields 2
	$(PY) tests/benchmarks/bench_ingest.py --sim bench-out/sim
	$(PY) tests/benchmarks/bench_process.py --sim bench-out/sim
	$(PY) tests/benchmarks/bench_stages.py --sim bench-out/sim --rounds 2
	$(PY) tests/benchmarks/bench_models.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache bench-out
