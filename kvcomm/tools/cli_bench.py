"""``kvcomm bench``: the command over the TTFT benchmark (:mod:`kvcomm.tools.bench`), its options,
their checks and its help. The command is registered on the ``kvcomm`` group in
:mod:`kvcomm.tools.cli`.
"""

from __future__ import annotations

import click

from kvcomm.tools.bench import MODEL_SHAPES
from kvcomm.tools.cli_common import config_epilog, quiet_transformers

_BENCH_HELP = """TTFT per agent position, dense vs prefix vs naive vs kvcomm, measured in one run.

\b
    kvcomm bench --model smollm2-135m --prefix-len 128 --input-len 256 --output-len 128
    KVCOMM_GAMMA=1.0 kvcomm bench --model-shape llama-3.1-8b --device cuda --dtype bfloat16 --json out.json

The texts are random words, unrelated to each other: at the engine's default gamma (0.3) the
entropy test admits most of them as new anchors and calls go dense by chance. To measure each
path's speed, run with gamma 1.0 (KVCOMM_GAMMA=1.0 or --gamma 1.0); `kvcomm eval` measures the
policies' fidelity on real text. Also benchmarks/ttft.py (the same implementation).
"""


@click.command(help=_BENCH_HELP, epilog=config_epilog(
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
@click.option("--store", "store_urls", multiple=True, metavar="URL",
              help="the store every policy's entries go through, each policy in a fresh namespace (repeat "
                   "for tiers, fastest first), e.g. redis://127.0.0.1:6379/0  [default: in-process memory "
                   "on the model's device]")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="write the results as JSON here")
def bench(model: str | None, model_shape: str | None, layers: int | None, device: str, dtype: str | None,
          agents: int, prefix_len: int, input_len: int, output_len: int, warmup: int, requests: int, policies: str,
          gamma: float | None, variants: tuple[str, ...], threads: int | None, store_urls: tuple[str, ...],
          json_path: str | None) -> None:
    import logging

    from kvcomm.config import POLICIES
    from kvcomm.errors import StoreError
    from kvcomm.store import parse_store_urls
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
    if store_urls:
        try:
            parse_store_urls(*store_urls)  # and a bad store URL (no connection yet)
        except StoreError as exc:
            raise click.BadParameter(str(exc), param_hint="--store") from exc
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_transformers()
    setting = BenchSetting(agents=agents, prefix_len=prefix_len, input_len=input_len, output_len=output_len,
                           warmup=warmup, requests=requests, policies=chosen, variants=variants)
    out = run_benchmark(setting, config, model=model, model_shape=model_shape, layers=layers, device=device,
                        dtype=dtype, threads=threads, store_urls=store_urls)
    click.echo(render(out))
    if json_path:
        write_json(out, json_path)
