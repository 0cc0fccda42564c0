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


if __name__ == "__main__":
    main()
