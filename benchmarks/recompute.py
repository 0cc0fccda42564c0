"""The selective recompute's forward on the CPU: folded attention against SDPA's, same run.

A reuse call at ``fidelity`` 1-3 recomputes a few tokens (the query, the first tokens of every
moved piece) over the reused KV in the static buffer (:meth:`StaticPromptCache.recompute`). On the
CPU its attention runs as folded matmuls (``many_query_attention``); this script times that
against SDPA's function over the same slots, with random KV in the buffer, and prints a table.
Asserts nothing.

    python benchmarks/recompute.py                       # SmolLM2-135M, the DAG's and the bench's sizes
    python benchmarks/recompute.py --sizes 941:30,3629:46 --threads 2
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

import torch

from kvcomm.fastpath.static_cache import StaticPromptCache
from kvcomm.models import load_model


def time_recompute(buf: StaticPromptCache, ids: list[int], selected: torch.Tensor, repeat: int) -> tuple[float, torch.Tensor]:
    """Best of ``repeat`` recomputes after one warm-up, in ms, and the last logits."""
    logits = buf.recompute(ids, selected)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        logits = buf.recompute(ids, selected)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3, logits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sizes", default="180:26,941:30,3629:46", help="prompt:recomputed pairs")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    static = importlib.import_module("kvcomm.fastpath.static_cache")
    folded_applies = static._many_applies
    model = load_model(args.model, progress=False).model
    print(f"{args.model} | {model.dtype} | CPU ({torch.get_num_threads()} threads)")
    print(f"{'prompt':>6}  {'recomputed':>10}  {'folded ms':>9}  {'SDPA ms':>8}  {'SDPA/folded':>11}  {'max |d logit|':>13}")
    for size in args.sizes.split(","):
        prompt, recomputed = (int(x) for x in size.split(":"))
        ids = torch.randint(100, 40000, (prompt,), generator=torch.Generator().manual_seed(0)).tolist()
        buf = StaticPromptCache(model, -(-(prompt + 64) // 512) * 512)
        buf.k.normal_()
        buf.v.normal_()
        selected = torch.linspace(0, prompt - 2, recomputed - 1).long().unique()
        try:
            folded_ms, folded = time_recompute(buf, ids, selected, args.repeat)
            static._many_applies = lambda *_: False  # every layer's attention goes on to SDPA
            sdpa_ms, sdpa = time_recompute(buf, ids, selected, args.repeat)
        finally:
            static._many_applies = folded_applies
        diff = float((folded - sdpa).abs().max())
        print(f"{prompt:>6}  {selected.numel() + 1:>10}  {folded_ms:>9.1f}  {sdpa_ms:>8.1f}  {sdpa_ms / folded_ms:>11.2f}  {diff:>13.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
