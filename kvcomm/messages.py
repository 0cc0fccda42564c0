"""Messages as segments: a conversation rendered with the tokenizer's chat template, cut at
message boundaries into token pieces that concatenate to the rendered chat.

Used by :mod:`kvcomm.chat` (message-segment mode): the *head* is all text before the first message
(the system prompt, tools text, the template's own preamble), one *piece* per message (its whole
rendering: role markers, content, end marker) and the generation prompt. Each is tokenized on its
own, and :func:`render` checks on every call that ``head + pieces + generation prompt`` is, token
for token, ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kvcomm.errors import TemplateError
from kvcomm.template import RenderedTemplate, Template

#: the roles a message may have (the first system message is the agent's; later ones are segments)
ROLES = ("system", "user", "assistant", "tool")
SYSTEM_PLACEHOLDER = {"role": "system", "content": "kvcomm"}

#: a cache of renderings: ``cache(key, make)`` returns ``make()``'s value, computed once per key
RenderingCache = Callable[[str, Callable[[], "str | None"]], "str | None"]


class MessageTemplate(Template):
    """``head + n`` message slots ``{m0}..{m<n-1>}`` ``+ generation prompt``, as token ids.

    The slots sit back to back (every message piece carries its own role markers), so the only
    fixed text is the head and the generation prompt. Registered with
    :meth:`KVCommEngine.register_agent` like any template; it renders to these ids as they are.
    """

    head: tuple[int, ...]
    tail: tuple[int, ...]

    def __init__(self, head: Sequence[int], tail: Sequence[int], n: int) -> None:
        if n < 1 or not tail:
            raise TemplateError(f"a message template needs >= 1 slot and a generation prompt (n={n})")
        # `messages` identifies the template (equality, hashing); the head and tail as id lists
        object.__setattr__(self, "messages", (("head", ",".join(map(str, head))),
                                              ("slots", "".join(f"{{m{i}}}" for i in range(n))),
                                              ("tail", ",".join(map(str, tail)))))
        object.__setattr__(self, "head", tuple(head))
        object.__setattr__(self, "tail", tuple(tail))

    def render(self, tokenizer: Any) -> RenderedTemplate:
        n = len(self.slots)
        segments = (self.head, *([()] * (n - 1)), self.tail)
        return RenderedTemplate(slots=tuple(f"m{i}" for i in range(n)), segment_ids=segments,
                                segment_texts=tuple("" for _ in segments))


def normalize(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Plain ``{"role", "content"}`` dicts (plus ``id``, ``tool_calls``...) checked for rendering.

    Raises:
        TemplateError: no messages, a role outside :data:`ROLES`, content that is not text.
    """
    if isinstance(messages, (str, Mapping)):
        raise TemplateError(f"chat() takes a list of messages, got a {type(messages).__name__}")
    if not messages:
        raise TemplateError("chat() got an empty message list: give at least one message after the system prompt")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise TemplateError(f"message {i} must be a mapping with 'role' and 'content', got {m!r:.80}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise TemplateError(f"message {i} has role {role!r}, which the chat template cannot render as a "
                                f"segment (roles: {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise TemplateError(f"message {i} ({role}) has content of type {type(content).__name__}: only text "
                                "can be rendered")
        out.append(dict(m))
    return out


def _template_view(m: Mapping[str, Any]) -> dict[str, Any]:
    """What the chat template sees of a message (ids and names are ours, not the template's)."""
    return {k: v for k, v in m.items() if k in ("role", "content", "tool_calls", "tool_call_id")}


class Rendered:
    """A conversation cut into token ids: head, one piece per message, generation prompt."""

    def __init__(self, head: tuple[int, ...], pieces: list[tuple[int, ...]], tail: tuple[int, ...]) -> None:
        self.head, self.pieces, self.tail = head, pieces, tail
        self.ids = [*head, *(t for p in pieces for t in p), *tail]


