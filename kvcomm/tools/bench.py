"""The TTFT benchmark behind ``kvcomm bench`` and ``benchmarks/ttft.py``: agents in a chain, each
reading the user input and every upstream answer behind its own long system prompt.

Every policy runs the same requests through the same harness in one process; the first
``warmup`` requests (anchors being created, CUDA graphs being captured) are not timed. Upstream
answers are synthetic texts of ``output_len`` tokens published as each agent's answer, so the
benchmark measures prompt handling, not decoding. ``model_shape`` builds a real architecture
(Llama-3.1-8B, Qwen2.5-7B) with random weights on the device: TTFT does not depend on weight
values, and no download is needed.

This module is a library: both front ends parse their own options, then call
:func:`bench_config`, :func:`run_benchmark`, :func:`render` and :func:`write_json`. It parses no
arguments and configures no logging.

Engine config: ``KVCOMM_*`` environment variables, then the front end's explicit options
(:func:`bench_config`); otherwise the engine's defaults. The texts are random words, unrelated
to each other, so at the default gamma (0.3) the entropy test admits most of them as new anchors
and calls go dense by chance. To measure each path's speed, run with gamma 1.0
(``KVCOMM_GAMMA=1.0`` or ``--gamma 1.0``), as the README's numbers do; ``kvcomm eval`` measures
the policies' fidelity on real text.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvcomm.config import KVCommConfig, env_var

if TYPE_CHECKING:  # torch loads with the model: `kvcomm --help` and the CLI's option table do not need it
    import torch

MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(
        arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    ),
    "qwen2.5-7b": dict(
        arch="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1000000.0,
    ),
    "tiny": dict(arch="llama", vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384),
}


class SyntheticTokenizer:
    """One token per whitespace-separated word (a stable hash): enough for prompts of random words.

    Implements the few tokenizer calls the engine makes, so architecture-shaped random models run
    without any tokenizer files.
    """

    SPECIAL = {"<|im_start|>": 1, "<|im_end|>": 2}

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = 2
        self.unk_token_id = 0
        self._words: dict[int, str] = {}

    def _id(self, word: str) -> int:
        if word in self.SPECIAL:
            return self.SPECIAL[word]
        h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
        i = 3 + h % (self.vocab_size - 3)
        self._words.setdefault(i, word)
        return i

    def __call__(self, text: str, add_special_tokens: bool = False, **_: Any) -> Any:
        class _Enc:
            input_ids = [self._id(w) for w in text.split()]

        return _Enc()

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False,
                            add_generation_prompt: bool = True, **_: Any) -> str:
        text = "".join(f"<|im_start|> {m['role']} {m['content']} <|im_end|> " for m in messages)
        return text + ("<|im_start|> assistant " if add_generation_prompt else "")

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.SPECIAL.get(token, 0)

    def decode(self, ids: list[int], skip_special_tokens: bool = True, **_: Any) -> str:
        return " ".join(self._words.get(i, f"<{i}>") for i in ids)

    def __len__(self) -> int:
        return self.vocab_size


def build_shaped_model(shape: str, *, device: str, dtype: torch.dtype, layers: int | None = None) -> Any:
    """A random-weight model of a real architecture, initialised directly on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    spec = dict(MODEL_SHAPES[shape])
    arch = spec.pop("arch")
    if layers:
        spec["num_hidden_layers"] = layers
    cfg = (LlamaConfig if arch == "llama" else Qwen2Config)(**spec)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


_WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have "
          "an they you were her all she there would their we him been has when who will more no if out so said "
          "what up its about into than them can only other new some could time these two may then do first any "
          "my now such like our over man me even most made after also did many before must through back years "
          "where much your way well down should because each just those people how too little state good very "
          "make world still own see men work long get here between both life being under never day same another "
          "know while last might us great old year off come since against go came right used take three").split()


