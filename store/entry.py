"""KVEntry: what a store holds under one key (named tensors, small metadata, model fingerprint)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class KVEntry:
    """Named tensors plus msgpack-able metadata, tagged with the model that produced them.

    Attributes:
        tensors: name -> tensor, e.g. ``{"k": [L, H_kv, T, D], "v": [L, H_kv, T, D], "ids": [T]}``.
            The ``int8`` codec quantizes float tensors whose name's last dot-component is ``k``
            (per-channel scales) or ``v`` (per-token scales); every other tensor is stored raw.
        meta: small msgpack-able values (str, int, float, bool, None, lists and str-keyed dicts
            of those). Tuples come back as lists.
        fingerprint: the model fingerprint the KV is valid for; ``""`` means model independent.

    Tensors returned by a store's ``get`` may be shared with the store's memory tier: treat them
    as read-only (write into a copy or a preallocated ``out`` buffer).
    """

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors (the unit of every store's byte budget)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to(self, device: str | torch.device) -> KVEntry:
        """A copy whose tensors live on ``device`` (tensors already there are cloned)."""
        device = torch.device(device)
        tensors = {}
        for name, t in self.tensors.items():
            moved = t.detach().to(device)
            tensors[name] = moved.clone(memory_format=torch.contiguous_format) if moved.data_ptr() == t.data_ptr() else moved.contiguous()
        return KVEntry(tensors=tensors, meta=dict(self.meta), fingerprint=self.fingerprint)
