"""Message-segment mode's per-engine state (:mod:`kvcomm.chat`): agent labels, the answers kept
for the AI messages that carry them, each agent's latest call for continuations, and settings.

One :class:`ChatSession` per engine (:func:`session`), used under the engine's lock.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvcomm.errors import TemplateError
from kvcomm.kv import KVBlock
from kvcomm.messages import MessageTemplate
from kvcomm.prompt import Content


@dataclass
class Answer:
    """An answer's producer KV: token ids and their KV at positions 0..T-1."""

    label: str
    ids: tuple[int, ...]
    kv: KVBlock
    # its pieces already published ((piece, pool) -> content): the end markers' KV is a forward
    pieces: dict[tuple[tuple[int, ...], str], Content] = field(default_factory=dict)


@dataclass
class Continuation:
    """One agent's latest call: ``ids`` (prompt + answer) and the KV of a prefix of them.

    ``block`` holds ``ids[:len(block)]``; when ``tail`` is set, ``tail`` (the answer's producer KV,
    keys rotated to its positions) follows it.
    """

    ids: tuple[int, ...]
    prompt_len: int
    block: KVBlock
    tail: KVBlock | None = None

    @property
    def covered(self) -> int:
        return self.block.length + (self.tail.length if self.tail is not None else 0)


class ChatSession:
    """An engine's message-segment state: labels, answers, continuations, settings.

    One per engine (:func:`session`), used under the engine's lock.

    Attributes:
        max_message_slots: the most message slots a template has (>= 2).
        fold_block: past ``max_message_slots``, the oldest messages fold ``fold_block`` at a time
            (1 <= fold_block < max_message_slots).
        continuation: reuse an agent's earlier call where a conversation continues it.
        max_answers: answers kept for the AI messages that carry them (least recent dropped).
        max_continuations: agents whose latest call's KV is kept.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.max_message_slots = 16
        self.fold_block = 8
        self.continuation = True
        self.max_answers = 1024
        self.max_continuations = 8
        self.labels: dict[str, str] = {}  # label -> agent identity (digest of its head)
        self.answers: OrderedDict[str, Answer] = OrderedDict()  # "id:<message id>" / "text:<text>"
        self.continuations: OrderedDict[str, Continuation] = OrderedDict()
        self._frame: tuple[tuple[int, ...], ...] | None = None  # an assistant message's markers
        self._frames: dict[tuple[int, ...], KVBlock] = {}  # their base KV
        self._sink_kv: KVBlock | None = None  # the KV of the sink messages are published behind
        self._texts: OrderedDict[str, str | None] = OrderedDict()

    # the templates this session registered (bounded: see the module docstring)
    @property
    def templates(self) -> list[str]:
        return [name for name, p in self.engine.agents.items() if isinstance(p.template, MessageTemplate)]

    def slot_layout(self, n_messages: int) -> tuple[int, int]:
        """``(folded, slots)``: how many oldest messages fold into the first slot, and the slot count."""
        k, b = self.max_message_slots, self.fold_block
        if not (k >= 2 and 1 <= b < k):
            raise TemplateError(f"max_message_slots={k} and fold_block={b}: need max_message_slots >= 2 "
                                "and 1 <= fold_block < max_message_slots")
        if n_messages <= k:
            return 0, n_messages
        folded = b * math.ceil((n_messages - k + 1) / b)
        return folded, n_messages - folded + 1

    def continues(self, engine: Any) -> bool:
        """Whether calls may continue an earlier call (never under ``dense``: the reference)."""
        return self.continuation and engine.config.policy != "dense"

    def remember_answer(self, key: str, answer: Answer) -> None:
        _remember(self.answers, key, answer, self.max_answers)

    def remember_continuation(self, identity: str, cont: Continuation) -> None:
        _remember(self.continuations, identity, cont, self.max_continuations)

    def rendering(self, key: str, make: Callable[[], str | None]) -> str | None:
        """A message's own rendering, cached by the message (least recent dropped)."""
        if key not in self._texts:
            _remember(self._texts, key, make(), 4096)
        return self._texts[key]


def _remember(table: OrderedDict[str, Any], key: str, value: Any, limit: int) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > limit:
        table.popitem(last=False)


_SESSIONS: weakref.WeakKeyDictionary[Any, ChatSession] = weakref.WeakKeyDictionary()
_SESSIONS_LOCK = threading.Lock()


def session(engine: Any) -> ChatSession:
    """The engine's :class:`ChatSession` (created on first use, dropped with the engine)."""
    with _SESSIONS_LOCK:
        if engine not in _SESSIONS:
            _SESSIONS[engine] = ChatSession(engine)
        return _SESSIONS[engine]


# -- one call ---------------------------------------------------------------------------------------


__all__ = ["Answer", "ChatSession", "Continuation", "session"]
