"""The store under the real engine (SmolLM2-135M, fp32 CPU) against real redis-servers.

- issue 5 #1: two OS processes share one Redis: the second reuses the first's template KV,
  anchors and deltas on its very first call, with the outputs of one process doing everything;
- issue 5 #2: the server is killed between two agent calls: dense fallback, a warning, counters,
  the outputs of a run without faults;
- issue 9 #3: entries tampered in Redis (flipped byte, swapped values, forged, unsigned) are all
  misses through the engine, whose outputs equal a run on a fresh, empty store;
- issue 5 #4 (part): the int8 codec under the engine: bytes vs raw, reuse still happens,
  first-token agreement with raw (printed; the full comparison is ``kvcomm eval``);
- issue 17 #2: a reuse call with Redis as its only tier reads its anchors in one batched round
  trip (counted by the store and seen by the server's MONITOR).
"""

from __future__ import annotations

import os
import uuid

import pytest
import redis
import torch
from _store_worker import AGENTS, make_engine, run_pipeline, run_worker

from kvcomm.errors import StoreFaultWarning
from kvcomm.keys import namespace_prefix
from kvcomm.store import KVEntry, MemoryStore, RedisStore, TieredStore
from kvcomm.store.codec import encode

N_NEW = 6
# The new request is shorter than the earlier ones: both earlier questions are length-compatible
# anchors of the `question` slot, so the shareability test can share it instead of adding an anchor.
EARLIER = [
    "What is the capital city of France, and which famous river flows through the middle of it?",
    "Name three prime numbers that are larger than ten and explain briefly why each of them is prime.",
]
NEW = "What is the boiling point of water at sea level?"
# more short requests for the int8 vs raw agreement (planner calls only: ~1 s each)
EXTRA = ["How many legs does a spider have?", "Who wrote the play Romeo and Juliet?",
         "What gas do plants take in from the air?"]
SECRET = "kvcomm-test-secret-0123456789abcdef"


def _ns(tag: str) -> str:
    return f"se-{tag}-{uuid.uuid4().hex[:10]}"


def _ids(calls: list[dict]) -> list[list[int]]:
    return [c["ids"] for c in calls]


