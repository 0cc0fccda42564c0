"""The ``kvcomm`` console script: ask, demo, eval, bench, report, config and store.

This module holds the group and its small commands (ask, report, config, demo); the commands
with many options live beside it and are registered here: ``store`` in
:mod:`~kvcomm.tools.cli_store`, ``eval`` in :mod:`~kvcomm.tools.cli_eval`, ``bench`` in
:mod:`~kvcomm.tools.cli_bench`.

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
from kvcomm.config import config_table
from kvcomm.errors import KVCommError
from kvcomm.tools.cli_bench import bench
from kvcomm.tools.cli_common import config_epilog, quiet_transformers

# the `X as X` imports re-export what moved out of this module (tests import _eval_store_factory from here)
from kvcomm.tools.cli_eval import _eval_store_factory as _eval_store_factory
from kvcomm.tools.cli_eval import eval_cmd
from kvcomm.tools.cli_store import store
from kvcomm.tools.cli_store import store_clear as store_clear
from kvcomm.tools.cli_store import store_ls as store_ls
from kvcomm.tools.cli_store import store_stats as store_stats


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


# the commands with many options, each in a module of its own
main.add_command(store)
main.add_command(eval_cmd)
main.add_command(bench)


@main.command()
@click.option("--model", default="smollm2-135m", show_default=True, help="model name or path")
@click.option("--question", default="What is the capital of France?", show_default=True)
@click.option("--max-new-tokens", default=32, show_default=True, type=int)
def ask(model: str, question: str, max_new_tokens: int) -> None:
    """Answer one question with the model (no reuse): checks the model loads."""
    from kvcomm.models import load_model

    quiet_transformers()
    click.echo(_plain_answer(load_model(model, progress=False), question, max_new_tokens))


def _plain_answer(loaded: Any, question: str, max_new_tokens: int) -> str:
    """The model's greedy answer to one user message, no reuse involved."""
    tok = loaded.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids.to(loaded.model.device)
    out = loaded.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


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


@main.command(epilog=config_epilog("the demo sets policy and max_new_tokens"))
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
    quiet_transformers()
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


if __name__ == "__main__":
    main()
