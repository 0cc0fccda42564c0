"""TTFT benchmark in the paper's setting: agents in a chain, each reading the user input and
every upstream answer behind its own long system prompt.

Every policy runs the same requests through the same harness in one process; the first
``warmup`` requests (anchors being created, CUDA graphs being captured) are not timed. Upstream
answers are synthetic texts of ``output_len`` tokens published as each agent's answer, so the
benchmark measures prompt handling, not decoding. ``--model-shape`` builds a real architecture
(Llama-3.1-8B, Qwen2.5-7B) with random weights on the device: TTFT does not depend on weight
values, and no download is needed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import statistics
from dataclasses import dataclass
from typing import Any

import torch

from kvcomm.config import KVCommConfig

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


@dataclass
class BenchSetting:
    agents: int = 5
    prefix_len: int = 512
    input_len: int = 1024
    output_len: int = 512
    warmup: int = 3
    requests: int = 3
    policies: tuple[str, ...] = ("dense", "prefix", "naive", "kvcomm")
    gamma: float = 0.3
    anchor_cache_bytes: int = 16 << 30  # keep every slot's anchor stacks across requests


def run_ttft(model: Any, tokenizer: Any, setting: BenchSetting, *, store_factory: Any = None,
             fingerprint: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Measure TTFT per policy and agent position; returns rows and the raw records."""
    from tqdm.auto import tqdm

    from kvcomm.engine import KVCommEngine
    from kvcomm.models import model_fingerprint
    from kvcomm.template import Template

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
    bar = tqdm(total=len(setting.policies) * total, desc="ttft", disable=not progress)
    for policy in setting.policies:
        store = store_factory() if store_factory else None
        eng = KVCommEngine(model, tokenizer, store=store, fingerprint=fp,
                           config=KVCommConfig.from_env(policy=policy, max_new_tokens=1, gamma=setting.gamma,
                                                        anchor_cache_bytes=setting.anchor_cache_bytes))
        for name, tmpl in templates:
            eng.register_agent(name, tmpl)
        timed = []
        for r in range(total):
            eng.reset_answers()
            for i, name in enumerate(names):
                res = eng.generate(name, {"question": questions[r]}, max_new_tokens=1, publish_answer=False,
                                   request_id=str(r))
                eng.latest[f"agent:{name}"] = eng.publish(f"agent:{name}", answers[r][i])
                if r >= setting.warmup:
                    timed.append((i, res.record))
                if progress and r == total - 1:
                    bar.write(f"{policy} {name}: {res.mode} {res.record.slots}")
            bar.update(1)
        results[policy] = timed
        static = getattr(eng, "_static", None)
        graphs[policy] = None if static is None else (static.graph is not None)
        stacks[policy] = (eng.anchor_stacks.hits, eng.anchor_stacks.misses)
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
                "ttft_p50_ms": p50,
                "fetch_ms": statistics.fmean(x.fetch_ms for x in recs),
                "correct_ms": statistics.fmean(x.correct_ms for x in recs),
                "first_token_ms": statistics.fmean(x.first_token_ms for x in recs),
                "speedup": dense_p50[i] / p50 if dense_p50 and p50 else 0.0,
            })
    return {"setting": setting.__dict__ | {"policies": list(setting.policies)}, "rows": rows, "cuda_graph": graphs,
            "anchor_stack_hits_misses": stacks}


TTFT_COLUMNS = [
    ("policy", "policy", ""),
    ("agent", "agent", "d"),
    ("prompt_tokens", "prompt", "d"),
    ("reuse_pct", "reuse %", ".0f"),
    ("reused_tokens", "reused tok", ".0f"),
    ("ttft_p50_ms", "TTFT p50 ms", ".2f"),
    ("fetch_ms", "fetch ms", ".2f"),
    ("correct_ms", "shift+corr ms", ".2f"),
    ("first_token_ms", "1st tok ms", ".2f"),
    ("speedup", "dense/policy", ".2f"),
]


_USAGE = """TTFT per agent position, dense vs prefix vs naive vs kvcomm, measured in one run.

    kvcomm bench --model smollm2-135m --prefix-len 128 --input-len 256 --output-len 128
    kvcomm bench --model-shape llama-3.1-8b --device cuda --dtype bfloat16 --json out.json
"""


def main(argv: list[str] | None = None) -> int:
    from kvcomm.metrics import format_table
    from kvcomm.models import load_model, resolve_device, resolve_dtype

    ap = argparse.ArgumentParser(prog="kvcomm bench", description=_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="model name or path (default smollm2-135m)")
    src.add_argument("--model-shape", choices=sorted(MODEL_SHAPES), help="real architecture, random weights")
    ap.add_argument("--layers", type=int, default=None, help="override the shape's layer count (quick runs)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--agents", type=int, default=5)
    ap.add_argument("--prefix-len", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--policies", default="dense,prefix,naive,kvcomm")
    ap.add_argument("--gamma", type=float, default=1.0,
                    help="kvcomm entropy threshold (default %(default)s: the texts are random words, unrelated "
                         "to each other, so at the engine's 0.3 the entropy test admits most of them as new "
                         "anchors and calls go dense by chance; this benchmark measures each path's speed, "
                         "`kvcomm eval` the policies' fidelity on real text)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.model_shape:
        model = build_shaped_model(args.model_shape, device=str(device), dtype=dtype, layers=args.layers)
        tokenizer = SyntheticTokenizer(model.config.vocab_size)
        label = f"{args.model_shape} (random weights)"
    else:
        loaded = load_model(args.model or "smollm2-135m", dtype=dtype, device=device, progress=False)
        model, tokenizer, label = loaded.model, loaded.tokenizer, loaded.name
    setting = BenchSetting(agents=args.agents, prefix_len=args.prefix_len, input_len=args.input_len,
                           output_len=args.output_len, warmup=args.warmup, requests=args.requests,
                           policies=tuple(args.policies.split(",")),
                           gamma=args.gamma)

    def store_factory():
        from kvcomm.store import MemoryStore

        return MemoryStore(device=device, max_bytes=64 << 30)

    out = run_ttft(model, tokenizer, setting, store_factory=store_factory)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nmodel {label} | {dtype} | device {name} | {args.agents} agents, prefix {args.prefix_len}, "
          f"input {args.input_len}, outputs {args.output_len} tokens | {args.requests} timed requests | "
          f"gamma {setting.gamma}")
    print(format_table(out["rows"], TTFT_COLUMNS))
    print("one-token forward as a CUDA graph replay:", out["cuda_graph"])
    print("anchor stack cache (hits, misses):", out["anchor_stack_hits_misses"])
    last = [r for r in out["rows"] if r["agent"] == args.agents]
    for r in last:
        print(f"agent {args.agents}: {r['policy']:>7}  TTFT p50 {r['ttft_p50_ms']:8.2f} ms   dense/policy {r['speedup']:.2f}x")
    if args.json_path:
        out["device"], out["model"], out["dtype"] = name, label, str(dtype)
        with open(args.json_path, "w") as f:
            json.dump(out, f, indent=1)
    return 0
