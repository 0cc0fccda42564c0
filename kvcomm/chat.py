"""Message-segment mode: an agent is its system prompt, every later message a shared segment.

The drop-in path for message-based agent graphs (LangGraph ``MessagesState``, where every agent
puts its own system prompt before one shared history). :meth:`KVCommEngine.chat
<kvcomm.engine.KVCommEngine.chat>` calls :func:`chat`; ``kvcomm.agents.KVCommChat`` calls that.

**Rendering** (:mod:`kvcomm.messages`). A call's conversation is rendered with the tokenizer's chat
template and cut at message boundaries: the *head* (all text before the first message: the system prompt, tools text,
the template's own preamble), one *piece* per message (its whole rendering: role markers, content,
end marker) and the generation prompt. Each is tokenized on its own. Guaranteed, and checked on
every call: ``head + piece_1 + ... + piece_N + generation prompt`` is, token for token,
``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` (a chat template that
renders or tokenizes a message differently in place raises TemplateError; templates that delimit
messages with special tokens, ChatML and Llama 3 among them, always pass). Dense, prefix and
reuse calls therefore all see the sequence a plain ``model.generate`` on the rendered chat sees.

**Segments.** Each piece is a content published once (its base KV, as any slot content) and
reused by every agent that reads it. Its anchor pool is its role (or, for an AI message, its
producer) and position bucket: ``msg:user@0``, ``msg:ai.<producer>@3``, ``msg:tool@p8-15``.

**AI messages carry their producer's KV.** After a call, the answer's KV (the engine's published
answer content) is kept under the id of the AI message that carries it (``message_id``) and its
text. When that message comes back in a conversation, its piece is published with a base KV
built from it: the role markers' base KV around the producer's KV of the answer tokens. A
message found neither way (or whose text no longer tokenizes as the answer did) is published like
user input.

**Templates stay bounded.** A call runs the registered template ``head + n message slots +
generation prompt``, named ``<label>#<n>`` (the slots sit back to back: each piece carries its own
role markers). It depends on the head and ``n`` only, never on roles or contents, and ``n`` never
exceeds ``max_message_slots`` (16): past it, the oldest messages fold into one first slot,
``fold_block`` (8) messages at a time, so the fold changes once every ``fold_block`` messages. An
agent thus registers at most ``max_message_slots`` templates however long its conversations grow.

**Continuation.** A call whose prompt starts with an earlier call of the same agent (its prompt
and answer: a ReAct loop, a supervisor called again on the grown history) reuses that call's KV
exactly, with no correction. The messages after it are what other agents (or tools) wrote since:
where whole messages follow, they are served like any other call's (moved and corrected from
their anchors, or prefilled where anchors lack this agent's deltas) over that exact prefix
(``KVCommEngine.generate(exact_kv=...)``; the record's ``slots`` has ``@continuation``); where none
does (only the end of the last message and the generation prompt), the rest is prefilled (mode
``prefix``). The engine keeps one such KV per agent (``max_continuations`` agents, least recently
used dropped). Policy ``dense`` never does.

**Streaming.** ``on_token`` sees every token as it is decoded (on the template path through
``KVCommEngine.generate(on_token=...)``; a teacher-forced call reports its tokens after the
forward). :class:`~kvcomm.streaming.TextStream` turns tokens into text deltas that add up to the
final text.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from kvcomm.chat_session import Answer, ChatSession, Continuation, session
from kvcomm.errors import ContextLengthError
from kvcomm.keys import MetricsKey
from kvcomm.kv import KVBlock, block_from_cache, cache_from_block, greedy_decode, prefill, sync_device
from kvcomm.messages import SYSTEM_PLACEHOLDER, MessageTemplate, Rendered, normalize, render
from kvcomm.metrics import CONTINUATION_KEY, CallRecord
from kvcomm.prompt import Content
from kvcomm.rope import shift_keys
from kvcomm.streaming import Stopper
from kvcomm.template import MESSAGE_SLOT_PREFIX

_MARK = "\x00kvcomm-content\x00"
_LABEL = re.compile(r"[^\w.\-]+")

R = TypeVar("R")


def chat(
    engine: Any,
    system_prompt: str | None,
    messages: Sequence[Mapping[str, Any]],
    result_type: Callable[..., R],
    *,
    agent: str | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    max_new_tokens: int | None = None,
    stop: Sequence[str] | None = None,
    message_id: str | None = None,
    on_token: Callable[[int], bool | None] | None = None,
    request_id: str = "",
    forced_ids: list[int] | None = None,
    return_logits: bool = False,
) -> R:
    """One agent call in message-segment mode (see the module docstring); the engine's ``chat``.

    Args:
        engine: the :class:`~kvcomm.KVCommEngine`.
        system_prompt: the agent's system prompt (None: the chat template's default, if any).
        messages: ``{"role", "content"}`` dicts, roles in :data:`ROLES`; an ``"id"`` on an AI
            message finds its producer's KV (else its text does).
        result_type: the engine's ``Result`` class (this module does not import the engine).
        agent: a label for the agent (records name its templates ``<label>#<n>``); default: a
            digest of the head.
        tools: tool schemas the chat template renders into the head (part of the agent).
        max_new_tokens: default: the engine config's.
        stop: the text is cut before the first of these, and decoding stops there.
        message_id: the id of the AI message that will carry this answer.
        on_token: called with each generated token (True stops the decode where it can).
        request_id, forced_ids, return_logits: as :meth:`KVCommEngine.generate`.

    Returns:
        The engine's ``Result`` (``mode`` ``prefix`` for a continuation with nothing to reuse after
        it); ``text`` is cut at ``stop``.

    Raises:
        TemplateError: no messages, a message the chat template cannot render as a segment.
        ContextLengthError: the conversation and ``max_new_tokens`` exceed the model's context.
    """
    msgs = normalize(messages)
    if system_prompt is None and msgs[0]["role"] == "system":  # a leading system message is the agent's
        system_prompt, msgs = msgs[0]["content"], normalize(msgs[1:])
    n_new = max_new_tokens or engine.config.max_new_tokens
    with engine.lock, torch.inference_mode(False):
        sess = session(engine)
        rendered = render(engine.tokenizer, sess.rendering, system_prompt, msgs, tools)
        if len(rendered.ids) + n_new > engine.max_positions:
            raise ContextLengthError(
                f"a conversation of {len(msgs)} messages renders to {len(rendered.ids)} tokens; with {n_new} new "
                f"tokens that exceeds the model's context of {engine.max_positions}")
        identity = _digest(rendered.head, rendered.tail)
        label = _label(sess, agent, identity)
        folded, n_slots = sess.slot_layout(len(msgs))
        name = f"{label}#{n_slots}"
        stopper = Stopper(engine, stop, on_token)
        call = _Call(engine, sess, identity, label, name, rendered, n_new, request_id, forced_ids, return_logits)
        continued = _continued(call) if sess.continues(engine) else None
        if continued is None:
            result, answer = _generate(call, msgs, folded, stopper)
        elif not folded and _starts_after(rendered, continued[1]):
            # new messages after the continued call: its KV is the exact prefix, they are reused
            result, answer = _generate(call, msgs, folded, stopper, exact=_prefix_block(*continued))
        else:
            result, answer = _continue(call, *continued, stopper, result_type)
        result.text = stopper.cut(result.text)
        if answer is not None:  # the AI message that will carry this answer finds its KV by id or text
            if message_id:
                sess.remember_answer(f"id:{message_id}", answer)
            if result.text:
                sess.remember_answer(f"text:{result.text}", answer)
        return result


@dataclass
class _Call:
    """What both paths of one call need."""

    engine: Any
    sess: ChatSession
    identity: str  # the agent: a digest of its head and generation prompt
    label: str
    name: str  # the template's (and the records') name, <label>#<slots>
    rendered: Rendered
    n_new: int
    request_id: str
    forced_ids: list[int] | None
    return_logits: bool


def _generate(call: _Call, msgs: list[dict[str, Any]], folded: int, stopper: Stopper,
              exact: KVBlock | None = None) -> tuple[Any, Answer | None]:
    """The template path: publish every segment, generate with the template ``<label>#<n>``.

    ``exact``: the KV of the prompt's first tokens (an earlier call of this agent that the
    conversation continues), which the engine uses as is (``generate(exact_kv=...)``).
    """
    engine, sess, rendered = call.engine, call.sess, call.rendered
    t0 = time.perf_counter()
    contents = [_segment(engine, sess, msgs[i], rendered.pieces[i], i) for i in range(len(msgs))]
    if folded:
        contents = [_fold(engine, contents[:folded]), *contents[folded:]]
    engine.register_agent(call.name, MessageTemplate(rendered.head, rendered.tail, len(contents)))
    segments_ms = (time.perf_counter() - t0) * 1e3
    keep = sess.continues(engine)
    result = engine.generate(call.name, {f"m{i}": c for i, c in enumerate(contents)}, max_new_tokens=call.n_new,
                             request_id=call.request_id, forced_ids=call.forced_ids,
                             return_logits=call.return_logits, return_cache=keep, exact_kv=exact,
                             on_token=None if call.forced_ids is not None else stopper)
    if call.forced_ids is not None:
        _report_forced(stopper, result.token_ids)
    result.record.publish_ms += segments_ms  # off the TTFT path, as the engine's own publishing
    prompt_kv, result.cache = result.cache, None  # asked for the continuation, not by the caller
    answer_ids = tuple(t for t in result.token_ids if t not in engine.eos_ids)
    published = engine.latest.get(f"agent:{call.name}")
    if not answer_ids or not isinstance(published, Content) or published.ids != answer_ids:
        return result, None
    answer = Answer(call.label, answer_ids, published.kv)
    if keep and prompt_kv is not None:
        prompt = tuple(rendered.ids)
        # the answer's KV continues the prompt's only where it is the producer's own
        tail = _at(engine, published.kv, len(prompt)) if engine.config.answer_base == "producer" else None
        sess.remember_continuation(call.identity, Continuation(prompt + answer_ids, len(prompt), prompt_kv, tail))
    return result, answer


def _segment(engine: Any, sess: ChatSession, m: Mapping[str, Any], piece: tuple[int, ...], position: int) -> Content:
    """The content of one message piece: its producer's KV for a known AI message, else published."""
    bucket = _bucket(position)
    if m["role"] == "assistant":
        answer = sess.answers.get(f"id:{m['id']}") if m.get("id") else None
        answer = answer or sess.answers.get(f"text:{m['content']}")
        if answer is not None:
            pool = f"{MESSAGE_SLOT_PREFIX}ai.{answer.label}@{bucket}"
            content = answer.pieces.get((piece, pool)) or _answer_content(engine, sess, answer, piece, pool)
            if content is not None:
                answer.pieces[(piece, pool)] = content
                return content
        return engine.publish(f"{MESSAGE_SLOT_PREFIX}ai@{bucket}", ids=list(piece))
    return engine.publish(f"{MESSAGE_SLOT_PREFIX}{m['role']}@{bucket}", ids=list(piece))


