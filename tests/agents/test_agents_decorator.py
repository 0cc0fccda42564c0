"""@share_context on real LangGraph graphs over the real SmolLM2."""

from __future__ import annotations

import asyncio
import inspect
from typing import TypedDict

import pytest
import torch
from langgraph.graph import END, START, StateGraph

from kvcomm import KVCommError, Result, Template
from kvcomm.agents import AgentConfigError, KVCommState, share_context, state_key

MAX_NEW = 8  # the make_engine fixture's max_new_tokens
# Slots sit between newlines, so tokenizing the filled prompt as one string gives the same ids
# as the engine's segment-by-segment tokenization: the undecorated reference below can then
# build its prompt the plain way (fill the messages, apply the chat template, tokenize).
PLANNER = Template.from_system_user("You are a careful planner.", "Question:\n{question}\nGive a short plan.")
SOLVER = Template.from_system_user(
    "You are a precise solver.", "Question:\n{question}\nPlan:\n{agent:planner}\nAnswer briefly."
)
CRITIC = Template.from_system_user(
    "You are a strict critic.", "Question:\n{question}\nAnswer:\n{agent:solver}\nPoint out one flaw."
)
NODES = [("planner", PLANNER), ("solver", SOLVER), ("critic", CRITIC)]
Q1 = "What is the capital of France, and which river flows through it?"
Q2 = "Name three prime numbers larger than ten."


class State(KVCommState, total=False):
    question: str
    planner_answer: str
    solver_answer: str
    critic_answer: str


def chain(nodes) -> object:
    g = StateGraph(State)
    names = []
    for node in nodes:
        name = node.__name__
        g.add_node(name, node)
        names.append(name)
    g.add_edge(START, names[0])
    for a, b in zip(names, names[1:], strict=False):
        g.add_edge(a, b)
    g.add_edge(names[-1], END)
    return g.compile()


def decorated_graph(engine=None, *, async_solver: bool = False):
    @share_context(engine, agent="planner", template=PLANNER)
    def planner(state: State, result: Result) -> None:
        return None

    if async_solver:

        @share_context(engine, agent="solver", template=SOLVER)
        async def solver(state: State, result: Result) -> None:
            await asyncio.sleep(0)
            return None
    else:

        @share_context(engine, agent="solver", template=SOLVER)
        def solver(state: State, result: Result) -> None:
            return None

    @share_context(engine, agent="critic", template=CRITIC)
    def critic(state: State, result: Result) -> None:
        return None

    return chain([planner, solver, critic])


def undecorated_graph(loaded):
    """The same pipeline with no kvcomm at all: each node fills its template's messages, applies
    the chat template, tokenizes the whole prompt and calls ``model.generate`` greedily."""
    tok, model = loaded.tokenizer, loaded.model
    eos = sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")})
    prompts: dict[str, list[int]] = {}

    def make(agent: str, template: Template):
        def node(state: State) -> dict:
            values = {slot: state[state_key(slot)] for slot in template.slots}
            text = tok.apply_chat_template(template.fill(values), tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False).input_ids
            prompts[agent] = list(ids)
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                                 eos_token_id=eos, pad_token_id=eos[0])
            return {f"{agent}_answer": tok.decode(out[0, len(ids):], skip_special_tokens=True)}

        node.__name__ = agent
        return node

    return chain([make(a, t) for a, t in NODES]), prompts


def test_dense_outputs_identical_to_undecorated_graph(smollm2, make_engine):
    engine = make_engine("dense")
    graph = decorated_graph(engine)
    ref_graph, ref_prompts = undecorated_graph(smollm2)
    for q in (Q1, Q2):
        engine.reset_answers()
        got = graph.invoke({"question": q})
        ref = ref_graph.invoke({"question": q})
        for agent, _ in NODES:
            assert got[f"{agent}_answer"] == ref[f"{agent}_answer"], agent
            assert got[f"{agent}_answer"].strip()
        assert engine.last_prompt_ids == ref_prompts["critic"]  # the same prompt tokens, not just text
        assert [c["mode"] for c in got["kvcomm_calls"]] == ["dense"] * 3
        assert all(c["reused_tokens"] == 0 for c in got["kvcomm_calls"])


