"""The correction's scale, fitted to the deviations the engine measures (``correction_scale_fit``).

A reuse call adds ``correction_scale`` times the anchors' estimate of a piece's deviation: a
weighted average of *other* contents' deviations under this agent's prefix. How much of that
estimate is right depends on the piece. At the DAG eval's reuse calls (KV level, against a
prefill) the scale that fits best was 1.26 for the template text after the question (the
estimate falls short), 0.95 for the question itself, 0.82 / 0.55 for an answer slot's keys /
values: one constant is a compromise between them.

With the fit on, every call served by a prefill (a dense call that measures a new anchor, a
fallback) also lets each slot it shared through anchors be estimated as a reuse call would
(:meth:`kvcomm.planner.Planner.observe_scales`), and accumulates the least-squares scale of that
estimate against the real deviation, ``s = sum <estimate, real> / sum |estimate|^2``, per slot,
piece kind (the slot's content, or the template text after it) and keys or values. A piece's
scale is that fit blended with ``correction_scale``, which counts as one observation, so a pool
with no measurement yet behaves as with the fit off. The sums are this engine's own; they are not
shared through the store.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: a fitted scale is clamped to [0, MAX_SCALE] (correction_scale's own range)
MAX_SCALE = 2.0


@dataclass
class _Sums:
    """``num = sum <estimate, real>``, ``den = sum |estimate|^2`` over ``n`` observations."""

    num: float = 0.0
    den: float = 0.0
    n: int = 0


class ScaleFits:
    """Least-squares scales of the anchors' estimate, per (slot, piece kind, keys or values).

    ``prior``: the scale before any observation (``correction_scale``), weighted as
    ``prior_weight`` observations of the mean size.
    """

    def __init__(self, prior: float, prior_weight: float = 1.0) -> None:
        self.prior = prior
        self.prior_weight = prior_weight
        self._sums: dict[tuple[str, str, str], _Sums] = {}

    def observe(self, slot: str, kind: str, which: str, estimate: torch.Tensor, real: torch.Tensor) -> None:
        """One piece's estimated and measured deviations from its moved KV (same shape; the layers
        the correction skips left out by the caller). ``kind``: "slot" or "seg"; ``which``: "k" or "v"."""
        if estimate.shape != real.shape:
            raise ValueError(f"estimate {tuple(estimate.shape)} and real {tuple(real.shape)} deviations differ in shape")
        est = estimate.double()
        den = float(est.square().sum())
        if not den > 0.0 or not torch.isfinite(est).all():  # no correction to scale, or a broken one
            return
        sums = self._sums.setdefault((slot, kind, which), _Sums())
        sums.num += float((est * real.double()).sum())
        sums.den += den
        sums.n += 1

    def scale(self, slot: str, kind: str) -> tuple[float, float]:
        """The (keys, values) scale of a piece of ``kind`` in ``slot``."""
        return self._one(slot, kind, "k"), self._one(slot, kind, "v")

    def _one(self, slot: str, kind: str, which: str) -> float:
        sums = self._sums.get((slot, kind, which))
        if sums is None or sums.n == 0:
            return self.prior
        fitted = sums.num / sums.den
        blended = (sums.n * fitted + self.prior_weight * self.prior) / (sums.n + self.prior_weight)
        return min(MAX_SCALE, max(0.0, blended))

    def observations(self) -> dict[str, dict[str, float]]:
        """Every fitted group: its observations and scale (for reports and tests)."""
        return {f"{slot}/{kind}/{which}": {"n": sums.n, "fitted": sums.num / sums.den, "scale": self._one(slot, kind, which)}
                for (slot, kind, which), sums in sorted(self._sums.items())}


__all__ = ["MAX_SCALE", "ScaleFits"]
