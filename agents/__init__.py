"""kvcomm.agents: LangGraph and LangChain adapters over :class:`~kvcomm.KVCommEngine`.

``share_context`` decorates LangGraph nodes; ``KVCommChat`` is a LangChain chat model. Names
load lazily, so ``import kvcomm.agents`` does not import langchain-core.
"""

from __future__ import annotations

if __name__ == "agents":  # the clone's root on sys.path: an installed `agents` gets the name
    from kvcomm._shadow import hand_over

    hand_over(__name__, __file__)

from typing import TYPE_CHECKING

from kvcomm._lazy import lazy_exports
from kvcomm.errors import AgentConfigError

if TYPE_CHECKING:
    from kvcomm.agents.chat_model import KVCommChat
    from kvcomm.agents.decorator import (
        KVCommState,
        answer_key,
        call_summary,
        share_context,
        state_key,
    )

_LAZY = {
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


__getattr__, __dir__ = lazy_exports("kvcomm.agents", _LAZY, globals(), needs="langgraph langchain-core")
