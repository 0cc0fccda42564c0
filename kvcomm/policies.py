"""The reuse policies as one table: name -> how the planner plans a call and what the engine runs.

Every policy runs through the same engine, so comparisons are one harness and one run. A call
is served in one of three modes (:class:`Plan` ``mode``):

- ``dense``: a full prefill (and, under kvcomm, the deltas this call measures are recorded);
- ``prefix``: the agent's fixed first segment reused exactly, the rest prefilled;
- ``reuse``: every piece moved from stored KV (RoPE shift), optionally corrected by anchors,
  then the last prompt token (and, where the policy says so, a selection of others) recomputed;
- ``partial`` (kvcomm with ``partial_reuse``): the leading slots reused as in ``reuse``, the
  prompt from the first slot without anchors on prefilled over them (its deltas recorded).

Adding a policy is one entry in :data:`POLICIES` plus, where it plans differently, its plan
function (``plan(planner, agent, contents) -> Plan``). Nothing else names policies: the engine
reads the entry's fields, the config validates names against this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Plan:
    """How one call is served: its mode, each slot's anchors, the deltas still to record."""

    mode: str  # "dense" | "prefix" | "reuse" | "partial"
    # per slot, its kvcomm.reuse.SlotAnchors, or None: moved only (typed loosely: the config
    # validates policy names from this module, and kvcomm.reuse imports the config)
    anchors: list[Any] = field(default_factory=list)
    record_slots: list[int] = field(default_factory=list)  # anchors lacking this agent's deltas
    slot_state: dict[str, str] = field(default_factory=dict)  # per slot, for the call record
    reused_slots: int = 0  # "partial": the leading slots served from reused KV; the rest is prefilled


# (planner, agent prompt, contents) -> Plan; typed loosely: the planner imports this module
PlanFn = Callable[[Any, Any, list[Any]], Plan]


@dataclass(frozen=True)
class Recompute:
    """Which reused tokens a reuse call recomputes (over the others' reused KV) besides the last.

    Attributes:
        ratio: CacheBlend's selection: this fraction of the reused tokens, those whose layer-1
            values deviate most from a real layer-1 pass (one 2-layer forward over the prompt).
        boundary: EPIC's LegoLink: the first ``boundary`` tokens of every moved piece (each slot
            content and each text segment after one), where the attention-sink damage sits.
        query: the last text segment (the template's tail: the instruction and the generation
            prompt) entirely: the tokens right before the answer.
        boundary_at: which moved pieces get the ``boundary`` recompute: ``"all"``, only the
            ``"segments"`` (the template text after each slot, prefilled at registration behind a
            placeholder) or only the slot ``"contents"``.
        query_tokens: the ``query`` recompute covers at least this many of the prompt's last
            tokens, reaching back into the last content where the template's tail is shorter.
        boundary_by: how the ``boundary`` tokens are chosen. ``"first"``: the first ``boundary``
            tokens of every moved piece (EPIC). ``"deviation"``: as many tokens, ``boundary`` per
            moved piece, but those whose keys the anchors' correction moved most (summed over
            layers), anywhere in the pieces; a piece moved without a correction gets its first
            ``boundary`` tokens.
        keep_first: with ``boundary_by="deviation"``, each moved piece's first ``keep_first``
            tokens are among its ``boundary`` whatever their correction.
    """

    ratio: float = 0.0
    boundary: int = 0
    query: bool = False
    boundary_at: str = "all"
    query_tokens: int = 0
    boundary_by: str = "first"
    keep_first: int = 1  # as KVCommConfig.recompute_boundary_keep_first

    @property
    def any(self) -> bool:
        return self.ratio > 0 or self.boundary > 0 or self.query


def _no_recompute(config: Any) -> Recompute:
    return Recompute()


#: kvcomm's one quality knob (``KVCommConfig.fidelity``): what each level recomputes after the
#: correction. Higher levels agree with a full prefill more often and cost more per reuse call;
#: the explicit knobs (recompute_ratio, recompute_boundary, recompute_query) add to the level's.
FIDELITY_LEVELS: dict[int, Recompute] = {
    0: Recompute(),  # the paper's method: only the last prompt token
    1: Recompute(query=True),  # + the template's last segment (the instruction before the answer)
    2: Recompute(query=True, boundary=4),  # + 4 tokens per moved piece (chosen by recompute_boundary_by)
    3: Recompute(query=True, boundary=4),  # level 2, and near-ties prefilled in full (FIDELITY_FALLBACK)
    4: Recompute(query=True, boundary=4),  # level 2, and every call not clear by a nat prefilled in full
}

