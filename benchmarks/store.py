"""Store throughput against the physical limit, and the fetch time of reuse calls.

Entry reads (default ``--sizes 16,64,128`` MiB of bf16 KV), each measured in the same run:

- ``loopback socket``: the same bytes through a plain TCP socket on 127.0.0.1 from a server in
  another process, received into one reused buffer: the most this machine moves through a socket;
- ``redis raw read``: a ``GETRANGE`` reply read from redis-server straight into a reused buffer,
  nothing parsed, checked or decoded: the most any client can get out of this redis-server;
- ``redis-py GET``: plain redis-py (with hiredis, as installed with kvcomm, and with its pure
  Python parser, the baseline of issue 17);
- ``RedisStore``: kvcomm's store (raw and int8 codecs, and chunked in 16 MiB chunks), decoded
  into tensors with the checksum verified; ``MemoryStore`` and a torch clone for scale.

``--calls`` instead measures ``fetch_ms`` of reuse calls (SmolLM2-135M on the CPU, Redis as the
only tier, 4 document slots with 5 anchors each): what one call waits for its anchors' deltas and
base KV. Public API only, so the same file measures an older checkout too.

    python benchmarks/store.py --sizes 16,64,128 --redis-url redis://127.0.0.1:6379/0
    python benchmarks/store.py --calls --redis-url redis://127.0.0.1:6379/0   # --words 10,4: small entries

GB/s are logical KV bytes per second ("wire MiB" is what crossed the socket, so int8 moving about
half the bytes shows up as a higher rate). Each number is the median of ``--repeat`` runs after a
warm-up. Prints tables; asserts nothing.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import redis
import torch

from kvcomm.keys import namespace_prefix
from kvcomm.store import KVEntry, MemoryStore, RedisStore

LAYERS, HEADS, DIM = 16, 8, 128  # bytes per token of k+v in bf16: 2 * 16 * 8 * 128 * 2 = 64 KiB
PLAIN_KEY = namespace_prefix("bench") + "plain"  # the redis-py baseline's key, in the stores' namespace

# a one-connection TCP server: for every byte received it sends N bytes back (N from argv)
_LOOPBACK_SERVER = """
import os, socket, sys
n = int(sys.argv[1])
data = os.urandom(n)
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while c.recv(1):
    c.sendall(data)
"""


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


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError("closed")
        got += n


def loopback_time(nbytes: int, repeat: int) -> float:
    """Seconds to receive ``nbytes`` through a TCP socket on 127.0.0.1 into one reused buffer."""
    server = subprocess.Popen([sys.executable, "-c", _LOOPBACK_SERVER, str(nbytes)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            view = memoryview(bytearray(nbytes))

            def once() -> None:
                sock.sendall(b"x")
                _recv_exactly(sock, view)

            return timed(once, repeat)
    finally:
        server.kill()
        server.wait()


def raw_redis_time(client: redis.Redis, key: str, nbytes: int, repeat: int) -> float:
    """Seconds to read a value's ``GETRANGE`` reply straight from the socket into one reused buffer."""
    conn = client.connection_pool.get_connection()
    view = memoryview(bytearray(nbytes + 2))
    try:
        def once() -> None:
            conn.send_command("GETRANGE", key, 0, nbytes)
            head = b""
            while not head.endswith(b"\r\n"):
                head += conn._sock.recv(1)
            _recv_exactly(conn._sock, view[: int(head[1:-2]) + 2])

        return timed(once, repeat)
    finally:
        client.connection_pool.release(conn)


