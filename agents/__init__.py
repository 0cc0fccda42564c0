"""kvcomm.agents: LangGraph and LangChain adapters over :class:`~kvcomm.KVCommEngine`.

``share_context`` decorates LangGraph nodes; ``KVCommChat`` is a LangChain chat model. Names
load lazily, so ``import kvcomm.agents`` does not import langchain-core.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvcomm.agents.chat_model import KVCommChat
    from kvcomm.agents.decorator import (
        AgentConfigError,
        KVCommState,
        answer_key,
        call_summary,
        share_context,
        state_key,
    )

_LAZY = {
    "AgentConfigError": "kvcomm.agents.decorator",
    "KVCommChat": "kvcomm.agents.chat_model",
    "KVCommState": "kvcomm.agents.decorator",
    "answer_key": "kvcomm.agents.decorator",
    "call_summary": "kvcomm.agents.decorator",
    "share_context": "kvcomm.agents.decorator",
    "state_key": "kvcomm.agents.decorator",
}

__all__ = [
    "AgentConfigError",
    "KVCommChat",
    "KVCommState",
    "answer_key",
    "call_summary",
    "share_context",
    "state_key",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvcomm.agents' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module), name)
    except ImportError as exc:  # langchain-core / langgraph are dependencies; name them if absent
        raise ImportError(f"kvcomm.agents.{name} needs langgraph and langchain-core "
                          f"(pip install langgraph langchain-core): {exc}") from exc
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
