# Every target creates .venv when missing and installs what it needs.
# torch==2.13.0 is installed first when pip can find it (a CPU wheel on this
# workplace's machines); otherwise plain torch. Re-running is fast: the
# install step is skipped while pyproject.toml is unchanged.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || \
		$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e '.[serve,analysis,dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/moesaic quickstart

test: $(STAMP)
	$(BIN)/python -m pytest

# CPU: decode speed vs transformers and a dense twin; the MoE layer benchmark runs its full grid
# on CUDA (tiny smoke shape without a GPU). benchmarks/README.md explains each.
bench: $(STAMP)
	$(BIN)/python benchmarks/decode.py --threads 1
	$(BIN)/python benchmarks/moe_layer.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV)