def _answer_content(engine: Any, sess: ChatSession, answer: Answer, piece: tuple[int, ...], pool: str) -> Content | None:
    """The piece ``pre + answer + post`` with base KV = frame KV around the producer's answer KV."""
    pre, post = _frame(engine, sess)
    k = len(piece) - len(pre) - len(post)
    if (k < 1 or k > len(answer.ids) or piece[: len(pre)] != pre or piece[len(piece) - len(post):] != post
            or piece[len(pre): len(pre) + k] != answer.ids[:k]):
        return None  # the message's text no longer tokenizes as the answer did: publish it as text
    parts = [sess._frames[pre]] if pre else []
    parts.append(_at(engine, answer.kv.slice(0, k), len(pre)))
    kv = KVBlock(torch.cat([p.k for p in parts], dim=2), torch.cat([p.v for p in parts], dim=2))
    if post:
        ends = _end_markers(engine, sess, kv, post)
        kv = KVBlock(torch.cat([kv.k, ends.k], dim=2), torch.cat([kv.v, ends.v], dim=2))
    content: Content = engine.publish(pool, ids=list(piece), kv=kv)
    return content


def _end_markers(engine: Any, sess: ChatSession, body: KVBlock, post: tuple[int, ...]) -> KVBlock:
    """The KV of the markers that close an answer, computed over it (one short forward, off the
    TTFT path) behind the sink every message is published behind: without the sink the first
    token takes the attention mass a real prompt's first token holds, and the markers' KV is far
    off (KL 0.54 against 0.21 on the supervisor example's reuse calls)."""
    model, sink = engine.model, engine.sink_ids(f"{MESSAGE_SLOT_PREFIX}frame")
    if sess._sink_kv is None or sess._sink_kv.length != len(sink):
        _, cache = prefill(model, sink)
        sess._sink_kv = block_from_cache(cache)
    head, n = sess._sink_kv, len(sink)
    moved = _at(engine, body, n)
    cache = cache_from_block(KVBlock(torch.cat([head.k, moved.k], dim=2), torch.cat([head.v, moved.v], dim=2)),
                             model.config)
    _, cache = prefill(model, list(post), start=n + body.length, cache=cache)
    ends = block_from_cache(cache, n + body.length)
    return KVBlock(shift_keys(ends.k, -n, engine.inv_freq), ends.v)


