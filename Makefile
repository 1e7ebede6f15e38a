# Two commands do all the set-up: `make demo` and `make test`. Both create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build of torch first, so that nothing pulls the multi-GB CUDA build. GPU users: see README.
TORCH_SPEC ?= torch==2.13.0

export HF_HUB_OFFLINE := 1
export WANDB_MODE ?= offline

.PHONY: demo test install clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/python launch/demo.py $(ARGS)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests $(ARGS)

clean:
	rm -rf $(VENV) runs
