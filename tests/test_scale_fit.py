"""The correction's fitted scale (kvcomm.scale_fit): the least-squares factor on the anchors'
estimate, blended with correction_scale, and the planner's observations at dense calls."""

from __future__ import annotations

import math

import pytest
import torch

from kvcomm.scale_fit import MAX_SCALE, ScaleFits


def test_no_observation_gives_the_prior() -> None:
    fits = ScaleFits(prior=0.75)
    assert fits.scale("question", "slot") == (0.75, 0.75)
    assert fits.observations() == {}


def test_the_fit_is_the_least_squares_factor_blended_with_the_prior() -> None:
    g = torch.Generator().manual_seed(0)
    fits = ScaleFits(prior=0.75, prior_weight=1.0)
    real = [torch.randn(3, 2, 5, 8, generator=g) for _ in range(3)]
    noise = [0.1 * torch.randn(3, 2, 5, 8, generator=g) for _ in range(3)]
    estimates = [2.0 * r + e for r, e in zip(real, noise, strict=True)]  # the estimate overshoots 2x
    for est, r in zip(estimates, real, strict=True):
        fits.observe("question", "slot", "k", est, r)
    num = sum(float((e.double() * r.double()).sum()) for e, r in zip(estimates, real, strict=True))
    den = sum(float(e.double().square().sum()) for e in estimates)
    fitted = num / den
    assert fitted == pytest.approx(0.5, abs=0.01)
    k, v = fits.scale("question", "slot")
    assert k == pytest.approx((3 * fitted + 0.75) / 4)
    assert v == 0.75  # values unobserved: the prior
    assert fits.scale("question", "seg") == (0.75, 0.75)  # another piece kind: its own fit
    assert fits.observations()["question/slot/k"]["n"] == 3


def test_an_undershooting_estimate_fits_above_one_and_the_scale_is_clamped() -> None:
    fits = ScaleFits(prior=1.0, prior_weight=0.0)
    real = torch.ones(2, 2, 3, 4)
    fits.observe("s", "seg", "v", 0.8 * real, real)
    assert fits.scale("s", "seg")[1] == pytest.approx(1.25)
    fits.observe("t", "seg", "v", 0.1 * real, real)  # fits 10
    assert fits.scale("t", "seg")[1] == MAX_SCALE
    fits.observe("u", "seg", "v", -real, real)  # the estimate points the wrong way
    assert fits.scale("u", "seg")[1] == 0.0


def test_a_zero_or_broken_estimate_is_no_observation() -> None:
    fits = ScaleFits(prior=0.75)
    real = torch.ones(2, 2, 3, 4)
    fits.observe("s", "slot", "k", torch.zeros_like(real), real)
    broken = real.clone()
    broken[0, 0, 0, 0] = float("nan")
    fits.observe("s", "slot", "k", broken, real)
    assert fits.observations() == {} and fits.scale("s", "slot") == (0.75, 0.75)
    with pytest.raises(ValueError, match="shape"):
        fits.observe("s", "slot", "k", real[:, :, :2], real)


@pytest.mark.parametrize("fit", [True, False])
def test_prefilled_calls_feed_the_fit_from_their_shared_slots_and_reuse_calls_read_it(smollm2, fit) -> None:
    """Calls served by a prefill observe the slots they shared through anchors (here every reuse
    call falls back: fallback_margin beyond any first-token lead); the new anchors' own dense
    calls observe nothing (their deviations, estimated by the others, would fit a scale biased
    low). The next call's pieces carry the fitted scales; with the fit off nothing is observed
    and the pieces take correction_scale."""
    from kvcomm import KVCommConfig, KVCommEngine, Template
    from kvcomm.store import MemoryStore

    eng = KVCommEngine(smollm2.model, smollm2.tokenizer, store=MemoryStore(), fingerprint=smollm2.fingerprint,
                       config=KVCommConfig(max_new_tokens=2, fidelity=0, gamma=1.0, fallback_margin=1e6,
                                           correction_scale_fit=fit))
    eng.register_agent("planner", Template.from_system_user("You are a careful planner.",
                                                            "Question: {question}\nGive a short plan."))
    questions = ["What is the capital of France, and which river flows through it?",
                 "Name three prime numbers larger than ten and explain why they are prime.",
                 "Why is the sky blue during the day but red at sunset?",
                 "How do vaccines train the immune system to fight a virus?"]
    for q in questions[:2]:  # the pool's two anchors, each measured by a dense call
        assert eng.generate("planner", {"question": q}).record.slots == {"question": "new-anchor"}
    assert eng.planner.scales.observations() == {}
    res = eng.generate("planner", {"question": questions[2]})
    assert res.record.fallback and res.record.slots == {"question": "shared(2)"}
    seen = eng.planner.scales.observations()
    if not fit:
        assert seen == {}
    else:
        assert set(seen) == {f"question/{kind}/{which}" for kind in ("slot", "seg") for which in ("k", "v")}
        assert all(obs["n"] == 1 and math.isfinite(obs["fitted"]) for obs in seen.values())
    pieces_seen = []
    assemble = eng.fast.assemble

    def spy(pieces, *args, **kwargs):  # type: ignore[no-untyped-def]
        pieces_seen.extend(pieces)
        return assemble(pieces, *args, **kwargs)

    eng.fast.assemble = spy  # type: ignore[method-assign]
    before = {kind: eng.planner.scales.scale("question", kind) for kind in ("slot", "seg")}
    eng.generate("planner", {"question": questions[3]})  # falls back too, and observes again after
    corrected = [p for p in pieces_seen if p.anchors is not None]
    assert {p.kind for p in corrected} == {"slot", "seg"}
    for p in corrected:
        assert p.scale == (before[p.kind] if fit else None)
    if fit:
        assert all(obs["n"] == 2 for obs in eng.planner.scales.observations().values())