def _entry_keys(client: redis.Redis, ns: str) -> list[bytes]:
    """Every KV entry (Redis string) of a namespace; pools, use counts and metrics are not strings."""
    keys = sorted(client.scan_iter(match=namespace_prefix(ns) + "*", count=1000))
    return [k for k in keys if client.type(k) == b"string"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(smollm2):
    """One torch thread in this module (restored after): on a 2-core machine shared with other work a
    2-thread forward of this small model is ~4x slower than a 1-thread one (spinning threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(smollm2, redis_url) -> dict:
    """ONE process doing every request in order (the earlier ones, then NEW) on its own store: an
    in-process MemoryStore in front of a signed Redis namespace (the tamper test attacks that one
    afterwards; the calls are recorded here first)."""
    ns = _ns("ref")
    store = TieredStore([MemoryStore(namespace=ns), RedisStore(redis_url, namespace=ns, secret=SECRET)])
    calls = run_pipeline(make_engine(smollm2, store, max_new_tokens=N_NEW), [*EARLIER, NEW], max_new_tokens=N_NEW)
    assert sum(store.stats()["faults"].values()) == 0
    store.close()
    return {"ns": ns, "calls": calls}


def _worker(spec: dict) -> dict:
    return run_worker(spec)


# -- issue 5 #1 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("first_process", ["pytest", pytest.param("subprocess", marks=pytest.mark.slow)])
def test_second_process_reuses_first_process_work(smollm2, redis_url, reference, first_process):
    """Process 1 (this pytest process, or a subprocess: slow, one more model load) runs the earlier
    requests; process 2, a new OS process with an empty memory tier, runs NEW."""
    ns = _ns("xproc")
    if first_process == "pytest":
        store = TieredStore([MemoryStore(namespace=ns), RedisStore(redis_url, namespace=ns)])
        first = {"pid": os.getpid(), "calls": run_pipeline(make_engine(smollm2, store, max_new_tokens=N_NEW), EARLIER,
                                                           max_new_tokens=N_NEW), "stats": store.stats()}
        store.close()
    else:
        first = _worker({"url": redis_url, "namespace": ns, "questions": EARLIER, "max_new_tokens": N_NEW})
    assert first["calls"][0]["mode"] == "prefix"  # the first agent of the first request pays a prefill
    assert first["stats"]["faults"] == dict.fromkeys(first["stats"]["faults"], 0)
    # process 1 alone computed what the one-process run computed for the same requests
    assert _ids(first["calls"]) == _ids(reference["calls"][: len(first["calls"])])

    second = _worker({"url": redis_url, "namespace": ns, "questions": [NEW], "max_new_tokens": N_NEW,
                      "fresh_namespace": _ns("xproc-empty")})
    assert second["pid"] != first["pid"]
    # against an empty store the same call is a prefill (after the fixed prefix) ...
    assert second["fresh_mode"] == "prefix"
    # ... but process 2 starts with an empty memory tier and finds process 1's work in Redis:
    # both agents' template KV (hits while registering, no prefill) ...
    assert second["register"]["hits"] == 2 and second["register"]["misses"] == 0
    # ... and the anchors (pool state, base KV, planner deltas): its first call reuses
    planner = second["calls"][0]
    assert planner["agent"] == "planner" and planner["mode"] == "reuse", planner
    assert planner["slots"]["question"].startswith("shared(")
    assert second["stats"]["hits"] > 2 and second["stats"]["promotions"] > 0
    assert second["stats"]["faults"] == dict.fromkeys(second["stats"]["faults"], 0)
    # and it answers exactly what one process doing all requests in order answers
    ref_new = [c for c in reference["calls"] if c["request"] == len(EARLIER)]
    assert [c["mode"] for c in second["calls"]] == [c["mode"] for c in ref_new]
    assert _ids(second["calls"]) == _ids(ref_new)


# -- issue 5 #2 -------------------------------------------------------------------------------------
def test_server_killed_mid_pipeline_falls_back_to_dense(smollm2, fresh_redis, recwarn):
    ns = _ns("kill")
    store = TieredStore([MemoryStore(namespace=ns), RedisStore(fresh_redis.url, namespace=ns)])
    eng = make_engine(smollm2, store, max_new_tokens=N_NEW)
    q = EARLIER[0]
    first = [eng.generate(a, {"question": q}) for a in ("planner", "solver")]
    assert [r.mode for r in first] == ["prefix", "prefix"]  # new anchors: deltas recorded in Redis
    eng.reset_answers()  # the same request again: every slot is an exact anchor with deltas
    plan = eng.generate("planner", {"question": q})
    assert plan.mode == "reuse"
    assert not [w for w in recwarn if issubclass(w.category, StoreFaultWarning)]

    fresh_redis.kill()  # between the planner and the solver of one request
    with pytest.warns(StoreFaultWarning, match="unreachable"):
        solve = eng.generate("solver", {"question": q})  # would be "reuse" with the server up
    assert solve.mode == "prefix"  # prefilled after the fixed prefix, registered in memory
    stats = store.stats()
    assert stats["faults"]["unreachable"] > 0
    assert stats["tiers"][1]["faults"]["unreachable"] > 0  # counted by the Redis tier itself

    # the reference: a dense-policy engine (no store involved) on the same inputs
    dense = make_engine(smollm2, MemoryStore(), max_new_tokens=N_NEW, policy="dense")
    assert plan.token_ids == first[0].token_ids  # exact-anchor reuse = the dense prefill's answer
    answer = [t for t in plan.token_ids if t not in eng.eos_ids]
    ref_solve = dense.generate("solver", {"question": q, "agent:planner": dense.publish("agent:planner", ids=answer)})
    assert solve.token_ids == ref_solve.token_ids == first[1].token_ids


# -- issue 9 #3 -------------------------------------------------------------------------------------
def _tamper(client: redis.Redis, ns: str) -> dict[str, list[bytes]]:
    """Tamper with every entry of ``ns``, four ways in turn; returns the keys by kind of attack."""
    keys = _entry_keys(client, ns)
    assert len(keys) >= 8
    done: dict[str, list[bytes]] = {"flip": [], "swap": [], "forge": [], "unsigned": []}
    prefix = namespace_prefix(ns).encode()
    honest = RedisStore(_url(client), namespace=ns, secret=SECRET)
    i = turn = 0
    while i < len(keys):
        kind = ("flip", "swap", "forge", "unsigned")[turn % 4]
        turn += 1
        key = keys[i]
        if kind == "swap" and i + 1 < len(keys):  # two keys' values exchanged (each validly signed)
            a, b = client.get(key), client.get(keys[i + 1])
            client.set(key, b)
            client.set(keys[i + 1], a)
            done["swap"] += [key, keys[i + 1]]
            i += 2
            continue
        if kind in ("flip", "swap"):  # one payload byte of a signed entry
            blob = bytearray(client.get(key))
            blob[-1] ^= 0x5A
            client.set(key, bytes(blob))
            done["flip"].append(key)
        else:  # an attacker's entry for this very key: the right format, KV of their choosing
            rel = key[len(prefix):].decode()
            entry = honest.get(rel)
            assert entry is not None
            evil = KVEntry(tensors={n: t + 1.0 for n, t in entry.tensors.items()}, meta=entry.meta,
                           fingerprint=entry.fingerprint)
            secret = b"not-the-team-secret-0123456789" if kind == "forge" else None
            client.set(key, encode(evil, namespace=ns, key=rel, secret=secret))
            done[kind].append(key)
        i += 1
    honest.close()
    return done


def _url(client: redis.Redis) -> str:
    kw = client.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}"


def test_tampered_entries_are_misses_through_the_engine(smollm2, redis_url, reference):
    """The reference run left a signed namespace in which NEW's planner call was a reuse; tamper
    with every entry, then run NEW again from a fresh engine and store."""
    ns = reference["ns"]
    assert reference["calls"][2 * len(EARLIER)]["mode"] == "reuse"  # what the intact store gave NEW
    client = redis.Redis.from_url(redis_url)
    tampered = _tamper(client, ns)
    assert all(tampered.values()), tampered
    bad = {k: client.get(k) for v in tampered.values() for k in v}

    with RedisStore(redis_url, namespace=ns, secret=SECRET) as store, \
            pytest.warns(StoreFaultWarning) as warned:  # every rejected entry says why, as a warning
        eng = make_engine(smollm2, store, max_new_tokens=N_NEW)
        reg = store.stats()
        assert reg["hits"] == 0 and reg["misses"] == 2  # both template entries were tampered: prefilled
        calls = run_pipeline(eng, [NEW], max_new_tokens=N_NEW)
        stats = store.stats()
        # no tampered value was ever accepted: those the engine did not rewrite are still misses
        for key, blob in bad.items():
            if client.get(key) == blob:
                assert store.get(key[len(namespace_prefix(ns)):].decode()) is None, key
    faults = stats["faults"]
    assert faults["corrupt"] > 0 and faults["bad_mac"] > 0 and faults["unsigned"] > 0, faults
    said = " ".join(str(w.message) for w in warned)
    assert all(f"{kind}: entry" in said for kind in ("corrupt", "bad_mac", "unsigned")), said
    # the anchors' base KV and deltas are gone, so NEW becomes an anchor: prefilled, as on an empty store
    assert [c["mode"] for c in calls] == ["prefix", "prefix"]
    print(f"\ntampered {sum(map(len, tampered.values()))} entries "
          f"({', '.join(f'{k} {len(v)}' for k, v in tampered.items())}); faults in the re-run: "
          f"{ {k: v for k, v in faults.items() if v} }, hits {stats['hits']}, misses {stats['misses']}")

    with RedisStore(redis_url, namespace=_ns("tamper-fresh"), secret=SECRET) as fresh:
        ref = run_pipeline(make_engine(smollm2, fresh, max_new_tokens=N_NEW), [NEW], max_new_tokens=N_NEW)
    assert [c["mode"] for c in ref] == ["prefix", "prefix"]
    assert _ids(calls) == _ids(ref)
    client.close()


# -- issue 5 #4 (part) ------------------------------------------------------------------------------
def test_int8_codec_under_the_engine(smollm2, redis_url):
    """Planner calls on the same requests with an int8 and a raw Redis tier (no memory tier in
    front, so every read decodes). Per-channel K scales are fp32 [L, H, 1, D], independent of the
    token count, so short entries (T < ~29 tokens) stay above 55% of bf16; against the fp32 the
    engine computes the ratio is ~0.25 + 1/T."""
    questions = [*EARLIER, NEW, *EXTRA]
    runs, sizes, ns = {}, {}, {}
    client = redis.Redis.from_url(redis_url)
    for codec in ("int8", "raw"):
        ns[codec] = _ns(codec)
        with RedisStore(redis_url, namespace=ns[codec], codec=codec) as store:
            eng = make_engine(smollm2, store, max_new_tokens=N_NEW, agents=AGENTS[:1])
            runs[codec] = run_pipeline(eng, questions, max_new_tokens=N_NEW)
            assert sum(store.stats()["faults"].values()) == 0
    calls, raw_calls = runs["int8"], runs["raw"]
    assert calls[len(EARLIER)]["mode"] == raw_calls[len(EARLIER)]["mode"] == "reuse"  # NEW's planner

    # bytes: the int8 run's entries, and the same entries written raw (fp32) and as bf16
    with RedisStore(redis_url, namespace=ns["int8"], codec="int8") as store, \
            RedisStore(redis_url, namespace=_ns("as-raw")) as raw, RedisStore(redis_url, namespace=_ns("as-bf16")) as bf16:
        keys = [k.decode()[len(namespace_prefix(ns["int8"])):] for k in _entry_keys(client, ns["int8"])]
        sizes = {"int8": 0, "raw": 0, "bf16": 0}
        for key in keys:
            entry = store.get(key)
            assert entry is not None
            halves = {n: t.to(torch.bfloat16) if t.is_floating_point() else t for n, t in entry.tensors.items()}
            assert raw.put(key, entry)
            assert bf16.put(key, KVEntry(tensors=halves, meta=entry.meta, fingerprint=entry.fingerprint))
            for name, st in (("int8", store), ("raw", raw), ("bf16", bf16)):
                sizes[name] += client.strlen(namespace_prefix(st.namespace) + key)
        raw.clear()
        bf16.clear()
    client.close()
    ratio_raw, ratio_bf16 = sizes["int8"] / sizes["raw"], sizes["int8"] / sizes["bf16"]
    assert ratio_raw <= 0.55

    first = [a["ids"][:1] == b["ids"][:1] for a, b in zip(calls, raw_calls, strict=True)]
    full = [a["ids"] == b["ids"] for a, b in zip(calls, raw_calls, strict=True)]
    reused = [i for i, (a, b) in enumerate(zip(calls, raw_calls, strict=True)) if a["mode"] == b["mode"] == "reuse"]
    print(f"\nint8 vs raw: {len(keys)} entries, {sizes['int8']} / {sizes['raw']} bytes = {ratio_raw:.3f} of raw fp32, "
          f"{ratio_bf16:.3f} of bf16; first-token agreement {sum(first)}/{len(first)} calls "
          f"({sum(first[i] for i in reused)}/{len(reused)} calls reusing in both), identical outputs "
          f"{sum(full)}/{len(full)}; modes int8 {[c['mode'] for c in calls]} raw {[c['mode'] for c in raw_calls]}")
    assert full[0]  # the first call is dense: no stored KV is involved


# -- issue 17 #2 ------------------------------------------------------------------------------------
def test_a_reuse_call_reads_its_anchors_in_one_round_trip(smollm2, redis_url):
    """Redis is the only tier. The plan of a reuse call reads every slot's pool state in one batch
    and every anchor's deltas and base KV in one more, whatever the number of slots and anchors;
    read one at a time that was 2 per slot + 2 per anchor."""
    import threading

    ns = _ns("trips")
    store = RedisStore(redis_url, namespace=ns)
    eng = make_engine(smollm2, store, max_new_tokens=N_NEW)
    run_pipeline(eng, EARLIER, max_new_tokens=N_NEW)  # both questions become anchors with deltas
    eng.reset_answers()
    seen: dict = {}
    plan = eng.planner.plan_with_anchors

    def counted(agent, contents):
        before = store.stats()["round_trips"]
        lines: list[str] = []
        client = redis.Redis.from_url(redis_url)
        ready = threading.Event()

        def watch() -> None:
            with client.monitor() as m:
                ready.set()
                for event in m.listen():
                    if "kvcomm-monitor-stop" in event["command"]:
                        return
                    if ns in event["command"]:
                        lines.append(event["command"].split()[0])

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        ready.wait(5)
        out = plan(agent, contents)
        seen["round_trips"] = store.stats()["round_trips"] - before
        client.get("kvcomm-monitor-stop")
        thread.join(5)
        client.close()
        seen["commands"] = lines
        seen["slots"] = len(contents)
        return out

    eng.planner.plan_with_anchors = counted
    res = eng.generate("planner", {"question": NEW})
    assert res.mode == "reuse" and res.record.slots["question"] == "shared(2)", res.record.slots
    anchors = res.record.anchors_matched
    assert seen["round_trips"] == 2, seen  # pools, then entries: one batch each
    assert seen["commands"] == ["HGETALL"] * 2 * seen["slots"] + ["GETRANGE"] * 2 * anchors, seen
    print(f"\nreuse call: {seen['slots']} slot(s), {anchors} anchors: {seen['round_trips']} round trips "
          f"(one at a time: {2 * seen['slots'] + 2 * anchors}); fetch {res.record.fetch_ms:.2f} ms")
    store.clear()
    store.close()


def test_a_shared_content_gets_its_anchor_weights_computed_once(smollm2, redis_url, reference, monkeypatch):
    """Redis as the only tier hands out new tensors on every read. The solver reads the question
    the planner has just shared over the same anchors: it reuses the planner's anchor weights for
    it (kept under the content's and the anchors' hashes) instead of recomputing them from its
    own copy, and the pipeline's outputs are the reference's."""
    from kvcomm.deviation import WeightMemo

    ns = _ns("weights")
    store = RedisStore(redis_url, namespace=ns)
    eng = make_engine(smollm2, store, max_new_tokens=N_NEW)
    calls = run_pipeline(eng, EARLIER, max_new_tokens=N_NEW)  # both questions become anchors
    seen: list[tuple[str, tuple[str, ...] | None, bool]] = []
    get = WeightMemo.get

    def recorded(self, tag, tensors, compute, names=None):
        hits = self.hits
        out = get(self, tag, tensors, compute, names=names)
        seen.append((tag, names, self.hits > hits))
        return out

    monkeypatch.setattr(WeightMemo, "get", recorded)
    eng.reset_answers()
    planner = eng.generate("planner", {"question": NEW}, max_new_tokens=N_NEW, request_id="r2")
    assert planner.mode == "reuse" and planner.record.slots["question"] == "shared(2)", planner.record.slots
    computed = {(tag, names) for tag, names, hit in seen if not hit}
    assert computed and all(names is not None for _, names in computed)  # slot and segment, keys and values
    seen.clear()
    solver = eng.generate("solver", {"question": NEW}, max_new_tokens=N_NEW, request_id="r2")
    assert solver.mode == "reuse" and solver.record.slots["question"] == "shared(2)", solver.record.slots
    question = {hash_ for _, names in computed for hash_ in names[:1]}
    again = [(tag, names, hit) for tag, names, hit in seen if names is not None and names[0] in question]
    assert len(again) == len(computed) and all(hit for *_, hit in again), seen
    calls += [{"request": 2, "agent": name, "mode": res.mode, "ids": list(res.token_ids), "slots": dict(res.record.slots)}
              for name, res in (("planner", planner), ("solver", solver))]
    assert _ids(calls) == _ids(reference["calls"])
    store.close()
