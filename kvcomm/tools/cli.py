"""The ``kvcomm`` console script: ask, demo, eval, bench, report, config and store.

Every subcommand that takes a store takes ``--store URL`` (repeatable). Commands that build
engines read the engine config from ``KVCOMM_*`` environment variables
(:meth:`KVCommConfig.from_env <kvcomm.config.KVCommConfig.from_env>`), with their own options over
it; ``kvcomm config`` and the help of those commands list the variables from
:func:`kvcomm.config.config_table`.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from kvcomm import __version__
from kvcomm.config import POLICIES, config_table
from kvcomm.errors import KVCommError
from kvcomm.tools.bench import MODEL_SHAPES


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

    _quiet_transformers()
    click.echo(_plain_answer(load_model(model, progress=False), question, max_new_tokens))


def _plain_answer(loaded: Any, question: str, max_new_tokens: int) -> str:
    """The model's greedy answer to one user message, no reuse involved."""
    tok = loaded.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids.to(loaded.model.device)
    out = loaded.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def _config_epilog(overrides: str) -> str:
    """The help epilog of a command that builds engines: every config variable and its default."""
    width = max(len(env) for _, _, env, _ in config_table())
    rows = [f"  {env:{width}}  {default}" for _, default, env, _ in config_table()]
    return (f"Engine config: KVCOMM_* environment variables over these defaults; {overrides}. "
            "`kvcomm config` describes each field and shows the values in effect.\n\n\b\n" + "\n".join(rows))


# -- kvcomm store ---------------------------------------------------------------------------------
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


@main.group()
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


@main.command()
@click.option("--run-dir", type=click.Path(file_okay=False), help="a run directory holding records.jsonl")
@click.option("--records", "records_path", type=click.Path(), help="a JSONL file of call records")
@click.option("--store", "stores", multiple=True, metavar="URL",
              help="read the records an engine appended to a store (repeat for several stores), "
                   "e.g. redis://host:6379/0?namespace=team1")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--plot", type=click.Path(dir_okay=False), help="also draw reuse rate and TTFT per agent to this PNG")
def report(run_dir: str | None, records_path: str | None, stores: tuple[str, ...], as_json: bool,
           plot: str | None) -> None:
    """Reuse per agent and slot: calls, reuse %, tokens reused, TTFT (saved vs dense), anchors, store hits."""
    from kvcomm.tools import report as rep

    if not (run_dir or records_path or stores):
        raise click.UsageError("give --run-dir, --records or --store")
    built = rep.build(rep.load(run_dir=run_dir, records=records_path, stores=stores))
    if plot:
        built["plot"] = str(rep.plot(built, plot))
    click.echo(json.dumps(built, indent=2) if as_json else rep.render(built))
    if plot and not as_json:
        click.echo(f"\nplot: {built['plot']}")


@main.command("config")
@click.option("--json", "as_json", is_flag=True, help="print a JSON list")
def config_cmd(as_json: bool) -> None:
    """The engine's config fields: the value in effect (KVCOMM_* over the defaults), the default,
    the environment variable and what the field does."""
    from kvcomm.config import KVCommConfig

    current, defaults = KVCommConfig.from_env().to_dict(), KVCommConfig().to_dict()
    table = config_table()
    if as_json:
        click.echo(json.dumps([{"field": name, "value": current[name], "default": defaults[name], "env": env,
                                "description": doc} for name, _, env, doc in table], indent=1))
        return
    rows = [("field", "value", "default", "environment", "description")]
    rows += [(name, repr(current[name]), default, env, doc) for name, default, env, doc in table]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[4])


