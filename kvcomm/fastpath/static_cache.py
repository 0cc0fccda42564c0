"""The fast first-token path: one preallocated KV buffer and a captured one-token forward.

The reuse path writes the moved and corrected KV straight into ``StaticPromptCache``'s buffer
(no concatenation, no copy into a cache object), and every one-token forward (the first token,
then each decode step) runs over that buffer with a fixed-shape 4D mask. Shapes never change,
so on CUDA the forward is captured once as a CUDA graph and replayed: an eager HF forward of a
large model is bound by kernel launches (tens of ms), a replay is not. On CPU it runs eagerly.

With ``decode_kernel`` on, those forwards run their attention through
:func:`kvcomm.kernels.decode_attention` (a split-K decode kernel that skips the buffer's empty
tail) instead of SDPA: the model's ``config._attn_implementation`` names a transformers attention
function (:mod:`kvcomm.fastpath.attention`) for the duration of each call. The captured graph
records whichever kernels ran during capture, so replays use it too.
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Iterator
from typing import Any

import torch
from transformers import StaticCache

from kvcomm.errors import KernelError
from kvcomm.fastpath.attention import (
    ATTN_IMPLEMENTATION,
    MANY_ATTN_IMPLEMENTATION,
    SDPA_IMPLEMENTATION,
    causal_chunks,
    chunk_overhead,
    chunked_rows,
    register_attention,
)
from kvcomm.fastpath.graphs import AssembleGraphs
from kvcomm.kernels.dispatch import use_triton
from kvcomm.kv import KVBlock, forward_over

logger = logging.getLogger(__name__)


def _scattered_update(owner: StaticPromptCache, original: Any) -> Any:
    """A cache layer's ``update`` that writes at ``owner._positions`` when they are set (a selective
    recompute's scattered tokens), else the layer's ``original`` one (contiguous after the length)."""

    def update(layer: Any, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        positions = owner._positions
        if positions is None:
            keys, values = original(layer, key_states, value_states, *args, **kwargs)
        else:
            layer.keys.index_copy_(2, positions, key_states)
            layer.values.index_copy_(2, positions, value_states)
            keys, values = layer.keys, layer.values
        # attention reads the filled slots only, not the buffer's empty tail (the mask hides it):
        # an eager forward's (a captured graph's shapes stay the buffer's)
        visible = owner._visible
        if visible < keys.shape[2]:
            return keys[:, :, :visible], values[:, :, :visible]
        return keys, values

    return update


def _configs(cfg: Any) -> list[Any]:
    """``cfg`` and its sub-configs (text_config, ...), parents first."""
    out = [cfg]
    for name in getattr(cfg, "sub_configs", None) or {}:
        sub = getattr(cfg, name, None)
        if sub is not None:
            out.extend(_configs(sub))
    return out


class StaticPromptCache:
    """KV buffers ``[L, 1, H, S, D]`` shared with a transformers ``StaticCache``.

    Args:
        model: the HF causal LM.
        capacity: S, the most tokens (prompt + generated) it holds.
        use_graph: capture the one-token forward as a CUDA graph (CUDA only).
        correction_graphs: with ``use_graph``, how many prompt layouts the reuse path's
            shift+correction keeps captured (:class:`kvcomm.fastpath.graphs.AssembleGraphs`, used through
            ``self.correction``); 0: none. ``correction_backend="eager"`` keeps that bookkeeping
            without CUDA graphs, on any device (how the tests check it on CPU).
        decode_kernel: run the one-token forwards' attention through the Triton decode kernel
            (default: when the buffers are on CUDA and Triton imports, as the kernels' "auto"
            backend decides; ``kvcomm.kernels.set_backend("torch")`` turns it off). Where the
            kernel does not apply at call time the attention is SDPA's.
    """

    def __init__(
        self, model: Any, capacity: int, *, use_graph: bool | None = None, decode_kernel: bool | None = None,
        correction_graphs: int = 8, correction_backend: str | None = None,
    ) -> None:
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
            layer.update = types.MethodType(_scattered_update(self, type(layer).update), layer)
        self._positions: torch.Tensor | None = None  # where a selective recompute writes (see recompute)
        # the slots an eager forward's attention reads (a prefix of the buffer, the rest masked):
        # the capacity for a captured graph, the filled ones for an eager step or recompute
        self._visible = capacity
        self.min = torch.finfo(dtype).min
        self.mask = torch.full((1, 1, 1, capacity), self.min, dtype=dtype, device=dev)
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.use_graph = (dev.type == "cuda") if use_graph is None else use_graph
        self.graph: Any = None
        # the correction writes into self.k/self.v: its graphs live and die with these buffers
        backend = correction_backend or ("cuda" if self.use_graph else None)
        self.correction = AssembleGraphs(correction_graphs, backend=backend) if backend and correction_graphs else None
        self.graph_failed = False
        self._logits: torch.Tensor | None = None
        if decode_kernel is None:
            try:
                decode_kernel = use_triton(None, self.k)
            except KernelError:  # "triton" forced where it cannot run: the attention stays SDPA's
                decode_kernel = False
        self.decode_kernel = bool(decode_kernel)
        if self.decode_kernel:
            register_attention()

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
        # eager: the attention reads the filled slots only (over a 3.6K-token prompt in a 6K buffer,
        # SDPA spent two thirds as long again on the empty tail's masked slots)
        self._visible = position + 1
        try:
            logits = self._forward()
        except Exception as exc:
            if not self.decode_kernel:
                raise
            # the kernel is an optimisation: one that fails (e.g. does not compile on this GPU)
            # must not fail the call. Retry with SDPA; if that fails too the error is not the
            # kernel's (a bad token id...) and is raised as is. The retry rewrites the failed
            # forward's KV at `position` with the same values.
            self.decode_kernel = False
            try:
                logits = self._forward()
            except Exception:
                self.decode_kernel = True
                raise
            logger.warning("decode-attention kernel failed, using SDPA for one-token forwards: %s", exc)
            self.graph, self.graph_failed = None, False  # captured again, without the kernel
        finally:
            self._visible = self.capacity
        self._length += 1
        return logits[0, -1].float()

    @torch.inference_mode()
    def recompute(self, ids: list[int], selected: torch.Tensor) -> torch.Tensor:
        """Recompute the prompt tokens at ``selected`` (sorted positions < P-1) and the last one
        over the buffer holding the reused KV of ids[:-1]; returns the last token's logits.

        Each recomputed token sees every position up to its own: the reused KV of the others and
        the new KV of the recomputed ones before it, which is written over the reused KV at its
        own position (the buffer stays in prompt order, so decoding and the answer's KV carry on
        as after :meth:`step`). One eager forward of the selected tokens.
        """
        P = len(ids)
        dev = self.k.device
        positions = torch.cat([selected.to(device=dev, dtype=torch.long), torch.tensor([P - 1], device=dev)])
        q = int(positions.numel())
        if P > self.capacity:
            raise ValueError(f"a prompt of {P} tokens in a cache of {self.capacity}")
        # the attention reads the prompt's P slots only (the cache layers hand back views of them)
        visible = torch.arange(P, device=dev).unsqueeze(0) <= positions.unsqueeze(1)  # [q, P]
        mask = torch.zeros(1, 1, q, P, dtype=self.mask.dtype, device=dev)
        mask[0, 0].masked_fill_(~visible, self.min)
        tokens = torch.tensor([ids], device=dev)[:, positions]
        self._positions, self._visible = positions, P
        # on the CPU the attention reads the grouped K/V heads in place (many_query_attention), in
        # row chunks that read only the keys their tokens can see (causal_chunks)
        name = MANY_ATTN_IMPLEMENTATION if dev.type == "cpu" else None
        rows = positions.tolist() if name else None  # (on the CPU: no device sync)
        chunks = causal_chunks(rows, overhead=chunk_overhead(self.k.dtype, P)) if rows is not None else None
        try:
            with self._attention(name), chunked_rows(chunks, rows):
                logits, _ = forward_over(self.model, self.cache, input_ids=tokens, position_ids=positions.unsqueeze(0),
                                         attention_mask=mask, use_cache=True, logits_to_keep=1)
        finally:
            self._positions, self._visible = None, self.capacity
        self.begin(P)
        return logits[0, -1].float()

    @torch.inference_mode()
    def forward_many(self, tokens: list[int], position: int) -> torch.Tensor:
        """Forward several known tokens at once from ``position`` (== the current length), each
        seeing the cache and the tokens before it; returns their logits ``[len(tokens), V]``.

        Teacher forcing knows every token in advance, so its decode is one forward, not one per
        token. Eager always (the captured graph is for one token); on the CPU its attention is
        :func:`kvcomm.fastpath.attention.many_query_attention`'s, elsewhere SDPA's.
        """
        q = len(tokens)
        if position != self._length or position + q > self.capacity:
            raise ValueError(f"forward of {q} tokens at {position}, cache holds {self._length} of {self.capacity}")
        dev = self.k.device
        visible = position + q  # the attention reads these slots only, not the empty tail after them
        mask = torch.full((1, 1, q, visible), self.min, dtype=self.mask.dtype, device=dev)
        mask[..., :position] = 0
        mask[0, 0].narrow(1, position, q).copy_(
            torch.triu(torch.full((q, q), self.min, dtype=self.mask.dtype, device=dev), diagonal=1))
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(position)
        self._visible = visible
        try:
            with self._attention(MANY_ATTN_IMPLEMENTATION if dev.type == "cpu" else None):  # as recompute's
                logits, _ = forward_over(self.model, self.cache, input_ids=torch.tensor([tokens], device=dev),
                                         position_ids=torch.arange(position, position + q, device=dev).unsqueeze(0),
                                         attention_mask=mask, use_cache=True)
        finally:
            self._visible = self.capacity
        self.mask[..., position : position + q] = 0
        self._length += q
        return logits[0].float()

    def _forward(self) -> torch.Tensor:
        # the decode kernel; else, over fewer keys than the mask has slots (an eager step), SDPA
        # with the mask cut to them (transformers' SDPA function would hand it the whole mask)
        name = ATTN_IMPLEMENTATION if self.decode_kernel else None
        if name is None and self._visible < self.capacity:
            name = SDPA_IMPLEMENTATION
        with self._attention(name):
            return self._model_call()

    @contextlib.contextmanager
    def _attention(self, name: str | None) -> Iterator[None]:
        """Run the model's attention through the registered function ``name`` (None: as it is).

        Llama/Qwen2 attention layers look their function up in config._attn_implementation on
        every forward, so the swap holds for the calls inside only. The setter recurses into
        sub-configs; restoring parents first puts back each one's own value.
        """
        if name is None:
            yield
            return
        register_attention()
        saved = [(cfg, cfg._attn_implementation) for cfg in _configs(self.model.config)]
        self.model.config._attn_implementation = name
        try:
            yield
        finally:
            for cfg, old in saved:
                cfg._attn_implementation = old

    def _model_call(self) -> torch.Tensor:
        logits, _ = forward_over(self.model, self.cache, input_ids=self.ids, position_ids=self.pos,
                                 attention_mask=self.mask, use_cache=True)
        return logits

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
