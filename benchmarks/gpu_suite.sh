#!/usr/bin/env bash
# One batched run on a lent GPU (device tool): GPU kernel tests, the kernel benchmark and the TTFT
# benchmark in the paper's setting. The image's torch, triton and transformers are used as they
# are; what it lacks (redis, hiredis, blake3) travels as wheels in .whl/dev, which
# `bash benchmarks/gpu_wheels.sh` fills here beforehand: the device call then carries ".whl".
# Results land in $OUT. `python3 -P`: the checkout's kvcomm/ must not shadow the installed
# package (kvcomm.store/kernels/agents exist only installed).
# Stages run alone too: `bash benchmarks/gpu_suite.sh ttft` (or tests, kernels, profile); all four
# together may exceed one 600 s device call.
set -uo pipefail
OUT=${OUT:-/tmp/kvcomm-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1
if ls .whl/dev/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/dev/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
rm -rf /tmp/kv; python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/kv . || exit 1
export PYTHONPATH=/tmp/kv:${PYTHONPATH:-}
cd /tmp && python3 -c "import torch, transformers, triton, kvcomm.store, kvcomm.kernels; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; cd - >/dev/null
STAGE=${1:-all}
if [[ $STAGE == all || $STAGE == ttft ]]; then
  KVCOMM_GAMMA=1.0 timeout 300 python3 benchmarks/ttft.py --model-shape llama-3.1-8b --device cuda --dtype bfloat16 \
    --warmup 5 --requests 3 --json "$OUT/ttft.json" 2>&1 | grep -v "it/s\]" | tee "$OUT/ttft.txt" | tail -40
fi
if [[ $STAGE == all || $STAGE == tests ]]; then
  timeout 90 python3 -P -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/test_graphs.py tests/test_fastpath.py > "$OUT/gpu_tests.txt" 2>&1
  grep -E "^E |Error|passed|failed" "$OUT/gpu_tests.txt" | head -20
fi
if [[ $STAGE == all || $STAGE == kernels ]]; then
  timeout 150 python3 benchmarks/kernel_bench.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt" | tail -45
fi
if [[ $STAGE == all || $STAGE == profile ]]; then
  timeout 120 python3 benchmarks/profile_step.py 2>&1 | tee "$OUT/profile_step.txt" | tail -40
fi
