"""The README's decorator example: two LangGraph nodes whose LLM calls share KV through kvcomm."""

from typing import TypedDict

from langgraph.graph import StateGraph

from kvcomm import KVCommConfig, KVCommEngine, Template, load_model
from kvcomm.agents import share_context

model, tokenizer, fingerprint = load_model("smollm2-135m")
engine = KVCommEngine(model, tokenizer, fingerprint=fingerprint, config=KVCommConfig(max_new_tokens=24))


class State(TypedDict, total=False):
    question: str
    planner_answer: str  # the planner's answer: what the solver's {agent:planner} slot reads
    solver_answer: str


@share_context(engine, agent="planner", template=Template.from_system_user(
    "You plan.", "Question:\n{question}\nGive a one-line plan."))
def planner(state: State, result) -> None: ...


@share_context(engine, agent="solver", template=Template.from_system_user(
    "You solve.", "Question:\n{question}\nPlan:\n{agent:planner}\nAnswer in one line."))
def solver(state: State, result) -> None: ...


graph = StateGraph(State).add_sequence([planner, solver]).set_entry_point("planner").compile()
for question in ["What is 12 times 3?", "What is 12 times 3?"]:
    engine.reset_answers()
    print(graph.invoke({"question": question})["solver_answer"])
print([(r.agent, r.mode, r.reused_tokens) for r in engine.records])