def _quiet_transformers() -> None:
    """Silence transformers' load-time progress bars and notices in CLI runs."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@main.command(epilog=_config_epilog("the demo sets policy and max_new_tokens"))
@click.option("--model", default="smollm2-135m", show_default=True, help="model name or path")
@click.option("--requests", "n_requests", default=6, show_default=True, type=click.IntRange(1, 6))
@click.option("--max-new-tokens", default=24, show_default=True, type=click.IntRange(1, 512))
@click.option("--store", "stores", multiple=True, metavar="URL",
              help="store URL for kvcomm (repeat for tiers, fastest first; default: in-process memory)")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="where the call records go (default runs/demo-<time>); read them with kvcomm report")
@click.option("--json", "as_json", is_flag=True, help="print per-call rows as JSON")
def demo(model: str, n_requests: int, max_new_tokens: int, stores: tuple[str, ...], run_dir: str | None,
         as_json: bool) -> None:
    """Run a four-agent pipeline with full prefill and with kvcomm, and compare TTFT per agent."""
    import time
    from pathlib import Path

    from kvcomm.config import KVCommConfig
    from kvcomm.metrics import write_jsonl
    from kvcomm.models import load_model
    from kvcomm.tools import report as rep
    from kvcomm.tools.demo import render, run_demo

    config = KVCommConfig.from_env()  # a bad KVCOMM_* value fails before the model loads
    _quiet_transformers()
    click.echo(f"loading {model} ...", err=True)
    loaded = load_model(model, progress=False)
    answer = _plain_answer(loaded, "What is the capital of France?", 16)
    click.echo(f"model check — What is the capital of France? -> {answer}")
    store_obj = None
    if stores:
        from kvcomm.store import from_url

        store_obj = from_url(*stores)
    result = run_demo(loaded.model, loaded.tokenizer, fingerprint=loaded.fingerprint, n_requests=n_requests,
                      max_new_tokens=max_new_tokens, store=store_obj, config=config,
                      echo=(lambda s: click.echo(s, err=True)) if as_json else click.echo)
    out_dir = Path(run_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    write_jsonl(result["records"]["dense"] + result["records"]["kvcomm"], out_dir / "records.jsonl")
    if as_json:
        click.echo(json.dumps(result["rows"], indent=1))
        return
    click.echo("")
    click.echo(render(result))
    click.echo(f"\nkvcomm report --run-dir {out_dir}")
    click.echo(rep.render(rep.build(rep.load(run_dir=str(out_dir)))))


def _eval_store_factory(urls: tuple[str, ...]) -> Any:
    """A fresh store of these URLs (tiered when several) in a namespace of its own per call."""
    import uuid

    from kvcomm.store import from_url

    def factory() -> Any:
        return from_url(*urls, namespace=f"eval-{uuid.uuid4().hex[:8]}")

    return factory


_EVAL_HELP = """Fidelity of every policy against full prefill on real tasks, teacher-forced.

\b
    kvcomm eval --n 40                                  # the 4-agent DAG over HumanEval prompts
    kvcomm eval --n 40 --upstream exact --plot eval.png
    kvcomm eval --workload rag --n 40 --json rag.json   # the RAG pipeline, free-running + teacher-forced
    kvcomm eval --workload rag --no-free-run            # the RAG agents' fidelity tables only

