"""``kvcomm report`` on records that real engine runs wrote (JSONL run dir and Redis)."""

from __future__ import annotations

import json
import statistics
import uuid

import pytest
from click.testing import CliRunner

from kvcomm import KVCommConfig, KVCommEngine, Template
from kvcomm.metrics import read_jsonl, write_jsonl
from kvcomm.store import MemoryStore, from_url
from kvcomm.tools.cli import main

PLANNER = Template.from_system_user("You are a careful planner.", "Question:\n{question}\nGive a short plan.")
SOLVER = Template.from_system_user(
    "You are a precise solver.", "Question:\n{question}\nPlan:\n{agent:planner}\nAnswer briefly."
)
QUESTIONS = ["What is the capital of France?", "Name a prime number larger than ten.",
             "What is the capital of France?"]


def _run(engine: KVCommEngine, questions: list[str]) -> None:
    engine.register_agent("planner", PLANNER)
    engine.register_agent("solver", SOLVER)
    for q in questions:
        engine.reset_answers()
        engine.generate("planner", {"question": q}, max_new_tokens=4)
        engine.generate("solver", {"question": q}, max_new_tokens=4)


@pytest.fixture(scope="module")
def run_dir(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    for policy in ("dense", "kvcomm"):
        eng = KVCommEngine(smollm2.model, smollm2.tokenizer, store=MemoryStore(), fingerprint=smollm2.fingerprint,
                           config=KVCommConfig(policy=policy, device="cpu"))
        _run(eng, QUESTIONS)
        write_jsonl(eng.records, out / "records.jsonl")
    return out


def test_report_json_per_agent_and_slot(run_dir):
    res = CliRunner().invoke(main, ["report", "--run-dir", str(run_dir), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    records = read_jsonl(run_dir / "records.jsonl")
    assert rep["records"] == len(records) == 12
    rows = {(r["name"], r["policy"]): r for r in rep["agents"]}
    assert set(rows) == {(a, p) for a in ("planner", "solver") for p in ("dense", "kvcomm")}
    for agent in ("planner", "solver"):
        dense, kv = rows[(agent, "dense")], rows[(agent, "kvcomm")]
        assert dense["calls"] == kv["calls"] == 3
        assert dense["reused_tokens"] == 0 and "ttft_saved_ms" not in dense
        assert kv["reuse_calls_pct"] > 0 and kv["reused_tokens"] > 0  # the repeated question reused
        mine = [r for r in records if r.agent == agent]
        d = statistics.fmean(r.ttft_ms for r in mine if r.policy == "dense")
        k = statistics.fmean(r.ttft_ms for r in mine if r.policy == "kvcomm")
        assert kv["ttft_saved_ms"] == pytest.approx(d - k)
        assert kv["reused_tokens"] == sum(r.reused_tokens for r in mine if r.policy == "kvcomm")
    slots = {(r["slot"], r["policy"]): r for r in rep["slots"]}
    assert slots[("question", "kvcomm")]["calls"] == 6
    assert slots[("question", "kvcomm")]["state_counts"].get("exact", 0) >= 2
    assert {r["policy"] for r in rep["policies"]} == {"dense", "kvcomm"}


def test_report_table_and_plot(run_dir, tmp_path):
    import matplotlib.image

    png = tmp_path / "reuse.png"
    res = CliRunner().invoke(main, ["report", "--records", str(run_dir / "records.jsonl"), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    assert "tokens reused %" in res.output and "saved vs dense ms" in res.output and "planner" in res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(png)
    assert img.shape[0] > 300 and img.shape[1] > 600
    assert img[..., :3].std() > 0.05  # bars drawn, not a blank canvas


def test_report_reads_records_from_redis(smollm2, redis_url):
    url = f"{redis_url}?namespace=rep{uuid.uuid4().hex[:8]}"
    store = from_url(url)
    try:
        eng = KVCommEngine(smollm2.model, smollm2.tokenizer, store=store, fingerprint=smollm2.fingerprint,
                           config=KVCommConfig(policy="kvcomm", device="cpu"))
        _run(eng, QUESTIONS[:1])
        res = CliRunner().invoke(main, ["report", "--store", url, "--json"])
        assert res.exit_code == 0, res.output
        rep = json.loads(res.output)
        assert rep["records"] == 2 and {r["name"] for r in rep["agents"]} == {"planner", "solver"}
        assert rep["store"] and rep["store"][0]["hits"] + rep["store"][0]["misses"] >= 0
    finally:
        store.clear()
        store.close()


def test_report_errors(tmp_path):
    res = CliRunner().invoke(main, ["report", "--records", str(tmp_path / "none.jsonl")])
    assert res.exit_code == 1 and "ReportError: no call records" in res.output
    res = CliRunner().invoke(main, ["report"])
    assert res.exit_code == 2 and "--run-dir" in res.output


def test_report_reads_records_jsonl_of_a_run_dir_only(run_dir, tmp_path):
    # the examples also write outputs.jsonl (answers) into the run directory: it is not records
    (run_dir / "outputs.jsonl").write_text(json.dumps({"policy": "dense", "item": 0, "ok": True}) + "\n")
    res = CliRunner().invoke(main, ["report", "--run-dir", str(run_dir), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["records"] == 12


@pytest.mark.parametrize("text, says", [
    ('{"policy": "dense", "item": 0}\n', "line 1: not a call record: missing agent, mode"),
    ("{not json\n", "line 1:"),
    ("[1, 2]\n", "line 1: a call record is a JSON object, got list"),
])
def test_report_names_a_file_that_is_not_records(tmp_path, text, says):
    bad = tmp_path / "answers.jsonl"
    bad.write_text(text)
    res = CliRunner().invoke(main, ["report", "--records", str(bad)])
    assert res.exit_code == 1
    assert f"ReportError: {bad} is not a file of call records: {says}" in res.output
    empty = tmp_path / "empty-run"
    empty.mkdir()
    res = CliRunner().invoke(main, ["report", "--run-dir", str(empty)])
    assert res.exit_code == 1 and "holding records.jsonl" in res.output


def test_slot_states_fold_into_kinds():
    from kvcomm.metrics import CallRecord
    from kvcomm.tools.report import slot_rows

    def rec(slots):
        return CallRecord(agent="a", policy="kvcomm", mode="reuse", prompt_tokens=10, reused_tokens=8,
                          recomputed_tokens=1, slots=slots)

    rows = slot_rows([rec({"q": "shared(2)", "@continuation": "120/196"}), rec({"q": "shared(0)", "@continuation": "85/137"}),
                      rec({"q": "new-anchor"})])
    by_slot = {r["slot"]: r["state_counts"] for r in rows}
    assert by_slot == {"@continuation": {"continued": 2}, "q": {"shared": 1, "unshared": 1, "new-anchor": 1}}
