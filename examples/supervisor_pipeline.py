"""A supervisor and three workers over one message list, with no template written: drop-in reuse.

Four ``create_react_agent`` agents share a LangGraph ``MessagesState``: the supervisor reads the
conversation and instructs the next worker, the researcher, the analyst and the writer each add
their message, and the supervisor closes. Every agent puts its own system prompt before the
same history, the setting KVCOMM is for. The model of all four is ``KVCommChat(engine)``, the
LangChain chat model, in message-segment mode (:mod:`kvcomm.chat`): each message is a segment
that every later agent reuses, and the supervisor, called again on the grown history, continues
its own earlier call exactly, the worker's message since then reused over it. Answers get the
engine's default 64 new tokens (about half of them end before that)::

    python examples/supervisor_pipeline.py --n 12 --policy dense,kvcomm

The route is fixed (supervisor → researcher → supervisor → analyst → supervisor → writer →
supervisor): a 135M model does not route reliably by itself, and a fixed route makes both runs
make the same calls in the same order, so each kvcomm call stands beside its dense twin.
A task's calls form rounds (the supervisor and a worker); the first round has nothing earlier
to reuse but the user message, so reuse is reported from the second round on.

Besides the run (records for ``kvcomm report``, per-agent reuse, TTFT of the reuse calls beside
the same calls under dense), the first-token agreement with dense is measured teacher-forced on
this message workload, as ``kvcomm eval`` does on its own: every call of the dense run is replayed
in order through a fresh kvcomm engine, on the dense run's conversation, forced on the dense
answer's tokens (each agent's upstream messages carry the replay engine's own KV). Each replayed
call is followed by a dense call of the same prompt: TTFT pairs taken seconds apart, which a
machine shared with other jobs skews far less than two runs minutes apart.
"""

from __future__ import annotations

import json
import statistics
import warnings
from collections import defaultdict
from typing import Any

import torch
from _common import load, make_engine, parser, policies, run_dir, save
from langchain_core.messages import BaseMessage
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import create_react_agent

from kvcomm import KVCommConfig, KVCommEngine
from kvcomm.agents import KVCommChat
from kvcomm.agents.chat_model import to_dicts
from kvcomm.metrics import CONTINUATION_KEY, CallRecord, format_table

EXAMPLE = "supervisor_pipeline"
SUPERVISOR = ("You are the supervisor of a team of three workers: a researcher, an analyst and a writer. "
              "Read the conversation and tell the next worker, in one sentence, what to do.")
WORKERS = {
    "researcher": "You are the researcher of the team. Give the key facts the task needs, briefly.",
    "analyst": "You are the analyst of the team. Weigh the facts given so far and draw one conclusion.",
    "writer": "You are the writer of the team. Write the final answer for the user in two sentences.",
}
ROUTE = list(WORKERS)
PROMPTS = {"supervisor": SUPERVISOR, **WORKERS}
TASKS = [
    "Plan a three day trip to Lisbon for a family with two young children.",
    "Explain why the sky looks blue during the day and red at sunset.",
    "Compare cats and dogs as pets for a small city apartment.",
    "Suggest a weekly training plan for a beginner who wants to run ten kilometres.",
    "Describe how a bill becomes a law in a parliamentary democracy.",
    "Recommend three ways a small bakery could attract more customers.",
    "Explain how vaccines train the immune system to fight a virus.",
    "Outline the pros and cons of working from home for a software team.",
    "Give advice to a student who wants to learn Spanish in one year.",
    "Explain how solar panels turn sunlight into electricity at home.",
    "Propose a simple budget for a university student living alone.",
    "Describe the causes and the effects of the French Revolution.",
    "Explain how a search engine ranks pages for a user query.",
    "Suggest a healthy menu for a vegetarian family for one day.",
    "Explain what inflation is and how central banks try to control it.",
    "Plan a small birthday party for a ten year old who loves dinosaurs.",
]


def route(state: MessagesState) -> str:
    """After the supervisor: the first worker that has not spoken yet, else the end."""
    spoken = {m.name for m in state["messages"] if m.type == "ai"}
    return next((w for w in ROUTE if w not in spoken), END)


def build_graph(model: KVCommChat) -> Any:
    """The supervisor and the workers, each a ``create_react_agent`` (no tools) over ``MessagesState``."""
    g = StateGraph(MessagesState)
    for name, prompt in PROMPTS.items():
        with warnings.catch_warnings():  # langgraph 1.x points to langchain.agents (not a dependency here)
            warnings.simplefilter("ignore", DeprecationWarning)
            agent = create_react_agent(model, tools=[], prompt=prompt, name=name)
        g.add_node(name, agent)
    g.add_edge(START, "supervisor")
    g.add_conditional_edges("supervisor", route, [*ROUTE, END])
    for worker in ROUTE:
        g.add_edge(worker, "supervisor")
    return g.compile()


