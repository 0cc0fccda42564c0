"""Worker processes for the concurrency test (a module of its own so that spawn can import it)."""

from __future__ import annotations

import random
import time
from typing import Any


def expected_tensor(seed: int, n: int) -> Any:
    import torch

    return torch.arange(n, dtype=torch.int64) * 7 + seed


def hammer(url: str, namespace: str, worker: int, seconds: float, keys: int, barrier: Any, results: Any) -> None:
    """Put/get random sizes under a few shared keys and bump one counter hash until the deadline.

    Reports what it did; every entry read back is checked against the tensor its meta promises.
    """
    t_start = time.monotonic()
    import torch

    from kvcomm.store import KVEntry, RedisStore

    torch.set_num_threads(1)  # 8 processes share the cores with redis-server
    t_imported = time.monotonic()
    store = RedisStore(url, namespace=namespace, retry_after=0, socket_timeout=30)
    rng = random.Random(worker)
    increments = {"shared": 0, f"w{worker}": 0}
    done = {"puts": 0, "gets": 0, "hits": 0, "wrong": 0, "records": 0, "lost_increments": 0}
    barrier.wait(timeout=120)  # all processes imported torch: start together
    deadline = time.monotonic() + seconds
    seq = 0
    while time.monotonic() < deadline:
        seq += 1
        key = f"entry{rng.randrange(keys)}"
        if rng.random() < 0.5:
            n = rng.choice([1, 1_000, 16_384, 100_000])  # up to 1 MB per value
            seed = worker * 10_000_000 + seq
            entry = KVEntry({"x": expected_tensor(seed, n), "half": torch.full((n // 8,), seed % 97, dtype=torch.bfloat16)},
                            meta={"seed": seed, "n": n, "writer": worker})
            done["puts"] += store.put(key, entry)
        else:
            done["gets"] += 1
            entry = store.get(key)
            if entry is not None:
                done["hits"] += 1
                meta = entry.meta
                ok = torch.equal(entry.tensors["x"], expected_tensor(meta["seed"], meta["n"])) and bool(
                    (entry.tensors["half"] == meta["seed"] % 97).all()
                )
                done["wrong"] += not ok
        for field, amount in (("shared", 1), (f"w{worker}", rng.randrange(1, 5))):
            if store.pool_increment("pool", field, amount) is None:
                done["lost_increments"] += 1
            else:
                increments[field] += amount
        if seq % 10 == 0:
            done["records"] += store.append_record("records", {"worker": worker, "seq": seq})
    timing = {"import_s": t_imported - t_start, "loop_s": time.monotonic() - deadline + seconds}
    results.put({"worker": worker, "increments": increments, **done, "faults": store.stats()["faults"], **timing})
    store.close()
