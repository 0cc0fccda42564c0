"""``@share_context``: run a LangGraph node's LLM call through a :class:`~kvcomm.KVCommEngine`.

A decorated node builds its prompt from state fields named by its template's slots, generates
through the engine (which reuses the KV caches other agents already computed for the same
contents) and writes the answer back into the state::

    @share_context(engine, agent="coder", template=CODER)
    def coder(state: State, result: Result) -> dict:
        return {"code": extract_code(result.text)}

**Slots to state keys** (:func:`state_key`; override per slot with ``state_keys=``):

=====================  ======================  ==========================================
slot                   state key               note
=====================  ======================  ==========================================
``question``           ``question``            a plain slot is its own key
``doc:3``              ``doc_3``               ``kind:name`` becomes ``kind_name``
``agent:planner``      ``planner_answer``      where the ``planner`` node writes its answer
=====================  ======================  ==========================================

**Contract of the decorated function.** It is called as ``fn(state, result)`` (sync or
``async``) after the engine call, where ``result`` is the engine's :class:`~kvcomm.Result`
(``text``, ``token_ids``, ``mode``, ``record``). Whatever dict it returns is merged over the
default update ``{output_key: result.text, "kvcomm_calls": [call summary]}``; returning
``None`` keeps the default update. ``output_key`` defaults to ``f"{agent}_answer"``, the key an
``agent:<agent>`` slot of a later node reads. ``kvcomm_calls`` only reaches the state when the
schema declares it (LangGraph drops undeclared keys): subclass :class:`KVCommState` or declare
``kvcomm_calls: Annotated[list[dict], operator.add]``.

**Where the engine comes from**, first match wins: the ``engine`` argument;
``config["configurable"]["kvcomm_engine"]``; the LangGraph runtime context
(``graph.invoke(..., context=engine)``, or a context with a ``kvcomm_engine`` attribute or key).

Misconfiguration raises :class:`~kvcomm.errors.AgentConfigError` naming the node: a bad
template, or a function that does not take ``(state, result)``, at decoration; a template slot
missing from a ``TypedDict`` state annotation, at decoration when the annotation resolves; a
slot missing from the state, or no engine, at the first call.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import operator
import sys
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypedDict

from kvcomm.errors import AgentConfigError, TemplateError
from kvcomm.template import Template, slot_kind

ENGINE_CONFIG_KEY = "kvcomm_engine"
METRICS_KEY = "kvcomm_calls"


class KVCommState(TypedDict, total=False):
    """Mix into a graph's state schema to collect one summary per engine call."""

    kvcomm_calls: Annotated[list[dict[str, Any]], operator.add]


def state_key(slot: str) -> str:
    """The state key a template slot reads: ``question`` → ``question``, ``doc:3`` → ``doc_3``,
    ``agent:planner`` → ``planner_answer``."""
    if slot_kind(slot) == "agent":
        return answer_key(slot.split(":", 1)[1])
    return slot.replace(":", "_").replace(".", "_").replace("-", "_")


def answer_key(agent: str) -> str:
    """The state key an agent's answer is written to by default: ``f"{agent}_answer"``."""
    return f"{agent}_answer"


def call_summary(node: str, result: Any) -> dict[str, Any]:
    """The per-call metrics a decorated node adds to ``state["kvcomm_calls"]``."""
    rec = result.record
    return {
        "node": node,
        "agent": rec.agent,
        "policy": rec.policy,
        "mode": rec.mode,
        "prompt_tokens": rec.prompt_tokens,
        "reused_tokens": rec.reused_tokens,
        "new_tokens": rec.new_tokens,
        "ttft_ms": rec.ttft_ms,
        "anchors_matched": rec.anchors_matched,
    }


