"""The fidelity harness (``kvcomm eval``): teacher-forced policies against dense on the real model."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from kvcomm import KVCommConfig
from kvcomm.tools.cli import main
from kvcomm.tools.eval_stats import fallback_sweep
from kvcomm.tools.evaluation import dag_templates, render, run_eval

QUESTIONS = ["def add(a, b):\n    \"\"\"Return a + b.\"\"\"", "def neg(x):\n    \"\"\"Return -x.\"\"\"",
             "def add(a, b):\n    \"\"\"Return a + b.\"\"\""]


TINY = dict(n_agents=2, max_new_tokens=2, exact_tokens=2, progress=False, resamples=200)


@pytest.fixture(scope="module")
def evaluated(smollm2):
    """One tiny eval for the tests of this module: naive, prefix, kvcomm and a kvcomm variant."""
    return run_eval(smollm2.model, smollm2.tokenizer, fingerprint=smollm2.fingerprint,
                    policies=["naive", "prefix", "kvcomm"], questions=QUESTIONS,
                    configs={"kvcomm ans=prefill": KVCommConfig(answer_base="prefill")}, **TINY)


def test_run_eval_rows_and_per_agent_breakdown(evaluated):
    out = evaluated
    rows = {r["policy"]: r for r in out["rows"]}
    assert list(rows) == ["naive", "prefix", "kvcomm", "kvcomm ans=prefill", "dense"]
    assert out["agents"] == ["analyst", "designer"] and out["requests"] == 3
    assert out["workload"] == "dag" and out["upstream"] == "own"
    dense = rows["dense"]
    assert dense["call_reuse_pct"] == 0 and dense["first_token_agree_pct"] == 100.0
    assert rows["naive"]["call_reuse_pct"] == 100.0 and rows["naive"]["calls"] == 6
    assert rows["prefix"]["call_reuse_pct"] == 0 and rows["prefix"]["token_reuse_pct"] > 0
    # kvcomm prefills the first requests in full (they become anchors); the repeated question is exact
    for label in ("kvcomm", "kvcomm ans=prefill"):
        assert 0 < rows[label]["call_reuse_pct"] < 100
    for r in out["by_agent"]:
        assert r["calls"] == 3 and 0 <= r["reuse_calls"] <= 3
        if r["reuse_calls"]:
            assert 0 <= r["first_token_agree_reuse_pct"] <= 100 and r["kl_first_reuse"] >= 0
        else:
            assert r["first_token_agree_reuse_pct"] is None
    assert {(r["policy"], r["agent"]) for r in out["by_agent"]} == {
        (p, a) for p in ("naive", "prefix", "kvcomm", "kvcomm ans=prefill") for a in ("analyst", "designer")}


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


# -- paired figures, --upstream, per-call rows, the plot (issue 15 part 2) ---------------------------
CALL_KEYS = {"request", "agent", "policy", "mode", "slots", "first_token_agree", "exact", "tf_agree", "kl_first",
             "kl_mean", "dense_margin", "margin", "fallback", "ttft_ms", "fetch_ms", "correct_ms", "first_token_ms",
             "prompt_tokens", "reused_tokens", "recomputed_tokens", "paired"}


def test_paired_figures_are_over_the_same_calls_for_every_row(evaluated):
    paired = evaluated["paired"]
    calls = evaluated["calls"]
    kvcomm_reuse = [[c["request"], c["agent"]] for c in calls if c["policy"] == "kvcomm" and c["mode"] == "reuse"]
    assert paired["reference"] == "kvcomm" and "kvcomm row served in reuse mode" in paired["basis"]
    assert paired["calls"] == kvcomm_reuse and paired["n"] == len(kvcomm_reuse) > 0
    labels = [r["policy"] for r in evaluated["rows"]]
    chosen = {label: sorted((c["request"], c["agent"]) for c in calls if c["policy"] == label and c["paired"])
              for label in labels}
    assert all(keys == sorted(map(tuple, kvcomm_reuse)) for keys in chosen.values())  # one call set, every row
    rows = {r["policy"]: r for r in paired["rows"]}
    assert list(rows) == labels
    for label in labels:
        mine = [c for c in calls if c["policy"] == label and c["paired"]]
        row = rows[label]
        assert row["calls"] == len(mine) and row["reuse_calls"] == sum(c["mode"] == "reuse" for c in mine)
        assert row["first_token_agree_pct"] == pytest.approx(100 * sum(c["first_token_agree"] for c in mine) / len(mine))
        assert row["kl_first"] == pytest.approx(sum(c["kl_first"] for c in mine) / len(mine))
        for fig in ("first_token_agree_pct", "exact_2_pct", "tf_token_agree_pct", "kl_first", "kl_mean"):
            lo, hi = row[f"{fig}_ci"]
            assert lo - 1e-9 <= row[fig] <= hi + 1e-9
            assert (f"{fig}_diff" in row) == (label != "kvcomm")
    assert rows["dense"]["first_token_agree_pct"] == 100.0 and rows["dense"]["kl_first"] == 0.0
    assert rows["prefix"]["reuse_calls"] == 0  # prefix serves the same calls in prefix mode
    per_agent = [r for r in paired["by_agent"] if r["policy"] == "naive"]
    assert sum(r["calls"] for r in per_agent) == paired["n"]


def test_per_call_rows_are_complete(evaluated):
    calls = evaluated["calls"]
    rows = {r["policy"]: r for r in evaluated["rows"]}
    assert len(calls) == len(rows) * evaluated["requests"] * len(evaluated["agents"])
    assert {(c["policy"], c["request"], c["agent"]) for c in calls} == {
        (p, r, a) for p in rows for r in range(evaluated["requests"]) for a in evaluated["agents"]}
    for c in calls:
        assert set(c) == CALL_KEYS
        assert c["mode"] in ("dense", "prefix", "reuse") and isinstance(c["slots"], dict)
        assert c["ttft_ms"] > 0 and 0 <= c["reused_tokens"] <= c["prompt_tokens"] and c["kl_first"] >= 0
        assert c["dense_margin"] >= 0 and c["margin"] >= 0 and c["fallback"] is False
        assert c["fetch_ms"] + c["correct_ms"] + c["first_token_ms"] <= c["ttft_ms"] + 1e-6
        if c["policy"] == "dense":  # a row's own margin is the same figure of its own logits
            assert c["margin"] == c["dense_margin"]
    for label, row in rows.items():
        mine = [c for c in calls if c["policy"] == label]
        assert row["call_reuse_pct"] == pytest.approx(100 * sum(c["mode"] == "reuse" for c in mine) / len(mine))
        assert row["reuse_calls"] == sum(c["mode"] == "reuse" for c in mine)
    assert all(c["first_token_agree"] and c["kl_first"] == 0 for c in calls if c["policy"] == "dense")
    assert all(set(c["slots"]) == {"question"} | ({"agent:analyst"} if c["agent"] == "designer" else set())
               for c in calls if c["policy"] == "kvcomm")
    assert rows["naive"]["speedup_reuse_calls"] > 0 and rows["prefix"]["speedup_reuse_calls"] is None


def test_plot_is_a_png_with_one_point_per_row(evaluated, tmp_path):
    from kvcomm.tools.eval_plot import plot, points

    path = plot(evaluated, tmp_path / "sub" / "eval.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    # paired: every row over the same calls (kvcomm's reuse calls), prefix too (it serves them by prefix)
    pts = points(evaluated)
    assert pts[0]["label"] == "dense"
    assert sorted(p["label"] for p in pts[1:]) == ["kvcomm", "kvcomm ans=prefill", "naive", "prefix"]
    assert len({p["n"] for p in pts[1:]}) == 1 and pts[1]["n"] == evaluated["paired"]["n"]
    # without paired figures: each row's own reuse calls (prefix is named under the axes in both)
    unpaired = {k: v for k, v in evaluated.items() if k != "paired"}
    assert [p["label"] for p in points(unpaired)] == ["dense", "naive", "kvcomm", "kvcomm ans=prefill"]
    assert plot(unpaired, tmp_path / "unpaired.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_frontier_keeps_the_undominated_points():
    from kvcomm.tools.eval_plot import pareto

    pts = [{"label": n, "x": x, "y": y} for n, x, y in
           [("dense", 1.0, 100.0), ("a", 3.0, 90.0), ("b", 2.0, 80.0), ("c", 4.0, 70.0), ("d", 3.0, 90.0)]]
    assert [p["label"] for p in pareto(pts)] == ["dense", "a", "c"]


def test_paired_figures_without_a_kvcomm_row_use_the_first_policy_row():
    from kvcomm.tools.eval_stats import bootstrap_ci, paired_figures

    def call(policy, request, mode, agree, kl):
        return {"request": request, "agent": "a", "policy": policy, "mode": mode, "first_token_agree": agree,
                "exact": agree, "tf_agree": float(agree), "kl_first": kl, "kl_mean": kl, "ttft_ms": 10.0}

    calls = [call("dense", r, "dense", True, 0.0) for r in range(4)]
    calls += [call("naive", r, "reuse" if r < 3 else "dense", r != 1, 0.1 * r) for r in range(4)]
    calls += [call("cacheblend", r, "reuse", True, 0.05) for r in range(4)]
    out = paired_figures(calls, ["naive", "cacheblend", "dense"], exact_tokens=4, resamples=500)
    assert out["reference"] == "naive" and "(no kvcomm row)" in out["basis"]
    assert out["calls"] == [[0, "a"], [1, "a"], [2, "a"]]
    rows = {r["policy"]: r for r in out["rows"]}
    assert rows["naive"]["first_token_agree_pct"] == pytest.approx(200 / 3)
    assert rows["cacheblend"]["first_token_agree_pct_diff"] == pytest.approx(100 / 3)
    assert rows["cacheblend"]["kl_first_ci"] == [pytest.approx(0.05), pytest.approx(0.05)]  # constant: no spread
    assert bootstrap_ci([1.0, 0.0, 1.0, 1.0], resamples=300) == bootstrap_ci([1.0, 0.0, 1.0, 1.0], resamples=300)
    assert bootstrap_ci([]) is None


def test_upstream_exact_feeds_every_row_the_dense_answer_kv(smollm2, monkeypatch):
    from kvcomm.engine import KVCommEngine
    from kvcomm.prompt import Content

    seen: list[tuple[str, str, Content | None]] = []  # (policy, agent, the analyst answer it read)
    generate = KVCommEngine.generate

    def spy(self, agent, fills=None, **kwargs):
        used = (fills or {}).get("agent:analyst") or self.latest.get("agent:analyst")
        res = generate(self, agent, fills, **kwargs)
        # what the designer read; for dense, what it published for the designer to read
        seen.append((self.config.policy, agent, used if agent == "designer" else self.latest.get("agent:analyst")))
        return res

    monkeypatch.setattr(KVCommEngine, "generate", spy)

    def dense_and_policy_kv(upstream, policies):
        seen.clear()
        run_eval(smollm2.model, smollm2.tokenizer, fingerprint=smollm2.fingerprint, policies=policies,
                 questions=QUESTIONS[:1], upstream=upstream, **TINY)
        dense = [c for p, a, c in seen if p == "dense" and a == "analyst"]
        used = {p: [c for q, a, c in seen if q == p and a == "designer"] for p in policies}
        return dense, used

    dense, used = dense_and_policy_kv("exact", ["naive", "kvcomm"])
    assert len(dense) == 1 and all(len(v) == 1 for v in used.values())
    for contents in used.values():
        for mine, ref in zip(contents, dense, strict=True):
            assert isinstance(mine, Content) and mine.ids == ref.ids and mine.hash == ref.hash
            assert torch.equal(mine.kv.k, ref.kv.k) and torch.equal(mine.kv.v, ref.kv.v)
    # own: naive's analyst answer KV is its own producer's (from reused KV), not dense's
    dense, used = dense_and_policy_kv("own", ["naive"])
    assert used["naive"][0].ids == dense[0].ids and not torch.equal(used["naive"][0].kv.k, dense[0].kv.k)


def test_run_eval_rejects_an_unknown_upstream(smollm2):
    with pytest.raises(ValueError, match="upstream='dense' must be one of own, exact"):
        run_eval(smollm2.model, smollm2.tokenizer, upstream="dense", questions=QUESTIONS, **TINY)


@pytest.mark.parametrize("args, says", [
    (["--upstream", "dense"], "'dense' is not one of 'own', 'exact'"),
    (["--workload", "rag", "--agents", "3"], "the rag workload has its own three agents"),
    (["--workload", "rag", "--n", "100"], "the rag workload has 59 questions"),
    (["--workload", "web"], "'web' is not one of 'dag', 'rag'"),
    (["--plot", "eval.jpg"], "give a file name ending in .png"),
    (["--policies", ","], "no policy given"),
    (["--no-free-run"], "the dag workload is teacher-forced only"),
    (["--store", "bogus://x"], "Invalid value for --store: unknown store URL scheme"),
])
def test_eval_bad_options_fail_in_one_line_before_the_model_loads(args, says):
    res = CliRunner().invoke(main, ["eval", "--model", "/no/such/model", *args])
    assert res.exit_code == 2 and says in res.output
    assert "ModelLoadError" not in res.output and "Traceback" not in res.output


def test_eval_command_prints_the_paired_table_and_writes_json_and_plot(smollm2, monkeypatch, tmp_path):
    import json

    import kvcomm.models

    monkeypatch.setattr(kvcomm.models, "load_model", lambda *a, **k: smollm2)
    js, png = tmp_path / "e.json", tmp_path / "e.png"
    res = CliRunner().invoke(main, ["eval", "--n", "1", "--agents", "2", "--max-new-tokens", "2", "--policies",
                                    "dense,naive", "--upstream", "exact", "--json", str(js), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    assert "upstream answers' KV: the dense producer's" in res.output
    assert "paired: every row over the same" in res.output and "(no kvcomm row)" in res.output
    out = json.loads(js.read_text())
    assert out["upstream"] == "exact" and out["paired"]["reference"] == "naive" and out["plot"] == str(png)
    assert len(out["calls"]) == 2 * 1 * 2 and png.read_bytes()[:4] == b"\x89PNG"


def test_eval_store_row_leaves_nothing_in_redis(smollm2, monkeypatch, redis_url):
    """--store: the "kvcomm @store" row's entries go to Redis, in a namespace of its own that is
    cleared once the eval is done (a shared Redis keeps no eval entries)."""
    import redis as redis_py

    import kvcomm.models
    from kvcomm.store import RedisStore

    monkeypatch.setattr(kvcomm.models, "load_model", lambda *a, **k: smollm2)
    written: list[str] = []
    put = RedisStore.put

    def counted(self, key, entry, *args, **kwargs):
        written.append(self.namespace)
        return put(self, key, entry, *args, **kwargs)

    monkeypatch.setattr(RedisStore, "put", counted)
    client = redis_py.Redis.from_url(redis_url)
    res = CliRunner().invoke(main, ["eval", "--n", "1", "--agents", "2", "--max-new-tokens", "2", "--policies",
                                    "dense", "--store", redis_url])
    assert res.exit_code == 0, res.output
    assert "kvcomm @store" in res.output
    assert written and {ns.split("-")[0] for ns in written} == {"eval"}, written
    assert not [k for ns in set(written) for k in client.scan_iter(match=f"kvcomm:{ns}:*")]
    client.close()


def test_render_says_why_nothing_is_paired():
    from kvcomm.tools.eval_stats import paired_figures, render_paired

    calls = [{"request": 0, "agent": "a", "policy": p, "mode": "dense", "first_token_agree": True, "exact": True,
              "tf_agree": 1.0, "kl_first": 0.0, "kl_mean": 0.0, "ttft_ms": 5.0} for p in ("kvcomm", "dense")]
    text = render_paired(paired_figures(calls, ["kvcomm", "dense"], exact_tokens=2), 2)
    assert "every row over the same 0 calls" in text and "the kvcomm row served no call in reuse mode" in text
    only_dense = render_paired(paired_figures(calls[1:], ["dense"], exact_tokens=2), 2)
    assert "there is no row but dense" in only_dense


def _call(request: int, policy: str, mode: str, agree: bool, kl: float, margin: float, ttft: float) -> dict:
    return {"request": request, "agent": "a", "policy": policy, "mode": mode, "first_token_agree": agree,
            "kl_first": kl, "margin": margin, "ttft_ms": ttft}


def test_fallback_sweep_counts_calls_under_the_margin_as_full_prefills() -> None:
    calls = [_call(r, "dense", "dense", True, 0.0, 9.0, 100.0) for r in range(4)] + [
        _call(0, "kvcomm", "reuse", True, 0.01, 2.0, 20.0),
        _call(1, "kvcomm", "reuse", False, 0.05, 0.2, 30.0),  # a near-tie it got wrong
        _call(2, "kvcomm", "reuse", True, 0.02, 0.6, 10.0),
        _call(3, "kvcomm", "dense", True, 0.0, 3.0, 100.0),  # dense anyway (recorded deltas)
    ]
    m0, m_half = fallback_sweep(calls, "kvcomm", (0.0, 0.5))
    assert m0["fallback_margin"] == 0.0 and m0["reuse_calls"] == 3 and m0["call_reuse_pct"] == 75.0
    assert m0["first_token_agree_reuse_pct"] == pytest.approx(200 / 3) and m0["first_token_agree_pct"] == 75.0
    assert m0["kl_first_reuse"] == pytest.approx(0.08 / 3)
    assert m0["speedup_reuse_calls"] == pytest.approx(100 / 20) and m0["speedup_all_calls"] == pytest.approx(400 / 160)
    # m = 0.5: the near-tie is prefilled in full (agrees, and costs its attempt plus dense's prefill)
    assert m_half["reuse_calls"] == 2 and m_half["call_reuse_pct"] == 50.0
    assert m_half["first_token_agree_reuse_pct"] == 100.0 and m_half["first_token_agree_pct"] == 100.0
    assert m_half["kl_first_reuse"] == pytest.approx(0.015)
    assert m_half["speedup_reuse_calls"] == pytest.approx(100 / 15)
    assert m_half["speedup_all_calls"] == pytest.approx(400 / 260)
    none = fallback_sweep(calls, "kvcomm", (9.0,))[0]  # every reuse call falls back
    assert none["reuse_calls"] == 0 and none["first_token_agree_reuse_pct"] is None


def test_eval_reports_the_fallback_sweep_of_its_kvcomm_row(evaluated):
    sweep = evaluated["fallback_sweep"]
    row = {r["policy"]: r for r in evaluated["rows"]}["kvcomm"]
    assert [s["fallback_margin"] for s in sweep] == [0.0, 0.1, 0.25, 0.5, 1.0]
    assert sweep[0]["call_reuse_pct"] == pytest.approx(row["call_reuse_pct"])  # m = 0: the row as measured
    assert sweep[0]["first_token_agree_pct"] == pytest.approx(row["first_token_agree_pct"])
    assert all(a["reuse_calls"] >= b["reuse_calls"] for a, b in zip(sweep, sweep[1:], strict=False))
    assert "kvcomm with fallback_margin=m" in render(evaluated)