def _frame(engine: Any, sess: ChatSession) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """An assistant message's rendering around its content, as token ids (their base KV cached)."""
    if sess._frame is None:
        tok = engine.tokenizer
        base = tok.apply_chat_template([SYSTEM_PLACEHOLDER], tokenize=False)
        one = tok.apply_chat_template([SYSTEM_PLACEHOLDER, {"role": "assistant", "content": _MARK}], tokenize=False)
        pre, _, post = str(one)[len(str(base)):].partition(_MARK)
        sess._frame = tuple(tuple(tok(t, add_special_tokens=False).input_ids) if t else () for t in (pre, post))
    ids = sess._frame[0]
    if ids and ids not in sess._frames:  # the role markers before an answer (those after it: see above)
        sess._frames[ids] = engine.publish(f"{MESSAGE_SLOT_PREFIX}frame", ids=list(ids)).kv
    return sess._frame[0], sess._frame[1]


def _fold(engine: Any, contents: list[Content]) -> Content:
    """The oldest messages as one content: their base KVs laid end to end."""
    ids: list[int] = []
    ks, vs = [], []
    for c in contents:
        ks.append(_at(engine, c.kv, len(ids)).k)
        vs.append(c.kv.v)
        ids += c.ids
    kv = KVBlock(torch.cat(ks, dim=2), torch.cat(vs, dim=2))
    folded: Content = engine.publish(f"{MESSAGE_SLOT_PREFIX}history", ids=ids, kv=kv)
    return folded


