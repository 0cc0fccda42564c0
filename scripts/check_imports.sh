#!/usr/bin/env bash
# The sub-packages install as kvcomm.store / kvcomm.kernels / kvcomm.agents: a bare import of
# `store`, `kernels` or `agents` works in the source tree and breaks in the wheel.
set -euo pipefail
if grep -rnE "^\s*(import|from)\s+(store|kernels|agents)(\.|\s|$)" --include='*.py' kvcomm store kernels agents examples benchmarks tests; then
  echo "bare import of store/kernels/agents found: import them as kvcomm.<name>" >&2
  exit 1
fi