def render(tokenizer: Any, cache: RenderingCache, system: str | None, messages: list[dict[str, Any]],
            tools: Sequence[Mapping[str, Any]] | None) -> Rendered:
    """Cut the rendered conversation into head, pieces and generation prompt, and check the cut."""
    tool_list = [dict(t) for t in tools] if tools else None

    def template(msgs: list[dict[str, Any]], gen: bool) -> str:
        try:
            text = tokenizer.apply_chat_template(msgs, tools=tool_list, tokenize=False, add_generation_prompt=gen)
        except Exception as exc:  # jinja raises on what a template refuses (roles that must alternate...)
            raise TemplateError(f"the chat template cannot render this conversation: {exc}") from None
        return str(text)

    def own(m: dict[str, Any]) -> str | None:
        """A message's rendering as the message after a system message (None: not a clean suffix)."""
        base, one = template([SYSTEM_PLACEHOLDER], False), template([SYSTEM_PLACEHOLDER, m], False)
        return one[len(base):] if one.startswith(base) else None

    views = [_template_view(m) for m in messages]
    conv = ([{"role": "system", "content": system}] if system is not None else []) + views
    full = template(conv, True)
    tools_key = repr(tool_list)
    own_texts = [cache(repr(sorted(v.items())) + tools_key, functools.partial(own, v)) for v in views]
    gen = cache("<generation prompt>" + tools_key,
                         lambda: template([SYSTEM_PLACEHOLDER], True)[len(template([SYSTEM_PLACEHOLDER], False)):]) or ""
    texts = [t for t in own_texts if t is not None]
    body = "".join(texts) + gen
    if len(texts) < len(views) or not full.endswith(body):  # a template that renders messages by position
        texts, gen = _incremental(template, conv, len(views), system is not None)
        body = "".join(texts) + gen
    head = full[: len(full) - len(body)]

    def encode(text: str) -> tuple[int, ...]:
        return tuple(tokenizer(text, add_special_tokens=False).input_ids) if text else ()

    out = Rendered(encode(head), [encode(t) for t in texts], encode(gen))
    canonical = list(encode(full))
    if out.ids != canonical:
        at = next((i for i, (a, b) in enumerate(zip(out.ids, canonical, strict=False)) if a != b),
                  min(len(out.ids), len(canonical)))
        where, n = "the generation prompt", len(out.head)
        for i, piece in enumerate(out.pieces):
            if at < n + len(piece):
                where = f"message {i} ({messages[i]['role']})"
                break
            n += len(piece)
        raise TemplateError(f"{where} does not tokenize on its own as it does inside the rendered conversation "
                            f"(token {at}): message-segment mode needs messages delimited by special tokens")
    if not out.tail:
        raise TemplateError("the chat template adds no generation prompt: message-segment mode needs one")
    return out


def _incremental(template: Callable[[list[dict[str, Any]], bool], str], conv: list[dict[str, Any]], n: int,
                 has_system: bool) -> tuple[list[str], str]:
    """Pieces by rendering growing prefixes of the conversation (templates that look at positions)."""
    first = 1 if has_system else 0
    prev = template(conv[:first], False) if first else ""
    texts = []
    for k in range(first + 1, first + n + 1):
        cur = template(conv[:k], False)
        if not cur.startswith(prev):
            raise TemplateError(f"the chat template renders message {k - first - 1} differently once later "
                                "messages follow: message-segment mode cannot cut it into segments")
        texts.append(cur[len(prev):])
        prev = cur
    full = template(conv, True)
    if not full.startswith(prev):
        raise TemplateError("the chat template's generation prompt rewrites the conversation")
    if not has_system and texts:  # a preamble the template adds before the first message is head
        own = template([SYSTEM_PLACEHOLDER, conv[0]], False)[len(template([SYSTEM_PLACEHOLDER], False)):]
        if texts[0].endswith(own):
            texts[0] = own
    return texts, full[len(prev):]


__all__ = ["ROLES", "MessageTemplate", "Rendered", "normalize", "render"]