def bench_size(mib: int, repeat: int, url: str, device: torch.device) -> list[tuple[Any, ...]]:
    """Rows (MiB, backend, wire bytes, put GB/s or None, get GB/s) for one entry size."""
    entry = make_entry(mib)
    nbytes = entry.nbytes
    gb = nbytes / 1e9
    rows: list[tuple[Any, ...]] = [(mib, "loopback socket", nbytes, None, gb / loopback_time(nbytes, repeat))]

    src = torch.cat([entry.tensors["k"].reshape(-1), entry.tensors["v"].reshape(-1)]).to(device)
    t_copy = timed(lambda src=src: (src.clone(), sync(device)), repeat)
    rows.append((mib, "memcpy (torch clone)", nbytes, gb / t_copy, gb / t_copy))

    blob = src.cpu().view(torch.uint8).numpy().tobytes()
    del src
    hiredis = redis.Redis.from_url(url)
    pure = redis.Redis.from_url(url, parser_class=redis.connection._RESP2Parser, protocol=2)
    t_set = timed(lambda blob=blob: hiredis.set(PLAIN_KEY, blob), repeat)
    rows.append((mib, "redis raw read", len(blob), None, gb / raw_redis_time(hiredis, PLAIN_KEY, len(blob), repeat)))
    rows.append((mib, "redis-py GET (hiredis)", len(blob), gb / t_set, gb / timed(lambda: hiredis.get(PLAIN_KEY), repeat)))
    rows.append((mib, "redis-py GET (py parser)", len(blob), None, gb / timed(lambda: pure.get(PLAIN_KEY), repeat)))
    hiredis.delete(PLAIN_KEY)
    hiredis.close()
    pure.close()
    del blob

    mem = MemoryStore(device=device, max_bytes=4 * nbytes, namespace="bench")
    t_put = timed(lambda: (mem.put("e", entry), sync(device)), repeat)
    t_get = timed(lambda: mem.get("e"), repeat)
    rows.append((mib, "MemoryStore", nbytes, gb / t_put, gb / t_get))
    mem.close()

    for name, options in (("RedisStore raw", {}), ("RedisStore int8", {"codec": "int8"}),
                          ("RedisStore chunked 16MiB", {"chunk_bytes": 16 << 20})):
        if name.endswith("chunked 16MiB") and nbytes <= 16 << 20:
            continue
        store = RedisStore(url, namespace="bench", device=device, socket_timeout=60,
                           max_entry_bytes=max(512 << 20, 2 * nbytes), buffer_bytes=4 * nbytes, **options)
        if not store.put("e", entry):
            raise SystemExit(f"{name} put failed: {store.stats()['faults']}")
        wire = store.stats()["bytes_written"]
        t_put = timed(lambda store=store: store.put("e", entry), repeat)
        t_get = timed(lambda store=store: (store.get("e", fingerprint="bench"), sync(device)), repeat)
        if sum(store.stats()["faults"].values()) or store.stats()["misses"]:
            raise SystemExit(f"{name}: faults during the benchmark: {store.stats()}")
        rows.append((mib, name, wire, gb / t_put, gb / t_get))
        store.clear()
        store.close()
    return rows


def print_table(rows: list[tuple[Any, ...]]) -> None:
    base = {(r[0], r[1]): r[4] for r in rows}
    head = (f"{'MiB':>5}  {'backend':26} {'wire MiB':>9} {'put GB/s':>9} {'get GB/s':>9} {'get/loopback':>13} "
            f"{'x redis-py':>11} {'x py-parser':>12}")
    print(head)
    print("-" * len(head))
    for mib, name, wire, put, get in rows:
        put_text = f"{put:>9.2f}" if put is not None else f"{'':>9}"
        loop = get / base[(mib, "loopback socket")]
        vs_hiredis = get / base[(mib, "redis-py GET (hiredis)")]
        vs_pure = get / base[(mib, "redis-py GET (py parser)")]
        print(f"{mib:>5}  {name:26} {wire / 2**20:>9.2f} {put_text} {get:>9.2f} {loop:>13.2f} "
              f"{vs_hiredis:>11.2f} {vs_pure:>12.2f}")


# -- fetch_ms of reuse calls --------------------------------------------------------------------------
_WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
          "quebec romeo sierra tango uniform victor whiskey xray yankee zulu river stone cloud field").split()


