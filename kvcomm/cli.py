"""The ``kvcomm`` console script."""

from __future__ import annotations

import sys
from typing import Any

import click

from kvcomm import __version__
from kvcomm.errors import KVCommError


class _Group(click.Group):
    """Prints a KVCommError as one line (``Type: message``) and exits 1, without a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KVCommError as exc:
            click.echo(f"Error: {type(exc).__name__}: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvcomm")
def main() -> None:
    """kvcomm: reuse KV caches across the agents of a multi-agent LLM pipeline."""


@main.command()
@click.option("--model", default="smollm2-135m", show_default=True, help="model name or path")
@click.option("--question", default="What is the capital of France?", show_default=True)
@click.option("--max-new-tokens", default=32, show_default=True, type=int)
def ask(model: str, question: str, max_new_tokens: int) -> None:
    """Answer one question with the model (no reuse): checks the model loads."""
    from kvcomm.models import load_model

    loaded = load_model(model)
    tok = loaded.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    out = loaded.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    click.echo(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())


# -- kvcomm store ---------------------------------------------------------------------------------
_STORE_URL_HELP = (
    "store URL (repeat for tiers, fastest first), e.g. redis://host:6379/0?namespace=team1; "
    "default: $KVCOMM_STORE_URL, else $KVCOMM_REDIS_URL, else redis://127.0.0.1:6379/0; "
    "the entry-signing secret comes from $KVCOMM_STORE_KEY, never from the URL"
)


def _store_url_option(f: Any) -> Any:
    return click.option(
        "--url", "urls", multiple=True, envvar="KVCOMM_STORE_URL", default=(),  # () -> from_url's env/default
        show_default=False, help=_STORE_URL_HELP,
    )(f)


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
                     "evictions"}


@main.group()
def store() -> None:
    """Inspect or clear a KV store (Redis, or tiers of memory and Redis)."""


@store.command("stats")
@_store_url_option
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def store_stats(urls: tuple[str, ...], as_json: bool) -> None:
    """What the store's namespace holds, and its configuration."""
    import json

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
        if name != "tiers":
            click.echo(f"{name:12} {value}")
    for i, tier in enumerate(info.get("tiers", [])):
        click.echo(f"tier {i:<7} {tier['kind']} {tier.get('url') or tier.get('device')}")


@store.command("ls")
@_store_url_option
@click.option("--prefix", default="", help="only keys starting with this (relative to the namespace)")
@click.option("--json", "as_json", is_flag=True, help="print a JSON list")
def store_ls(urls: tuple[str, ...], prefix: str, as_json: bool) -> None:
    """List the keys of the store's namespace."""
    import json

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


@main.command()
@click.option("--run-dir", type=click.Path(file_okay=False), help="a run directory holding records.jsonl")
@click.option("--records", "records_path", type=click.Path(), help="a JSONL file of call records")
@click.option("--store", "stores", multiple=True, metavar="URL",
              help="read the records an engine appended to a store (repeatable), e.g. redis://host:6379/0")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--plot", type=click.Path(dir_okay=False), help="also draw reuse rate and TTFT per agent to this PNG")
def report(run_dir: str | None, records_path: str | None, stores: tuple[str, ...], as_json: bool,
           plot: str | None) -> None:
    """Reuse per agent and slot: calls, reuse %, tokens reused, TTFT (saved vs dense), anchors, store hits."""
    import json

    from kvcomm import report as rep

    if not (run_dir or records_path or stores):
        raise click.UsageError("give --run-dir, --records or --store")
    built = rep.build(rep.load(run_dir=run_dir, records=records_path, stores=stores))
    if plot:
        built["plot"] = str(rep.plot(built, plot))
    click.echo(json.dumps(built, indent=2) if as_json else rep.render(built))
    if plot and not as_json:
        click.echo(f"\nplot: {built['plot']}")


if __name__ == "__main__":
    main()