def test_second_run_reuses_with_sync_and_async_nodes(make_engine):
    engine = make_engine("kvcomm")
    graph = decorated_graph(async_solver=True)  # the engine comes from the run's context

    engine.reset_answers()
    first = asyncio.run(graph.ainvoke({"question": Q1}, context=engine))
    engine.reset_answers()
    second = asyncio.run(graph.ainvoke({"question": Q1}, context=engine))

    calls1, calls2 = first["kvcomm_calls"], second["kvcomm_calls"]
    assert [c["node"] for c in calls1] == ["planner", "solver", "critic"]
    assert [c["mode"] for c in calls1] == ["prefix"] * 3  # first sight: anchors are recorded (after the exact prefix)
    assert [c["mode"] for c in calls2] == ["reuse"] * 3
    for c in calls2:
        assert 0 < c["reused_tokens"] < c["prompt_tokens"], c
        assert c["anchors_matched"] >= 1
    # the solver's and critic's prompts held the previous agent's answer: reused as well
    assert engine.records[-1].slots.get("agent:solver") == "exact"
    assert second["planner_answer"].strip() and second["critic_answer"].strip()


def test_engine_from_config_output_key_state_keys_and_merge(make_engine):
    engine = make_engine("dense")

    class S(TypedDict, total=False):
        question: str
        plan: str
        plan_tokens: int
        solver_answer: str

    @share_context(agent="planner", template=PLANNER, output_key="plan", max_new_tokens=4)
    def plan_node(state: S, result: Result) -> dict:
        return {"plan_tokens": len(result.token_ids)}

    @share_context(agent="solver", template=SOLVER, state_keys={"agent:planner": "plan"})
    async def solve_node(state: S, result: Result) -> None:
        return None

    g = StateGraph(S)
    g.add_node("plan_node", plan_node)
    g.add_node("solve_node", solve_node)
    g.add_edge(START, "plan_node")
    g.add_edge("plan_node", "solve_node")
    g.add_edge("solve_node", END)
    out = asyncio.run(g.compile().ainvoke({"question": Q2}, config={"configurable": {"kvcomm_engine": engine}}))
    assert out["plan"] and out["plan_tokens"] == 4 and out["solver_answer"]
    assert "planner_answer" not in out
    assert [r.agent for r in engine.records] == ["planner", "solver"]
    # the solver's prompt holds the planner's answer tokens as generated (no re-tokenizing)
    assert _contains(engine.last_prompt_ids, list(engine.latest["agent:planner"].ids))


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_slot_missing_from_state_names_the_node_at_first_call():
    @share_context(agent="solver", template=SOLVER)
    def solver(state: dict, result: Result) -> None:
        return None

    g = StateGraph(dict)
    g.add_node("solver", solver)
    g.add_edge(START, "solver")
    with pytest.raises(AgentConfigError, match=r"node 'solver'.*'agent:planner' \(state key 'planner_answer'\)"):
        g.compile().invoke({"question": Q1})


def test_no_engine_names_the_node():
    @share_context(agent="planner", template=PLANNER)
    def lonely(state: State, result: Result) -> None:
        return None

    with pytest.raises(AgentConfigError, match=r"node 'lonely' \(agent 'planner'\) has no KVComm engine"):
        chain([lonely]).invoke({"question": Q1})
    with pytest.raises(AgentConfigError, match="outside a LangGraph run"):
        lonely({"question": Q1})
    assert issubclass(AgentConfigError, KVCommError)


def test_decoration_time_errors_name_the_node():
    class Small(TypedDict, total=False):
        question: str

    with pytest.raises(AgentConfigError, match=r"node 'solver'.*'agent:planner' \(state key 'planner_answer'\).*Small"):

        @share_context(agent="solver", template=SOLVER)
        def solver(state: Small, result: Result) -> None:
            return None

    with pytest.raises(AgentConfigError, match=r"node 'one_arg'.*takes \(state, result\)"):

        @share_context(agent="planner", template=PLANNER)
        def one_arg(state: State) -> None:
            return None

    with pytest.raises(AgentConfigError, match="bad template.*no slots"):
        share_context(agent="planner", template="no slots here")
    with pytest.raises(AgentConfigError, match="state_keys names slot"):
        share_context(agent="planner", template=PLANNER, state_keys={"doc:1": "doc"})


