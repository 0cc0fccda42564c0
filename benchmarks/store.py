"""Store throughput: put/get GB/s of MemoryStore and RedisStore (raw, int8) for KV entries of a
few sizes, against a plain redis-py SET/GET of the same bytes and a local memcpy (torch clone).

    python benchmarks/store.py --sizes 1,16,128 --redis-url redis://127.0.0.1:6379/0

GB/s are logical KV bytes (bf16 k and v) per second, so int8 moving half the bytes shows up as a
higher rate; "wire MiB" is what crossed the socket. Each number is the median of --repeat runs
after one warm-up. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import redis
import torch

from kvcomm.keys import namespace_prefix
from kvcomm.store import KVEntry, MemoryStore, RedisStore

LAYERS, HEADS, DIM = 16, 8, 128  # bytes per token of k+v in bf16: 2 * 16 * 8 * 128 * 2 = 64 KiB
PLAIN_KEY = namespace_prefix("bench") + "plain"  # the redis-py baseline's key, in the stores' namespace


def make_entry(mib: int) -> KVEntry:
    tokens = mib * (1 << 20) // (2 * LAYERS * HEADS * DIM * 2)
    shape = (LAYERS, HEADS, tokens, DIM)
    return KVEntry({"k": torch.randn(shape, dtype=torch.bfloat16), "v": torch.randn(shape, dtype=torch.bfloat16)},
                   meta={"tokens": tokens}, fingerprint="bench")


def timed(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_size(mib: int, repeat: int, plain: redis.Redis, url: str, device: torch.device) -> list[tuple]:
    """Rows (MiB, backend, wire bytes, put GB/s, get GB/s) for one entry size."""
    entry = make_entry(mib)
    nbytes = entry.nbytes
    gb = nbytes / 1e9
    rows = []

    src = torch.cat([entry.tensors["k"].reshape(-1), entry.tensors["v"].reshape(-1)]).to(device)
    t_copy = timed(lambda src=src: (src.clone(), sync(device)), repeat)
    rows.append((mib, "memcpy (torch clone)", nbytes, gb / t_copy, gb / t_copy))

    blob = src.cpu().view(torch.uint8).numpy().tobytes()
    t_set = timed(lambda blob=blob: plain.set(PLAIN_KEY, blob), repeat)
    t_get = timed(lambda: plain.get(PLAIN_KEY), repeat)
    rows.append((mib, "redis-py SET/GET", len(blob), gb / t_set, gb / t_get))
    plain.delete(PLAIN_KEY)
    del blob, src

    mem = MemoryStore(device=device, max_bytes=4 * nbytes, namespace="bench")
    t_put = timed(lambda: (mem.put("e", entry), sync(device)), repeat)
    t_get = timed(lambda: mem.get("e"), repeat)
    rows.append((mib, "MemoryStore", nbytes, gb / t_put, gb / t_get))
    mem.close()

    for codec in ("raw", "int8"):
        store = RedisStore(url, namespace="bench", codec=codec, device=device, socket_timeout=60,
                           max_entry_bytes=max(512 << 20, 2 * nbytes))
        if not store.put("e", entry):
            raise SystemExit(f"RedisStore({codec}) put failed: {store.stats()['faults']}")
        wire = store.stats()["bytes_written"]
        t_put = timed(lambda store=store: store.put("e", entry), repeat)
        t_get = timed(lambda store=store: (store.get("e", fingerprint="bench"), sync(device)), repeat)
        if sum(store.stats()["faults"].values()) or store.stats()["misses"]:
            raise SystemExit(f"RedisStore({codec}) faults during the benchmark: {store.stats()}")
        rows.append((mib, f"RedisStore {codec}", wire, gb / t_put, gb / t_get))
        store.clear()
        store.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,16,128", help="entry sizes in MiB, comma separated")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--repeat", type=int, default=0, help="runs per measurement (default: by size)")
    ap.add_argument("--device", default="cpu", help="device of the memory tier and decoded tensors")
    args = ap.parse_args()
    device = torch.device(args.device)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    plain = redis.Redis.from_url(args.redis_url)
    plain.ping()
    rows = [row for mib in sizes for row in bench_size(mib, args.repeat or max(3, min(20, 64 // mib)), plain,
                                                        args.redis_url, device)]
    base = {(r[0], r[1]): r for r in rows}
    head = f"{'MiB':>5}  {'backend':22} {'wire MiB':>9} {'put GB/s':>9} {'get GB/s':>9} {'get/redis-py':>13} {'get/memcpy':>11}"
    print(f"device={device}  torch threads={torch.get_num_threads()}  redis={args.redis_url}")
    print(head)
    print("-" * len(head))
    for mib, name, wire, put, get in rows:
        vs_redis = get / base[(mib, "redis-py SET/GET")][4]
        vs_copy = get / base[(mib, "memcpy (torch clone)")][4]
        print(f"{mib:>5}  {name:22} {wire / 2**20:>9.2f} {put:>9.2f} {get:>9.2f} {vs_redis:>13.2f} {vs_copy:>11.3f}")


if __name__ == "__main__":
    main()
