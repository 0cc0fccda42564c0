#!/usr/bin/env bash
# Fill .whl/dev with the wheels benchmarks/gpu_suite.sh needs on the lent GPU machine, whose image
# has torch, triton, transformers, msgpack, click, tqdm and matplotlib but nothing else kvcomm
# imports there, and cannot download. Run it here (where pip can download), in the repo root; the
# device call then carries .whl (see gpu_suite.sh). Versions are the ones .venv has (what CI tests),
# fetched for the image's Python (3.12, x86-64 Linux).
#
#   bash benchmarks/gpu_wheels.sh            # redis, hiredis, blake3 for CPython 3.12
#   PYVER=3.11 bash benchmarks/gpu_wheels.sh # another Python (a local rehearsal of the suite)
#
# transformers stays the image's: kvcomm names the cache as the installed version's forward does
# (kvcomm.kv.forward_over), and a newer transformers would pull a newer huggingface-hub, kernels,
# tomlkit, regex and httpx2 with it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
DEST=.whl/dev
PY=.venv/bin/python
[[ -x $PY ]] || { echo "no .venv here: run 'make install' first" >&2; exit 1; }
rm -rf "$DEST" && mkdir -p "$DEST"
pins=()
for name in redis hiredis blake3; do
  pins+=("$name==$($PY -c "from importlib.metadata import version; print(version('$name'))")")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${pins[@]}"
ls -1 "$DEST"
du -sh "$DEST" | awk '{print "total " $1 " (a device call carries 64 MiB at most)"}'
