"""The ``kvcomm`` command line across its subcommands: ``config``, the config epilogs, ``bench``
(and ``benchmarks/ttft.py``, the same implementation) and ``--store URL``.

(That the core never imports ``kvcomm.tools`` is checked in ``tests/test_imports.py``.)"""

from __future__ import annotations

import json
import runpy
import uuid
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kvcomm.config import KVCommConfig, config_table
from kvcomm.tools.bench import BENCH_ANCHOR_CACHE_BYTES, bench_config
from kvcomm.tools.cli import _eval_store_factory, main

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model-shape", "tiny", "--device", "cpu", "--agents", "2", "--prefix-len", "8", "--input-len", "16",
        "--output-len", "8", "--warmup", "2", "--requests", "1"]


def test_config_prints_the_config_table() -> None:
    res = CliRunner().invoke(main, ["config"], env={"KVCOMM_GAMMA": None})
    assert res.exit_code == 0, res.output
    header, *lines = res.output.splitlines()
    assert header.split() == ["field", "value", "default", "environment", "description"]
    assert len(lines) == len(config_table())
    for line, (name, default, env, doc) in zip(lines, config_table(), strict=True):
        value = repr(getattr(KVCommConfig(), name))
        assert line.split()[:4] == [name, value, default, env] and line.endswith(doc)


def test_config_json_shows_the_environment_over_the_defaults() -> None:
    res = CliRunner().invoke(main, ["config", "--json"], env={"KVCOMM_GAMMA": "1.0", "KVCOMM_FAST_PATH": "off"})
    assert res.exit_code == 0, res.output
    rows = {r["field"]: r for r in json.loads(res.output)}
    assert list(rows) == [name for name, *_ in config_table()]
    assert rows["gamma"] == {"field": "gamma", "value": 1.0, "default": 0.3, "env": "KVCOMM_GAMMA",
                             "description": dict((n, d) for n, _, _, d in config_table())["gamma"]}
    assert rows["fast_path"]["value"] is False and rows["fast_path"]["default"] is True
    assert rows["policy"]["value"] == rows["policy"]["default"] == "kvcomm"


def test_config_with_a_bad_variable_is_one_line() -> None:
    res = CliRunner().invoke(main, ["config"], env={"KVCOMM_GAMMA": "lots"})
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == ["Error: ConfigError: gamma='lots' is not a valid float"]


@pytest.mark.parametrize("command", ["eval", "bench", "demo"])
def test_help_of_engine_commands_lists_every_config_variable(command: str) -> None:
    res = CliRunner().invoke(main, [command, "--help"])
    assert res.exit_code == 0, res.output
    epilog = res.output[res.output.index("Engine config:"):]
    for _, default, env, _ in config_table():
        assert f"{env}  " in epilog and default in epilog
    assert "kvcomm config" in epilog


def test_bench_help_says_how_to_run_at_gamma_1() -> None:
    out = CliRunner().invoke(main, ["bench", "--help"]).output
    assert "KVCOMM_GAMMA=1.0" in out and "--gamma 1.0" in out and "random words" in out


def test_bench_config_reads_the_environment_then_the_options() -> None:
    assert bench_config({}) == KVCommConfig(anchor_cache_bytes=BENCH_ANCHOR_CACHE_BYTES)
    assert bench_config({}, gamma=None).gamma == KVCommConfig().gamma == 0.3
    assert bench_config({"KVCOMM_GAMMA": "1.0"}).gamma == 1.0
    assert bench_config({"KVCOMM_GAMMA": "1.0"}, gamma=0.5).gamma == 0.5
    assert bench_config({"KVCOMM_ANCHOR_CACHE_BYTES": "0"}).anchor_cache_bytes == 0
    assert bench_config({"KVCOMM_TAU": "2"}).tau == 2.0


