"""``KVCommChat``: a LangChain chat model whose calls go through a :class:`~kvcomm.KVCommEngine`.

Drop it into any message-based agent graph (``create_react_agent``, ``MessagesState``)::

    model = KVCommChat(engine=engine)
    researcher = create_react_agent(model, tools=[], prompt="You research.", name="researcher")

Two ways to map a call to the engine:

* **Message-segment mode** (the default: no ``agent``, no ``template``): the first system message
  is the agent, every later message a shared segment (:mod:`kvcomm.chat`, through
  :meth:`KVCommEngine.chat <kvcomm.engine.KVCommEngine.chat>`). No template to write. The
  agent's label in the records is ``agent_name`` (on the model or per call), else the LangGraph
  node that calls the model, else a digest of the system prompt. Each answer gets a fresh message
  id, by which the AI message brings its producer's KV to the agents that read it.
* **Agent mode** (``agent=`` on the model or per call): the engine runs that registered agent
  (``template=`` registers it on first use). Slots come from ``fills=`` per call
  (``chat.invoke(msgs, fills={...})`` or ``chat.bind(fills=...)``); the slot named ``input_slot``
  (default ``input``), when not in ``fills``, takes the last human message.

Every answer carries ``usage_metadata`` (``input_tokens`` = prompt, ``output_tokens``,
``total_tokens``, ``input_token_details={"cache_read": reused tokens}``) on every path (invoke,
batch, stream: the last chunk; the async ones run the sync ones in a worker thread), and the
call's ``agent``/``mode``/``ttft_ms``/``token_ids`` in ``response_metadata``. ``stop`` cuts the
text before the first stop sequence. ``stream`` yields text as tokens decode (see
:mod:`kvcomm.chat`: live on the continuation path, after the engine returns on the others).
Tool calling is not supported (``bind_tools`` raises NotImplementedError).
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel, LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, SystemMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field

from kvcomm.errors import SlotError, TemplateError
from kvcomm.messages import ROLES
from kvcomm.streaming import Stopper, TextStream

_ROLES = {"system": "system", "human": "user", "ai": "assistant", "tool": "tool"}


class KVCommChat(BaseChatModel):
    """A chat model over a KVComm engine (see the module docstring for the two call modes).

    Args:
        engine: the :class:`~kvcomm.KVCommEngine` to generate with.
        agent: the registered agent to run (agent mode); ``None`` for message-segment mode.
        template: registers ``agent`` with this template on first use.
        input_slot: in agent mode, the slot the last human message fills.
        agent_name: in message-segment mode, the agent's label in the records.
        max_new_tokens: tokens per call (alias ``max_tokens``; default: the engine config's).
        stop: stop sequences of every call (a call's own ``stop`` adds to them).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    engine: Any
    agent: str | None = None
    template: Any = None
    input_slot: str = "input"
    agent_name: str | None = None
    max_new_tokens: int | None = Field(default=None, alias="max_tokens")
    stop: list[str] | None = None

    @property
    def _llm_type(self) -> str:
        return "kvcomm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"agent": self.agent, "policy": self.engine.config.policy, "fingerprint": self.engine.fingerprint}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider="kvcomm", ls_model_type="chat",
                                 ls_model_name=str(kwargs.get("model") or self._model_name()))
        if self.max_new_tokens is not None:
            params["ls_max_tokens"] = self.max_new_tokens
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop or [])
        return params

    def _model_name(self) -> str:
        fingerprint = getattr(self.engine, "fingerprint", "") or ""
        return f"kvcomm:{fingerprint[:16]}"

    # -- calls -----------------------------------------------------------------------------------
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        result, meta = self._call(messages, stop, run_manager, None, kwargs)
        message = AIMessage(content=result.text, id=meta.pop("id"), usage_metadata=_usage(result.record),
                            response_metadata=meta)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        """Text deltas as tokens come (the engine call runs in a worker thread), usage on the last chunk."""
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        cancelled = threading.Event()

        def on_token(tok: int) -> bool:
            events.put(("token", tok))
            return cancelled.is_set()

        def work() -> None:
            try:
                events.put(("done", self._call(messages, stop, run_manager, on_token, kwargs)))
            except BaseException as exc:  # re-raised in the consuming thread
                events.put(("error", exc))

        stream = TextStream(self.engine.tokenizer, self.engine.eos_ids, self._stops(stop))
        msg_id: str | None = None
        worker = threading.Thread(target=work, name="kvcomm-stream", daemon=True)
        worker.start()
        try:
            while True:
                kind, value = events.get()
                if kind == "error":
                    raise value
                if kind == "done":
                    result, meta = value
                    msg_id = meta.pop("id")
                    last = AIMessageChunk(content=stream.finish(result.text), id=msg_id, chunk_position="last",
                                          usage_metadata=_usage(result.record), response_metadata=meta)
                    yield ChatGenerationChunk(message=last)
                    return
                delta = stream.push(value)
                if delta:
                    chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
                    if run_manager is not None:
                        run_manager.on_llm_new_token(delta, chunk=chunk)
                    yield chunk
        finally:
            cancelled.set()  # a consumer that stops early stops the decode where the path can

    def _call(self, messages: list[BaseMessage], stop: list[str] | None, run_manager: CallbackManagerForLLMRun | None,
              on_token: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """Run one call in the mode it asks for; returns (the engine's Result, response metadata + id)."""
        agent = kwargs.get("agent") or self.agent
        template = kwargs.get("template") or self.template
        n_new = kwargs.get("max_new_tokens") or kwargs.get("max_tokens") or self.max_new_tokens
        stops = self._stops(stop)
        eng = self.engine
        msg_id = f"kvcomm-{uuid.uuid4().hex}"
        if agent is None and template is None:
            system, dicts = to_dicts(messages)
            label = kwargs.get("agent_name") or self.agent_name or _graph_label(run_manager)
            result = eng.chat(system, dicts, agent=label, tools=kwargs.get("tools"), max_new_tokens=n_new, stop=stops,
                              message_id=msg_id, on_token=on_token)
        else:
            if agent is None:
                raise SlotError("KVCommChat: a template needs an agent name (agent=...)")
            fills = dict(kwargs.get("fills") or {})
            with eng.lock:  # register, read the registration and generate as one step
                if template is not None:
                    eng.register_agent(agent, template)
                registered = eng.agents.get(agent)  # unknown: generate() raises AgentError
                slots = registered.rendered.slots if registered is not None else ()
                if self.input_slot in slots and self.input_slot not in fills:
                    fills[self.input_slot] = _last_human(messages)
                stopper = Stopper(eng, stops, on_token)  # tokens reported, and stops seen, as they decode
                result = eng.generate(agent, fills, max_new_tokens=n_new, on_token=stopper)
            result.text = stopper.cut(result.text)
        rec = result.record
        meta = {"id": msg_id, "agent": rec.agent, "mode": rec.mode, "policy": rec.policy, "ttft_ms": rec.ttft_ms,
                "token_ids": list(result.token_ids), "model_name": self._model_name()}
        return result, meta

    def _stops(self, stop: list[str] | None) -> list[str]:
        return [*(self.stop or []), *(stop or [])]


def to_dicts(messages: Sequence[BaseMessage]) -> tuple[str | None, list[dict[str, Any]]]:
    """LangChain messages as ``(system prompt, [{"role", "content", ...}])`` for :meth:`KVCommEngine.chat`.

    A leading system message is the agent's system prompt; every other message is a segment.

    Raises:
        TemplateError: a message type or content block the chat template cannot render.
    """
    system = None
    start = 0
    if messages and isinstance(messages[0], SystemMessage):
        system, start = _text(messages[0], 0), 1
    out = []
    for i, m in enumerate(messages[start:], start):
        role = _ROLES.get(m.type) or (str(getattr(m, "role", "")) if m.type == "chat" else None)
        if role not in ROLES:
            raise TemplateError(f"message {i} is a {type(m).__name__} (type {m.type!r}"
                                f"{', role ' + repr(role) if role else ''}): the chat template cannot render it; "
                                f"KVCommChat renders system, human, ai and tool messages")
        d: dict[str, Any] = {"role": role, "content": _text(m, i)}
        if m.id:
            d["id"] = m.id
        tool_calls = getattr(m, "tool_calls", None)
        if tool_calls:
            d["tool_calls"] = [{"type": "function", "id": c.get("id"),
                                "function": {"name": c["name"], "arguments": c["args"]}} for c in tool_calls]
        tool_call_id = getattr(m, "tool_call_id", None)
        if tool_call_id:
            d["tool_call_id"] = tool_call_id
        out.append(d)
    return system, out


def _text(message: BaseMessage, index: int) -> str:
    """A message's text; a non-text content block is an error (the chat template renders text)."""
    content = message.content
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise TemplateError(f"message {index} ({message.type}) holds a {kind!r} content block: KVCommChat "
                                "renders text only")
    return "".join(parts)


def _graph_label(run_manager: CallbackManagerForLLMRun | None) -> str | None:
    """The LangGraph node that runs the model (the outermost one: a react agent's graph node)."""
    meta = getattr(run_manager, "metadata", None) or {}
    namespace = str(meta.get("langgraph_checkpoint_ns") or "")
    outer = namespace.split("|")[0].split(":")[0]
    return outer or meta.get("langgraph_node") or None


def _usage(rec: Any) -> UsageMetadata:
    return {"input_tokens": rec.prompt_tokens, "output_tokens": rec.new_tokens,
            "total_tokens": rec.prompt_tokens + rec.new_tokens,
            "input_token_details": {"cache_read": rec.reused_tokens}}


def _last_human(messages: list[BaseMessage]) -> str:
    for i, m in reversed(list(enumerate(messages))):
        if isinstance(m, HumanMessage):
            return _text(m, i)
    raise SlotError("KVCommChat needs a human message to fill its input slot")


__all__ = ["KVCommChat", "to_dicts"]
