"""The reuse planner: anchor pools, each call's plan, its pieces, and the deltas it records.

For every slot of a call the planner looks its content up in the slot's anchor pool: an anchor
itself ("exact"), shareable through this agent's measured deltas of enough anchors ("shared"),
or not (the call goes dense, and its real KV becomes the deltas of the anchors that lacked
this agent's). The engine (:mod:`kvcomm.engine`) runs what the plan says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kvcomm.anchors import AnchorPool, ShareDecision
from kvcomm.config import KVCommConfig
from kvcomm.kv import KVBlock, block_from_cache
from kvcomm.reuse import Piece, SlotAnchors, key_delta
from kvcomm.template import RenderedTemplate, Template, slot_kind

if TYPE_CHECKING:
    from kvcomm.engine import Content


@dataclass
class AgentPrompt:
    """A registered agent: its template, and that template prefilled once with dummy slot text."""

    name: str
    template: Template
    rendered: RenderedTemplate
    block: KVBlock  # the template prefilled with dummy slot text
    reg_starts: list[int]  # where each segment starts in that prefill


@dataclass
class Plan:
    """How one call is served: its mode, each slot's anchors, the deltas still to record."""

    mode: str
    anchors: list[SlotAnchors | None] = field(default_factory=list)
    record_slots: list[int] = field(default_factory=list)  # anchors lacking this agent's deltas
    slot_state: dict[str, str] = field(default_factory=dict)