Every row (dense, each policy, each --gamma/--variant/--store row) decodes the dense run's
answer tokens. The first table gives each row's figures over its own calls; the paired tables
give every row's figures over the same calls, the ones the kvcomm row served from reused KV
(the first non-dense row's when there is no kvcomm row), with bootstrap 95% intervals over calls
and each row's difference from that row. --json also holds one row per call.

--upstream own (default): each policy's engine feeds downstream agents the answer KV its own
producer computed, what a deployment sees. --upstream exact: every policy gets the dense
producer's answer KV, so each call shows its own error only.

--workload rag runs the RAG pipeline (retrieve -> expert -> critic -> final, over the standard
library's docstrings, as examples/rag_pipeline.py) twice: free-running under every row (hit
rate against dense's, final answers that differ from dense's) and teacher-forced on its three
agents (the fidelity tables). --no-free-run leaves the free run out (it decodes every row's
answers token by token, most of the time on a CPU). --agents does not apply to it.
"""


@main.command("eval", help=_EVAL_HELP, epilog=_config_epilog(
    "--policies, --gamma, --variant and --max-new-tokens set the rows' fields over them"))
@click.option("--model", default="smollm2-135m", show_default=True, help="model name or path")
@click.option("--workload", type=click.Choice(["dag", "rag"]), default="dag", show_default=True,
              help="dag: a fully connected DAG of --agents agents over HumanEval prompts; rag: the RAG pipeline")
@click.option("--n", "n_requests", default=40, show_default=True, type=click.IntRange(1, 164),
              help="requests (rag: at most its number of questions)")
@click.option("--agents", "n_agents", default=4, show_default=True, type=click.IntRange(2, 6),
              help="agents in the DAG (dag workload only)")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1, 512),
              help="tokens per agent call (rag: 48 unless given, as the example)")
@click.option("--policies", default=",".join(POLICIES), show_default=True,
              help="comma-separated rows of the policy table (default: all of them)")
@click.option("--upstream", type=click.Choice(["own", "exact"]), default="own", show_default=True,
              help="upstream answers' KV: each policy's own producer's, or the dense producer's")
@click.option("--gamma", "gammas", multiple=True, type=float, help="extra kvcomm rows with these gammas")
@click.option("--variant", "variants", multiple=True, metavar="FIELD=VALUE[,FIELD=VALUE]",
              help="an extra row: kvcomm with these config fields changed, e.g. answer_base=prefill")
@click.option("--store", "store_urls", multiple=True, metavar="URL",
              help="also a kvcomm row whose entries go through this store (repeat for tiers, fastest first; "
                   "e.g. redis://...?codec=int8), in a fresh namespace")
@click.option("--free-run/--no-free-run", "free_run", default=True, show_default=True,
              help="rag workload: also run the pipeline free under every row (hit rates, answers against dense's)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write the results as JSON here")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), metavar="FILE.png",
              help="draw reuse-call TTFT speed-up against reuse-call first-token agreement, one point per row, "
                   "with the Pareto frontier, to this PNG")
@click.pass_context
def eval_cmd(ctx: click.Context, model: str, workload: str, n_requests: int, n_agents: int, max_new_tokens: int,
             policies: str, upstream: str, gammas: tuple[float, ...], variants: tuple[str, ...],
             store_urls: tuple[str, ...], free_run: bool, json_path: str | None, plot_path: str | None) -> None:
    from kvcomm.config import KVCommConfig
    from kvcomm.models import load_model
    from kvcomm.tools.evaluation import render, run_eval

    chosen = [p.strip() for p in policies.split(",") if p.strip()]
    bad = [p for p in chosen if p not in POLICIES]
    if bad:
        raise click.BadParameter(f"unknown policy {', '.join(bad)} (choose from {', '.join(POLICIES)})")
    if not chosen:
        raise click.BadParameter(f"no policy given (choose from {', '.join(POLICIES)})", param_hint="--policies")
    if plot_path and not plot_path.lower().endswith(".png"):
        raise click.BadParameter(f"{plot_path!r}: the plot is a PNG, give a file name ending in .png",
                                 param_hint="--plot")
    given = {name for name in ("n_agents", "max_new_tokens", "free_run")
             if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}
    if workload != "rag" and "free_run" in given:
        raise click.BadParameter("the dag workload is teacher-forced only; the free run is the rag workload's",
                                 param_hint="--free-run/--no-free-run")
    if workload == "rag":
        from kvcomm.tools.rag import QUESTIONS

        if "n_agents" in given:
            raise click.BadParameter("the rag workload has its own three agents (expert, critic, final)",
                                     param_hint="--agents")
        if n_requests > len(QUESTIONS):
            raise click.BadParameter(f"{n_requests}: the rag workload has {len(QUESTIONS)} questions",
                                     param_hint="--n")
        if "max_new_tokens" not in given:
            max_new_tokens = 48
    base = KVCommConfig.from_env()
    extra = {f"kvcomm g={g:g}": base.replace(policy="kvcomm", gamma=g) for g in gammas}
    for text in variants:  # checked before the model loads: a typo fails in a second, not a minute
        # ConfigError names a malformed variant, an unknown field or a bad value
        extra[text.replace("\n", "\\n")] = base.replace(policy="kvcomm").variant(text)
    _quiet_transformers()
    loaded = load_model(model, progress=False)
    factories = {}
    if store_urls:
        label = "kvcomm @store"
        extra[label] = base.replace(policy="kvcomm")
        factories[label] = _eval_store_factory(store_urls)
    common: dict[str, Any] = {
        "fingerprint": loaded.fingerprint, "policies": chosen, "n_requests": n_requests,
        "max_new_tokens": max_new_tokens, "configs": extra, "exact_tokens": min(32, max_new_tokens),
        "base_config": base, "store_factories": factories, "upstream": upstream}
    if workload == "rag":
        from kvcomm.tools.rag_eval import render_task, run_rag_eval

        out = run_rag_eval(loaded.model, loaded.tokenizer, free_running=free_run, **common)
        if out["task"] is not None:
            click.echo(render_task(out["task"]))
            click.echo("")
        click.echo("RAG agents, teacher-forced (the same passages and questions):")
    else:
        out = run_eval(loaded.model, loaded.tokenizer, n_agents=n_agents, **common)
    click.echo(render(out))
    if plot_path:
        from kvcomm.tools.eval_plot import plot

        out["plot"] = str(plot(out, plot_path))
        click.echo(f"\nplot: {out['plot']}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=1)
        click.echo(f"wrote {json_path}")


_BENCH_HELP = """TTFT per agent position, dense vs prefix vs naive vs kvcomm, measured in one run.

\b
    kvcomm bench --model smollm2-135m --prefix-len 128 --input-len 256 --output-len 128
    KVCOMM_GAMMA=1.0 kvcomm bench --model-shape llama-3.1-8b --device cuda --dtype bfloat16 --json out.json

The texts are random words, unrelated to each other: at the engine's default gamma (0.3) the
entropy test admits most of them as new anchors and calls go dense by chance. To measure each
path's speed, run with gamma 1.0 (KVCOMM_GAMMA=1.0 or --gamma 1.0); `kvcomm eval` measures the
policies' fidelity on real text. Also benchmarks/ttft.py (the same implementation).
"""


@main.command(help=_BENCH_HELP, epilog=_config_epilog(
    "--gamma over them; policy and max_new_tokens=1 set per run; anchor_cache_bytes 16 GiB unless set"))
@click.option("--model", default=None, help="model name or path  [default: smollm2-135m]")
@click.option("--model-shape", type=click.Choice(sorted(MODEL_SHAPES)), default=None,
              help="a real architecture with random weights (instead of --model)")
@click.option("--layers", type=int, default=None, help="override the shape's layer count (quick runs)")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
@click.option("--agents", default=5, show_default=True, type=click.IntRange(1))
@click.option("--prefix-len", default=512, show_default=True, type=click.IntRange(1))
@click.option("--input-len", default=1024, show_default=True, type=click.IntRange(1))
@click.option("--output-len", default=512, show_default=True, type=click.IntRange(1))
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(0))
@click.option("--requests", default=3, show_default=True, type=click.IntRange(1))
@click.option("--policies", default="dense,prefix,naive,kvcomm", show_default=True)
@click.option("--gamma", type=float, default=None,
              help="kvcomm entropy threshold  [default: $KVCOMM_GAMMA, else the engine's 0.3]")
@click.option("--variant", "variants", multiple=True, metavar="FIELD=VALUE[,FIELD=VALUE]",
              help="also a kvcomm row with these config fields changed (repeatable), e.g. fidelity=0")
@click.option("--threads", type=int, default=None, help="CPU threads for torch")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="write the results as JSON here")
def bench(model: str | None, model_shape: str | None, layers: int | None, device: str, dtype: str | None,
          agents: int, prefix_len: int, input_len: int, output_len: int, warmup: int, requests: int, policies: str,
          gamma: float | None, variants: tuple[str, ...], threads: int | None, json_path: str | None) -> None:
    import logging

    from kvcomm.config import POLICIES
    from kvcomm.tools.bench import BenchSetting, bench_config, render, run_benchmark, write_json

    if model and model_shape:
        raise click.UsageError("give --model or --model-shape, not both")
    chosen = tuple(policies.split(","))
    bad = [p for p in chosen if p not in POLICIES]
    if bad:
        raise click.BadParameter(f"unknown policy {', '.join(bad)} (choose from {', '.join(POLICIES)})",
                                 param_hint="--policies")
    config = bench_config(gamma=gamma)  # KVCOMM_* then --gamma; a bad value fails before the model loads
    for text in variants:
        config.replace(policy="kvcomm").variant(text)  # a bad variant fails before the model loads too
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_transformers()
    setting = BenchSetting(agents=agents, prefix_len=prefix_len, input_len=input_len, output_len=output_len,
                           warmup=warmup, requests=requests, policies=chosen, variants=variants)
    out = run_benchmark(setting, config, model=model, model_shape=model_shape, layers=layers, device=device,
                        dtype=dtype, threads=threads)
    click.echo(render(out))
    if json_path:
        write_json(out, json_path)


if __name__ == "__main__":
    main()