def test_non_dict_return_is_an_error(make_engine):
    engine = make_engine("dense")

    @share_context(engine, agent="planner", template=PLANNER, max_new_tokens=2)
    def talky(state: State, result: Result) -> str:
        return result.text

    with pytest.raises(AgentConfigError, match="node 'talky'.*returned str"):
        chain([talky]).invoke({"question": Q1})


def test_wrapper_keeps_name_doc_and_state_annotation():
    @share_context(agent="planner", template=PLANNER)
    async def planner(state: State, result: Result) -> None:
        """Plans."""

    assert planner.__name__ == "planner" and planner.__doc__ == "Plans."
    assert asyncio.iscoroutinefunction(planner)
    assert list(inspect.signature(planner).parameters) == ["state"]
    assert planner.__kvcomm__["output_key"] == "planner_answer"
    assert state_key("doc:3") == "doc_3" and state_key("agent:coder") == "coder_answer"


def test_parallel_branches_share_one_engine(make_engine):
    """LangGraph runs fan-out branches concurrently; the engine calls are serialized, not mixed."""
    engine = make_engine("kvcomm")

    class S(TypedDict, total=False):
        question: str
        planner_answer: str
        solver_answer: str
        critic_answer: str

    @share_context(agent="planner", template=PLANNER, max_new_tokens=3)
    async def planner(state: S, result: Result) -> None:
        return None

    @share_context(agent="solver", template=SOLVER, max_new_tokens=3)
    async def solver(state: S, result: Result) -> None:
        return None

    critic_tmpl = Template.from_system_user("You are a strict critic.", "Plan:\n{agent:planner}\nCritique it.")

    @share_context(agent="critic", template=critic_tmpl, max_new_tokens=3)
    def critic(state: S, result: Result) -> None:  # a sync node beside an async one
        return None

    g = StateGraph(S)
    for node in (planner, solver, critic):
        g.add_node(node)
    g.add_edge(START, "planner")
    g.add_edge("planner", "solver")
    g.add_edge("planner", "critic")
    out = asyncio.run(g.compile().ainvoke({"question": Q2}, context=engine))
    assert out["solver_answer"] and out["critic_answer"]
    assert sorted(r.agent for r in engine.records) == ["critic", "planner", "solver"]


REVIEWER = Template.from_system_user("You are a reviewer.", "Question:\n{question}\nPlan:\n{agent:planner}\nRate it.")


def fan_out_graph(engine, spy):
    """planner → (solver ‖ reviewer): LangGraph runs the two sync nodes in parallel threads."""

    def node(agent, template):
        @share_context(engine, agent=agent, template=template)
        def run(state: State, result: Result) -> None:
            spy.append(agent)
            return None

        run.__name__ = agent
        return run

    class FanState(State, total=False):
        reviewer_answer: str

    g = StateGraph(FanState)
    for agent, template in (("planner", PLANNER), ("solver", SOLVER), ("reviewer", REVIEWER)):
        g.add_node(agent, node(agent, template))
    g.add_edge(START, "planner")
    g.add_edge("planner", "solver")
    g.add_edge("planner", "reviewer")
    g.add_edge("solver", END)
    g.add_edge("reviewer", END)
    return g.compile()


def test_parallel_branches_share_one_engine_safely(make_engine, watch_engine_calls):
    """Both branches write the engine's one static KV buffer: their calls are serialised, so the
    answers equal those of the same calls made one after another."""
    engine, spy = make_engine(), []
    calls = watch_engine_calls(engine)
    graph = fan_out_graph(engine, spy)
    states = [graph.invoke({"question": q}, context=engine) for q in (Q1, Q2, Q1)]
    assert len(calls.threads) >= 2  # LangGraph really ran the branches on different threads
    assert calls.most == 1  # and they never were inside the engine at the same time
    ref = make_engine()
    for name, tmpl in (("planner", PLANNER), ("solver", SOLVER), ("reviewer", REVIEWER)):
        ref.register_agent(name, tmpl)
    for q, state in zip((Q1, Q2, Q1), states, strict=True):
        ref.reset_answers()
        for agent in ("planner", "solver", "reviewer"):
            assert state[f"{agent}_answer"] == ref.generate(agent, {"question": q}).text, (q, agent)
    assert spy.count("planner") == 3 and spy.count("reviewer") == 3
