"""``kvcomm store stats|ls|clear`` through click's CliRunner, against a real redis-server."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from store_helpers import kv_entry

from kvcomm.store import RedisStore
from kvcomm.tools.cli import main


@pytest.fixture
def filled(redis_store: RedisStore, redis_url: str) -> str:
    redis_store.put("seg:planner", kv_entry())
    redis_store.put("seg:coder", kv_entry())
    redis_store.pool_increment("pool:question", "a1", 3)
    return f"{redis_url}?namespace={redis_store.namespace}"


def test_stats_ls_clear(filled: str) -> None:
    runner = CliRunner()
    out = runner.invoke(main, ["store", "stats", "--store", filled, "--json"])
    assert out.exit_code == 0, out.output
    info = json.loads(out.output)
    assert info["kind"] == "redis" and info["keys"] == 3 and info["entries"] == 2 and info["entry_bytes"] > 0

    out = runner.invoke(main, ["store", "stats", "--store", filled])
    assert out.exit_code == 0 and "entries" in out.output

    out = runner.invoke(main, ["store", "ls", "--store", filled, "--json"])
    assert json.loads(out.output) == ["pool:question", "seg:coder", "seg:planner"]
    out = runner.invoke(main, ["store", "ls", "--store", filled, "--prefix", "seg:"])
    assert out.output.split() == ["seg:coder", "seg:planner"]

    out = runner.invoke(main, ["store", "clear", "--store", filled, "--prefix", "seg:"], input="n\n")
    assert out.exit_code == 1  # declined: nothing removed
    out = runner.invoke(main, ["store", "clear", "--store", filled, "--prefix", "seg:"], input="y\n")
    assert out.exit_code == 0 and "removed 2 keys" in out.output
    out = runner.invoke(main, ["store", "clear", "--store", filled, "--yes"])
    assert "removed 1 keys" in out.output
    assert json.loads(runner.invoke(main, ["store", "ls", "--store", filled, "--json"]).output) == []


def test_url_from_environment(filled: str) -> None:
    out = CliRunner().invoke(main, ["store", "ls"], env={"KVCOMM_STORE_URL": filled})
    assert out.exit_code == 0 and "seg:coder" in out.output


@pytest.mark.parametrize(
    "url, message",
    [
        ("redis://user:pw123@127.0.0.1:1/0", "not reachable"),
        ("nosuch://x", "unknown store URL scheme"),
        ("redis://127.0.0.1:6379/0?bogus=1", "unknown parameter 'bogus'"),
    ],
)
@pytest.mark.parametrize("command", ["stats", "ls", "clear"])
def test_bad_url_or_unreachable_exits_1_with_one_line(url: str, message: str, command: str) -> None:
    out = CliRunner().invoke(main, ["store", command, "--store", url, "--yes"] if command == "clear"
                             else ["store", command, "--store", url])
    assert out.exit_code == 1
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: StoreError:") and message in lines[0]
    assert "pw123" not in out.output
