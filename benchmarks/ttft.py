"""TTFT per agent position, dense vs prefix vs naive vs kvcomm, in one run (prints a table).

    python benchmarks/ttft.py --model smollm2-135m --prefix-len 128 --input-len 256 --output-len 128
    python benchmarks/ttft.py --model-shape llama-3.1-8b --device cuda --dtype bfloat16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    from kvcomm.bench import (
        MODEL_SHAPES,
        TTFT_COLUMNS,
        BenchSetting,
        SyntheticTokenizer,
        build_shaped_model,
        run_ttft,
    )
    from kvcomm.metrics import format_table
    from kvcomm.models import load_model, resolve_device, resolve_dtype

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
                    help="kvcomm entropy threshold (default 0.3; 1.0 with --model-shape: random weights make "
                         "anchor distances meaningless, the benchmark then measures each path's speed)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.model_shape:
        model = build_shaped_model(args.model_shape, device=str(device), dtype=dtype, layers=args.layers)
        tokenizer = SyntheticTokenizer(model.config.vocab_size)
        label = f"{args.model_shape} (random weights)"
    else:
        loaded = load_model(args.model or "smollm2-135m", dtype=dtype, device=device)
        model, tokenizer, label = loaded.model, loaded.tokenizer, loaded.name
    setting = BenchSetting(agents=args.agents, prefix_len=args.prefix_len, input_len=args.input_len,
                           output_len=args.output_len, warmup=args.warmup, requests=args.requests,
                           policies=tuple(args.policies.split(",")),
                           gamma=args.gamma if args.gamma is not None else (1.0 if args.model_shape else 0.3))

    def store_factory():
        from kvcomm.store import MemoryStore

        return MemoryStore(device=device, max_bytes=64 << 30)

    out = run_ttft(model, tokenizer, setting, store_factory=store_factory)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nmodel {label} | {dtype} | device {name} | {args.agents} agents, prefix {args.prefix_len}, "
          f"input {args.input_len}, outputs {args.output_len} tokens | {args.requests} timed requests | "
          f"gamma {setting.gamma}")
    print(format_table(out["rows"], TTFT_COLUMNS))
    print("one-token forward as a CUDA graph replay:", out["cuda_graph"])
    last = [r for r in out["rows"] if r["agent"] == args.agents]
    for r in last:
        print(f"agent {args.agents}: {r['policy']:>7}  TTFT p50 {r['ttft_p50_ms']:8.2f} ms   dense/policy {r['speedup']:.2f}x")
    if args.json_path:
        out["device"], out["model"], out["dtype"] = name, label, str(dtype)
        with open(args.json_path, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
