"""KV blocks and the few model calls the engine makes (prefill, one-token forward, decode).

A block is stacked over layers: ``k``, ``v`` each ``[L, H_kv, T, D]`` (batch 1 squeezed).
Every forward over a cache goes through :func:`forward_over`, which names the cache as the
installed transformers does.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache

from kvcomm.errors import DependencyError

#: The oldest transformers kvcomm's whole test suite has run on (pyproject.toml's floor). Before 5.4 a
#: static cache layer had no ``cumulative_length`` (the fast path's write position) and wrote after
#: the slots that hold anything: over a buffer left by a longer call, a step wrote past its position
#: and returned other logits, no error. On 5.4 and 5.5 the packaged SmolLM2 GGUF loads wrong (5.4: its
#: tokenizer as a CodeLlama one) and the real model answers otherwise.
MIN_TRANSFORMERS = "5.6"


@dataclass
class KVBlock:
    k: torch.Tensor  # [L, H, T, D], keys post-RoPE
    v: torch.Tensor  # [L, H, T, D]

    @property
    def length(self) -> int:
        return int(self.k.shape[2])

    def slice(self, start: int, end: int) -> KVBlock:
        return KVBlock(self.k[:, :, start:end], self.v[:, :, start:end])

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


def block_from_cache(cache: Any, start: int = 0, end: int | None = None) -> KVBlock:
    """Copy tokens [start, end) of every layer out of a HF cache."""
    ks = [layer.keys[0, :, start:end] for layer in cache.layers]
    vs = [layer.values[0, :, start:end] for layer in cache.layers]
    return KVBlock(torch.stack(ks), torch.stack(vs))


def cache_from_block(block: KVBlock, config: Any) -> DynamicCache:
    """A DynamicCache holding ``block`` (it copies the tensors)."""
    data = [(block.k[i].unsqueeze(0), block.v[i].unsqueeze(0)) for i in range(block.k.shape[0])]
    return DynamicCache(ddp_cache_data=data, config=config)


def check_transformers(installed: str | None = None) -> None:
    """Raise :class:`DependencyError` where the installed transformers (or ``installed``) is older
    than :data:`MIN_TRANSFORMERS`."""
    found = installed or transformers.__version__
    if Version(found) < Version(MIN_TRANSFORMERS):
        raise DependencyError(f"kvcomm needs transformers>={MIN_TRANSFORMERS}, found {found}: "
                              f"pip install -U 'transformers>={MIN_TRANSFORMERS}'")


@functools.cache
def _cache_argument(model_class: Any) -> str:
    """What a model class's forward calls its KV cache: ``cache`` from transformers 5.24 on,
    ``past_key_values`` before (5.24 still takes the old name, with a warning)."""
    params = inspect.signature(model_class.forward).parameters
    return "past_key_values" if "past_key_values" in params and "cache" not in params else "cache"


def forward_over(model: Any, cache: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """``model(**kwargs)`` over ``cache`` (grown in place); returns (logits, the output's cache)."""
    out = model(**{_cache_argument(model.__class__): cache}, **kwargs)
    returned = getattr(out, "cache", None)
    return out.logits, out.past_key_values if returned is None else returned


def next_token_margin(logits: torch.Tensor) -> float:
    """How decisive a next-token distribution is: the top token's log-probability minus the
    runner-up's (nats). Near 0, a small change to the KV can swap the two."""
    top = logits.float().log_softmax(-1).topk(2).values
    return float(top[0] - top[1])


def sync_device(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA runs asynchronously: a timer read without this
    would time the launches, not the work); nothing elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def prefill(model: Any, ids: list[int], *, start: int = 0, cache: Any = None) -> tuple[torch.Tensor, Any]:
    """Run ``ids`` at positions start.. over ``cache``; returns (last logits [V], cache)."""
    dev = model.device
    input_ids = torch.tensor([ids], device=dev)
    pos = torch.arange(start, start + len(ids), device=dev).unsqueeze(0)
    if cache is None:
        cache = DynamicCache(config=model.config)
    logits, cache = forward_over(model, cache, input_ids=input_ids, position_ids=pos, use_cache=True,
                                 logits_to_keep=1)
    return logits[0, -1].float(), cache


@torch.inference_mode()
def greedy_decode(
    model: Any,
    cache: Any,
    first_logits: torch.Tensor,
    start_pos: int,
    max_new_tokens: int,
    eos_ids: set[int],
    *,
    forced: list[int] | None = None,
    step: Callable[[int, int], torch.Tensor] | None = None,
    many: Callable[[list[int], int], torch.Tensor] | None = None,
    on_token: Callable[[int], bool | None] | None = None,
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding from the first token's logits.

    Returns the generated ids (EOS included if produced) and each step's logits. With
    ``forced`` the given tokens are fed instead of the argmax (teacher forcing), so logits of
    two caches can be compared token by token; all forced tokens but the last run as one forward
    (each sees the ones before it, as in a step-by-step decode). ``step(token, position) -> logits``
    and ``many(tokens, position) -> logits [n, V]`` replace the plain forwards over ``cache`` (the
    static fast path). ``on_token(token)`` sees each token as it is decoded (not forced ones);
    True from it ends the decode after that token (a stop sequence, a closed stream).
    """
    dev = model.device
    if forced is not None:
        return _forced_decode(model, cache, first_logits, start_pos, forced[:max_new_tokens], many)
    ids: list[int] = []
    logits = [first_logits]
    nxt = int(first_logits.argmax())  # host sync: the token decides whether we stop
    steps = max_new_tokens if forced is None else min(max_new_tokens, len(forced))
    for i in range(steps):
        tok = forced[i] if forced is not None else nxt
        ids.append(tok)
        stop = on_token is not None and bool(on_token(tok))
        if stop or (forced is None and tok in eos_ids) or i == steps - 1:
            break
        if step is not None:
            last = step(tok, start_pos + i)
        else:
            step_logits, _ = forward_over(model, cache, input_ids=torch.tensor([[tok]], device=dev),
                                          position_ids=torch.tensor([[start_pos + i]], device=dev), use_cache=True)
            last = step_logits[0, -1].float()
        logits.append(last)
        nxt = int(last.argmax())
    return ids, logits


def _forced_decode(model: Any, cache: Any, first_logits: torch.Tensor, start_pos: int, forced: list[int],
                   many: Callable[[list[int], int], torch.Tensor] | None) -> tuple[list[int], list[torch.Tensor]]:
    """Teacher forcing in one forward: the logits after each of ``forced[:-1]``."""
    ids = list(forced)
    if len(ids) < 2:
        return ids, [first_logits]
    feed = ids[:-1]
    if many is not None:
        rest = many(feed, start_pos)
    else:
        dev = model.device
        logits, _ = forward_over(model, cache, input_ids=torch.tensor([feed], device=dev),
                                 position_ids=torch.arange(start_pos, start_pos + len(feed), device=dev).unsqueeze(0),
                                 use_cache=True)
        rest = logits[0].float()
    return ids, [first_logits, *rest.unbind(0)]