def share_context(
    engine: Any = None,
    *,
    agent: str,
    template: Template | str | list[dict[str, str]],
    output_key: str | None = None,
    state_keys: Mapping[str, str] | None = None,
    max_new_tokens: int | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a LangGraph node so its LLM call goes through a KVComm engine.

    Args:
        engine: a :class:`~kvcomm.KVCommEngine`; ``None`` to take it from the run's config or
            runtime context (see the module docstring).
        agent: the agent name the engine registers the template under; its answer is published
            as slot ``agent:<agent>``.
        template: the agent's prompt (:class:`~kvcomm.Template`, a string or chat messages).
        output_key: the state key the answer is written to (default ``f"{agent}_answer"``).
        state_keys: per-slot overrides of :func:`state_key`, e.g. ``{"agent:planner": "plan"}``.
        max_new_tokens: tokens generated per call (default: the engine config's).

    Returns:
        A decorator; the decorated node takes ``state`` and returns the state update.

    Raises:
        AgentConfigError: at decoration, for a bad template or function signature, or a slot
            missing from a resolvable ``TypedDict`` state annotation.
    """
    try:
        tmpl = template if isinstance(template, Template) else Template(template)
    except TemplateError as exc:
        raise AgentConfigError(f"@share_context(agent={agent!r}): bad template: {exc}") from None
    out_key = output_key or answer_key(agent)
    keys = {slot: state_key(slot) for slot in tmpl.slots}
    extra = sorted(set(state_keys or {}) - set(keys))
    if extra:
        raise AgentConfigError(
            f"@share_context(agent={agent!r}): state_keys names slot(s) {', '.join(extra)} that the "
            f"template does not have (its slots: {', '.join(tmpl.slots)})"
        )
    keys.update(state_keys or {})

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        node = getattr(fn, "__name__", agent)
        _check_signature(fn, node, agent)
        _check_annotation(fn, node, agent, keys, sys._getframe(1).f_locals)  # the defining scope
        is_async = inspect.iscoroutinefunction(fn)

        def prepare(state: Any) -> tuple[Any, dict[str, str]]:
            values = _values(state, keys, node, agent)  # state errors first: they need no engine
            return (engine if engine is not None else _engine_from_langgraph(node, agent)), values

        def update(result: Any, returned: Any) -> dict[str, Any]:
            base = {out_key: result.text, METRICS_KEY: [call_summary(node, result)]}
            if returned is None:
                return base
            if not isinstance(returned, Mapping):
                raise AgentConfigError(
                    f"node {node!r} (agent {agent!r}) returned {type(returned).__name__}; a "
                    "@share_context node returns a dict (merged over the answer update) or None"
                )
            return {**base, **returned}

        def call_engine(eng: Any, values: dict[str, str]) -> Any:
            with eng.lock:  # the engine's own lock: register, read the latest answers, generate as one step
                eng.register_agent(agent, tmpl)
                return eng.generate(agent, _fills(eng, values), max_new_tokens=max_new_tokens)

        if is_async:

            @functools.wraps(fn)
            async def anode(state: Any) -> dict[str, Any]:
                eng, values = prepare(state)
                result = await asyncio.to_thread(call_engine, eng, values)
                return update(result, await fn(state, result))

            wrapper: Callable[..., Any] = anode
        else:

            @functools.wraps(fn)
            def node_fn(state: Any) -> dict[str, Any]:
                eng, values = prepare(state)
                result = call_engine(eng, values)
                return update(result, fn(state, result))

            wrapper = node_fn
        # LangGraph reads the signature (through __wrapped__) to inject config/runtime kwargs
        # and to infer the node's input schema: show it ``(state)`` with the user's annotation.
        params = list(inspect.signature(fn).parameters.values())
        wrapper.__signature__ = inspect.Signature([params[0].replace(name="state")])  # type: ignore[attr-defined]
        ann = dict(getattr(fn, "__annotations__", {}))
        wrapper.__annotations__ = {"state": ann[params[0].name]} if params[0].name in ann else {}
        wrapper.__kvcomm__ = {  # type: ignore[attr-defined]
            "agent": agent, "template": tmpl, "output_key": out_key, "state_keys": dict(keys),
        }
        return wrapper

    return decorate


def _check_signature(fn: Callable[..., Any], node: str, agent: str) -> None:
    try:
        sig = inspect.signature(fn)
        sig.bind(None, None)
    except (TypeError, ValueError):
        raise AgentConfigError(
            f"node {node!r} (agent {agent!r}): a @share_context function takes (state, result), "
            f"got {fn.__name__}{_sig_text(fn)}"
        ) from None


def _sig_text(fn: Callable[..., Any]) -> str:
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(?)"


def _check_annotation(fn: Callable[..., Any], node: str, agent: str, keys: dict[str, str],
                      localns: Mapping[str, Any]) -> None:
    """Check slots against a ``TypedDict`` state annotation when it resolves (best effort)."""
    try:
        hints = typing.get_type_hints(fn, localns=dict(localns))
        first = next(iter(inspect.signature(fn).parameters))
        schema = hints.get(first)
        fields = typing.get_type_hints(schema) if schema is not None and typing.is_typeddict(schema) else None
    except Exception:  # a forward reference that does not resolve yet: check at the first call
        return
    if fields is None:
        return
    missing = [f"{slot!r} (state key {key!r})" for slot, key in keys.items() if key not in fields]
    if missing:
        raise AgentConfigError(
            f"node {node!r} (agent {agent!r}): template slot(s) {', '.join(missing)} are not fields "
            f"of the state schema {getattr(schema, '__name__', schema)} (fields: {', '.join(sorted(fields))})"
        )


def _values(state: Any, keys: dict[str, str], node: str, agent: str) -> dict[str, str]:
    """Each slot's text from the state; every missing key named in one error."""
    if not isinstance(state, Mapping):
        raise AgentConfigError(
            f"node {node!r} (agent {agent!r}): state is a {type(state).__name__}; @share_context "
            "reads slots from a dict or TypedDict state"
        )
    values, missing = {}, []
    for slot, key in keys.items():
        value = state.get(key)
        if value is None or value == "":
            missing.append(f"{slot!r} (state key {key!r}{' is empty' if value == '' else ''})")
        else:
            values[slot] = str(value)
    if missing:
        present = ", ".join(sorted(str(k) for k in state)) or "none"
        raise AgentConfigError(
            f"node {node!r} (agent {agent!r}): no state value for template slot(s) {', '.join(missing)} "
            f"(state keys: {present}); set them before this node, or map slots with state_keys="
        )
    return values


def _fills(engine: Any, values: dict[str, str]) -> dict[str, str]:
    """The engine's fills: an ``agent:`` slot whose text is the engine's latest answer for that
    agent is left out, so the engine uses the answer's own tokens and KV (no re-tokenizing)."""
    fills = {}
    for slot, text in values.items():
        latest = engine.latest.get(slot) if slot_kind(slot) == "agent" else None
        if latest is not None and engine.tokenizer.decode(list(latest.ids), skip_special_tokens=True) == text:
            continue
        fills[slot] = text
    return fills


def _engine_from_langgraph(node: str, agent: str) -> Any:
    hint = (
        f"node {node!r} (agent {agent!r}) has no KVComm engine: pass one to @share_context(engine, ...), "
        f"or run the graph with config={{'configurable': {{'{ENGINE_CONFIG_KEY}': engine}}}} or context=engine"
    )
    try:
        from langgraph.config import get_config
    except ImportError:  # pragma: no cover - langgraph is a dependency
        raise AgentConfigError(hint + " (langgraph is not installed)") from None
    try:
        config = get_config()
    except RuntimeError:
        raise AgentConfigError(hint + " (called outside a LangGraph run)") from None
    configurable = config.get("configurable") or {}
    if configurable.get(ENGINE_CONFIG_KEY) is not None:
        return configurable[ENGINE_CONFIG_KEY]
    from langgraph.runtime import get_runtime

    context = getattr(get_runtime(), "context", None)
    for candidate in (context, getattr(context, ENGINE_CONFIG_KEY, None),
                      context.get(ENGINE_CONFIG_KEY) if isinstance(context, Mapping) else None):
        if candidate is not None and hasattr(candidate, "generate") and hasattr(candidate, "register_agent"):
            return candidate
    raise AgentConfigError(hint)
