"""The reuse path's shift + correction captured as CUDA graphs: one per prompt layout.

:func:`kvcomm.reuse.assemble` issues about eight launches per piece (weights for K and V, then
the fused correction for each), about 80 for agent 5 of the paper's setting. On a GPU those
launches cost more than the bytes they move (benchmarks/NOTES.md: ~3.4 ms against a 0.45 ms
bandwidth floor). A layout that repeats (same agent, same content lengths, same anchors) is
captured once and then replayed: one launch.

What a captured graph reads:

- **by address**: the template's segments, the anchor stacks (stable objects served by the
  engine's ``StackCache``), ``inv_freq`` and the destination buffer. Their addresses are part of
  the layout key, and the entry keeps a reference to each, so an address in a live key always
  means the tensor it was captured with (nothing else can be allocated there).
- **by copy**: the slot contents, new tensors on every request. Each gets a static buffer in the
  entry, refreshed by one copy per call; the copy is skipped when the source is the very tensor
  copied last time, unchanged since (same storage and strides, same version counter; the entry
  keeps it alive, so its address cannot have been reused).

A layout is captured the second time it is seen: layouts that never repeat (contents of every
length) run eagerly and cost nothing extra. ``max_graphs`` entries are kept, least recently used
out. Capture is an optimisation: if it fails, that call and every later one run eagerly, after one
warning.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kvcomm.config import KVCommConfig
from kvcomm.fastpath.stacks import version_of
from kvcomm.kv import KVBlock
from kvcomm.reuse import Piece, assemble

logger = logging.getLogger(__name__)


@dataclass
class _CopyInput:
    """A static buffer the graph reads, refreshed from the call's source tensor."""

    static: torch.Tensor
    source: torch.Tensor | None = None  # the tensor copied last (kept alive: its address stays its own)
    version: int | None = None  # its version counter then (None: an inference tensor, always copied)

    def refresh(self, src: torch.Tensor) -> None:
        last = self.source
        if (last is not None and self.version is not None and last.data_ptr() == src.data_ptr()
                and last.stride() == src.stride() and version_of(src) == self.version):
            return
        self.static.copy_(src)
        self.source, self.version = src, version_of(src)


@dataclass
class _Entry:
    replay: Callable[[], None]
    inputs: list[_CopyInput]
    keep: list[Any] = field(default_factory=list)  # what the graph reads by address


class _Layout:
    """A call's layout key, and the tensors it reads by copy in first-use order."""

    def __init__(self) -> None:
        self.key: list[Any] = []
        self.copies: list[torch.Tensor] = []
        self._copy_index: dict[tuple[Any, ...], int] = {}

    def address(self, t: torch.Tensor | None) -> None:
        self.key.append(None if t is None else ("a", *_ident(t)))

    def copy(self, t: torch.Tensor) -> None:
        ident = _ident(t)
        if ident not in self._copy_index:  # one content read by two pieces is one input
            self._copy_index[ident] = len(self.copies)
            self.copies.append(t)
        self.key.append(("c", self._copy_index[ident], tuple(t.shape), t.dtype))


