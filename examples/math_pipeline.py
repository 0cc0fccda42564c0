"""Math word problems through a three-agent LangGraph pipeline: analyst → solver → verifier.

The problems are generated here from a few one-step and two-step templates with fixed numbers,
so their answers are known exactly; a problem counts as solved when the last number in the
verifier's answer equals it::

    python examples/math_pipeline.py --n 20 --policy dense,kvcomm
"""

from __future__ import annotations

import re
from typing import Any

from _common import parser, run
from langgraph.graph import END, START, StateGraph

from kvcomm import Result, Template
from kvcomm.agents import KVCommState, share_context

ANALYST = Template.from_system_user(
    "You are a careful math teacher.",
    "Problem:\n{question}\nWhich quantities are given and what is asked? Answer in one sentence.",
)
SOLVER = Template.from_system_user(
    "You solve arithmetic word problems step by step.",
    "Problem:\n{question}\nAnalysis:\n{agent:analyst}\nSolve it. End with 'Answer: <number>'.",
)
VERIFIER = Template.from_system_user(
    "You check arithmetic solutions.",
    "Problem:\n{question}\nSolution:\n{agent:solver}\nCheck the solution and give the final answer "
    "as 'Answer: <number>'.",
)

_TEMPLATES = [
    ("{name} has {a} apples and buys {b} more. How many apples does {name} have now?", lambda a, b, c: a + b),
    ("A box holds {a} pencils. {name} gives away {b} of them. How many pencils are left?", lambda a, b, c: a - b),
    ("{name} buys {a} packs of stickers with {b} stickers in each pack. How many stickers is that?",
     lambda a, b, c: a * b),
    ("{name} reads {a} pages a day for {b} days and then {c} more pages. How many pages in total?",
     lambda a, b, c: a * b + c),
    ("A train has {a} cars with {b} seats each; {c} seats are taken. How many seats are free?",
     lambda a, b, c: a * b - c),
]
_NAMES = ["Ana", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana"]


def problems(n: int) -> list[dict[str, Any]]:
    """``n`` problems with exact integer answers (deterministic)."""
    out = []
    for i in range(n):
        text, answer = _TEMPLATES[i % len(_TEMPLATES)]
        a, b, c = 3 + (7 * i) % 17, 2 + (5 * i) % 9, 1 + (3 * i) % 7
        if answer(a, b, c) < 0:
            a, b = b, a
        out.append({"question": text.format(name=_NAMES[i % len(_NAMES)], a=a, b=b, c=c),
                    "answer": answer(a, b, c)})
    return out


class State(KVCommState, total=False):
    question: str
    analyst_answer: str
    solver_answer: str
    verifier_answer: str


@share_context(agent="analyst", template=ANALYST)
def analyst(state: State, result: Result) -> None:
    return None


@share_context(agent="solver", template=SOLVER)
def solver(state: State, result: Result) -> None:
    return None


@share_context(agent="verifier", template=VERIFIER)
def verifier(state: State, result: Result) -> None:
    return None


def build_graph() -> Any:
    g = StateGraph(State)
    for node in (analyst, solver, verifier):
        g.add_node(node)
    g.add_edge(START, "analyst")
    g.add_edge("analyst", "solver")
    g.add_edge("solver", "verifier")
    g.add_edge("verifier", END)
    return g.compile()


def last_number(text: str) -> float | None:
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return float(nums[-1].replace(",", "")) if nums else None


def main(argv: list[str] | None = None, loaded: Any = None) -> dict[str, Any]:
    args = parser("math_pipeline", "Math word problems: analyst → solver → verifier",
                  n=20, max_new_tokens=64).parse_args(argv)
    return run(args, "math_pipeline", build_graph(), problems(args.n), lambda p: {"question": p["question"]},
               lambda p, s: last_number(s["verifier_answer"]) == p["answer"], "accuracy", loaded)


if __name__ == "__main__":
    main()
