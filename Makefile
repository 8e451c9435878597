# Prism: `make run-local` installs then serves; `make test` installs then runs ruff and pytest.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
TESTDEPS := $(VENV)/.installed-test

.PHONY: install test lint run-local clean proto soak

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

# `make run-local [MODEL=hub-id-or-folder]`: cache, encoder (vision models), decoder and the
# OpenAI gateway on HOST:GATEWAY_PORT; Ctrl-C stops them all. Without MODEL: a tiny demo
# checkpoint with random weights, generated locally (no download). Port 0 = any free port;
# with ENCODERS/DECODERS > 1, replica i listens on its base port + i.
MODEL ?=
HOST ?= 127.0.0.1
GATEWAY_PORT ?= 8080
ENCODER_PORT ?= 50051
DECODER_PORT ?= 50052
CACHE_PORT ?= 50053
ENCODERS ?= 1
DECODERS ?= 1
CACHE_DISK_PATH ?=
RUN_LOCAL_ARGS ?=

run-local: $(RUNTIME)
	$(BIN)/python -m services.launcher $(if $(MODEL),--model '$(MODEL)') --host $(HOST) \
		--gateway-port $(GATEWAY_PORT) --encoder-port $(ENCODER_PORT) \
		--decoder-port $(DECODER_PORT) --cache-port $(CACHE_PORT) \
		--encoders $(ENCODERS) --decoders $(DECODERS) \
		$(if $(CACHE_DISK_PATH),--cache-disk-path '$(CACHE_DISK_PATH)') $(RUN_LOCAL_ARGS)

# `make soak [SOAK_MINUTES=30] [SOAK_ARGS=...]`: steady load with periodic decoder kills, checking
# every completion and the memory of every process (bench/soak.py). Long: not part of `make test`.
SOAK_MINUTES ?= 30
SOAK_ARGS ?=

soak: $(RUNTIME)
	$(BIN)/python bench/soak.py --minutes $(SOAK_MINUTES) $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Regenerate the gRPC stubs from protos/ (committed; a test fails when they drift).
proto: $(TESTDEPS)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos \
		--grpc_python_out=protos protos/prism/v1/*.proto
