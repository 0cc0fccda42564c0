"""``KVCommChat``: a LangChain chat model whose calls go through a :class:`~kvcomm.KVCommEngine`.

Two ways to map a call to the engine:

* **Agent mode** (``agent=`` on the model or per call): the engine runs that registered agent
  (``template=`` registers it on first use). Slots come from ``fills=`` passed per call
  (``chat.invoke(msgs, fills={...})`` or ``chat.bind(fills=...)``); the slot named
  ``input_slot`` (default ``input``), when not in ``fills``, takes the last human message.
* **Plain mode** (no agent): the messages before the last human message become the fixed text
  of a one-slot template (registered once per distinct prefix, as agent ``chat_<hash>``) and the
  last human message fills its ``{input}`` slot. The same input sent under two system prompts
  reuses its KV.

Each answer carries ``usage_metadata`` with ``input_tokens`` (prompt), ``output_tokens``,
``total_tokens`` and ``input_token_details={"cache_read": reused_tokens}``, and the call's
``mode``/``ttft_ms``/``agent`` in ``response_metadata``.
"""

from __future__ import annotations

import hashlib
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import ConfigDict

from kvcomm.errors import SlotError
from kvcomm.template import Template

_ROLES = {"system": "system", "human": "user", "ai": "assistant"}


class KVCommChat(BaseChatModel):
    """A chat model over a KVComm engine (see the module docstring for the two call modes).

    Args:
        engine: the :class:`~kvcomm.KVCommEngine` to generate with.
        agent: the registered agent to run (agent mode); ``None`` for plain mode.
        template: registers ``agent`` with this template on first use.
        input_slot: the slot the last human message fills (``{input}`` in plain mode).
        max_new_tokens: tokens per call (default: the engine config's).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    engine: Any
    agent: str | None = None
    template: Any = None
    input_slot: str = "input"
    max_new_tokens: int | None = None

    @property
    def _llm_type(self) -> str:
        return "kvcomm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"agent": self.agent, "policy": self.engine.config.policy, "fingerprint": self.engine.fingerprint}

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        agent = kwargs.get("agent") or self.agent
        fills = dict(kwargs.get("fills") or {})
        n_new = kwargs.get("max_new_tokens") or self.max_new_tokens
        eng = self.engine
        if agent is None:
            agent, template = self._plain_template(messages)
            fills[self.input_slot] = _last_human(messages)
        else:
            template = kwargs.get("template") or self.template
        with eng.lock:  # register, read the registration and generate as one step
            if template is not None:
                eng.register_agent(agent, template)
            registered = eng.agents.get(agent)  # unknown: generate() raises AgentError
            slots = registered.rendered.slots if registered is not None else ()
            if self.input_slot in slots and self.input_slot not in fills:
                fills[self.input_slot] = _last_human(messages)
            result = eng.generate(agent, fills, max_new_tokens=n_new)
        text = _truncate(result.text, stop)
        rec = result.record
        message = AIMessage(
            content=text,
            usage_metadata={
                "input_tokens": rec.prompt_tokens,
                "output_tokens": rec.new_tokens,
                "total_tokens": rec.prompt_tokens + rec.new_tokens,
                "input_token_details": {"cache_read": rec.reused_tokens},
            },
            response_metadata={"agent": agent, "mode": rec.mode, "policy": rec.policy, "ttft_ms": rec.ttft_ms,
                               "model_name": f"kvcomm:{eng.fingerprint[:16]}"},
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _plain_template(self, messages: list[BaseMessage]) -> tuple[str, Template]:
        if not messages or not isinstance(messages[-1], HumanMessage):
            raise SlotError("KVCommChat in plain mode needs messages ending with a human message")
        fixed = []
        for m in messages[:-1]:
            role = _ROLES.get(m.type)
            if role is None:
                raise SlotError(f"KVCommChat cannot place a {m.type!r} message in a prompt template")
            fixed.append({"role": role, "content": _text(m).replace("{", "{{").replace("}", "}}")})
        fixed.append({"role": "user", "content": "{" + self.input_slot + "}"})
        digest = hashlib.blake2b(repr(fixed).encode(), digest_size=6).hexdigest()
        return f"chat_{digest}", Template(fixed)


def _text(message: BaseMessage) -> str:
    return str(message.text)


def _last_human(messages: list[BaseMessage]) -> str:
    for m in reversed(messages):
        if isinstance(m, HumanMessage):
            return _text(m)
    raise SlotError("KVCommChat needs a human message to fill its input slot")


def _truncate(text: str, stop: list[str] | None) -> str:
    cut = min((i for s in (stop or []) if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


__all__ = ["KVCommChat"]
