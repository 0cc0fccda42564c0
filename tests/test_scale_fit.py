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
def test_dense_calls_measuring_new_anchors_feed_the_fit_and_reuse_calls_read_it(smollm2, fit) -> None:
    """The second anchor's dense call observes how the first anchor estimates its deviations (the
    first has no other anchor to be estimated by); a later reuse call's pieces carry the fitted
    scales. With the fit off nothing is observed and the pieces take correction_scale."""
    from kvcomm import KVCommConfig, KVCommEngine, Template
    from kvcomm.store import MemoryStore

    eng = KVCommEngine(smollm2.model, smollm2.tokenizer, store=MemoryStore(), fingerprint=smollm2.fingerprint,
                       config=KVCommConfig(max_new_tokens=2, fidelity=0, gamma=1.0, correction_scale_fit=fit))
    eng.register_agent("planner", Template.from_system_user("You are a careful planner.",
                                                            "Question: {question}\nGive a short plan."))
    questions = ["What is the capital of France, and which river flows through it?",
                 "Name three prime numbers larger than ten and explain why they are prime.",
                 "Why is the sky blue during the day but red at sunset?"]
    assert eng.generate("planner", {"question": questions[0]}).mode in ("dense", "prefix")
    assert eng.planner.scales.observations() == {}  # no other anchor to estimate the first one
    assert eng.generate("planner", {"question": questions[1]}).mode in ("dense", "prefix")
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
    res = eng.generate("planner", {"question": questions[2]})
    assert res.mode == "reuse", res.record.slots
    corrected = [p for p in pieces_seen if p.anchors is not None]
    assert {p.kind for p in corrected} == {"slot", "seg"}
    for p in corrected:
        assert p.scale == (eng.planner.scales.scale("question", p.kind) if fit else None)
