# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test lint typecheck clean

$(BIN)/nightrender: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, so no dependency pulls a multi-GB CUDA build onto a CPU machine
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/nightrender

install: $(BIN)/nightrender

demo: install
	$(BIN)/nightrender run examples/prompts.txt --model synthetic:tiny --width 256 --height 256 --steps 4 --out renders

test: install
	$(BIN)/ruff check api jobs worker cli tests bench
	$(BIN)/ruff format --check api jobs worker cli tests bench
	$(BIN)/mypy
	$(BIN)/pytest -q -ra

clean:
	rm -rf .nightrender renders
