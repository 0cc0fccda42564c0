"""Helpers shared by the store tests (imported as ``store_helpers``)."""

from __future__ import annotations

from typing import Any

import torch

from kvcomm.store import KVEntry


def kv_entry(layers: int = 2, heads: int = 2, tokens: int = 8, dim: int = 16, dtype: torch.dtype = torch.bfloat16,
             fingerprint: str = "model-a", **meta: Any) -> KVEntry:
    """A KV block shaped like the engine's: k, v [L, H, T, D] and the token ids."""
    shape = (layers, heads, tokens, dim)
    return KVEntry(
        tensors={
            "k": torch.randn(shape).to(dtype),
            "v": torch.randn(shape).to(dtype),
            "ids": torch.randint(0, 50_000, (tokens,)),
        },
        meta={"tokens": tokens, **meta},
        fingerprint=fingerprint,
    )


def assert_entries_equal(a: KVEntry, b: KVEntry) -> None:
    """Bit-exact equality of names, dtypes, shapes, bytes, meta and fingerprint."""
    assert list(a.tensors) == list(b.tensors)
    for name in a.tensors:
        x, y = a.tensors[name], b.tensors[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x.cpu().reshape(-1).view(torch.uint8), y.cpu().reshape(-1).view(torch.uint8)), name
    assert a.meta == b.meta
    assert a.fingerprint == b.fingerprint