def run_policy(loaded: Any, policy: str, args: Any, tasks: list[str]) -> tuple[KVCommEngine, list[list[BaseMessage]]]:
    from tqdm import tqdm

    engine = make_engine(loaded, policy, args.store, EXAMPLE, args.max_new_tokens)
    graph = build_graph(KVCommChat(engine=engine))
    conversations = []
    for task in tqdm(tasks, desc=f"{policy:>10}", unit="task"):
        conversations.append(graph.invoke({"messages": [("user", task)]})["messages"])
    return engine, conversations


def calls_of(conversation: list[BaseMessage]) -> list[tuple[str, list[BaseMessage], BaseMessage]]:
    """(agent, the messages it read, its answer) per call, in call order."""
    return [(m.name or "", conversation[:i], m) for i, m in enumerate(conversation) if m.type == "ai"]


def label(rec: CallRecord) -> str:
    return rec.agent.rpartition("#")[0] or rec.agent  # message-mode templates are <agent>#<slots>


#: how the report groups calls. An agent called again on its grown history continues its earlier
#: call (the records' ``@continuation`` slot entry): "continued reuse" where the messages since are served
#: from reused KV over that exact prefix, "continuation" where they are prefilled after it (their
#: anchors lack this agent's deltas yet); "prefix": the other prefilled calls, after the system
#: prompt (new anchors measured); "reuse": every message served from reused KV
KINDS = ("reuse", "continued reuse", "partial", "continuation", "prefix", "dense")


def kind(rec: CallRecord) -> str:
    if CONTINUATION_KEY not in rec.slots:
        return rec.mode
    return "continued reuse" if rec.mode == "reuse" else "continuation"


def reuse_table(records: list[CallRecord], per_task: int) -> list[dict[str, Any]]:
    """Per agent and overall: prompt tokens served from reused KV, all calls and from round 2 on."""
    groups: dict[str, list[tuple[int, CallRecord]]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[label(r)].append((i % per_task, r))
    groups["ALL"] = [(i % per_task, r) for i, r in enumerate(records)]
    rows = []
    for name, items in groups.items():
        later = [r for j, r in items if j >= 2]  # calls 0-1 are round 1 (supervisor, first worker)
        rows.append({"name": name, "calls": len(items),
                     "modes": " ".join(f"{m}:{sum(kind(r) == m for _, r in items)}" for m in KINDS
                                       if any(kind(r) == m for _, r in items)),
                     "reused_pct": _pct([r for _, r in items]), "reused_r2_pct": _pct(later) if later else None})
    return rows


def _pct(records: list[CallRecord]) -> float:
    return 100.0 * sum(r.reused_tokens for r in records) / max(1, sum(r.prompt_tokens for r in records))


def ttft_rows(dense: list[CallRecord], other: list[CallRecord]) -> list[dict[str, Any]]:
    """Each call beside the dense run's same call, per kind (:data:`KINDS`)."""
    if [d.agent for d in dense] != [o.agent for o in other]:
        raise RuntimeError("dense and kvcomm runs made their calls in different orders")
    rows = []
    groups = [(mode, (mode,)) for mode in KINDS[:-1]] + [("all reuse", ("reuse", "continued reuse"))]
    for mode, kinds in groups:
        pairs = [(d, o) for d, o in zip(dense, other, strict=True) if kind(o) in kinds]
        if pairs and (len(kinds) == 1 or len({kind(o) for _, o in pairs}) > 1):
            d_ms = statistics.fmean(d.ttft_ms for d, _ in pairs)
            o_ms = statistics.fmean(o.ttft_ms for _, o in pairs)
            rows.append({"mode": mode, "calls": len(pairs), "dense_ms": d_ms, "kvcomm_ms": o_ms, "speedup": d_ms / o_ms})
    return rows


def teacher_forced(loaded: Any, args: Any, dense_runs: list[list[BaseMessage]]) -> list[dict[str, Any]]:
    """Every dense call replayed in order, forced on the dense tokens, in a fresh kvcomm engine.

    Per mode of the replayed call: first-token agreement with dense and the KL of the first
    token's distribution from dense's, and the TTFT of the replayed call beside a dense call of
    the very same prompt made right after it (pairs taken together: robust to a shared machine).
    """
    from tqdm import tqdm

    def engine(policy: str, max_new_tokens: int) -> KVCommEngine:
        config = KVCommConfig.from_env(policy=policy, max_new_tokens=max_new_tokens)
        return KVCommEngine(loaded.model, loaded.tokenizer, config=config, fingerprint=loaded.fingerprint)

    replay, dense = engine("kvcomm", args.max_new_tokens), engine("dense", 1)
    stats: dict[str, list[tuple[bool, float, float, float]]] = defaultdict(list)
    for conversation in tqdm(dense_runs, desc="  teacher-forced", unit="task"):
        for agent, seen, answer in calls_of(conversation):
            forced = list(answer.response_metadata["token_ids"])
            _, history = to_dicts(seen)
            for m in history:
                m.pop("id", None)  # the dense engine's ids: each engine finds its own answers by text
            res = replay.chat(PROMPTS[agent], history, agent=agent, forced_ids=forced, return_logits=True,
                              max_new_tokens=len(forced))
            ref = dense.chat(PROMPTS[agent], history, agent=agent, return_logits=True, max_new_tokens=1)
            got, want = res.logits[0], ref.logits[0]
            kl = float(torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                                  reduction="sum"))
            stats[kind(res.record)].append((int(got.argmax()) == forced[0], kl, res.ttft_ms, ref.ttft_ms))
    rows = []
    for mode, xs in stats.items():
        ttft, dense_ttft = statistics.fmean(x[2] for x in xs), statistics.fmean(x[3] for x in xs)
        rows.append({"mode": mode, "calls": len(xs), "first_token_pct": 100.0 * sum(x[0] for x in xs) / len(xs),
                     "kl_first": statistics.fmean(x[1] for x in xs), "ttft_ms": ttft, "dense_ttft_ms": dense_ttft,
                     "speedup": dense_ttft / ttft})
    return rows