#: the fallback margin (nats) each level sets (``KVCommConfig.fallback_margin`` raises it): a reuse
#: call whose first token leads its runner-up by less is prefilled in full. Recomputing more tokens
#: does not settle near-ties (any deviation can swap two tokens 0.1 nats apart); only a full
#: prefill does, so the top level buys its agreement with reuse calls, not with a slower first token.
FIDELITY_FALLBACK: dict[int, float] = {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.5, 4: 1.0}


def fallback_margin(config: Any) -> float:
    """The first-token margin under which a reuse call is prefilled in full: the config's
    ``fallback_margin``, raised to its fidelity level's for kvcomm."""
    level = FIDELITY_FALLBACK[config.fidelity] if config.policy == "kvcomm" else 0.0
    return max(float(config.fallback_margin), level)


def _kvcomm_recompute(config: Any) -> Recompute:
    level = FIDELITY_LEVELS[config.fidelity]
    query = level.query or config.recompute_query
    # query_tokens widens the query recompute; without one (fidelity 0) there is nothing to widen
    return Recompute(ratio=max(level.ratio, config.recompute_ratio), boundary=max(level.boundary, config.recompute_boundary),
                     query=query, boundary_at=config.recompute_boundary_at, boundary_by=config.recompute_boundary_by,
                     keep_first=config.recompute_boundary_keep_first,
                     query_tokens=config.recompute_query_tokens if query else 0)


@dataclass(frozen=True)
class Policy:
    """One reuse policy.

    Attributes:
        name: what ``KVCommConfig.policy`` says.
        plan: how a call is planned (see the module docstring).
        corrects: the reuse path adds the anchors' estimated deviations (KVCOMM's correction).
        admits_anchors: publishing a content runs the shareability test (it may become an anchor).
        recompute: what a reuse call recomputes after the KV is assembled (:class:`Recompute`,
            from the config); nothing: only the last prompt token.
        description: one line for ``--help`` and the README.
    """

    name: str
    plan: PlanFn
    description: str
    corrects: bool = False
    admits_anchors: bool = False
    recompute: Callable[[Any], Recompute] = _no_recompute  # (KVCommConfig) -> Recompute


def _dense(planner: Any, agent: Any, contents: list[Any]) -> Plan:
    return Plan("dense")


def _prefix(planner: Any, agent: Any, contents: list[Any]) -> Plan:
    return Plan("prefix")


def _move_all(planner: Any, agent: Any, contents: list[Any]) -> Plan:
    """Every slot reused, moved only: no anchors needed, never dense."""
    return Plan("reuse", [None] * len(contents))


def _anchored(planner: Any, agent: Any, contents: list[Any]) -> Plan:
    """KVCOMM: per slot, the anchors with this agent's deltas (:meth:`kvcomm.planner.Planner.plan_with_anchors`)."""
    plan: Plan = planner.plan_with_anchors(agent, contents)
    return plan


POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy("dense", _dense, "full prefill of every call (the reference every other policy is measured against)"),
        Policy("prefix", _prefix, "exact-prefix reuse only (what vLLM / SGLang prefix caching give)"),
        Policy("naive", _move_all, "every shared segment moved (RoPE shift), no correction"),
        Policy("cacheblend", _move_all, "moved, then the cacheblend_ratio most deviating tokens recomputed",
               recompute=lambda config: Recompute(ratio=config.cacheblend_ratio)),
        Policy("epic", _move_all, "moved, then the first epic_tokens of every piece and the query recomputed "
               "(EPIC's LegoLink)", recompute=lambda config: Recompute(boundary=config.epic_tokens, query=True)),
        Policy("kvcomm", _anchored, "moved and corrected from the anchor pool; dense where no anchor fits",
               corrects=True, admits_anchors=True,
               recompute=_kvcomm_recompute),
    )
}


def policy(name: str) -> Policy:
    """The table entry of ``name`` (a KeyError names the known policies)."""
    try:
        return POLICIES[name]
    except KeyError:
        raise KeyError(f"unknown policy {name!r}: one of {', '.join(POLICIES)}") from None


BOUNDARY_PIECES = ("all", "segments", "contents")
#: how kvcomm chooses its boundary tokens (``KVCommConfig.recompute_boundary_by``)
BOUNDARY_CHOICES = ("deviation", "first")

__all__ = ["BOUNDARY_CHOICES", "BOUNDARY_PIECES", "FIDELITY_FALLBACK", "FIDELITY_LEVELS", "fallback_margin", "POLICIES", "Plan", "Policy", "Recompute", "policy"]
