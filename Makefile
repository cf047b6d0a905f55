# pytest-gondolin — `make demo` runs the example suite, `make test` the test suite.
# Both install what is missing first (host packages via apt, a venv with the package).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: demo test unit lint bench soak image deps venv clean

deps:
	@sh scripts/install-deps.sh

$(BIN)/.installed: pyproject.toml | deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

venv: $(BIN)/.installed

# Building the image needs root (mmdebstrap); it is cached under ~/.cache/pytest-gondolin.
image: venv
	@if [ "$$(id -u)" -eq 0 ]; then $(BIN)/gondolin image build; \
	else $(SUDO) env GONDOLIN_CACHE_DIR="$${GONDOLIN_CACHE_DIR:-$$HOME/.cache/pytest-gondolin}" $(BIN)/gondolin image build \
	  && $(SUDO) chown -R "$$(id -u):$$(id -g)" "$${GONDOLIN_CACHE_DIR:-$$HOME/.cache/pytest-gondolin}"; fi

demo: image
	$(BIN)/python -m pytest -p gondolin examples -v -rP -p no:cacheprovider $(PYTEST_ARGS)

test: image
	$(BIN)/python -m pytest tests -m "not soak" $(PYTEST_ARGS)

# Long load and leak runs (minutes): hundreds of sandboxed tests, resource growth measured.
soak: image
	$(BIN)/python -m pytest tests/soak -m soak -s $(PYTEST_ARGS)

unit: venv
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check pytest_gondolin tests bench examples
	$(BIN)/mypy

bench: image
	$(BIN)/python bench/run.py --write-readme

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
