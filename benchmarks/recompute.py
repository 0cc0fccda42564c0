"""The selective recompute's forward on the CPU: its attention as oneDNN matmuls over folded query
heads, over grouped K/V heads in place (torch's SDPA, ``enable_gqa``), as folded torch matmuls, and
as transformers' SDPA, same run.

A reuse call at ``fidelity`` 1-4 recomputes a few tokens (the query, the first tokens of every
moved piece) over the reused KV in the static buffer (:meth:`StaticPromptCache.recompute`). On the
CPU its attention runs through ``many_query_attention``, its rows in chunks that read only the keys
they can see (``causal_chunks``); this script times its default (float32 from 1,024 keys on:
oneDNN's matmuls, ``ONEDNN_FOLDED``, where MKL runs no AVX-512 code, i.e. not on Intel CPUs; else
the grouped SDPA) against oneDNN's path and the grouped SDPA each forced, the folded torch matmuls, the grouped SDPA in one pass, and transformers'
SDPA function (which copies every K/V head out per query head), over the same slots, with random KV
in the buffer, and prints a table. The selection is laid out like a ``fidelity=2`` call's: runs of
4 tokens at evenly spaced piece starts, and the prompt's last 16 tokens. Each row times the
variants in turn, ``--repeat`` rounds, and keeps each one's median, so a noisy machine slows them
alike. Asserts nothing.

    python benchmarks/recompute.py                       # SmolLM2-135M, the DAG's and the bench's sizes
    python benchmarks/recompute.py --sizes 941:41,3629:53 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch

from kvcomm.fastpath.cpu import cpu_description, cpu_vendor
from kvcomm.fastpath.static_cache import StaticPromptCache
from kvcomm.models import load_model


def time_variants(buf: StaticPromptCache, ids: list[int], selected: torch.Tensor, repeat: int,
                  variants: dict[str, Callable[[], contextlib.AbstractContextManager[None]]],
                  ) -> dict[str, tuple[float, torch.Tensor]]:
    """Each variant's median recompute time in ms over ``repeat`` interleaved rounds (after one
    warm-up each), and its logits."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    logits: dict[str, torch.Tensor] = {}
    for round_ in range(repeat + 1):
        for name, setting in variants.items():
            with setting():
                t0 = time.perf_counter()
                logits[name] = buf.recompute(ids, selected)
                if round_:
                    times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: (statistics.median(times[name]), logits[name]) for name in variants}


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
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    static = importlib.import_module("kvcomm.fastpath.attention")
    model = load_model(args.model, progress=False).model
    print(f"{args.model} | {model.dtype} | {cpu_description()} | torch {torch.__version__}")

    @contextlib.contextmanager
    def setting(onednn: bool | None = None, grouped: bool = True, one_pass: bool = False,
                transformers_sdpa: bool = False) -> Iterator[None]:
        saved = static.ONEDNN_FOLDED, static.GROUPED_SDPA, static.CHUNK_OVERHEAD, static._many_applies
        if onednn is not None:  # None: the default's choice (by CPU vendor)
            static.ONEDNN_FOLDED = onednn and static._LINEAR is not None
        static.GROUPED_SDPA = grouped and saved[1]
        if one_pass:
            static.CHUNK_OVERHEAD = 1 << 62
        if transformers_sdpa:  # every layer's attention goes on to transformers' SDPA function
            static._many_applies = lambda *_: False
        try:
            yield
        finally:
            static.ONEDNN_FOLDED, static.GROUPED_SDPA, static.CHUNK_OVERHEAD, static._many_applies = saved

    variants: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
        "default": setting,
        "oneDNN": functools.partial(setting, onednn=True),
        "grouped": functools.partial(setting, onednn=False),
        "folded": functools.partial(setting, onednn=False, grouped=False),
        "one pass": functools.partial(setting, onednn=False, one_pass=True),
        "HF SDPA": functools.partial(setting, transformers_sdpa=True),
    }
    if static._LINEAR is None:
        print("(this torch has no oneDNN: its column is the grouped SDPA)")
    print(f"default: {'oneDNN' if static.ONEDNN_FOLDED else 'grouped SDPA'} from {static.ONEDNN_MIN_KEYS} keys "
          f"(CPU vendor {cpu_vendor() or '?'}, MKL {torch.backends.mkl.is_available()})")
    print(f"{'prompt':>6}  {'recomputed':>10}  {'default ms':>10}  {'oneDNN ms':>9}  {'grouped ms':>10}  {'folded ms':>9}  "
          f"{'one pass ms':>11}  {'HF SDPA ms':>10}  {'grouped/default':>15}  {'HF/default':>10}  {'max |d logit|':>13}")
    for size in args.sizes.split(","):
        prompt, recomputed = (int(x) for x in size.split(":"))
        ids = torch.randint(100, 40000, (prompt,), generator=torch.Generator().manual_seed(0)).tolist()
        buf = StaticPromptCache(model, -(-(prompt + 64) // 512) * 512)
        buf.k.normal_()
        buf.v.normal_()
        selected = fidelity2_selection(prompt, recomputed)
        got = time_variants(buf, ids, selected, args.repeat, variants)
        ms = {name: got[name][0] for name in variants}
        ref = got["HF SDPA"][1]
        diff = max(float((got[name][1] - ref).abs().max()) for name in variants)
        print(f"{prompt:>6}  {selected.numel() + 1:>10}  {ms['default']:>10.1f}  {ms['oneDNN']:>9.1f}  {ms['grouped']:>10.1f}  "
              f"{ms['folded']:>9.1f}  {ms['one pass']:>11.1f}  {ms['HF SDPA']:>10.1f}  "
              f"{ms['grouped'] / ms['default']:>15.2f}  {ms['HF SDPA'] / ms['default']:>10.2f}  {diff:>13.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
