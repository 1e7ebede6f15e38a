# Two commands do all the set-up: `make demo` and `make test`. Both create .venv when it is missing, with the
# exact versions in constraints.txt (the ones the suite passed with); `make test-latest` tries the newest releases.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
LATEST := .venv-latest
# CPU build of torch first, so that nothing pulls the multi-GB CUDA build. GPU users: see README.
TORCH_SPEC ?= torch==2.13.0
# pip itself is pinned too: a new pip changes how the rest resolves and builds.
PIP_SPEC ?= pip==26.3

export HF_HUB_OFFLINE := 1
export WANDB_MODE ?= offline
# demo and test run with the venv's tools first on PATH: DeepSpeed compiles its C++ extensions with the `ninja` it
# finds there, and the pinned one (constraints.txt) and an older system one log their builds differently, so each
# switch between them compiled the extensions again.
ON_PATH := PATH="$(abspath $(BIN)):$$PATH"

.PHONY: demo test lint install test-latest lock clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(PIP_SPEC)"
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(ON_PATH) $(BIN)/python launch/demo.py $(ARGS)

# Two xdist workers: the Ray tests wait on process start-up, the other worker fills that time. (xdist 3.8's
# --dist loadgroup does not group under pytest 9.2: it renames a node attribute pytest no longer reads.)
# --maxschedchunk 1: each worker takes the next test when it is nearly done, in collection order, and
# tests/conftest.py puts the slowest modules first, so no 2-minute test is left for the end.
test: $(BIN)/.installed
	$(ON_PATH) $(BIN)/python -m pytest -q -n 2 --maxschedchunk 1 tests $(ARGS)

# ruff, configured in pyproject.toml (line length 120); `.venv/bin/ruff format .` and `ruff check --fix .` mend most of it.
lint: $(BIN)/.installed
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# A maintainer's check before refreshing the lock: the newest releases pyproject.toml admits, in their own venv.
test-latest:
	test -x $(LATEST)/bin/python || $(PY) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager "$(TORCH_SPEC)" -e ".[dev]"
	$(LATEST)/bin/python -m pytest -q tests $(ARGS)

# Rewrite constraints.txt from .venv-latest (after test-latest passed); then `make test` installs the new lock.
lock:
	head -n 3 constraints.txt > constraints.new
	$(LATEST)/bin/python -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/' >> constraints.new
	mv constraints.new constraints.txt
	# the same pins as a PEP 751 lock with hashes (tests/test_lock.py checks they agree and that every URL is public)
	$(LATEST)/bin/python -m pip lock -q -c constraints.txt ".[dev]" -o pylock.toml

clean:
	rm -rf $(VENV) $(LATEST) runs
