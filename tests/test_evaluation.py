"""The fidelity harness (``kvcomm eval``): teacher-forced policies against dense on the real model."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from kvcomm import KVCommConfig
from kvcomm.tools.cli import main
from kvcomm.tools.evaluation import dag_templates, run_eval

QUESTIONS = ["def add(a, b):\n    \"\"\"Return a + b.\"\"\"", "def neg(x):\n    \"\"\"Return -x.\"\"\"",
             "def add(a, b):\n    \"\"\"Return a + b.\"\"\""]


def test_run_eval_rows_and_per_agent_breakdown(smollm2):
    out = run_eval(smollm2.model, smollm2.tokenizer, fingerprint=smollm2.fingerprint, policies=["naive"],
                   n_agents=2, max_new_tokens=3, exact_tokens=3, questions=QUESTIONS, progress=False,
                   configs={"kvcomm ans=prefill": KVCommConfig(answer_base="prefill")})
    rows = {r["policy"]: r for r in out["rows"]}
    assert list(rows) == ["naive", "kvcomm ans=prefill", "dense"]
    assert out["agents"] == ["analyst", "designer"] and out["requests"] == 3
    dense = rows["dense"]
    assert dense["call_reuse_pct"] == 0 and dense["first_token_agree_pct"] == 100.0
    assert rows["naive"]["call_reuse_pct"] == 100.0 and rows["naive"]["calls"] == 6
    # kvcomm prefills the first requests in full (they become anchors); the repeated question is exact
    assert 0 < rows["kvcomm ans=prefill"]["call_reuse_pct"] < 100
    for r in out["by_agent"]:
        assert r["calls"] == 3 and 0 <= r["reuse_calls"] <= 3
        if r["reuse_calls"]:
            assert 0 <= r["first_token_agree_reuse_pct"] <= 100 and r["kl_first_reuse"] >= 0
        else:
            assert r["first_token_agree_reuse_pct"] is None
    assert {(r["policy"], r["agent"]) for r in out["by_agent"]} == {
        (p, a) for p in ("naive", "kvcomm ans=prefill") for a in ("analyst", "designer")}


def test_dag_templates_read_every_earlier_answer():
    names = [n for n, _ in dag_templates(3)]
    assert names == ["analyst", "designer", "coder"]
    assert dag_templates(3)[2][1].slots == ["question", "agent:analyst", "agent:designer"]
    with pytest.raises(ValueError, match="n_agents=7"):
        dag_templates(7)


@pytest.mark.parametrize("variant, says", [
    ("oops", "expected FIELD=VALUE"),
    ("answr_base=prefill", "ConfigError: unknown config field(s): answr_base"),
    ("answer_base=x", "answer_base='x' must be one of producer, prefill"),
    ("gamma=abc", "gamma"),
])
def test_eval_variant_errors_before_loading_the_model(variant, says):
    res = CliRunner().invoke(main, ["eval", "--model", "/no/such/model", "--variant", variant])
    assert res.exit_code in (1, 2) and says in res.output
    assert "ModelLoadError" not in res.output  # checked first: a typo fails fast
