# Set-up on a fresh machine: `make demo` (main job) and `make test` (test suite) create .venv,
# install effgen with a pinned CPU PyTorch, and run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

PROMPTS := --prompt "a large red circle at the top left on a grey background" \
           --prompt "a small blue square at the middle center on a white background" \
           --prompt "a large yellow star at the bottom right on a black background" \
           --prompt "a small green triangle at the top center on a grey background"

.PHONY: demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: this CPU build is on the machine; an unpinned torch pulls CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/effgen-export pixart --out build/pixart
	$(BIN)/effgen generate build/pixart $(PROMPTS) --seed 0 --out out/pixart
	@echo "images: out/pixart/000.png .. 003.png, grid: out/pixart/grid.png"

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf build out
