"""What a call is made of: a registered agent's prompt and the contents that fill its slots.

Both the engine (which builds them) and the planner (which plans over them) import these types
from here, so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcomm.anchors import ShareDecision
from kvcomm.kv import KVBlock
from kvcomm.template import RenderedTemplate, Template


@dataclass
class Content:
    """What fills a slot in one request: token ids and base KV at positions 0..T-1."""

    slot: str
    ids: tuple[int, ...]
    hash: str  # the content's identity in the store (:class:`kvcomm.keys.ContentKey`)
    kv: KVBlock
    decision: ShareDecision | None = None  # the shareability test's verdict (kvcomm)

    @property
    def length(self) -> int:
        return len(self.ids)


@dataclass
class AgentPrompt:
    """A registered agent: its template, and that template prefilled once with dummy slot text."""

    name: str
    template: Template
    rendered: RenderedTemplate
    block: KVBlock  # the template prefilled with dummy slot text
    reg_starts: list[int]  # where each text segment starts in that prefill

    @property
    def segments(self) -> tuple[tuple[int, ...], ...]:
        """The template's text segments as token ids: ``segments[i]`` precedes slot i."""
        return self.rendered.segment_ids

    @property
    def slots(self) -> tuple[str, ...]:
        return self.rendered.slots

    def segment_block(self, i: int) -> KVBlock:
        """Text segment i's KV as prefilled at registration (after the dummy slot texts)."""
        start = self.reg_starts[i]
        return self.block.slice(start, start + len(self.segments[i]))


__all__ = ["AgentPrompt", "Content"]
