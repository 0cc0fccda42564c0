"""The reuse planner: anchor pools, each call's plan, its pieces, and the deltas it records.

For every slot of a call the planner looks its content up in the slot's anchor pool: an anchor
itself ("exact"), shareable through this agent's measured deltas of enough anchors ("shared"),
or not (the call goes dense, and its real KV becomes the deltas of the anchors that lacked
this agent's). The engine (:mod:`kvcomm.engine`) runs what the plan says.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from kvcomm.anchors import AnchorInfo, AnchorPool, ShareDecision
from kvcomm.config import KVCommConfig
from kvcomm.keys import ContentKey, DeltaKey, StoreKey
from kvcomm.kv import KVBlock, block_from_cache
from kvcomm.policies import Plan
from kvcomm.prompt import AgentPrompt, Content
from kvcomm.reuse import Piece, SlotAnchors, key_delta
from kvcomm.template import slot_kind

if TYPE_CHECKING:
    from kvcomm.store import KVEntry, KVStore


class Planner:
    """Plans each call of one engine (which holds its lock while the planner runs).

    Args:
        store: the engine's store.
        model: the model id that starts every key (:func:`kvcomm.keys.model_id`).
        fingerprint: entries fetched must carry it.
        config: the engine's configuration.
        device: where fetched KV goes (the model's device).
        inv_freq: the model's RoPE inverse frequencies (deltas of keys are kept in the base's frame).
    """

    def __init__(self, store: KVStore, model: str, fingerprint: str, config: KVCommConfig, device: torch.device,
                 inv_freq: torch.Tensor) -> None:
        self.store = store
        self.model = model
        self.fingerprint = fingerprint
        self.config = config
        self.device = device
        self.inv_freq = inv_freq
        self.pools: dict[str, AnchorPool] = {}

    def pool(self, slot: str) -> AnchorPool:
        """The slot's anchor pool (its state lives in the store)."""
        if slot not in self.pools:
            self.pools[slot] = AnchorPool(self.store, self.model, slot, self.config)
        return self.pools[slot]

    def content_key(self, content_hash: str) -> ContentKey:
        return ContentKey(self.model, content_hash)

    def admit(self, content: Content) -> ShareDecision:
        """The shareability test for a new content: it becomes an anchor or is shared from them."""
        pool = self.pool(content.slot)
        anchors = pool.anchors()
        if any(info.content_hash == content.hash for info in anchors):
            return ShareDecision(False, "already an anchor")
        # every candidate's base KV in one batch (one round trip to a Redis store)
        hashes = [info.content_hash for info in anchors if self.covers(info.length, content.length)]
        keys = [str(self.content_key(h)) for h in hashes]
        anchor_values = {}
        for h, entry in zip(hashes, self.store.get_many(keys, fingerprint=self.fingerprint), strict=True):
            base = self.fetch(self.content_key(h), entry=entry) if entry is not None else None
            if base is not None:
                anchor_values[h] = base.v
        decision = pool.decide(content.hash, content.kv.v, anchor_values)
        if decision.new_anchor:
            for gone in pool.add(content.hash, content.length):
                for key in self.store.scan(DeltaKey.anchor_prefix(self.model, gone)):
                    self.store.delete(key)
        return decision

    def covers(self, anchor_length: int, length: int) -> bool:
        """Whether an anchor this long may stand in for a content of ``length`` tokens."""
        return anchor_length >= length * self.config.min_anchor_coverage

    def fetch(self, key: StoreKey, *, length: int | None = None, entry: KVEntry | None = None) -> KVBlock | None:
        """A stored KV block on the model's device; None when missing or not ``length`` tokens long.

        ``entry``: the entry already read (by :meth:`prefetch`) instead of asking the store.
        """
        if entry is None:
            entry = self.store.get(str(key), fingerprint=self.fingerprint)
        if entry is None or (length is not None and entry.tensors["k"].shape[2] != length):
            return None
        return KVBlock(entry.tensors["k"].to(self.device), entry.tensors["v"].to(self.device))

    def pool_anchors(self, slots: list[str]) -> dict[str, list[AnchorInfo]]:
        """The anchors of every slot's pool, read in one batch (one round trip to a Redis store)."""
        pools = [self.pool(slot) for slot in dict.fromkeys(slots)]
        maps = self.store.pool_read_many([key for pool in pools for key in pool.map_keys])
        return {pool.slot: pool.anchors((maps[2 * i], maps[2 * i + 1])) for i, pool in enumerate(pools)}

    def wanted(self, content: Content, anchors: list[AnchorInfo]) -> tuple[bool, list[str]]:
        """``(exact, hashes)``: whether ``content`` is an anchor itself, and the anchors a plan for
        it reads (itself, or every anchor long enough to stand in for it)."""
        if any(info.content_hash == content.hash for info in anchors):
            return True, [content.hash]
        return False, [info.content_hash for info in anchors if self.covers(info.length, content.length)]

    def anchor_keys(self, agent: str, hashes: list[str]) -> list[str]:
        """The store keys :meth:`slot_anchors` reads: each anchor's deltas for ``agent`` and its base KV."""
        return [str(key) for h in hashes for key in (DeltaKey(self.model, h, agent), self.content_key(h))]

    def prefetch(self, agent: str, contents: list[Content], pools: dict[str, list[AnchorInfo]]
                 ) -> dict[str, KVEntry | None]:
        """Every entry a call's plan reads (each slot's anchors' deltas for ``agent`` and their base
        KV), fetched as one batch: one pipelined round trip to a Redis store (one per shard of a
        cluster, all at once), the memory tier of a tiered store answering first."""
        keys = list(dict.fromkeys(key for content in contents
                                  for key in self.anchor_keys(agent, self.wanted(content, pools[content.slot])[1])))
        return dict(zip(keys, self.store.get_many(keys, fingerprint=self.fingerprint), strict=True))

    def plan_with_anchors(self, agent: AgentPrompt, contents: list[Content]) -> Plan:
        """KVCOMM's plan: per slot, the anchors with this agent's deltas; dense where one lacks them.

        Reads the store twice, whatever the number of slots and anchors: every pool's state in one
        batch, then every delta and base KV the plan needs in another (:meth:`prefetch`).
        """
        pools = self.pool_anchors([content.slot for content in contents])
        fetched = self.prefetch(agent.name, contents, pools)
        plan = Plan("reuse")
        for i, content in enumerate(contents):
            exact, hashes = self.wanted(content, pools[content.slot])
            found = self.slot_anchors(agent.name, hashes, exact=exact, fetched=fetched)
            if exact:
                plan.slot_state[content.slot] = "exact" if found else "new-anchor"
                if not found:
                    plan.mode = "dense"
                    plan.record_slots.append(i)
                plan.anchors.append(found)
                continue
            plan.slot_state[content.slot] = f"shared({len(found) if found else 0})"
            if found is None:
                plan.mode = "dense"
            plan.anchors.append(found)
        if plan.mode == "dense" and self.config.partial_reuse:
            # reuse the slots before the first one that has no anchor (or must be measured);
            # prefill from that slot on, which measures the deltas a dense call would
            first = next(i for i, found in enumerate(plan.anchors) if found is None)
            if first > 0:
                plan.mode, plan.reused_slots = "partial", first
        return plan

    def slot_anchors(self, agent: str, hashes: list[str], *, exact: bool,
                     fetched: dict[str, KVEntry | None] | None = None) -> SlotAnchors | None:
        """The anchors among ``hashes`` with this agent's deltas and their bases; None if none.

        ``fetched``: entries already read by :meth:`prefetch`; else they are read here, in one batch.
        """
        if fetched is None:
            keys = self.anchor_keys(agent, hashes)
            fetched = dict(zip(keys, self.store.get_many(keys, fingerprint=self.fingerprint), strict=True))
        found = SlotAnchors([], [], [], exact=exact)
        for content_hash in hashes:
            delta = fetched.get(str(DeltaKey(self.model, content_hash, agent)))
            if delta is None:
                continue
            key = self.content_key(content_hash)
            entry = fetched.get(str(key))
            base = self.fetch(key, entry=entry) if entry is not None else None
            if base is None:
                continue
            t = {name: tensor.to(self.device) for name, tensor in delta.tensors.items()}
            found.base.append(base)
            found.hashes.append(content_hash)
            found.slot_deltas.append(KVBlock(t["ph.k"], t["ph.v"]))
            found.segment_deltas.append(KVBlock(t["pf.k"], t["pf.v"]))
            found.slot_shifts.append(int(delta.meta["ph_shift"]))
            found.segment_shifts.append(int(delta.meta["pf_shift"]))
        return found if len(found) else None

    def pieces(self, agent: AgentPrompt, contents: list[Content], seg_starts: list[int], slot_starts: list[int],
               anchors: list[SlotAnchors | None]) -> list[Piece]:
        """The prompt as pieces for :func:`kvcomm.reuse.assemble`: fixed text, then slot + segment pairs."""
        pieces = [Piece(0, agent.segment_block(0), 0)]
        for j, content in enumerate(contents):
            found = anchors[j] if j < len(anchors) else None
            # an answer's base KV was computed in its producer's context already: averaging other
            # answers' per-position deltas can add more error than it removes (config switch)
            fix = (self.config.correct_answer_slots or slot_kind(content.slot) != "agent"
                   or (found is not None and found.exact))
            pieces.append(Piece(slot_starts[j], content.kv, slot_starts[j], found, "slot", correct=fix,
                                content_hash=content.hash))
            pieces.append(Piece(seg_starts[j + 1], agent.segment_block(j + 1),
                                seg_starts[j + 1] - agent.reg_starts[j + 1], found, "seg", content.kv,
                                content_hash=content.hash))
        return pieces

    def record_deltas(self, agent: AgentPrompt, contents: list[Content], cache: Any, seg_starts: list[int],
                      slot_starts: list[int], which: list[int]) -> None:
        """Store ``agent``'s deviations of the slots ``which`` from a dense call's real ``cache``."""
        real = block_from_cache(cache, 0, seg_starts[-1] + len(agent.segments[-1]))
        for j in which:
            content = contents[j]
            q, n = slot_starts[j], content.length
            slot_k = key_delta(real.k[:, :, q : q + n], content.kv.k, q, self.inv_freq)
            slot_v = real.v[:, :, q : q + n] - content.kv.v
            registered, p = agent.reg_starts[j + 1], seg_starts[j + 1]
            m = len(agent.segments[j + 1])
            seg = agent.segment_block(j + 1)
            seg_k = key_delta(real.k[:, :, p : p + m], seg.k, p - registered, self.inv_freq)
            seg_v = real.v[:, :, p : p + m] - seg.v
            # stored under the format's names: ph = the placeholder (slot), pf = the following segment
            deltas = {"ph.k": slot_k, "ph.v": slot_v, "pf.k": seg_k, "pf.v": seg_v}
            if self.config.delta_dtype == "bfloat16":
                deltas = {name: t.to(torch.bfloat16) for name, t in deltas.items()}
            entry = self.entry(deltas,
                               {"ph_shift": q, "pf_shift": p - registered, "agent": agent.name, "slot": content.slot})
            self.store.put(str(DeltaKey(self.model, content.hash, agent.name)), entry)

    def entry(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> KVEntry:
        """A store entry of this model's KV."""
        from kvcomm.store import KVEntry

        return KVEntry(tensors={name: t.contiguous() for name, t in tensors.items()}, meta=meta,
                       fingerprint=self.fingerprint)
