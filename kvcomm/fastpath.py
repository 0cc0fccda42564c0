"""The fast first-token path: one preallocated KV buffer and a captured one-token forward.

The reuse path writes the moved and corrected KV straight into ``StaticPromptCache``'s buffer
(no concatenation, no copy into a cache object), and every one-token forward (the first token,
then each decode step) runs over that buffer with a fixed-shape 4D mask. Shapes never change,
so on CUDA the forward is captured once as a CUDA graph and replayed: an eager HF forward of a
large model is bound by kernel launches (tens of ms), a replay is not. On CPU it runs eagerly.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import StaticCache

from kvcomm.kv import KVBlock

logger = logging.getLogger(__name__)


class StaticPromptCache:
    """KV buffers ``[L, 1, H, S, D]`` shared with a transformers ``StaticCache``.

    Args:
        model: the HF causal LM.
        capacity: S, the most tokens (prompt + generated) it holds.
        use_graph: capture the one-token forward as a CUDA graph (CUDA only).
    """

    def __init__(self, model: Any, capacity: int, *, use_graph: bool | None = None) -> None:
        cfg = model.config
        L = cfg.num_hidden_layers
        H = cfg.num_key_value_heads
        D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dev, dtype = model.device, model.dtype
        self.model = model
        self.capacity = capacity
        self.k = torch.zeros(L, 1, H, capacity, D, dtype=dtype, device=dev)
        self.v = torch.zeros_like(self.k)
        self.cache = StaticCache(config=cfg, max_cache_len=capacity)
        for i, layer in enumerate(self.cache.layers):
            # hand the layer our buffers instead of letting it allocate its own
            layer.keys, layer.values = self.k[i], self.v[i]
            layer.device, layer.batch_size, layer.num_heads = dev, 1, H
            layer.k_head_dim = layer.v_head_dim = D
            layer.cumulative_length = torch.zeros((), dtype=torch.long, device=dev)
            layer.is_initialized = True
        self.min = torch.finfo(dtype).min
        self.mask = torch.full((1, 1, 1, capacity), self.min, dtype=dtype, device=dev)
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.use_graph = (dev.type == "cuda") if use_graph is None else use_graph
        self.graph: Any = None
        self.graph_failed = False
        self._logits: torch.Tensor | None = None

    @property
    def layers(self) -> list[Any]:  # duck-types the HF cache for kvcomm.kv.block_from_cache
        return self.cache.layers

    def prompt_views(self, n: int) -> KVBlock:
        """Strided views ``[L, H, n, D]`` of the first n slots, for the reuse path to write into."""
        return KVBlock(self.k[:, 0, :, :n], self.v[:, 0, :, :n])

    def get_seq_length(self) -> int:
        return self._length

    def begin(self, filled: int) -> None:
        """The first ``filled`` slots hold a prompt's KV; the next forward writes slot ``filled``."""
        self._length = filled
        self.mask.fill_(self.min)
        self.mask[..., :filled] = 0

    @torch.inference_mode()
    def step(self, token: int, position: int) -> torch.Tensor:
        """Forward one token at ``position`` (== the current length); returns its logits [V]."""
        if position != self._length or position >= self.capacity:
            raise ValueError(f"step at position {position}, cache holds {self._length} of {self.capacity}")
        self.ids.fill_(token)
        self.pos.fill_(position)
        self.mask[..., position] = 0
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(position)
        if self.use_graph and not self.graph_failed:
            if self.graph is None:
                self._capture()
            if self.graph is not None:
                self.graph.replay()
                self._length += 1
                assert self._logits is not None
                return self._logits[0, -1].float()
        logits = self._forward()
        self._length += 1
        return logits[0, -1].float()

    def _forward(self) -> torch.Tensor:
        out = self.model(input_ids=self.ids, position_ids=self.pos, attention_mask=self.mask,
                         cache=self.cache, use_cache=True)
        return out.logits

    def _capture(self) -> None:
        """Capture the one-token forward; on any failure fall back to eager, with a warning."""
        saved = [layer.cumulative_length.clone() for layer in self.cache.layers]
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: allocator and library handles outside the graph
                    self._reset_lengths(saved)
                    self._forward()
            torch.cuda.current_stream().wait_stream(stream)
            self._reset_lengths(saved)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._logits = self._forward()
            self.graph = graph
        except Exception as exc:  # capture is an optimisation: never fail the call for it
            logger.warning("CUDA graph capture failed, using eager one-token forwards: %s", exc)
            self.graph_failed = True
            self.graph = None
        self._reset_lengths(saved)

    def _reset_lengths(self, saved: list[torch.Tensor]) -> None:
        for layer, n in zip(self.cache.layers, saved, strict=True):
            layer.cumulative_length.copy_(n)
