"""The static-buffer fast path gives the eager path's first token and cache (CPU)."""

from __future__ import annotations

import pytest
import torch

from kvcomm import KVCommConfig, KVCommEngine, Template
from kvcomm.fastpath import StaticPromptCache
from kvcomm.models import tiny_random_model
from kvcomm.store import MemoryStore

AGENTS = [
    ("a", Template.from_system_user("You are agent A.", "Q: {question}\nAnswer:")),
    ("b", Template.from_system_user("You are agent B.", "Q: {question}\nA said: {agent:a}\nAnswer:")),
]
QUESTIONS = ["What is two plus two, and why?", "Name a colour of the sky at noon.", "Is seven a prime number?",
             "What is the boiling point of water at sea level?"]


def _run(loaded, fast: bool, policy: str):
    eng = KVCommEngine(loaded.model, loaded.tokenizer, store=MemoryStore(), fingerprint=loaded.fingerprint,
                       config=KVCommConfig(policy=policy, fast_path=fast, max_new_tokens=6))
    for name, tmpl in AGENTS:
        eng.register_agent(name, tmpl)
    out = []
    for q in QUESTIONS:
        eng.reset_answers()
        for name, _ in AGENTS:
            out.append(eng.generate(name, {"question": q}, return_cache=True, return_logits=True))
    return out


@pytest.mark.parametrize("policy", ["naive", "kvcomm"])
def test_fast_path_equals_eager_path(smollm2, policy):
    eager, fast = _run(smollm2, False, policy), _run(smollm2, True, policy)
    reused = 0
    for e, f in zip(eager, fast, strict=True):
        assert e.mode == f.mode
        assert e.token_ids == f.token_ids
        assert torch.allclose(e.logits[0], f.logits[0], atol=1e-4, rtol=1e-4)
        assert torch.allclose(e.cache.k, f.cache.k, atol=1e-5) and torch.allclose(e.cache.v, f.cache.v, atol=1e-5)
        reused += f.mode == "reuse"
    assert reused > 0  # the fast path was exercised


def test_static_cache_steps_match_dynamic_forward():
    model = tiny_random_model("llama")
    ids = torch.randint(0, 256, (1, 12))
    ref = model(input_ids=ids).logits[0].float()
    buf = StaticPromptCache(model, 32)
    buf.begin(0)
    for i in range(12):
        got = buf.step(int(ids[0, i]), i)
        assert torch.allclose(got, ref[i], atol=1e-5), i
    with pytest.raises(ValueError, match="position"):
        buf.step(1, 3)
