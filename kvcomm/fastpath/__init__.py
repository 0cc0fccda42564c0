"""The fast path: how the reuse path's KV gets into the model fast (static buffers, CUDA graphs).

Not part of the method: with it off (``KVCommConfig.fast_path=False``) every result is the same,
only slower. The engine calls it through :class:`FastPath` alone:

- ``stack_anchors(plan.anchors)``: each slot's anchors stacked for the kernels, kept across calls
  (:class:`~kvcomm.fastpath.stacks.StackCache`);
- ``assemble(...)``: the moved + corrected prompt KV written straight into the static buffer
  (:class:`~kvcomm.fastpath.static_cache.StaticPromptCache`), replayed from a CUDA graph where
  the layout repeats (:class:`~kvcomm.fastpath.graphs.AssembleGraphs`);
- ``first_token(...)``: the one-token forward over that buffer (a CUDA graph on CUDA), or
  ``recompute(...)``: a selective recompute over it (scattered tokens written at their positions).
"""

from __future__ import annotations

from typing import Any

import torch

from kvcomm.config import KVCommConfig
from kvcomm.deviation import Workspace
from kvcomm.fastpath.stacks import StackCache
from kvcomm.fastpath.static_cache import StaticPromptCache
from kvcomm.kernels.dispatch import use_triton
from kvcomm.kv import KVBlock
from kvcomm.reuse import Piece, SlotAnchors, assemble, correction_norms

#: the static buffer grows in steps of this many tokens (fewer regrowths, fewer graph recaptures)
CAPACITY_STEP = 512


class FastPath:
    """One engine's static KV buffer, anchor stacks and captured graphs.

    Args:
        model: the HF causal LM the buffer is shaped for.
        config: the engine's config (``fast_path``, ``correction_graphs``, ``anchor_cache_bytes``).
    """

    def __init__(self, model: Any, config: KVCommConfig) -> None:
        self.model = model
        self.config = config
        self.anchor_stacks = StackCache(config.anchor_cache_bytes)
        self.workspace = Workspace()  # the CPU correction's scratch, reused across calls
        self.buffer: StaticPromptCache | None = None

    def stack_anchors(self, anchors: list[SlotAnchors | None]) -> None:
        """Where the Triton kernels run, or the correction is replayed from captured graphs (whose
        layouts key on the stacks' addresses): stack each slot's anchors once per set of stored
        tensors (then served from the cache). The CPU path reads anchors as a list: nothing to stack."""
        graphs = self.buffer is not None and self.buffer.correction is not None
        for slot_anchors in anchors:
            if slot_anchors is not None and (graphs or use_triton(None, slot_anchors.slot_deltas[0].k)):
                slot_anchors.stacks(self.anchor_stacks.stack)

    def assemble(self, pieces: list[Piece], total: int, inv_freq: torch.Tensor, *, correct: bool,
                 capacity: int | None, timings: dict[str, float] | None = None,
                 deviation: torch.Tensor | None = None) -> KVBlock:
        """:func:`kvcomm.reuse.assemble` of ``total`` tokens (``deviation``: its per-token key
        correction norms, filled too).

        With ``capacity`` (the most tokens the call will hold) the KV lands in the static buffer,
        through a captured graph where one applies; with None it is a fresh block.
        """
        if capacity is None:
            return assemble(pieces, total, inv_freq, self.config, correct=correct, workspace=self.workspace,
                            timings=timings, deviation=deviation)
        buf = self._buffer(capacity)
        out = buf.prompt_views(total)
        if buf.correction is not None:  # CUDA: replayed where the layout repeats
            out = buf.correction.run(pieces, total, inv_freq, self.config, correct=correct, out=out)
            if deviation is not None:  # read back from the result: the graph computes the KV only
                correction_norms(pieces, out, inv_freq, self.config, correct=correct, deviation=deviation)
            return out
        return assemble(pieces, total, inv_freq, self.config, correct=correct, out=out, workspace=self.workspace,
                        timings=timings, deviation=deviation)

    def first_token(self, token: int, position: int) -> tuple[torch.Tensor, StaticPromptCache]:
        """The forward of the last prompt token over the buffer ``assemble`` just filled."""
        assert self.buffer is not None, "assemble(..., capacity=...) fills the buffer first"
        self.buffer.begin(position)
        return self.buffer.step(token, position), self.buffer

    def recompute(self, ids: list[int], selected: torch.Tensor) -> tuple[torch.Tensor, StaticPromptCache]:
        """Recompute the ``selected`` positions and the last token over the buffer ``assemble``
        just filled (:meth:`StaticPromptCache.recompute`); the buffer stays in prompt order."""
        assert self.buffer is not None, "assemble(..., capacity=...) fills the buffer first"
        return self.buffer.recompute(ids, selected), self.buffer

    def _buffer(self, need: int) -> StaticPromptCache:
        """The one static buffer, grown (and its CUDA graph recaptured) when too small.

        It grows by half its size at least (up to the model's context), so prompts that lengthen
        call by call (a conversation, a pipeline's later agents) reallocate a few times, not on
        every call that is a step longer than the last.
        """
        if self.buffer is None or self.buffer.capacity < need:
            grown = 0 if self.buffer is None else self.buffer.capacity * 3 // 2
            limit = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
            want = max(need, min(grown, limit) if limit else grown)
            capacity = -(-want // CAPACITY_STEP) * CAPACITY_STEP
            self.buffer = StaticPromptCache(self.model, capacity, correction_graphs=self.config.correction_graphs)
        return self.buffer


__all__ = ["FastPath", "StaticPromptCache"]
