"""The real engine (SmolLM2-135M, fp32 CPU) on a real local Redis Cluster of three masters.

- two OS processes share one cluster: the second (a new process with an empty memory tier)
  reuses the first's anchors on its very first call, with the outputs of one process doing
  everything;
- a master is killed between two agent calls of a request: the keys on it are misses with a
  warning, the answers equal a dense run's, and the other shards keep serving.
"""

from __future__ import annotations

import os
import uuid

import pytest
import torch
from _store_worker import AGENTS, make_engine, run_pipeline, run_worker

from kvcomm.errors import StoreFaultWarning
from kvcomm.keys import PoolKey, model_id, namespace_prefix
from kvcomm.store import MemoryStore, RedisStore, TieredStore

N_NEW = 6
EARLIER = [
    "What is the capital city of France, and which famous river flows through the middle of it?",
    "Name three prime numbers that are larger than ten and explain briefly why each of them is prime.",
]
NEW = "What is the boiling point of water at sea level?"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(smollm2):
    """One torch thread (restored after), as in tests/test_store_engine.py: faster on 2 shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ids(calls: list[dict]) -> list[list[int]]:
    return [c["ids"] for c in calls]


def test_second_process_reuses_the_first_ones_anchors_through_the_cluster(smollm2, redis_cluster):
    ns = "cx-" + uuid.uuid4().hex[:10]
    reference = run_pipeline(make_engine(smollm2, MemoryStore(), max_new_tokens=N_NEW), [*EARLIER, NEW],
                             max_new_tokens=N_NEW)  # one process doing everything, no Redis at all
    store = TieredStore([MemoryStore(namespace=ns), RedisStore(redis_cluster.url, namespace=ns)])
    first = run_pipeline(make_engine(smollm2, store, max_new_tokens=N_NEW), EARLIER, max_new_tokens=N_NEW)
    stats = store.stats()
    assert stats["faults"] == dict.fromkeys(stats["faults"], 0)
    shards = store.tiers[1].usage()["shards"]
    assert all(row["entries"] > 0 for row in shards), shards  # the work is spread over all three
    store.close()
    assert _ids(first) == _ids(reference[: len(first)])

    second = run_worker({"url": redis_cluster.url, "namespace": ns, "questions": [NEW], "max_new_tokens": N_NEW})
    assert second["pid"] != os.getpid()
    assert second["register"]["hits"] == 2 and second["register"]["misses"] == 0  # templates from the cluster
    planner = second["calls"][0]
    assert planner["agent"] == "planner" and planner["mode"] == "reuse", planner
    assert planner["slots"]["question"].startswith("shared(")
    assert second["stats"]["faults"] == dict.fromkeys(second["stats"]["faults"], 0)
    ref_new = [c for c in reference if c["request"] == len(EARLIER)]
    assert [c["mode"] for c in second["calls"]] == [c["mode"] for c in ref_new]
    assert _ids(second["calls"]) == _ids(ref_new)


def test_master_killed_mid_pipeline_answers_equal_dense(smollm2, fresh_cluster, recwarn):
    ns = "ckill-" + uuid.uuid4().hex[:8]
    store = RedisStore(fresh_cluster.url, namespace=ns, retry_after=30, socket_connect_timeout=0.5)
    eng = make_engine(smollm2, store, max_new_tokens=N_NEW)
    q = EARLIER[0]
    first = [eng.generate(a, {"question": q}) for a, _ in AGENTS]
    assert [r.mode for r in first] == ["prefix", "prefix"]  # new anchors: deltas recorded on the cluster
    eng.reset_answers()
    plan = eng.generate("planner", {"question": q})  # every slot an exact anchor with deltas
    assert plan.mode == "reuse"
    assert not [w for w in recwarn if issubclass(w.category, StoreFaultWarning)]

    # the shard holding the question's anchor pool dies between the planner and the solver
    model = model_id(smollm2.fingerprint)
    dead = fresh_cluster.port_of(namespace_prefix(ns) + str(PoolKey(model, "question")))
    alive = [p for p in fresh_cluster.ports if p != dead]
    before = store.stats()
    fresh_cluster.kill(dead)
    with pytest.warns(StoreFaultWarning, match=f"unreachable: .*127.0.0.1:{dead}"):
        solve = eng.generate("solver", {"question": q})  # would be a reuse with every shard up
    after = store.stats()
    assert after["faults"]["unreachable"] > before["faults"]["unreachable"]
    assert after["hits"] > before["hits"]  # the other shards kept serving during the call
    assert solve.record.slots["question"] in ("new-anchor", "shared(0)"), solve.record.slots

    dense = make_engine(smollm2, MemoryStore(), max_new_tokens=N_NEW, policy="dense")
    answer = [t for t in plan.token_ids if t not in eng.eos_ids]
    ref = dense.generate("solver", {"question": q, "agent:planner": dense.publish("agent:planner", ids=answer)})
    assert solve.token_ids == ref.token_ids == first[1].token_ids
    shards = store.usage()["shards"]
    assert sorted(row["node"] for row in shards if "error" not in row) == sorted(f"127.0.0.1:{p}" for p in alive)
    store.close()
