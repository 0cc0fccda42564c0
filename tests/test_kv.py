"""kvcomm.kv: teacher-forced decoding in one forward equals decoding token by token."""

from __future__ import annotations

import torch

from kvcomm.fastpath.static_cache import StaticPromptCache
from kvcomm.kv import block_from_cache, greedy_decode, prefill
from kvcomm.models import tiny_random_model

PROMPT = [5, 17, 33, 2, 9, 41, 7]
FORCED = [11, 3, 250, 8, 8, 19]


def _stepwise(model, cache, first, start):
    logits = [first]
    for i, tok in enumerate(FORCED[:-1]):
        logits.append(prefill(model, [tok], start=start + i, cache=cache)[0])
    return logits


def test_forced_decode_in_one_forward_matches_steps() -> None:
    model = tiny_random_model("llama", seed=3)
    first, cache = prefill(model, PROMPT)
    ids, got = greedy_decode(model, cache, first, len(PROMPT), 16, set(), forced=FORCED)
    assert ids == FORCED and len(got) == len(FORCED)
    _, ref_cache = prefill(model, PROMPT)
    want = _stepwise(model, ref_cache, first, len(PROMPT))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    # the cache holds the same KV as after stepwise decoding
    n = len(PROMPT) + len(FORCED) - 1
    torch.testing.assert_close(block_from_cache(cache, 0, n).k, block_from_cache(ref_cache, 0, n).k, atol=1e-5, rtol=1e-5)


def test_static_cache_forward_many_matches_steps() -> None:
    model = tiny_random_model("llama", seed=4)
    first, cache = prefill(model, PROMPT[:-1])
    ref = StaticPromptCache(model, 64, use_graph=False, decode_kernel=False)
    got = StaticPromptCache(model, 64, use_graph=False, decode_kernel=False)
    for buf in (ref, got):
        block = block_from_cache(cache)
        buf.prompt_views(len(PROMPT) - 1).k.copy_(block.k)
        buf.prompt_views(len(PROMPT) - 1).v.copy_(block.v)
        buf.begin(len(PROMPT) - 1)
    start = len(PROMPT) - 1
    want = [ref.step(tok, start + i) for i, tok in enumerate([PROMPT[-1], *FORCED[:-1]])]
    out = got.forward_many([PROMPT[-1], *FORCED[:-1]], start)
    torch.testing.assert_close(out, torch.stack(want), atol=1e-4, rtol=1e-4)
    assert got.get_seq_length() == ref.get_seq_length() == start + len(FORCED)
    torch.testing.assert_close(got.k[:, 0, :, : start + len(FORCED)], ref.k[:, 0, :, : start + len(FORCED)],
                               atol=1e-5, rtol=1e-5)