def make_text(tokenizer: Any, n_tokens: int, rng: random.Random) -> str:
    """Random words whose tokenization is exactly ``n_tokens`` long (trimmed by decoding)."""
    words: list[str] = []
    while True:
        words += [rng.choice(_WORDS) for _ in range(max(8, n_tokens // 2))]
        ids = tokenizer(" ".join(words), add_special_tokens=False).input_ids
        if len(ids) >= n_tokens:
            break
    text = tokenizer.decode(ids[:n_tokens], skip_special_tokens=True)
    return text


#: the anchor-stack cache of a bench run unless ``KVCOMM_ANCHOR_CACHE_BYTES`` or an option sets it:
#: large enough to keep every slot's anchor stacks across requests, so timed requests measure the
#: steady state rather than restacking (the engine's default is 2 GiB)
BENCH_ANCHOR_CACHE_BYTES = 16 << 30


@dataclass
class BenchSetting:
    """The workload: how many agents, how long each part of a prompt is, how many requests."""

    agents: int = 5
    prefix_len: int = 512
    input_len: int = 1024
    output_len: int = 512
    warmup: int = 3
    requests: int = 3
    policies: tuple[str, ...] = ("dense", "prefix", "naive", "kvcomm")
    #: extra kvcomm rows, each ``FIELD=VALUE[,FIELD=VALUE]`` over the run's config (its label)
    variants: tuple[str, ...] = ()


def bench_config(environ: Mapping[str, str] | None = None, **overrides: Any) -> KVCommConfig:
    """The engine config of a bench run: ``KVCOMM_*`` variables, then ``overrides`` (None: not given).

    Every field keeps the engine's default except ``anchor_cache_bytes``, which is
    :data:`BENCH_ANCHOR_CACHE_BYTES` unless the environment or an override sets it. ``policy`` and
    ``max_new_tokens`` are set per run by :func:`run_ttft`.

    Raises:
        ConfigError: an unknown field or a bad value (from the environment or an override).
    """
    env = os.environ if environ is None else environ
    given = {k: v for k, v in overrides.items() if v is not None}
    if "anchor_cache_bytes" not in given and env_var("anchor_cache_bytes") not in env:
        given["anchor_cache_bytes"] = BENCH_ANCHOR_CACHE_BYTES
    return KVCommConfig.from_env(dict(env), **given)


def run_ttft(model: Any, tokenizer: Any, setting: BenchSetting, *, config: KVCommConfig | None = None,
             store_factory: Callable[[], Any] | None = None, fingerprint: str | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Measure TTFT per policy and agent position.

    Args:
        config: the engine config of every run (None: the defaults); each policy runs with its
            ``policy`` and ``max_new_tokens=1``.
        store_factory: a fresh store per policy (None: the engine's default), cleared and
            closed after the policy's run.

    Returns:
        ``setting`` (the workload, gamma and anchor_cache_bytes), ``rows`` (one per policy and
        agent position, see :data:`TTFT_COLUMNS`), ``cuda_graph`` and ``anchor_stack_hits_misses``
        (per policy).
    """
    from tqdm.auto import tqdm

    from kvcomm.engine import KVCommEngine
    from kvcomm.models import model_fingerprint
    from kvcomm.template import Template

    base = config or KVCommConfig()
    rng = random.Random(0)
    fp = fingerprint or model_fingerprint(model)
    names = [f"agent{i + 1}" for i in range(setting.agents)]
    templates = []
    for i, name in enumerate(names):
        system = make_text(tokenizer, setting.prefix_len, rng)
        user = "Input: {question}\n" + "".join(f"{prev} said: {{agent:{prev}}}\n" for prev in names[:i]) + "Respond."
        templates.append((name, Template.from_system_user(system, user)))
    total = setting.warmup + setting.requests
    questions = [make_text(tokenizer, setting.input_len, rng) for _ in range(total)]
    answers = [[make_text(tokenizer, setting.output_len, rng) for _ in names] for _ in range(total)]
    results: dict[str, list[Any]] = {}
    graphs: dict[str, bool | None] = {}  # was the one-token forward a CUDA graph replay?
    stacks: dict[str, tuple[int, int]] = {}  # anchor-stack cache (hits, misses)
    runs = {policy: base.replace(policy=policy, max_new_tokens=1) for policy in setting.policies}
    runs |= {text: base.replace(policy="kvcomm", max_new_tokens=1).variant(text) for text in setting.variants}
    bar = tqdm(total=len(runs) * total, desc="ttft", disable=not progress)
    for policy, run_config in runs.items():
        store = store_factory() if store_factory else None
        try:
            results[policy], graphs[policy], stacks[policy] = _run_policy(
                KVCommEngine(model, tokenizer, store=store, fingerprint=fp, config=run_config), policy, templates,
                questions, answers, setting.warmup, bar)
        finally:
            if store is not None:  # this run's own namespace: leave nothing behind in a shared Redis
                store.clear()
                store.close()
    bar.close()
    rows = []
    dense_p50 = {i: statistics.median(rec.ttft_ms for j, rec in results["dense"] if j == i)
                 for i in range(setting.agents)} if "dense" in results else {}
    for policy, timed in results.items():
        for i in range(setting.agents):
            recs = [rec for j, rec in timed if j == i]
            p50 = statistics.median(x.ttft_ms for x in recs)
            rows.append({
                "policy": policy,
                "agent": i + 1,
                "prompt_tokens": recs[0].prompt_tokens,
                "reuse_pct": 100.0 * sum(x.mode == "reuse" for x in recs) / len(recs),
                "reused_tokens": statistics.fmean(x.reused_tokens for x in recs),
                # what a reuse call's first-token forward costs: its recompute (fidelity) or a prefill
                "recomputed_tokens": statistics.fmean(x.recomputed_tokens for x in recs),
                "ttft_p50_ms": p50,
                "fetch_ms": statistics.fmean(x.fetch_ms for x in recs),
                "correct_ms": statistics.fmean(x.correct_ms for x in recs),
                "stack_ms": statistics.fmean(x.stack_ms for x in recs),
                "weights_ms": statistics.fmean(x.weights_ms for x in recs),
                "apply_ms": statistics.fmean(x.apply_ms for x in recs),
                "first_token_ms": statistics.fmean(x.first_token_ms for x in recs),
                # None without a dense row in the run: a ratio needs both, measured side by side
                "speedup": dense_p50[i] / p50 if dense_p50 and p50 else None,
            })
    described = setting.__dict__ | {"policies": list(setting.policies), "variants": list(setting.variants),
                                    "gamma": base.gamma,
                                    "anchor_cache_bytes": base.anchor_cache_bytes}
    return {"setting": described, "rows": rows, "cuda_graph": graphs, "anchor_stack_hits_misses": stacks}


TTFT_COLUMNS = [
    ("policy", "policy", ""),
    ("agent", "agent", "d"),
    ("prompt_tokens", "prompt", "d"),
    ("reuse_pct", "reuse %", ".0f"),
    ("reused_tokens", "reused tok", ".0f"),
    ("recomputed_tokens", "recomp tok", ".0f"),
    ("ttft_p50_ms", "TTFT p50 ms", ".2f"),
    ("fetch_ms", "fetch ms", ".2f"),
    ("correct_ms", "shift+corr ms", ".2f"),
    ("stack_ms", "stack ms", ".2f"),
    ("weights_ms", "weights ms", ".2f"),
    ("apply_ms", "apply ms", ".2f"),
    ("first_token_ms", "1st tok ms", ".2f"),
    ("speedup", "dense/policy", ".2f"),
]




def _run_policy(eng: Any, policy: str, templates: list[tuple[str, Any]], questions: list[str],
                answers: list[list[str]], warmup: int, bar: Any) -> tuple[list[Any], bool | None, tuple[int, int]]:
    """One policy's requests through ``eng``: its timed ``(agent index, record)`` pairs, whether
    its one-token forward was a CUDA graph replay, and its anchor-stack cache (hits, misses).
    ``bar``: the run's progress bar (a request per step; the last request's modes written to it
    unless it is disabled)."""
    names = [name for name, _ in templates]
    for name, tmpl in templates:
        eng.register_agent(name, tmpl)
    timed = []
    for r in range(len(questions)):
        eng.reset_answers()
        for i, name in enumerate(names):
            res = eng.generate(name, {"question": questions[r]}, max_new_tokens=1, publish_answer=False,
                               request_id=str(r))
            eng.latest[f"agent:{name}"] = eng.publish(f"agent:{name}", answers[r][i])
            if r >= warmup:
                timed.append((i, res.record))
            if not bar.disable and r == len(questions) - 1:
                bar.write(f"{policy} {name}: {res.mode} {res.record.slots}")
        bar.update(1)
    buffer = eng.fast.buffer  # the static KV buffer: None where no call took the reuse path
    return timed, None if buffer is None else (buffer.graph is not None), \
        (eng.fast.anchor_stacks.hits, eng.fast.anchor_stacks.misses)


def load_bench_model(*, model: str | None = None, model_shape: str | None = None, layers: int | None = None,
                     device: str = "auto", dtype: str | None = None) -> tuple[Any, Any, str, torch.device, torch.dtype]:
    """The model under test: a real one by name or path, or a shape from :data:`MODEL_SHAPES`.

    Returns:
        ``(model, tokenizer, label, device, dtype)``; ``dtype`` None is bfloat16 on CUDA, else
        float32. A shaped model gets a :class:`SyntheticTokenizer`.
    """
    from kvcomm.models import load_model, resolve_device, resolve_dtype

    if model and model_shape:
        raise ValueError("give a model or a model shape, not both")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype or ("bfloat16" if dev.type == "cuda" else "float32"))
    if model_shape:
        net = build_shaped_model(model_shape, device=str(dev), dtype=dt, layers=layers)
        return net, SyntheticTokenizer(net.config.vocab_size), f"{model_shape} (random weights)", dev, dt
    loaded = load_model(model or "smollm2-135m", dtype=dt, device=dev, progress=False)
    return loaded.model, loaded.tokenizer, loaded.name, dev, dt


#: config fields the harness sets per run, left out of the config it reports
_PER_RUN_FIELDS = ("policy", "max_new_tokens")


def fresh_store_factory(urls: tuple[str, ...] | list[str], prefix: str) -> Callable[[], Any]:
    """A factory of stores of these URLs (one tiered store when several, fastest first), each in
    a namespace of its own (``<prefix>-<random>``), so runs never read each other's entries."""
    import uuid

    from kvcomm.store import from_url

    def factory() -> Any:
        return from_url(*urls, namespace=f"{prefix}-{uuid.uuid4().hex[:8]}")

    return factory


def describe_store(urls: tuple[str, ...] | list[str]) -> str:
    """The store of a bench run, for its header: the URLs (passwords redacted), or the default."""
    if not urls:
        return "store in-process memory (the model's device)"
    from kvcomm.store import redact

    return "store " + " -> ".join(redact(url) for url in urls) + " (a fresh namespace per policy)"


def run_benchmark(setting: BenchSetting, config: KVCommConfig, *, model: str | None = None,
                  model_shape: str | None = None, layers: int | None = None, device: str = "auto",
                  dtype: str | None = None, threads: int | None = None, progress: bool = True,
                  store_urls: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load the model (:func:`load_bench_model`) and run :func:`run_ttft`, one fresh store per policy.

    Args:
        threads: CPU threads for torch (None: torch's default).
        store_urls: the store every policy's entries go through (several: tiers, fastest first),
            each policy in a namespace of its own; empty: an in-process memory store on the
            model's device.

    Returns:
        :func:`run_ttft`'s result plus ``device``, ``model``, ``dtype``, ``store`` (its header
        line) and ``config`` (the engine config used, without the fields set per run).
    """
    import torch

    from kvcomm.fastpath.cpu import cpu_description

    if threads:
        torch.set_num_threads(threads)
    net, tokenizer, label, dev, dt = load_bench_model(model=model, model_shape=model_shape, layers=layers,
                                                      device=device, dtype=dtype)

    def memory_store() -> Any:
        from kvcomm.store import MemoryStore

        return MemoryStore(device=dev, max_bytes=64 << 30)

    store_factory = fresh_store_factory(store_urls, "bench") if store_urls else memory_store
    out = run_ttft(net, tokenizer, setting, config=config, store_factory=store_factory, progress=progress)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_description()
    out["device"], out["model"], out["dtype"] = name, label, str(dt)
    out["store"] = describe_store(store_urls)
    out["config"] = {k: v for k, v in config.to_dict().items() if k not in _PER_RUN_FIELDS}
    return out


def describe_config(config: dict[str, Any] | KVCommConfig) -> str:
    """The engine config of a run in one line: the fields that differ from the engine's defaults."""
    given = config.to_dict() if isinstance(config, KVCommConfig) else config
    defaults = KVCommConfig().to_dict()
    changed = [f"{k}={v}" for k, v in given.items() if k not in _PER_RUN_FIELDS and v != defaults[k]]
    return "engine config: " + (", ".join(changed) + "; the other fields at their defaults" if changed
                                else "the defaults") + " (set them with KVCOMM_* variables, see `kvcomm config`)"


def render(out: dict[str, Any]) -> str:
    """The printed report of :func:`run_benchmark`: a blank line, the setting, the config, the table
    and the last agent's TTFT per policy."""
    from kvcomm.metrics import format_table

    s = out["setting"]
    agents = s["agents"]
    lines = [
        "",
        f"model {out['model']} | {out['dtype']} | device {out['device']} | {agents} agents, prefix {s['prefix_len']}, "
        f"input {s['input_len']}, outputs {s['output_len']} tokens | {s['requests']} timed requests | "
        f"gamma {s['gamma']}",
        *([out["store"]] if "store" in out else []),
        describe_config(out["config"]),
        format_table(out["rows"], TTFT_COLUMNS),
        f"one-token forward as a CUDA graph replay: {out['cuda_graph']}",
        f"anchor stack cache (hits, misses): {out['anchor_stack_hits_misses']}",
    ]
    for r in (r for r in out["rows"] if r["agent"] == agents):
        lines.append(f"agent {agents}: {r['policy']:>7}  TTFT p50 {r['ttft_p50_ms']:8.2f} ms"
                     + (f"   dense/policy {r['speedup']:.2f}x" if r["speedup"] is not None
                        else "   (no dense row in this run: add dense to --policies for the ratio)"))
    return "\n".join(lines)


def write_json(out: dict[str, Any], path: str | Path) -> None:
    """:func:`run_benchmark`'s result as JSON."""
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
