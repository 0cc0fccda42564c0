"""One OS process of tests/test_store_engine.py: a planner -> solver pipeline on a shared Redis.

Usage: ``python tests/_store_worker.py '<json spec>'`` (or :func:`run_worker` from a test) with the
spec keys

- ``url``: the Redis URL (one server or ``redis+cluster://``), ``namespace``: the store namespace
  shared by the processes;
- ``questions``: one request per question (planner, then solver with the planner's answer);
- ``max_new_tokens``; ``threads``: torch's thread count, the test process's own (the same
  kernels give the same float results in every process);
- ``fresh_namespace`` (optional): first run the planner on ``questions[0]`` against this (empty)
  namespace and report its mode, i.e. what the same call gives without anyone's earlier work.

The store is ``TieredStore([MemoryStore(), RedisStore(url)])``: the memory tier of a new process
is empty, so everything it reuses comes from Redis. The last stdout line is a JSON object:
``calls`` (request, agent, mode, token ids, slot states), ``register`` (store counters after the
agents were registered), ``stats`` (the store's ``stats()`` at the end), ``fresh_mode``.
The pipeline helpers are imported by the test too, so both sides run the same code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from kvcomm import KVCommConfig, KVCommEngine, Template

PLANNER = Template.from_system_user("You are a careful planner.", "Question: {question}\nGive a short plan.")
SOLVER = Template.from_system_user(
    "You are a precise solver.", "Question: {question}\nPlan: {agent:planner}\nAnswer briefly."
)
AGENTS = (("planner", PLANNER), ("solver", SOLVER))


def make_engine(loaded: Any, store: Any, *, max_new_tokens: int = 6, agents: tuple = AGENTS, **cfg: Any) -> KVCommEngine:
    eng = KVCommEngine(loaded.model, loaded.tokenizer, store=store, fingerprint=loaded.fingerprint,
                       config=KVCommConfig(max_new_tokens=max_new_tokens, **cfg))
    for name, template in agents:
        eng.register_agent(name, template)
    return eng


def run_pipeline(eng: KVCommEngine, questions: list[str], *, max_new_tokens: int = 6) -> list[dict[str, Any]]:
    """Each question is one request: planner, then solver (reading the planner's answer)."""
    calls = []
    for i, q in enumerate(questions):
        eng.reset_answers()
        for name, _ in AGENTS:
            if name not in eng.agents:
                continue
            res = eng.generate(name, {"question": q}, max_new_tokens=max_new_tokens, request_id=f"r{i}")
            calls.append({"request": i, "agent": name, "mode": res.mode, "ids": list(res.token_ids),
                          "slots": dict(res.record.slots)})
    return calls


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run this file as a new OS process (torch's thread count: this process's) and return its report."""
    spec = {**spec, "threads": torch.get_num_threads()}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(Path(__file__)), json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return report


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    torch.set_num_threads(int(spec["threads"]))
    from kvcomm.models import load_model
    from kvcomm.store import MemoryStore, RedisStore, TieredStore

    loaded = load_model("smollm2-135m", dtype="float32", device="cpu")
    url, ns, n = spec["url"], spec["namespace"], int(spec["max_new_tokens"])
    out: dict[str, Any] = {"pid": os.getpid()}
    if spec.get("fresh_namespace"):
        with RedisStore(url, namespace=spec["fresh_namespace"]) as fresh:
            eng = make_engine(loaded, fresh, max_new_tokens=n, agents=AGENTS[:1])
            out["fresh_mode"] = eng.generate("planner", {"question": spec["questions"][0]}, max_new_tokens=1).mode
    store = TieredStore([MemoryStore(namespace=ns), RedisStore(url, namespace=ns)])
    eng = make_engine(loaded, store, max_new_tokens=n)
    out["register"] = store.stats()
    out["calls"] = run_pipeline(eng, spec["questions"], max_new_tokens=n)
    out["stats"] = store.stats()
    store.close()
    sys.stdout.write(json.dumps(out, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