@pytest.mark.parametrize("args, exit_code, says", [
    (["--model", "/no/such/model", "--policies", "dense,nope"], 2, "unknown policy nope"),
    (["--model", "/no/such/model", "--model-shape", "tiny"], 2, "not both"),
    (["--model", "/no/such/model", "--gamma", "-1"], 1, "ConfigError: gamma=-1.0 must be >= 0"),
    (["--model", "/no/such/model", "--variant", "fidelity"], 1, "expected FIELD=VALUE"),
    (["--model", "/no/such/model", "--variant", "fidelity=9"], 1, "ConfigError: fidelity=9 must be one of"),
    (["--model", "/no/such/model", "--store", "bogus://x"], 2, "Invalid value for --store: unknown store URL scheme"),
    (["--model", "/no/such/model", "--store", "redis://127.0.0.1:1/0?nope=1"], 2, "nope"),
])
def test_bench_errors_before_loading_the_model(args: list[str], exit_code: int, says: str) -> None:
    res = CliRunner().invoke(main, ["bench", *args])
    assert res.exit_code == exit_code and says in res.output
    assert "ModelLoadError" not in res.output


def test_bench_cli_and_script_run_one_implementation(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVCOMM_GAMMA", "1.0")
    variant = ["--variant", "fidelity=0"]  # one more kvcomm row, its config changed
    res = CliRunner().invoke(main, ["bench", *TINY, *variant, "--json", str(tmp_path / "cli.json")])
    assert res.exit_code == 0, res.output
    script = runpy.run_path(str(ROOT / "benchmarks" / "ttft.py"))
    assert script["main"]([*TINY, *variant, "--json", str(tmp_path / "script.json")]) == 0
    printed = capsys.readouterr().out
    cli, scr = (json.loads((tmp_path / name).read_text()) for name in ("cli.json", "script.json"))
    assert list(cli) == list(scr) == ["setting", "rows", "cuda_graph", "anchor_stack_hits_misses", "device", "model",
                                      "dtype", "store", "config"]
    assert cli["store"] == scr["store"] == "store in-process memory (the model's device)"
    assert cli["setting"] == scr["setting"] == {
        "agents": 2, "prefix_len": 8, "input_len": 16, "output_len": 8, "warmup": 2, "requests": 1,
        "policies": ["dense", "prefix", "naive", "kvcomm"], "variants": ["fidelity=0"], "gamma": 1.0,
        "anchor_cache_bytes": BENCH_ANCHOR_CACHE_BYTES}
    assert cli["config"] == scr["config"] == {
        k: v for k, v in bench_config(gamma=1.0).to_dict().items() if k not in ("policy", "max_new_tokens")}
    untimed = ("policy", "agent", "prompt_tokens", "reuse_pct", "reused_tokens", "recomputed_tokens")
    assert [[r[k] for k in untimed] for r in cli["rows"]] == [[r[k] for k in untimed] for r in scr["rows"]]
    assert len(cli["rows"]) == 10 and [r["policy"] for r in cli["rows"]][-2:] == ["fidelity=0"] * 2
    variant_rows = [r for r in cli["rows"] if r["policy"] == "fidelity=0"]
    # at fidelity 0 a reuse call recomputes only its last token; the default (2) recomputes more
    default_rows = [r for r in cli["rows"] if r["policy"] == "kvcomm"]
    assert all(v["reused_tokens"] >= d["reused_tokens"] for v, d in zip(variant_rows, default_rows, strict=True))
    assert any(v["reused_tokens"] > d["reused_tokens"] for v, d in zip(variant_rows, default_rows, strict=True))
    for r in cli["rows"]:  # every prompt token is reused or recomputed, on every path
        assert r["reused_tokens"] + r["recomputed_tokens"] == r["prompt_tokens"], r
    # the header names the CPU: ratios against dense depend on it
    assert cli["device"] == scr["device"] and cli["device"].startswith(f"CPU ({torch.get_num_threads()} threads; ")
    assert torch.backends.cpu.get_cpu_capability() in cli["device"]
    for out in (res.output, printed):
        assert f"device {cli['device']} |" in out
        assert "| gamma 1.0" in out and "engine config: gamma=1.0, anchor_cache_bytes=" in out
        assert "TTFT p50 ms" in out and "shift+corr ms" in out and "recomp tok" in out and "agent 2:  kvcomm  TTFT p50" in out


def test_eval_store_is_one_tiered_store_in_a_fresh_namespace(redis_url: str) -> None:
    from kvcomm.store import TieredStore

    factory = _eval_store_factory(("memory://", f"{redis_url}?namespace=mine"))
    first, second = factory(), factory()
    try:
        assert isinstance(first, TieredStore) and len(first.tiers) == 2
        assert first.namespace.startswith("eval-") and first.namespace != second.namespace
        assert {t.namespace for t in first.tiers} == {first.namespace}
    finally:
        for store in (first, second):
            store.clear()
            store.close()


def test_store_commands_take_repeated_store_urls(redis_url: str) -> None:
    url = f"{redis_url}?namespace=cli{uuid.uuid4().hex[:8]}"
    res = CliRunner().invoke(main, ["store", "stats", "--store", "memory://", "--store", url, "--json"])
    assert res.exit_code == 0, res.output
    assert [t["kind"] for t in json.loads(res.output)["tiers"]] == ["memory", "redis"]


def test_bench_without_dense_prints_no_ratio(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A run without the dense row has no ratio to print (not 0.00x): the column is empty, null in JSON."""
    monkeypatch.setenv("KVCOMM_GAMMA", "1.0")
    res = CliRunner().invoke(main, ["bench", *TINY, "--policies", "naive", "--json", str(tmp_path / "out.json")])
    assert res.exit_code == 0, res.output
    assert [r["speedup"] for r in json.loads((tmp_path / "out.json").read_text())["rows"]] == [None, None]
    assert "agent 2:   naive  TTFT p50" in res.output and "add dense to --policies for the ratio" in res.output
    assert "0.00x" not in res.output


def test_bench_runs_every_policy_through_the_given_store(redis_url: str, monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    """--store: a tiered memory -> Redis store, each policy in a fresh namespace of its own,
    cleared after its run; the header names it with the password redacted, and kvcomm's calls are
    served from reused KV."""
    import redis as redis_py

    monkeypatch.setenv("KVCOMM_GAMMA", "1.0")
    client = redis_py.Redis.from_url(redis_url)
    before = set(client.scan_iter(match="kvcomm:bench-*"))
    from kvcomm.store import RedisStore

    namespaces: list[str] = []
    put = RedisStore.put

    def counted(self, key, entry, *args, **kwargs):  # what reached Redis, per namespace
        namespaces.append(self.namespace)
        return put(self, key, entry, *args, **kwargs)

    monkeypatch.setattr(RedisStore, "put", counted)
    res = CliRunner().invoke(main, ["bench", *TINY, "--policies", "dense,kvcomm", "--store", "memory://",
                                    "--store", redis_url, "--json", str(tmp_path / "out.json")])
    assert res.exit_code == 0, res.output
    assert f"store memory:// -> {redis_url} (a fresh namespace per policy)" in res.output
    assert len(set(namespaces)) == 2 and all(ns.startswith("bench-") for ns in namespaces), set(namespaces)
    assert set(client.scan_iter(match="kvcomm:bench-*")) == before  # each policy's namespace cleared after it
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["store"] == f"store memory:// -> {redis_url} (a fresh namespace per policy)"
    kvcomm_rows = [r for r in out["rows"] if r["policy"] == "kvcomm"]
    assert kvcomm_rows and all(r["reuse_pct"] == 100.0 for r in kvcomm_rows), kvcomm_rows
    assert all(r["speedup"] is not None for r in out["rows"])  # dense ran: every row has its ratio
    from kvcomm.tools.bench import describe_store

    said = describe_store(["memory://", redis_url.replace("redis://", "redis://:hunter2@")])
    assert "hunter2" not in said and said.startswith("store memory:// -> redis://")
    client.close()
