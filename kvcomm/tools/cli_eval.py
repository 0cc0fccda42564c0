"""``kvcomm eval``: the command over the fidelity harness, its options, their checks and its help.

The measuring lives in :mod:`kvcomm.tools.evaluation` (the DAG workload) and
:mod:`kvcomm.tools.rag_eval` (the RAG workload); this module turns options into their arguments,
checks them before the model loads and prints or writes the results. The command is registered
on the ``kvcomm`` group in :mod:`kvcomm.tools.cli`.
"""

from __future__ import annotations

import json
from typing import Any

import click

from kvcomm.config import POLICIES
from kvcomm.tools.cli_common import config_epilog, quiet_transformers


def _eval_store_factory(urls: tuple[str, ...]) -> Any:
    """A fresh store of these URLs (tiered when several) in a namespace of its own per call."""
    from kvcomm.tools.bench import fresh_store_factory

    return fresh_store_factory(urls, "eval")


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


@click.command("eval", help=_EVAL_HELP, epilog=config_epilog(
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
    from kvcomm.errors import StoreError
    from kvcomm.models import load_model
    from kvcomm.store import parse_store_urls
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
    if store_urls:
        try:
            parse_store_urls(*store_urls)  # a bad URL fails before the model loads (no connection yet)
        except StoreError as exc:
            raise click.BadParameter(str(exc), param_hint="--store") from exc
    quiet_transformers()
    loaded = load_model(model, progress=False)
    factories = {}
    opened: list[Any] = []
    if store_urls:
        label = "kvcomm @store"
        extra[label] = base.replace(policy="kvcomm")
        make_store = _eval_store_factory(store_urls)

        def store_factory() -> Any:
            store = make_store()
            opened.append(store)
            return store

        factories[label] = store_factory
    common: dict[str, Any] = {
        "fingerprint": loaded.fingerprint, "policies": chosen, "n_requests": n_requests,
        "max_new_tokens": max_new_tokens, "configs": extra, "exact_tokens": min(32, max_new_tokens),
        "base_config": base, "store_factories": factories, "upstream": upstream}
    try:
        if workload == "rag":
            from kvcomm.tools.rag_eval import render_task, run_rag_eval

            out = run_rag_eval(loaded.model, loaded.tokenizer, free_running=free_run, **common)
            if out["task"] is not None:
                click.echo(render_task(out["task"]))
                click.echo("")
            click.echo("RAG agents, teacher-forced (the same passages and questions):")
        else:
            out = run_eval(loaded.model, loaded.tokenizer, n_agents=n_agents, **common)
    finally:
        for store in opened:  # the row's own namespaces: leave nothing behind in a shared Redis
            store.clear()
            store.close()
    click.echo(render(out))
    if plot_path:
        from kvcomm.tools.eval_plot import plot

        out["plot"] = str(plot(out, plot_path))
        click.echo(f"\nplot: {out['plot']}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=1)
        click.echo(f"wrote {json_path}")
