"""TTFT per agent position, dense vs prefix vs naive vs kvcomm, in one run (prints a table).

    python benchmarks/ttft.py --model smollm2-135m --prefix-len 128 --input-len 256 --output-len 128
    python benchmarks/ttft.py --model-shape llama-3.1-8b --device cuda --dtype bfloat16 --json out.json

The implementation lives in :mod:`kvcomm.bench` (also ``kvcomm bench``).
"""

from __future__ import annotations

import sys

from kvcomm.bench import main

if __name__ == "__main__":
    sys.exit(main())