class Planner:
    """Plans each call of one engine (which holds its lock while the planner runs).

    Args:
        store: the engine's :class:`kvcomm.store.KVStore`; keys are ``prefix`` + name.
        prefix: the model fingerprint's key prefix.
        fingerprint: entries fetched must carry it.
        config: the engine's configuration.
        device: where fetched KV goes (the model's device).
        inv_freq: the model's RoPE inverse frequencies (deltas of keys are kept in the base's frame).
    """

    def __init__(self, store: Any, prefix: str, fingerprint: str, config: KVCommConfig, device: torch.device,
                 inv_freq: torch.Tensor) -> None:
        self.store = store
        self.prefix = prefix
        self.fingerprint = fingerprint
        self.config = config
        self.device = device
        self.inv_freq = inv_freq
        self.pools: dict[str, AnchorPool] = {}

    def pool(self, slot: str) -> AnchorPool:
        """The slot's anchor pool (its state lives in the store)."""
        if slot not in self.pools:
            self.pools[slot] = AnchorPool(self.store, self.prefix, slot, self.config)
        return self.pools[slot]

    def admit(self, content: Content) -> ShareDecision:
        """The shareability test for a new content: it becomes an anchor or is shared from them."""
        pool = self.pool(content.slot)
        anchor_v = {}
        for a in pool.anchors():
            if a.content_hash == content.hash:
                return ShareDecision(False, "already an anchor")
            if self.covers(a.length, content.length):
                base = self.fetch(f"content:{a.content_hash}")
                if base is not None:
                    anchor_v[a.content_hash] = base.v
        decision = pool.decide(content.hash, content.kv.v, anchor_v)
        if decision.new_anchor:
            for gone in pool.add(content.hash, content.length):
                for key in self.store.scan(f"{self.prefix}delta:{gone}:"):
                    self.store.delete(key)
        return decision

    def covers(self, anchor_length: int, length: int) -> bool:
        """Whether an anchor this long may stand in for a content of ``length`` tokens."""
        return anchor_length >= length * self.config.min_anchor_coverage

    def fetch(self, key: str, *, length: int | None = None) -> KVBlock | None:
        """A stored KV block on the model's device; None when missing or not ``length`` tokens long."""
        entry = self.store.get(f"{self.prefix}{key}", fingerprint=self.fingerprint)
        if entry is None or (length is not None and entry.tensors["k"].shape[2] != length):
            return None
        dev = self.device
        return KVBlock(entry.tensors["k"].to(dev), entry.tensors["v"].to(dev))

    def plan(self, a: AgentPrompt, contents: list[Content]) -> Plan:
        """How agent ``a``'s call over ``contents`` (one per slot, in order) is served."""
        policy = self.config.policy
        if policy in ("dense", "prefix"):
            return Plan(policy)
        if policy in ("naive", "cacheblend"):
            return Plan("reuse", [None] * len(contents))
        plan = Plan("reuse")
        for i, c in enumerate(contents):
            pool = self.pool(c.slot)
            anchors = pool.anchors()
            if any(x.content_hash == c.hash for x in anchors):
                got = self.slot_anchors(a.name, [c.hash], exact=True)
                plan.slot_state[c.slot] = "exact" if got else "new-anchor"
                if not got:
                    plan.mode = "dense"
                    plan.record_slots.append(i)
                plan.anchors.append(got)
                continue
            usable = [x.content_hash for x in anchors if self.covers(x.length, c.length)]
            got = self.slot_anchors(a.name, usable, exact=False)
            plan.slot_state[c.slot] = f"shared({len(got) if got else 0})"
            if got is None:
                plan.mode = "dense"
            plan.anchors.append(got)
        return plan

    def slot_anchors(self, agent: str, hashes: list[str], *, exact: bool) -> SlotAnchors | None:
        """The anchors among ``hashes`` with this agent's deltas and their bases; None if none."""
        sa = SlotAnchors([], [], [], exact=exact)
        for h in hashes:
            delta = self.store.get(f"{self.prefix}delta:{h}:{agent}", fingerprint=self.fingerprint)
            if delta is None:
                continue
            base = self.fetch(f"content:{h}")
            if base is None:
                continue
            dev = self.device
            t = {k: v.to(dev) for k, v in delta.tensors.items()}
            sa.base.append(base)
            sa.ph.append(KVBlock(t["ph.k"], t["ph.v"]))
            sa.pf.append(KVBlock(t["pf.k"], t["pf.v"]))
            sa.ph_shift.append(int(delta.meta["ph_shift"]))
            sa.pf_shift.append(int(delta.meta["pf_shift"]))
        return sa if len(sa) else None

    def pieces(self, a: AgentPrompt, contents: list[Content], seg_starts: list[int], slot_starts: list[int],
               anchors: list[SlotAnchors | None]) -> list[Piece]:
        """The prompt as pieces for :func:`kvcomm.reuse.assemble`: fixed text, then slot + segment pairs."""
        segs = a.rendered.segment_ids
        pieces = [Piece(0, a.block.slice(0, len(segs[0])), 0)]
        for j, c in enumerate(contents):
            sa = anchors[j] if j < len(anchors) else None
            # an answer's base KV was computed in its producer's context already: averaging other
            # answers' per-position deltas can add more error than it removes (config switch)
            fix = self.config.correct_answer_slots or slot_kind(c.slot) != "agent" or (sa is not None and sa.exact)
            pieces.append(Piece(slot_starts[j], c.kv, slot_starts[j], sa, "slot", correct=fix))
            r = a.reg_starts[j + 1]
            seg_block = a.block.slice(r, r + len(segs[j + 1]))
            pieces.append(Piece(seg_starts[j + 1], seg_block, seg_starts[j + 1] - r, sa, "seg", c.kv))
        return pieces

    def record_deltas(self, a: AgentPrompt, contents: list[Content], cache: Any, seg_starts: list[int],
                      slot_starts: list[int], which: list[int]) -> None:
        """Store agent ``a``'s deviations of the slots ``which`` from a dense call's real ``cache``."""
        real = block_from_cache(cache, 0, seg_starts[-1] + len(a.rendered.segment_ids[-1]))
        for j in which:
            c = contents[j]
            q, T = slot_starts[j], c.length
            ph_k = key_delta(real.k[:, :, q : q + T], c.kv.k, q, self.inv_freq)
            ph_v = real.v[:, :, q : q + T] - c.kv.v
            r, p = a.reg_starts[j + 1], seg_starts[j + 1]
            m = len(a.rendered.segment_ids[j + 1])
            seg = a.block.slice(r, r + m)
            pf_k = key_delta(real.k[:, :, p : p + m], seg.k, p - r, self.inv_freq)
            pf_v = real.v[:, :, p : p + m] - seg.v
            entry = self.entry({"ph.k": ph_k, "ph.v": ph_v, "pf.k": pf_k, "pf.v": pf_v},
                               {"ph_shift": q, "pf_shift": p - r, "agent": a.name, "slot": c.slot})
            self.store.put(f"{self.prefix}delta:{c.hash}:{a.name}", entry)

    def entry(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Any:
        """A store entry of this model's KV."""
        from kvcomm.store import KVEntry

        return KVEntry(tensors={k: v.contiguous() for k, v in tensors.items()}, meta=meta,
                       fingerprint=self.fingerprint)
