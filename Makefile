# Prism: `make run-local` installs then serves; `make test` installs then runs ruff and pytest.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
TESTDEPS := $(VENV)/.installed-test

.PHONY: install test lint run-local clean proto

# Each stamp is rebuilt only when the dependency list changes (idempotent, fast otherwise).
$(RUNTIME): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	@touch $(RUNTIME)

# Test extras: pytest, ruff and torch==2.13.0 (CPU build, the transformers reference only).
$(TESTDEPS): $(RUNTIME)
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(TESTDEPS)

install: $(RUNTIME)

lint: $(TESTDEPS)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

run-local: $(RUNTIME)
	@echo "The gRPC services (encoder, decoder, cache, gateway) arrive with issue #3."
	@echo "Until then use the in-process path: $(BIN)/prism generate --model <folder or hub id> --prompt '...'"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Regenerate the gRPC stubs from protos/ (committed; a test fails when they drift).
proto: $(TESTDEPS)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos \
		--grpc_python_out=protos protos/prism/v1/*.proto