def _text(seed: int, words: int) -> str:
    import random

    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def bench_calls(url: str, calls: int, anchor_words: int = 40, new_words: int = 30) -> None:
    """fetch_ms of reuse calls, Redis the only tier: 4 slots x 5 anchors (min_anchors=5, gamma=1).

    The anchors' documents are ``anchor_words`` words long, the new ones ``new_words`` (no longer).
    Only anchors at least as many *tokens* long stand in for a content, and words tokenize to 1-3
    tokens: leave a margin (``--words 6,4`` makes some new documents longer than 5 anchors, so they
    become anchors and the call is a prefill, which this benchmark stops on; ``10,4`` does not).
    """
    import uuid

    from kvcomm import KVCommConfig, KVCommEngine, Template
    from kvcomm.models import load_model

    torch.set_num_threads(1)
    loaded = load_model("smollm2-135m", dtype="float32", device="cpu")
    template = Template.from_system_user(
        "You read documents.", "A: {doc:1}\nB: {doc:2}\nC: {doc:3}\nD: {doc:4}\nSummarize.")
    store = RedisStore(url, namespace="fetch-" + uuid.uuid4().hex[:8])
    engine = KVCommEngine(loaded.model, loaded.tokenizer, store=store, fingerprint=loaded.fingerprint,
                          config=KVCommConfig(max_new_tokens=1, min_anchors=5, gamma=1.0, fast_path=False))
    engine.register_agent("reader", template)
    for r in range(5):  # five 40-word documents per slot: the anchors (dense calls record their deltas)
        engine.generate("reader", {f"doc:{j}": _text(100 * r + j, anchor_words) for j in range(1, 5)})
    fetch, ttft, anchors = [], [], 0
    before = store.stats()
    for r in range(calls):  # new 30-word documents: shared from the 5 anchors of each slot
        res = engine.generate("reader", {f"doc:{j}": _text(1000 + 100 * r + j, new_words) for j in range(1, 5)})
        if res.mode != "reuse":
            raise SystemExit(f"call {r} was {res.mode}: {res.record.slots}")
        fetch.append(res.record.fetch_ms)
        ttft.append(res.record.ttft_ms)
        anchors = res.record.anchors_matched
    after = store.stats()
    read = (after["bytes_read"] - before["bytes_read"]) / calls
    print(f"{calls} reuse calls, 4 slots, {anchors} anchors matched, {read / 2**20:.1f} MiB read per call")
    print(f"fetch_ms median {statistics.median(fetch):.1f}  mean {statistics.fmean(fetch):.1f}  "
          f"min {min(fetch):.1f}   TTFT median {statistics.median(ttft):.1f} ms")
    store.clear()
    store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16,64,128", help="entry sizes in MiB, comma separated")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--repeat", type=int, default=0, help="runs per measurement (default: by size)")
    ap.add_argument("--device", default="cpu", help="device of the memory tier and decoded tensors")
    ap.add_argument("--calls", action="store_true", help="measure fetch_ms of reuse calls instead")
    ap.add_argument("--n", type=int, default=8, help="reuse calls measured with --calls")
    ap.add_argument("--words", default="40,30", help="--calls: words of the anchors' and the new documents")
    args = ap.parse_args()
    if args.calls:
        anchor_words, new_words = (int(w) for w in args.words.split(","))
        bench_calls(args.redis_url, args.n, anchor_words, new_words)
        return
    device = torch.device(args.device)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    redis.Redis.from_url(args.redis_url).ping()
    print(f"device={device}  torch threads={torch.get_num_threads()}  redis={args.redis_url}")
    rows = [row for mib in sizes for row in bench_size(mib, args.repeat or max(3, min(9, 128 // mib)),
                                                        args.redis_url, device)]
    print_table(rows)


if __name__ == "__main__":
    main()