def main(argv: list[str] | None = None, loaded: Any = None) -> dict[str, Any]:
    p = parser(EXAMPLE, "a supervisor and three workers over MessagesState, KVCommChat with no template",
               n=12, max_new_tokens=64)
    p.add_argument("--no-eval", action="store_true", help="skip the teacher-forced agreement replay")
    args = p.parse_args(argv)
    if not 1 <= args.n <= len(TASKS):
        raise SystemExit(f"error: --n {args.n}: between 1 and {len(TASKS)} tasks")
    out = run_dir(EXAMPLE, args.run_dir)
    loaded = loaded or load(args)
    tasks = TASKS[: args.n]
    engines, runs = {}, {}
    for policy in policies(args.policy):
        engines[policy], runs[policy] = run_policy(loaded, policy, args, tasks)
        save(engines[policy], out, policy)
    per_task = 2 * len(ROUTE) + 1
    summary: dict[str, Any] = {"run_dir": str(out), "tasks": len(tasks), "calls_per_task": per_task}
    for policy, eng in engines.items():
        rows = reuse_table(eng.records, per_task)
        summary[f"reuse_{policy}"] = rows
        if policy != "dense":
            print(f"\n{policy}: prompt tokens served from reused KV, per agent")
            print(format_table(rows, [("name", "agent", "s"), ("calls", "calls", "d"), ("modes", "modes", "s"),
                                      ("reused_pct", "reused %", ".1f"), ("reused_r2_pct", "from round 2 %", ".1f")]))
            if "dense" in engines:
                summary[f"ttft_{policy}"] = ttft_rows(engines["dense"].records, eng.records)
                print(f"\n{policy}: TTFT of its calls beside the same calls under dense (prefix: prefilled after "
                      "the system prompt)")
                print(format_table(summary[f"ttft_{policy}"], [
                    ("mode", "mode", "s"), ("calls", "calls", "d"), ("dense_ms", "dense TTFT ms", ".1f"),
                    ("kvcomm_ms", f"{policy} TTFT ms", ".1f"), ("speedup", "speed-up", ".2f")]))
    if "dense" in runs and not args.no_eval:
        summary["teacher_forced"] = teacher_forced(loaded, args, runs["dense"])
        print("\nteacher-forced replay of the dense conversations: agreement with dense, and TTFT beside a "
              "dense call of the same prompt")
        print(format_table(summary["teacher_forced"], [
            ("mode", "mode", "s"), ("calls", "calls", "d"), ("first_token_pct", "1st token = dense %", ".1f"),
            ("kl_first", "KL 1st token", ".4f"), ("dense_ttft_ms", "dense TTFT ms", ".1f"),
            ("ttft_ms", "kvcomm TTFT ms", ".1f"), ("speedup", "speed-up", ".2f")]))
    outputs = [{"policy": policy, "task": i, "messages": [(m.name or m.type, m.content) for m in conv]}
               for policy, convs in runs.items() for i, conv in enumerate(convs)]
    with (out / "outputs.jsonl").open("a") as f:
        f.writelines(json.dumps(o) + "\n" for o in outputs)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nrecords: {out / 'records.jsonl'}   report: kvcomm report --run-dir {out}")
    return summary


if __name__ == "__main__":
    main()
