"""Streaming and stop sequences for message-segment calls: tokens in, text deltas out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


class Stopper:
    """Feeds ``on_token`` and watches for stop sequences in the decoded text."""

    def __init__(self, engine: Any, stop: Sequence[str] | None, on_token: Callable[[int], bool | None] | None) -> None:
        self.tokenizer, self.eos = engine.tokenizer, engine.eos_ids
        self.stop = [s for s in (stop or []) if s]
        self.on_token = on_token
        self.ids: list[int] = []

    def __call__(self, tok: int) -> bool:
        halt = bool(self.on_token(tok)) if self.on_token is not None else False
        if self.stop and tok not in self.eos:
            self.ids.append(tok)
            tail = self.tokenizer.decode(self.ids[-8:], skip_special_tokens=True)
            halt = halt or any(s in tail for s in self.stop) or any(s in self.text() for s in self.stop)
        return halt

    def text(self) -> str:
        return str(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def cut(self, text: str) -> str:
        return cut_at_stop(text, self.stop)


def cut_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """``text`` up to the first occurrence of any stop sequence."""
    return text[: min((i for s in (stop or []) if s and (i := text.find(s)) >= 0), default=len(text))]


class TextStream:
    """Token ids in, text deltas out, whose concatenation is the decoded (and stop-cut) text.

    Text that could still become a stop sequence, or an incomplete character, is held back until
    the next token settles it; :meth:`finish` returns what remains of the final text.
    """

    def __init__(self, tokenizer: Any, eos: set[int], stop: Sequence[str] | None = None) -> None:
        self.tokenizer, self.eos = tokenizer, eos
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.sent = ""

    def push(self, tok: int) -> str:
        if tok in self.eos:
            return ""
        self.ids.append(tok)
        text = cut_at_stop(str(self.tokenizer.decode(self.ids, skip_special_tokens=True)), self.stop)
        safe = len(text) - _held(text, self.stop)
        if text.endswith("\ufffd") or not text.startswith(self.sent) or safe <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent): safe], text[:safe]
        return delta

    def finish(self, final: str) -> str:
        """The rest of ``final`` (the call's text); '' where the stream already sent all of it."""
        rest = final[len(self.sent):] if final.startswith(self.sent) else ""
        self.sent = final
        return rest


def _held(text: str, stop: list[str]) -> int:
    """How many trailing characters of ``text`` start a stop sequence (to hold back)."""
    return max((n for s in stop for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), default=0)


__all__ = ["Stopper", "TextStream", "cut_at_stop"]
