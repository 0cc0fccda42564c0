"""``kvcomm store``: inspect or clear a KV store (``stats``, ``ls``, ``clear``).

Each subcommand takes ``--store URL`` (repeatable, fastest tier first) and opens the store with
:func:`kvcomm.store.from_url`. The group is registered on the ``kvcomm`` group in
:mod:`kvcomm.tools.cli`.
"""

from __future__ import annotations

import json
from typing import Any

import click

_STORE_URL_HELP = (
    "store URL (repeat for tiers, fastest first), e.g. redis://host:6379/0?namespace=team1; "
    "default: $KVCOMM_STORE_URL, else $KVCOMM_REDIS_URL, else redis://127.0.0.1:6379/0; "
    "the entry-signing secret comes from $KVCOMM_STORE_KEY, never from the URL"
)


def _store_url_option(f: Any) -> Any:
    # none given: from_url() falls back to kvcomm.store.store_urls_from_env(), the one environment lookup
    return click.option("--store", "urls", multiple=True, metavar="URL", help=_STORE_URL_HELP)(f)


def _open_store(urls: tuple[str, ...]) -> Any:
    from kvcomm.store import from_url

    store = from_url(*urls)
    try:
        store.ping()  # unreachable -> StoreError -> one line, exit 1
    except BaseException:
        store.close()
        raise
    return store


_PROCESS_COUNTERS = {"hits", "misses", "puts", "put_failures", "bytes_read", "bytes_written", "faults", "promotions",
                     "evictions", "round_trips", "buffers"}
_SHARD_COLUMNS = (("node", "shard", "<"), ("keys", "keys", ">"), ("entries", "entries", ">"), ("chunks", "chunks", ">"),
                  ("entry_bytes", "entry bytes", ">"), ("used_memory", "used memory", ">"),
                  ("maxmemory", "maxmemory", ">"), ("maxmemory_policy", "policy", "<"))


def _shard_table(shards: list[dict[str, Any]]) -> list[str]:
    """``kvcomm store stats``: one row per server (each shard of a cluster) of the namespace's keys and bytes."""
    rows = [[str(row.get(name, row.get("error", "")) if name != "node" else row["node"]) for name, _, _ in _SHARD_COLUMNS]
            for row in shards]
    widths = [max(len(head), *(len(r[i]) for r in rows)) for i, (_, head, _) in enumerate(_SHARD_COLUMNS)]
    line = "  ".join(f"{head:{align}{w}}" for (_, head, align), w in zip(_SHARD_COLUMNS, widths, strict=True))
    body = ["  ".join(f"{v:{align}{w}}" for v, (_, _, align), w in zip(r, _SHARD_COLUMNS, widths, strict=True))
            for r in rows]
    return [line.rstrip(), "-" * len(line.rstrip()), *(b.rstrip() for b in body)]


@click.group()
def store() -> None:
    """Inspect or clear a KV store (Redis, or tiers of memory and Redis)."""


@store.command("stats")
@_store_url_option
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def store_stats(urls: tuple[str, ...], as_json: bool) -> None:
    """What the store's namespace holds, and its configuration."""

    def config(stats: dict[str, Any]) -> dict[str, Any]:  # hit/miss counters of this fresh process are 0
        return {k: v for k, v in stats.items() if k not in _PROCESS_COUNTERS}

    st = _open_store(urls)
    try:
        info = {**config(st.stats()), **st.usage()}
    finally:
        st.close()
    if "tiers" in info:
        info["tiers"] = [config(t) for t in info["tiers"]]
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    for name, value in info.items():
        if name not in ("tiers", "shards"):
            click.echo(f"{name:12} {value}")
    for i, tier in enumerate(info.get("tiers", [])):
        click.echo(f"tier {i:<7} {tier['kind']} {tier.get('url') or tier.get('device')}")
    if info.get("shards"):
        click.echo("")
        for line in _shard_table(info["shards"]):
            click.echo(line)


@store.command("ls")
@_store_url_option
@click.option("--prefix", default="", help="only keys starting with this (relative to the namespace)")
@click.option("--json", "as_json", is_flag=True, help="print a JSON list")
def store_ls(urls: tuple[str, ...], prefix: str, as_json: bool) -> None:
    """List the keys of the store's namespace."""
    st = _open_store(urls)
    try:
        keys = st.scan(prefix)
    finally:
        st.close()
    click.echo(json.dumps(keys) if as_json else "\n".join(keys))


@store.command("clear")
@_store_url_option
@click.option("--prefix", default="", help="only keys starting with this (relative to the namespace)")
@click.option("--yes", "-y", is_flag=True, help="do not ask for confirmation")
def store_clear(urls: tuple[str, ...], prefix: str, yes: bool) -> None:
    """Delete the keys of the store's namespace (entries, anchor pools, metrics)."""
    st = _open_store(urls)
    try:
        if not yes:
            what = f"keys starting with {prefix!r}" if prefix else "all keys"
            click.confirm(f"Delete {what} of namespace {st.namespace!r}?", abort=True)
        removed = st.clear(prefix)
    finally:
        st.close()
    click.echo(f"removed {removed} keys")