def _ident(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


def _by_copy(piece: Piece) -> bool:
    return piece.kind == "slot"  # a slot's source is its content: new every request


def _reads_content(p: Piece, correct: bool) -> bool:
    """Whether assemble reads ``p.content`` (a segment's channel weights compare it to anchors)."""
    a = p.anchors
    return p.content is not None and correct and p.correct and a is not None and len(a) > 0 and not a.exact


def layout_of(
    pieces: list[Piece], total: int, inv_freq: torch.Tensor, config: KVCommConfig, correct: bool, out: KVBlock
) -> _Layout:
    """Everything :func:`assemble` branches on or reads, as a hashable key."""
    lay = _Layout()
    lay.key += [total, correct, config.tau, config.correct_first_layer, config.rerotate_key_deltas]
    for t in (inv_freq, out.k, out.v):
        lay.address(t)
    for p in pieces:
        lay.key += [p.start, p.shift, p.kind, p.correct]
        for t in (p.src.k, p.src.v):
            lay.copy(t) if _by_copy(p) else lay.address(t)
        if p.content is not None and _reads_content(p, correct):
            lay.copy(p.content.k)
            lay.copy(p.content.v)
        anchors = p.anchors
        if anchors is None:
            lay.key.append(None)
            continue
        stack = anchors.stacks()
        lay.key += [len(anchors), anchors.exact, tuple(anchors.slot_shifts), tuple(anchors.segment_shifts),
                    tuple(stack.lengths or ())]
        for blk in (stack.slot_deltas, stack.segment_deltas, stack.base):
            lay.address(None if blk is None else blk.k)
            lay.address(None if blk is None else blk.v)
    return lay


class AssembleGraphs:
    """:func:`assemble` into a static buffer, replayed from CUDA graphs where a layout repeats.

    Args:
        max_graphs: layouts kept captured (LRU); 0 runs every call eagerly.
        backend: ``"cuda"`` captures ``torch.cuda.CUDAGraph``s; ``"eager"`` records the same
            static-input closure and re-runs it (how the tests check the bookkeeping on CPU).
    """

    def __init__(self, max_graphs: int = 8, *, backend: str = "cuda") -> None:
        if backend not in ("cuda", "eager"):
            raise ValueError(f"backend must be 'cuda' or 'eager', got {backend!r}")
        self.max_graphs = max_graphs
        self.backend = backend
        self._entries: OrderedDict[tuple[Any, ...], _Entry] = OrderedDict()
        self._seen: OrderedDict[tuple[Any, ...], None] = OrderedDict()  # layouts met once
        self.captures = self.replays = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._seen.clear()

    def run(
        self, pieces: list[Piece], total: int, inv_freq: torch.Tensor, config: KVCommConfig, *,
        correct: bool, out: KVBlock,
    ) -> KVBlock:
        """Same result as ``assemble(pieces, total, inv_freq, config, correct=correct, out=out)``."""
        if self.max_graphs <= 0:
            return assemble(pieces, total, inv_freq, config, correct=correct, out=out)
        lay = layout_of(pieces, total, inv_freq, config, correct, out)
        key = tuple(lay.key)
        entry = self._entries.get(key)
        if entry is None:
            if key not in self._seen:
                self._remember(key)
                return assemble(pieces, total, inv_freq, config, correct=correct, out=out)
            entry = self._capture(key, lay, pieces, total, inv_freq, config, correct, out)
            if entry is None:
                return assemble(pieces, total, inv_freq, config, correct=correct, out=out)
        self._entries.move_to_end(key)
        for inp, src in zip(entry.inputs, lay.copies, strict=True):
            inp.refresh(src)
        entry.replay()
        self.replays += 1
        return out

    def _remember(self, key: tuple[Any, ...]) -> None:
        self._seen[key] = None
        self._seen.move_to_end(key)
        while len(self._seen) > 64:
            self._seen.popitem(last=False)

    def _capture(self, key, lay, pieces, total, inv_freq, config, correct, out) -> _Entry | None:
        inputs = [_CopyInput(torch.empty_like(t, memory_format=torch.contiguous_format)) for t in lay.copies]
        for inp, src in zip(inputs, lay.copies, strict=True):
            inp.refresh(src)
        static = _static_pieces(pieces, correct, {_ident(src): inp.static for src, inp in zip(lay.copies, inputs, strict=True)})

        def body() -> None:
            assemble(static, total, inv_freq, config, correct=correct, out=out)

        try:
            replay = body if self.backend == "eager" else _cuda_graph(body)
        except Exception as exc:  # an optimisation: never fail the call for it
            # a capture that fails once fails for every layout (something on the path cannot be
            # captured here): stop trying, and say so once
            logger.warning("CUDA graph capture of the KV correction failed, running it eagerly from now on: %s", exc)
            self.max_graphs = 0
            self.clear()
            return None
        keep = [inv_freq, out, pieces]  # by-address tensors stay alive with the graph
        entry = _Entry(replay, inputs, keep)
        self._entries[key] = entry
        self._seen.pop(key, None)
        while len(self._entries) > self.max_graphs:
            self._entries.popitem(last=False)
        self.captures += 1
        return entry


def _static_pieces(pieces: list[Piece], correct: bool, statics: dict[tuple[Any, ...], torch.Tensor]) -> list[Piece]:
    """The pieces with every by-copy tensor replaced by its static buffer."""

    def sub(t: torch.Tensor) -> torch.Tensor:
        return statics[_ident(t)]

    out = []
    for p in pieces:  # the anchors are read by address: shared as they are
        read = p.content is not None and _reads_content(p, correct)
        content = KVBlock(sub(p.content.k), sub(p.content.v)) if p.content is not None and read else None
        src = KVBlock(sub(p.src.k), sub(p.src.v)) if _by_copy(p) else p.src
        out.append(Piece(p.start, src, p.shift, p.anchors, p.kind, content, p.correct, p.content_hash))
    return out


def _cuda_graph(body: Callable[[], None]) -> Callable[[], None]:
    """Capture ``body`` (after a warm-up on a side stream: Triton compiles, the allocator settles)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph.replay