def _continued(call: _Call) -> tuple[Continuation, int] | None:
    """The agent's latest call and how many prompt tokens its KV serves, where this call's
    prompt continues it (starts with that call's whole prompt); else None."""
    ids = call.rendered.ids
    cont = call.sess.continuations.get(call.identity)
    if cont is None:
        return None
    reuse = 0
    for a, b in zip(ids[: len(ids) - 1], cont.ids[: cont.covered], strict=False):
        if a != b:
            break
        reuse += 1
    return (cont, reuse) if reuse >= cont.prompt_len - 1 else None


def _starts_after(rendered: Rendered, n: int) -> bool:
    """Whether a whole message piece starts at or after token ``n`` (a message to reuse)."""
    start = len(rendered.head)
    for piece in rendered.pieces:
        if start >= n:
            return True
        start += len(piece)
    return False


def _continue(call: _Call, cont: Continuation, reuse: int, stopper: Stopper,
              result_type: Callable[..., Any]) -> tuple[Any, Answer | None]:
    """The continuation path: the agent's latest call's KV (``reuse`` tokens) as the prefix, the
    rest (no whole message: the end of the last one, the generation prompt) prefilled, decoded here."""
    engine, sess, ids = call.engine, call.sess, call.rendered.ids
    model = engine.model
    sync_device(model.device)
    t0 = time.perf_counter()
    cache = cache_from_block(_prefix_block(cont, reuse), model.config)
    logits, cache = prefill(model, ids[reuse:], start=reuse, cache=cache)
    sync_device(model.device)
    ttft = (time.perf_counter() - t0) * 1e3
    t1 = time.perf_counter()
    # as the template path decodes (KVCommEngine.generate): the same stops, and a forced decode runs
    # every forced token in one forward and reports them after it
    forced = call.forced_ids
    out, step_logits = greedy_decode(model, cache, logits, len(ids), call.n_new, engine.eos_ids, forced=forced,
                                     on_token=None if forced is not None else stopper)
    if forced is not None:
        _report_forced(stopper, out)
    sync_device(model.device)
    rec = CallRecord(agent=call.name, policy=engine.config.policy, mode="prefix", prompt_tokens=len(ids),
                     reused_tokens=reuse, recomputed_tokens=len(ids) - reuse, new_tokens=len(out), ttft_ms=ttft,
                     first_token_ms=ttft, decode_ms=(time.perf_counter() - t1) * 1e3, request_id=call.request_id,
                     timestamp=time.time(), slots={CONTINUATION_KEY: f"{reuse}/{len(ids)}"})
    engine.last_prompt_ids = list(ids)
    engine.records.append(rec)
    engine.store.append_record(str(MetricsKey(engine.model_id)), rec.to_dict())
    answer_ids = tuple(t for t in out if t not in engine.eos_ids)
    end = len(ids) + len(answer_ids)
    if answer_ids and cache.get_seq_length() < end:  # the last token was sampled, never fed
        prefill(model, list(answer_ids[-1:]), start=end - 1, cache=cache)
    block = block_from_cache(cache, 0, end)
    sess.remember_continuation(call.identity, Continuation(tuple(ids) + answer_ids, len(ids), block))
    answer = None
    if answer_ids:
        if engine.config.answer_base == "producer":
            raw = block.slice(len(ids), end)
            kv = KVBlock(shift_keys(raw.k, -len(ids), engine.inv_freq), raw.v)
        else:  # as the engine's answers: prefilled alone
            kv = engine.publish(f"agent:{call.name}", ids=list(answer_ids)).kv
        answer = Answer(call.label, answer_ids, kv)
    text = engine.tokenizer.decode(list(answer_ids), skip_special_tokens=True)
    logits_out = step_logits if call.return_logits else None
    return result_type(text, out, "prefix", rec, logits_out, None), answer


