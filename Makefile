# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates .venv and installs what it needs; a stamp file makes re-runs fast.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.kvcomm-installed
PYTEST_ARGS ?=

.PHONY: demo test test-all conformance lint install redis-server clean

$(STAMP): pyproject.toml scripts/setup.sh
	PY=$(PY) bash scripts/setup.sh
	touch $(STAMP)

install: $(STAMP)

redis-server:
	@command -v redis-server >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq redis-server)

lint: $(STAMP)
	$(BIN)/ruff check kvcomm store kernels agents examples benchmarks tests
	$(BIN)/mypy
	bash scripts/check_imports.sh

# the RAG pipeline (retrieve → expert → critic → final) with full prefill and with kvcomm in the
# embedded store, then the per-agent / per-slot report of its call records
DEMO_RUN := runs/demo
demo: $(STAMP)
	rm -rf $(DEMO_RUN)
	HF_HUB_OFFLINE=1 $(BIN)/python examples/rag_pipeline.py --n 12 --run-dir $(DEMO_RUN)
	HF_HUB_OFFLINE=1 $(BIN)/kvcomm report --run-dir $(DEMO_RUN)

test: $(STAMP) redis-server lint
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP) redis-server lint
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(BIN)/pytest -q $(PYTEST_ARGS)

# langchain-core's standard chat-model tests on KVCommChat (real SmolLM2; ~20 min on 2 cores)
conformance: $(STAMP)
	$(BIN)/pip install -q -e ".[conformance]"
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -m "slow or not slow" -rs tests/agents/test_agents_standard.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info runs
