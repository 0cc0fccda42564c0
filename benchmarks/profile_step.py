"""Where the one-token forward's time goes (CUDA): graph replay vs eager, by cache capacity,
and the top kernels of an eager step. Prints a table; meant for the lent GPU.

    python benchmarks/profile_step.py --model-shape llama-3.1-8b
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def _time(fn, n: int = 30) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def main(argv: list[str] | None = None) -> int:
    from kvcomm.fastpath.static_cache import StaticPromptCache
    from kvcomm.tools.bench import MODEL_SHAPES, build_shaped_model

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model-shape", choices=sorted(MODEL_SHAPES), default="llama-3.1-8b")
    ap.add_argument("--capacities", default="1024,4096")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 0
    model = build_shaped_model(args.model_shape, device="cuda", dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model_shape}: {n_params / 1e9:.2f}B params, weight bytes {2 * n_params / 1e9:.1f} GB, "
          f"attn {model.config._attn_implementation}")
    rows = []
    for cap in (int(c) for c in args.capacities.split(",")):
        buf = StaticPromptCache(model, cap)
        buf.k.normal_()
        buf.v.normal_()
        pos = cap // 2

        def step(b=buf, p=pos):
            b.begin(p)
            b.step(7, p)

        t_graph = _time(step)
        eager = StaticPromptCache(model, cap, use_graph=False)
        eager.k.copy_(buf.k)
        eager.v.copy_(buf.v)

        def step_eager(b=eager, p=pos):
            b.begin(p)
            b.step(7, p)

        t_eager = _time(step_eager)
        rows.append((cap, buf.graph is not None, t_graph, t_eager))
    weights_ms = 2 * n_params / 4.2e12 * 1e3
    print(f"weight-read floor at 4.2 TB/s: {weights_ms:.2f} ms")
    print("capacity  graph  graph ms  eager ms")
    for cap, g, tg, te in rows:
        print(f"{cap:8d}  {str(g):5s}  {tg:8.2f}  {te:8.2f}")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step_eager()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
