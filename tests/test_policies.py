"""kvcomm.policies: the table is the one list of policies, and every entry is usable."""

from __future__ import annotations

import pytest

from kvcomm.config import POLICIES, KVCommConfig
from kvcomm.errors import ConfigError
from kvcomm.policies import FIDELITY_FALLBACK, FIDELITY_LEVELS, Plan, Recompute, fallback_margin, policy
from kvcomm.policies import POLICIES as TABLE


def test_config_validates_against_the_table() -> None:
    assert POLICIES == tuple(TABLE)
    for name in TABLE:
        assert KVCommConfig(policy=name).policy == name
    with pytest.raises(ConfigError, match="policy='nope'"):
        KVCommConfig(policy="nope")


@pytest.mark.parametrize("name", list(TABLE))
def test_every_policy_plans_a_mode(name) -> None:
    entry = policy(name)
    assert entry.name == name and entry.description
    if name == "kvcomm":
        pytest.skip("kvcomm plans through the planner (tests/test_planner.py)")
    plan = entry.plan(None, None, [object(), object()])  # type: ignore[arg-type]
    assert isinstance(plan, Plan) and plan.mode in ("dense", "prefix", "reuse")
    if plan.mode == "reuse":
        assert plan.anchors == [None, None]


def test_recompute_selections_come_from_the_config() -> None:
    config = KVCommConfig(cacheblend_ratio=0.2, recompute_ratio=0.1, recompute_boundary=3, epic_tokens=8, fidelity=0)
    assert policy("cacheblend").recompute(config) == Recompute(ratio=0.2)
    assert policy("kvcomm").recompute(config) == Recompute(ratio=0.1, boundary=3, keep_first=1)
    # a fidelity level sets kvcomm's recompute; explicit knobs add to it
    # the default widens the query recompute to the prompt's last 16 tokens; fidelity 0 has none to widen
    assert policy("kvcomm").recompute(KVCommConfig(fidelity=2)) == Recompute(boundary=4, query=True, query_tokens=16,
                                                                             keep_first=1)
    assert policy("kvcomm").recompute(config.replace(fidelity=3, recompute_query_tokens=0)) == Recompute(
        ratio=0.1, boundary=4, query=True, keep_first=1)
    assert policy("kvcomm").recompute(config).query_tokens == 0
    assert not policy("kvcomm").recompute(KVCommConfig(fidelity=0)).any
    assert policy("epic").recompute(config) == Recompute(boundary=8, query=True)
    assert policy("kvcomm").recompute(KVCommConfig(recompute_boundary_at="segments")) == Recompute(
        boundary=4, query=True, boundary_at="segments", query_tokens=16, keep_first=1)
    assert policy("epic").recompute(config.replace(recompute_boundary_at="contents")).boundary_at == "all"
    # EPIC's own recompute always takes each piece's first tokens (it has no correction to rank by)
    assert policy("epic").recompute(config.replace(recompute_boundary_by="deviation")).boundary_by == "first"
    assert policy("kvcomm").recompute(config.replace(recompute_boundary_by="deviation")).boundary_by == "deviation"
    assert policy("kvcomm").recompute(KVCommConfig(recompute_query_tokens=16)).query_tokens == 16
    assert not policy("naive").recompute(config).any and not policy("dense").recompute(config).any
    assert policy("kvcomm").corrects and not policy("naive").corrects
    with pytest.raises(KeyError, match="unknown policy"):
        policy("nope")


def test_fallback_margin_is_the_config_s_or_the_fidelity_level_s() -> None:
    assert fallback_margin(KVCommConfig()) == 0.0  # the default level never falls back
    assert fallback_margin(KVCommConfig(fidelity=3)) == FIDELITY_FALLBACK[3] == 0.5
    assert fallback_margin(KVCommConfig(fidelity=3, fallback_margin=1.0)) == 1.0  # the larger applies
    assert fallback_margin(KVCommConfig(fidelity=1, fallback_margin=0.2)) == 0.2
    # the levels are kvcomm's: other policies fall back only where fallback_margin says so
    assert fallback_margin(KVCommConfig(policy="epic", fidelity=3)) == 0.0
    assert fallback_margin(KVCommConfig(policy="epic", fallback_margin=0.3)) == 0.3
    assert FIDELITY_LEVELS[3] == FIDELITY_LEVELS[4] == FIDELITY_LEVELS[2]  # levels 3-4 recompute what level 2 does
    assert fallback_margin(KVCommConfig(fidelity=4)) == FIDELITY_FALLBACK[4] == 1.0  # and fall back more
