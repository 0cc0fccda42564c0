"""kvcomm.kv: teacher-forced decoding in one forward equals decoding token by token; model calls
name the cache as the model's forward does; a transformers older than the floor is refused."""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import transformers

from kvcomm import DependencyError, KVCommEngine
from kvcomm.fastpath.static_cache import StaticPromptCache
from kvcomm.kv import (
    MIN_TRANSFORMERS,
    _cache_argument,
    block_from_cache,
    check_transformers,
    forward_over,
    greedy_decode,
    prefill,
)
from kvcomm.models import load_model, tiny_random_model

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


class _PastKeyValuesModel(torch.nn.Module):
    """A causal LM as transformers before 5.24 calls it: the cache goes in as ``past_key_values``
    and comes back as ``out.past_key_values`` (no ``cache`` anywhere)."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.seen: list[str] = []

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, past_key_values: Any = None, use_cache: bool = False,
                logits_to_keep: int = 0) -> SimpleNamespace:
        self.seen.append("past_key_values" if past_key_values is not None else "none")
        logits, cache = forward_over(self.inner, past_key_values, input_ids=input_ids, position_ids=position_ids,
                                     attention_mask=attention_mask, use_cache=use_cache, logits_to_keep=logits_to_keep)
        return SimpleNamespace(logits=logits, past_key_values=cache)


def test_the_cache_goes_by_the_name_the_forward_takes() -> None:
    model = tiny_random_model("llama", seed=5)
    # the installed transformers' name, whichever version it is
    assert _cache_argument(type(model)) in inspect.signature(type(model).forward).parameters
    old = _PastKeyValuesModel(model)
    assert _cache_argument(type(old)) == "past_key_values"
    first, cache = prefill(old, PROMPT)
    ref_first, ref_cache = prefill(model, PROMPT)
    assert old.seen == ["past_key_values"]  # the cache reached the forward, under its old name
    torch.testing.assert_close(first, ref_first)
    ids, got = greedy_decode(old, cache, first, len(PROMPT), 4, set())
    ref_ids, want = greedy_decode(model, ref_cache, ref_first, len(PROMPT), 4, set())
    assert ids == ref_ids and len(old.seen) == 1 + len(ids) - 1  # each decode step went over the same cache
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    n = len(PROMPT) + len(ids) - 1
    torch.testing.assert_close(block_from_cache(cache, 0, n).k, block_from_cache(ref_cache, 0, n).k)


@pytest.mark.parametrize("installed", ["4.57.6", "5.0.0", "5.5.4", "5.6.0rc1"])
def test_a_transformers_older_than_the_floor_is_named(installed: str) -> None:
    with pytest.raises(DependencyError, match=f"transformers>={MIN_TRANSFORMERS}, found {re.escape(installed)}"):
        check_transformers(installed)


@pytest.mark.parametrize("installed", [MIN_TRANSFORMERS, "5.6.0", "5.17.0", "5.25.0", "6.0.0.dev0"])
def test_transformers_at_or_above_the_floor_passes(installed: str) -> None:
    check_transformers(installed)


def test_the_engine_and_load_model_refuse_an_old_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_random_model("llama", seed=6)
    monkeypatch.setattr(transformers, "__version__", "5.5.4")
    with pytest.raises(DependencyError, match="found 5.5.4"):
        KVCommEngine(model, None)
    with pytest.raises(DependencyError, match="found 5.5.4"):
        load_model("smollm2-135m")  # refused before anything is read


def test_pyproject_states_the_same_floor() -> None:
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    floors = [dep for dep in project["dependencies"] if dep.startswith("transformers")]
    assert floors == [f"transformers>={MIN_TRANSFORMERS}"]