def _prefix_block(cont: Continuation, n: int) -> KVBlock:
    """The KV of ``cont.ids[:n]``."""
    if n <= cont.block.length or cont.tail is None:
        return cont.block.slice(0, n)
    head, tail = cont.block, cont.tail.slice(0, n - cont.block.length)
    return KVBlock(torch.cat([head.k, tail.k], dim=2), torch.cat([head.v, tail.v], dim=2))


def _report_forced(stopper: Stopper, tokens: list[int]) -> None:
    """Report a forced decode's tokens to ``stopper`` (and its ``on_token``), up to its stop: a
    forced decode feeds every forced token, so they are reported after it."""
    for tok in tokens:
        if stopper(tok):
            break


# -- helpers ----------------------------------------------------------------------------------------
def _at(engine: Any, kv: KVBlock, position: int) -> KVBlock:
    """``kv`` (at 0..T-1) with its keys rotated to start at ``position``."""
    return KVBlock(shift_keys(kv.k, position, engine.inv_freq), kv.v) if position else kv


def _bucket(position: int) -> str:
    """A message position's pool bucket: 0..7 each, then 8-15, 16-31, ... (few pools, similar contexts)."""
    if position < 8:
        return str(position)
    low = 1 << (position.bit_length() - 1)
    return f"p{low}-{2 * low - 1}"


def _digest(*parts: Sequence[int]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(",".join(map(str, p)).encode() + b";")
    return h.hexdigest()


def _label(sess: ChatSession, agent: str | None, identity: str) -> str:
    """A readable agent label, unique to its head (a label another head took gets the digest)."""
    label = _LABEL.sub("_", agent).strip("_")[:40] if agent else ""
    label = label or f"chat-{identity[:8]}"
    if sess.labels.setdefault(label, identity) != identity:
        label = f"{label}-{identity[:6]}"
        sess.labels.setdefault(label, identity)
    return label


__all__ = ["ChatSession", "chat", "session"]
