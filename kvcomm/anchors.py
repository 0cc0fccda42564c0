"""Anchor pools: per slot, earlier contents whose deviations under each agent were measured.

Pool state lives in the store as three small maps (:class:`kvcomm.keys.PoolKey`: membership with
lengths and age, use counts, a creation counter; updated with the store's atomic pool operations),
so processes sharing one Redis share anchors. Tensors (an anchor's base KV and its
per-agent deltas) are ordinary store entries.

Shareability test (DESIGN §3.2): candidates are anchors at least as long as the content; fewer
than ``min_anchors`` -> new anchor. Otherwise d_i = ||V_content - V_anchor_i[:, :, :T]||_F,
w = softmax(-d), H = -sum w log2 w; H > gamma * log2(n) -> new anchor, else shareable, and the
anchors in the top-p mass of w get a use count (the LFU statistic of eviction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvcomm.config import KVCommConfig
from kvcomm.keys import PoolKey

if TYPE_CHECKING:
    from kvcomm.store import KVStore


@dataclass(frozen=True)
class AnchorInfo:
    content_hash: str
    length: int
    seq: int  # creation order (smaller = older)
    uses: int


@dataclass(frozen=True)
class ShareDecision:
    new_anchor: bool
    reason: str  # "too few anchors" | "entropy" | "shareable" | "already an anchor"
    entropy: float = 0.0
    matched: tuple[str, ...] = ()


class AnchorPool:
    """The anchors of one slot (state in ``store`` under the model id ``model``)."""

    def __init__(self, store: KVStore, model: str, slot: str, config: KVCommConfig) -> None:
        self.store = store
        self.slot = slot
        self.config = config
        self._members = str(PoolKey(model, slot, "members"))
        self._uses = str(PoolKey(model, slot, "uses"))
        self._seq = str(PoolKey(model, slot, "seq"))

    @property
    def map_keys(self) -> tuple[str, str]:
        """The store keys of the pool's members and uses maps (to read many pools in one batch)."""
        return self._members, self._uses

    def anchors(self, maps: tuple[dict[str, str], dict[str, str]] | None = None) -> list[AnchorInfo]:
        """The anchors, oldest first; ``maps``: the members and uses maps when already read."""
        members, uses = maps if maps is not None else self.store.pool_read_many(self.map_keys)
        out = []
        for h, val in members.items():
            try:
                length, seq = (int(x) for x in str(val).split(","))
            except ValueError:
                continue  # a malformed member is ignored, never trusted
            out.append(AnchorInfo(h, length, seq, int(uses.get(h, 0) or 0)))
        return sorted(out, key=lambda info: info.seq)

    def __contains__(self, content_hash: str) -> bool:
        return content_hash in self.store.pool_read(self._members)

    def decide(self, content_hash: str, values: torch.Tensor, anchor_values: dict[str, torch.Tensor]) -> ShareDecision:
        """The shareability test of a content with value cache ``values`` [L, H, T, D].

        ``anchor_values`` maps the content hash of each length-compatible anchor to its value
        cache (at least T tokens, or ``min_anchor_coverage`` * T).
        """
        if content_hash in anchor_values:
            return ShareDecision(False, "already an anchor")
        n = len(anchor_values)
        if n < self.config.min_anchors:
            return ShareDecision(True, "too few anchors")
        names = list(anchor_values)
        d = torch.stack([_distance(values, anchor_values[h]) for h in names])
        w = torch.softmax(-d, dim=0)
        entropy = float(-(w * torch.log2(w.clamp_min(1e-30))).sum())
        if entropy > self.config.gamma * math.log2(n):
            return ShareDecision(True, "entropy", entropy)
        order = torch.argsort(w, descending=True).tolist()
        chosen, mass = [], 0.0
        for i in order:
            chosen.append(names[i])
            mass += float(w[i])
            if mass >= self.config.top_p:
                break
        for h in chosen:
            self.store.pool_increment(self._uses, h, 1)
        return ShareDecision(False, "shareable", entropy, tuple(chosen))

    def add(self, content_hash: str, length: int) -> list[str]:
        """Add an anchor; returns the content hashes evicted to keep at most V anchors."""
        seq = self.store.pool_increment(self._seq, "n", 1) or 0
        self.store.pool_write(self._members, {content_hash: f"{length},{seq}"})
        return self.evict()

    def evict(self) -> list[str]:
        """While over V anchors: drop the least-used among the ``eviction_window`` oldest."""
        evicted = []
        anchors = self.anchors()
        while len(anchors) > self.config.max_anchors:
            window = anchors[: self.config.eviction_window]
            victim = min(window, key=lambda info: (info.uses, info.seq))
            self.store.pool_remove(self._members, victim.content_hash)
            self.store.pool_remove(self._uses, victim.content_hash)
            evicted.append(victim.content_hash)
            anchors = [info for info in anchors if info.content_hash != victim.content_hash]
        return evicted


def _distance(values: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of the value difference over the content's T tokens.

    An anchor shorter than the content (``min_anchor_coverage`` < 1) is compared over its m < T
    tokens and the norm scaled by sqrt(T / m), so that it stands beside full-length anchors as if
    its per-token difference held for all T tokens.
    """
    T = values.shape[2]
    m = min(T, anchor.shape[2])
    d = torch.linalg.vector_norm((values[:, :, :m] - anchor[:, :, :m]).float())
    return d if m == T else d * math.sqrt(T / m)
