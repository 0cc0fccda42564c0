"""TTFT per agent position, dense vs prefix vs naive vs kvcomm, in one run (prints a table).

    python benchmarks/ttft.py --model smollm2-135m --prefix-len 128 --input-len 256 --output-len 128
    KVCOMM_GAMMA=1.0 python benchmarks/ttft.py --model-shape llama-3.1-8b --device cuda --dtype bfloat16 --json out.json

The engine config comes from ``KVCOMM_*`` environment variables, ``--gamma`` over them. The texts
are random words, so at the default gamma (0.3) calls go dense by chance: measure each path's
speed with gamma 1.0. The implementation is :mod:`kvcomm.tools.bench`, which ``kvcomm bench``
runs too.
"""

from __future__ import annotations

import argparse
import logging
import sys

from kvcomm.tools.bench import MODEL_SHAPES, BenchSetting, bench_config, render, run_benchmark, write_json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="model name or path (default smollm2-135m)")
    src.add_argument("--model-shape", choices=sorted(MODEL_SHAPES), help="real architecture, random weights")
    ap.add_argument("--layers", type=int, default=None, help="override the shape's layer count (quick runs)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--agents", type=int, default=5)
    ap.add_argument("--prefix-len", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--policies", default="dense,prefix,naive,kvcomm")
    ap.add_argument("--gamma", type=float, default=None,
                    help="kvcomm entropy threshold (default: $KVCOMM_GAMMA, else the engine's 0.3)")
    ap.add_argument("--variant", dest="variants", action="append", default=[], metavar="FIELD=VALUE[,FIELD=VALUE]",
                    help="also a kvcomm row with these config fields changed (repeatable), e.g. fidelity=0")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    ap.add_argument("--store", dest="store_urls", action="append", default=[], metavar="URL",
                    help="the store every policy's entries go through, each policy in a fresh namespace "
                         "(repeat for tiers, fastest first; default: in-process memory on the model's device)")
    ap.add_argument("--json", dest="json_path", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    setting = BenchSetting(agents=args.agents, prefix_len=args.prefix_len, input_len=args.input_len,
                           output_len=args.output_len, warmup=args.warmup, requests=args.requests,
                           policies=tuple(args.policies.split(",")), variants=tuple(args.variants))
    out = run_benchmark(setting, bench_config(gamma=args.gamma), model=args.model, model_shape=args.model_shape,
                        layers=args.layers, device=args.device, dtype=args.dtype, threads=args.threads,
                        store_urls=tuple(args.store_urls))
    print(render(out))
    if args.json_path:
        write_json(out, args.json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
