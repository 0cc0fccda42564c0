"""One call's prompt KV: the policy's plan, then a prefill or the reuse path.

The hot path of :meth:`kvcomm.KVCommEngine.generate`, top to bottom: plan (which slots are
reused, from which anchors), then either a prefill (``dense``, or ``prefix``: after the agent's
fixed prefix or an exact prefix) or the reuse path: move and correct every piece into one KV
block (:func:`kvcomm.reuse.assemble` through the fast path), recompute the tokens the policy
asks for over it, and compute the first token's logits. The engine decodes from there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from kvcomm.cacheblend import recompute_selection, selective_recompute
from kvcomm.config import KVCommConfig
from kvcomm.fastpath import FastPath
from kvcomm.kv import KVBlock, cache_from_block, prefill, sync_device
from kvcomm.metrics import CallRecord
from kvcomm.planner import Planner
from kvcomm.policies import Plan, Policy
from kvcomm.prompt import AgentPrompt, Content
from kvcomm.reuse import Piece


@dataclass(frozen=True)
class ExactPrefix:
    """A call's exact prefix (``generate(exact_kv=...)``): the KV of its prompt's first ``length``
    tokens, ``slots``, how many slots start before that end (served by it and the gap after it),
    and ``served``, where the first slot it does not serve starts (the prompt's last token if none)."""

    kv: KVBlock
    length: int
    slots: int
    served: int

    @classmethod
    def of(cls, kv: KVBlock | None, slot_starts: list[int], prompt_len: int) -> ExactPrefix | None:
        if kv is None:
            return None
        n = min(kv.length, prompt_len - 1)  # the last prompt token is always computed
        if n <= 0:
            return None
        slots = next((j for j, start in enumerate(slot_starts) if start >= n), len(slot_starts))
        return cls(kv, n, slots, slot_starts[slots] if slots < len(slot_starts) else prompt_len - 1)


@dataclass
class CallLayout:
    """Where one call's prompt pieces sit: the template segments (``seg_starts``, the first at 0)
    and the slot contents (``slot_starts``) of ``ids``."""

    prompt: AgentPrompt
    contents: list[Content]
    ids: list[int]
    seg_starts: list[int]
    slot_starts: list[int]

    @classmethod
    def build(cls, prompt: AgentPrompt, contents: list[Content]) -> CallLayout:
        """The prompt's token ids, ``seg_0 c_1 seg_1 ... c_n seg_n``, and where each piece starts."""
        ids = list(prompt.segments[0])
        seg_starts, slot_starts = [0], []
        for content, seg in zip(contents, prompt.segments[1:], strict=True):
            slot_starts.append(len(ids))
            ids += content.ids
            seg_starts.append(len(ids))
            ids += seg
        return cls(prompt, contents, ids, seg_starts, slot_starts)


class PromptBuilder:
    """Builds a call's prompt KV and first-token logits under one engine's policy and config.

    Holds what the engine holds (model, planner, fast path, RoPE frequencies); the policy's
    :class:`Recompute` is derived once (the config is frozen).
    """

    def __init__(self, model: Any, config: KVCommConfig, policy: Policy, planner: Planner, fast: FastPath,
                 inv_freq: torch.Tensor) -> None:
        self.model = model
        self.config = config
        self.policy = policy
        self.planner = planner
        self.fast = fast
        self.inv_freq = inv_freq
        self.recompute = policy.recompute(config)
        # where the boundary recompute goes by the correction's size, the correction reports it per token
        self.boundary_by_deviation = (self.recompute.boundary > 0 and self.recompute.boundary_by == "deviation"
                                      and policy.corrects)

    def plan(self, call: CallLayout, exact: ExactPrefix | None) -> Plan:
        """The policy's plan; with an exact prefix, of the slots after it only (those before are
        served by it: no anchors needed, no deltas recorded)."""
        prompt, contents = call.prompt, call.contents
        if exact is None:
            return self.policy.plan(self.planner, prompt, contents)
        k = exact.slots
        plan = self.policy.plan(self.planner, prompt, contents[k:]) if k < len(contents) else Plan("prefix")
        if plan.mode in ("reuse", "partial"):
            plan.anchors = [None] * k + plan.anchors
        plan.record_slots = [k + j for j in plan.record_slots]
        if plan.mode == "partial":
            plan.reused_slots += k
        plan.slot_state = {**{c.slot: "exact-prefix" for c in contents[:k]}, **plan.slot_state}
        return plan

    def prefill(self, call: CallLayout, rec: CallRecord, exact: ExactPrefix | None = None) -> tuple[torch.Tensor, Any]:
        """A prefill of the prompt: after the agent's fixed prefix, whose KV (the registered
        template's, at the same positions) is exact, where the policy and ``exact_prefix`` allow
        (mode ``prefix``), or after ``exact``'s tokens where they are more; else of every token
        (mode ``dense``). Sets ``rec``'s mode and counts."""
        prompt, ids = call.prompt, call.ids
        n_fixed = len(prompt.segments[0])
        if exact is not None and exact.length > n_fixed:
            block, n = exact.kv, exact.length
        else:
            from_prefix = self.policy.name == "prefix" or (self.policy.name != "dense" and self.config.exact_prefix)
            if not from_prefix or not 0 < n_fixed < len(ids):
                rec.mode, rec.reused_tokens, rec.recomputed_tokens = "dense", 0, len(ids)
                return prefill(self.model, ids)
            block, n = prompt.block, n_fixed
        cache = cache_from_block(block.slice(0, n), self.model.config)
        rec.mode, rec.reused_tokens, rec.recomputed_tokens = "prefix", n, len(ids) - n
        return prefill(self.model, ids[n:], start=n, cache=cache)

    def reuse(self, call: CallLayout, plan: Plan, rec: CallRecord, t0: float, n_new: int,
              exact: ExactPrefix | None = None) -> tuple[torch.Tensor, Any]:
        """The reuse path: move (and correct) every piece, then recompute the last prompt token.

        A ``partial`` plan moves the pieces before its first unreused slot only and recomputes
        every token from there on (a prefill over the reused KV). With ``exact``, its KV stands
        for every piece before its first unserved slot, and the tokens between its end and that
        slot are recomputed. Fills ``rec``'s timings and token counts; returns (first-token
        logits, cache).
        """
        ids, slot_starts = call.ids, call.slot_starts
        prompt_len = len(ids)
        t_fetch = time.perf_counter()
        rec.fetch_ms = (t_fetch - t0) * 1e3  # anchors and deltas were fetched while planning
        pieces = self.planner.pieces(call.prompt, call.contents, call.seg_starts, slot_starts, plan.anchors)
        prefill_from = slot_starts[plan.reused_slots] if plan.mode == "partial" else prompt_len - 1
        pieces = [piece for piece in pieces if piece.start < prefill_from]
        if exact is not None:  # its KV, already at its positions, in place of the pieces it serves
            # kind "slot": a captured correction graph copies it in (it is new on every call)
            pieces = [Piece(0, exact.kv.slice(0, exact.length), 0, kind="slot"),
                      *(piece for piece in pieces if piece.start >= exact.served)]
        static = self.config.fast_path
        t_stack = time.perf_counter()
        self.fast.stack_anchors(plan.anchors)
        rec.stack_ms = (time.perf_counter() - t_stack) * 1e3
        timings: dict[str, float] = {}
        deviation = (torch.empty(prompt_len - 1, dtype=torch.float32, device=self.model.device)
                     if self.boundary_by_deviation else None)
        block = self.fast.assemble(pieces, prompt_len - 1, self.inv_freq, correct=self.policy.corrects,
                                   capacity=prompt_len + n_new if static else None, timings=timings,
                                   deviation=deviation)
        rec.weights_ms, rec.apply_ms = timings.get("weights", 0.0), timings.get("apply", 0.0)
        rec.anchors_matched = sum(len(found) for found in plan.anchors if found is not None)
        rec.bytes_moved = block.nbytes
        sync_device(self.model.device)
        t_corr = time.perf_counter()
        rec.correct_ms = (t_corr - t_fetch) * 1e3
        cache: Any
        partial = prefill_from < prompt_len - 1
        gap = exact is not None and exact.length < exact.served
        if self.recompute.any or partial or gap:
            selected = self.selection(call, block, deviation, exact, prefill_from)
            n_recomputed = int(selected.numel()) + 1
            if static:  # written over the reused KV in the static buffer, which stays in prompt order
                logits, cache = self.fast.recompute(ids, selected)
            else:
                logits, cache, _ = selective_recompute(self.model, ids, block, selected)
        elif static:
            logits, cache = self.fast.first_token(ids[-1], prompt_len - 1)
            n_recomputed = 1
        else:
            cache = cache_from_block(block, self.model.config)
            logits, cache = prefill(self.model, ids[-1:], start=prompt_len - 1, cache=cache)
            n_recomputed = 1
        sync_device(self.model.device)
        rec.first_token_ms = (time.perf_counter() - t_corr) * 1e3
        rec.reused_tokens, rec.recomputed_tokens = prompt_len - n_recomputed, n_recomputed
        return logits, cache

    def selection(self, call: CallLayout, block: KVBlock, deviation: torch.Tensor | None,
                  exact: ExactPrefix | None, prefill_from: int) -> torch.Tensor:
        """The reused positions (< P-1) a reuse call recomputes besides the last token: the
        policy's (:func:`kvcomm.cacheblend.recompute_selection`), none inside an exact prefix but
        all of the gap after it, and every token from a partial plan's first unreused slot on."""
        ids = call.ids
        if self.recompute.any:
            selected = recompute_selection(self.recompute, self.model, ids, block, len(call.prompt.segments[0]),
                                           call.seg_starts, call.slot_starts, deviation,
                                           exact.served if exact is not None else 0)
        else:
            selected = torch.zeros(0, dtype=torch.long, device=block.k.device)
        if exact is not None:  # nothing inside the exact prefix; all of the gap after it
            between = torch.arange(exact.length, exact.served, device=selected.device)
            selected = torch.cat([selected[selected >= exact.served], between]).unique(sorted=True)
        if prefill_from < len(ids) - 1:  # every token from the first unreused slot on
            tail = torch.arange(prefill_from, len(ids) - 1, device=selected.device)
            selected = torch.cat([selected[selected < prefill_from], tail])
        return selected


__all__ = ["CallLayout", "ExactPrefix", "PromptBuilder"]
