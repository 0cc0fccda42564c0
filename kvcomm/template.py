"""Agent prompt templates: fixed text segments around named slots.

A template is a list of chat messages whose text may hold slots: ``{question}``,
``{agent:planner}``, ``{doc:3}``. Write ``{{`` and ``}}`` for literal braces. The messages are
rendered once with the tokenizer's chat template (generation prompt appended) and split at the
slots into text segments, each tokenized on its own, so a prompt is always the concatenation
``seg_0 + content_1 + seg_1 + ... + content_n + seg_n`` of token ids: the dense and the reuse
paths see exactly the same token sequence.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvcomm.errors import TemplateError

_SLOT = re.compile(r"\{([A-Za-z_][\w]*(?::[\w.\-]+)?)\}")
_ANY_BRACE = re.compile(r"\{[^{}]*\}")
_MARK = "\x00KVCOMM_SLOT_{}\x00"
_MARK_RE = re.compile("\x00KVCOMM_SLOT_(\\d+)\x00")


@dataclass(frozen=True)
class Template:
    """An agent's prompt as chat messages with slots.

    Args:
        messages: ``[{"role": "system", "content": "..."}, {"role": "user", "content": "... {question} ..."}]``.
    """

    messages: tuple[tuple[str, str], ...]

    def __init__(self, messages: Sequence[Mapping[str, str]] | str) -> None:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        pairs = []
        for i, m in enumerate(messages):
            if "role" not in m or "content" not in m:
                raise TemplateError(f"template message {i} needs 'role' and 'content' keys, got {sorted(m)}")
            pairs.append((str(m["role"]), str(m["content"])))
        if not pairs:
            raise TemplateError("a template needs at least one message")
        object.__setattr__(self, "messages", tuple(pairs))
        for _, content in pairs:
            for chunk in _split_literal_braces(content):
                if isinstance(chunk, str):
                    _reject_malformed(chunk)
        names = self.slots
        if not names:
            raise TemplateError(
                "template has no slots: put at least one {slot} such as {question} in a message "
                "(a prompt without shared content has nothing to reuse)"
            )
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise TemplateError(f"slot(s) {', '.join(dupes)} appear more than once in the template")

    @classmethod
    def from_system_user(cls, system: str, user: str) -> Template:
        return cls([{"role": "system", "content": system}, {"role": "user", "content": user}])

    @property
    def slots(self) -> list[str]:
        """Slot names in prompt order."""
        out: list[str] = []
        for _, content in self.messages:
            for chunk in _split_literal_braces(content):
                if isinstance(chunk, str):
                    out += _SLOT.findall(chunk)
        return out

    def render(self, tokenizer: Any) -> RenderedTemplate:
        """Render with the chat template and tokenize each text segment separately."""
        order: list[str] = []
        msgs = []
        for role, content in self.messages:
            text = ""
            for chunk in _split_literal_braces(content):
                if not isinstance(chunk, str):
                    text += chunk[0]  # a literal brace
                    continue
                _reject_malformed(chunk)

                def mark(m: re.Match[str]) -> str:
                    order.append(m.group(1))
                    return _MARK.format(len(order) - 1)

                text += _SLOT.sub(mark, chunk)
            msgs.append({"role": role, "content": text})
        rendered = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        pieces = _MARK_RE.split(rendered)
        texts, idx = pieces[0::2], [int(i) for i in pieces[1::2]]
        if idx != list(range(len(order))):
            raise TemplateError("the chat template reordered or dropped slots; use a simpler template")
        segments = [tuple(_encode(tokenizer, t)) for t in texts]
        if not segments[-1]:
            raise TemplateError("the template must end with text after its last slot (the chat template's "
                                "generation prompt normally provides it)")
        return RenderedTemplate(slots=tuple(order), segment_ids=tuple(segments), segment_texts=tuple(texts))

    def text_before(self, slot: str) -> str:
        """The fixed text right before ``slot`` inside its message: from the message's start or
        the previous slot in it (literal braces resolved). "" when the slot opens its message."""
        for _, content in self.messages:
            text = ""
            for chunk in _split_literal_braces(content):
                if not isinstance(chunk, str):
                    text += chunk[0]
                    continue
                pos = 0
                for m in _SLOT.finditer(chunk):
                    text += chunk[pos : m.start()]
                    if m.group(1) == slot:
                        return text
                    text, pos = "", m.end()
                text += chunk[pos:]
        raise TemplateError(f"template has no slot {slot!r}")

    def fill(self, values: Mapping[str, str]) -> list[dict[str, str]]:
        """The messages with every slot replaced by its text (for a plain, reuse-free call)."""
        missing = [s for s in self.slots if s not in values]
        if missing:
            raise TemplateError(f"no value for slot(s): {', '.join(missing)}")
        out = []
        for role, content in self.messages:
            text = ""
            for chunk in _split_literal_braces(content):
                text += chunk[0] if not isinstance(chunk, str) else _SLOT.sub(lambda m: values[m.group(1)], chunk)
            out.append({"role": role, "content": text})
        return out


@dataclass(frozen=True)
class RenderedTemplate:
    """``segment_ids[i]`` precedes ``slots[i]``; ``segment_ids[-1]`` follows the last slot."""

    slots: tuple[str, ...]
    segment_ids: tuple[tuple[int, ...], ...]
    segment_texts: tuple[str, ...]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids) if text else []


def _split_literal_braces(text: str) -> list[str | tuple[str]]:
    """Split on ``{{`` / ``}}`` so literal braces are never read as slots."""
    out: list[str | tuple[str]] = []
    for part in re.split(r"(\{\{|\}\})", text):
        if part in ("{{", "}}"):
            out.append((part[0],))
        elif part:
            out.append(part)
    return out


def _reject_malformed(chunk: str) -> None:
    for m in _ANY_BRACE.finditer(chunk):
        if not _SLOT.fullmatch(m.group(0)):
            raise TemplateError(
                f"bad slot {m.group(0)!r}: slot names look like {{question}}, {{agent:planner}} or "
                "{doc:3}; write {{ and }} for literal braces"
            )


#: slots (and pools) of message-segment mode: a whole message, role markers included
MESSAGE_SLOT_PREFIX = "msg:"


def slot_kind(slot: str) -> str:
    """'agent' for ``agent:<name>`` slots (filled by an agent's answer), 'message' for a whole chat
    message (``msg:...``, :mod:`kvcomm.chat`), else 'input'."""
    if slot.startswith("agent:"):
        return "agent"
    return "message" if slot.startswith(MESSAGE_SLOT_PREFIX) else "input"


GENERIC_SYSTEM = "You are a helpful assistant."


def common_suffix(texts: Sequence[str]) -> str:
    """The longest string every text ends with."""
    if not texts:
        return ""
    first = texts[0]
    n = 0
    while n < len(first) and all(len(t) > n and t[-1 - n] == first[-1 - n] for t in texts):
        n += 1
    return first[len(first) - n :]


def message_prefix(tokenizer: Any, system: str = GENERIC_SYSTEM) -> str:
    """The chat template's text of a generic system message alone: where the next message's role
    markers start. A whole message (markers included, message-segment mode) is prefilled behind it,
    as it sits in a conversation; behind :func:`chat_prefix` it would follow a second user header.
    "\n" where the tokenizer has no chat template."""
    try:
        text = tokenizer.apply_chat_template([{"role": "system", "content": system}], tokenize=False)
    except Exception:  # no template (a plain tokenizer)
        return "\n"
    return text if isinstance(text, str) and text else "\n"


def chat_prefix(tokenizer: Any, system: str = GENERIC_SYSTEM) -> str:
    """The chat template's text up to a user message's content, after a generic system message.

    Slot contents usually sit in an agent's user message behind its system prompt; a content
    prefilled behind this prefix (``sink_text="chat"``) gets a base KV closer to the one it has
    in a real prompt than behind a bare newline. "\\n" where the tokenizer has no chat template.
    """
    mark = "\x00kvcomm-slot\x00"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": mark}], tokenize=False
        )
    except Exception:  # no template (a plain tokenizer): any short neutral text will do
        return "\n"
    return text.split(mark)[0] if isinstance(text, str) and mark in text else "\n"
