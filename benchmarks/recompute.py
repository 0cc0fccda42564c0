"""The selective recompute's forward on the CPU: folded attention (in causal row chunks, and in one
pass) against SDPA's, same run.

A reuse call at ``fidelity`` 1-4 recomputes a few tokens (the query, the first tokens of every
moved piece) over the reused KV in the static buffer (:meth:`StaticPromptCache.recompute`). On the
CPU its attention runs as folded matmuls (``many_query_attention``), its rows in chunks that read
only the keys they can see (``causal_chunks``); this script times that against the same folded
attention in one pass and against SDPA's function, over the same slots, with random KV in the
buffer, and prints a table. The selection is laid out like a ``fidelity=2`` call's: runs of 4
tokens at evenly spaced piece starts, and the prompt's last 16 tokens. Asserts nothing.

    python benchmarks/recompute.py                       # SmolLM2-135M, the DAG's and the bench's sizes
    python benchmarks/recompute.py --sizes 941:41,3629:53 --threads 2
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


def fidelity2_selection(prompt: int, recomputed: int) -> torch.Tensor:
    """``recomputed - 1`` positions (< prompt - 1): the last 16 before the final token, and runs
    of 4 at evenly spaced starts over the rest, like a ``fidelity=2`` call's boundary recompute."""
    tail = list(range(max(0, prompt - 17), prompt - 1))
    runs = max(0, (recomputed - 1 - len(tail)) // 4)
    starts = torch.linspace(0, max(0, prompt - 21), runs + 1).long().tolist()[1:] if runs else []
    picked = {p for s in starts for p in range(s, s + 4)} | set(tail)
    return torch.tensor(sorted(p for p in picked if p < prompt - 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sizes", default="180:33,941:41,3629:53", help="prompt:recomputed pairs")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    static = importlib.import_module("kvcomm.fastpath.static_cache")
    folded_applies = static._many_applies
    model = load_model(args.model, progress=False).model
    print(f"{args.model} | {model.dtype} | CPU ({torch.get_num_threads()} threads)")
    overhead = static.CHUNK_OVERHEAD
    print(f"{'prompt':>6}  {'recomputed':>10}  {'chunked ms':>10}  {'folded ms':>9}  {'SDPA ms':>8}  "
          f"{'folded/chunked':>14}  {'SDPA/chunked':>12}  {'max |d logit|':>13}")
    for size in args.sizes.split(","):
        prompt, recomputed = (int(x) for x in size.split(":"))
        ids = torch.randint(100, 40000, (prompt,), generator=torch.Generator().manual_seed(0)).tolist()
        buf = StaticPromptCache(model, -(-(prompt + 64) // 512) * 512)
        buf.k.normal_()
        buf.v.normal_()
        selected = fidelity2_selection(prompt, recomputed)
        try:
            chunked_ms, chunked = time_recompute(buf, ids, selected, args.repeat)
            static.CHUNK_OVERHEAD = 1 << 62  # one chunk: the folded attention in one pass
            folded_ms, folded = time_recompute(buf, ids, selected, args.repeat)
            static._many_applies = lambda *_: False  # every layer's attention goes on to SDPA
            sdpa_ms, sdpa = time_recompute(buf, ids, selected, args.repeat)
        finally:
            static._many_applies, static.CHUNK_OVERHEAD = folded_applies, overhead
        diff = max(float((chunked - sdpa).abs().max()), float((folded - sdpa).abs().max()))
        print(f"{prompt:>6}  {selected.numel() + 1:>10}  {chunked_ms:>10.1f}  {folded_ms:>9.1f}  {sdpa_ms:>8.1f}  "
              f"{folded_ms / chunked_ms:>14.2f}  {sdpa_ms / chunked_ms:>12.2f}  {diff:>13.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
