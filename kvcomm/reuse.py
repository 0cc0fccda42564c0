"""The reuse path: assemble a prompt's KV from stored pieces instead of prefilling it.

Prompt layout (``seg_i`` fixed template text, ``c_j`` slot contents)::

    seg_0 | c_1 | seg_1 | c_2 | ... | c_n | seg_n
    exact   moved+corrected by ph deltas / moved+corrected by pf deltas

``seg_0`` is the same in every request (exact). A content's base KV sits at positions 0..T-1:
its keys are rotated to the slot's real start q_j. A following segment was prefilled at
registration after dummy placeholders, at start r_i: it is moved by p_i - r_i. KVCOMM then adds
the anchors' weighted deviations; layer 0 is never corrected. Everything but the last prompt
token is written into one preallocated buffer; the engine recomputes that last token.

Key deltas are stored in the frame of the base (rotated back by the anchor's own shift), so the
default "re-rotated" correction is R(shift)(base + sum w*delta); the reference code's variant
adds deltas in the anchor's frame: R(shift)(base) + sum w*R(shift_a)(delta).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvcomm import deviation
from kvcomm.config import KVCommConfig
from kvcomm.deviation import Workspace
from kvcomm.kv import KVBlock
from kvcomm.rope import shift_keys, shift_keys_into


@dataclass
class AnchorStack:
    """A slot's anchors stacked on a leading anchor axis (right-padded on tokens)."""

    slot_deltas: KVBlock  # [A, L, H, max T_a, D] placeholder (slot) deltas, each anchor's own T_a
    segment_deltas: KVBlock  # [A, L, H, M, D] deltas of the following segment (M: its length)
    base: KVBlock | None = None  # [A, L, H, max T_a, D] anchor bases; None for an exact slot
    lengths: list[int] | None = None  # each base's T_a when they differ, else None
    lengths_on_device: torch.Tensor | None = None  # the same on the stacks' device (read without a sync)


def pad_stack(xs: list[torch.Tensor]) -> torch.Tensor:
    """``[L, H, T_a, D]`` each -> ``[A, L, H, max T_a, D]``, zero right-padded (a view when A == 1)."""
    if len(xs) == 1:
        return xs[0].unsqueeze(0)
    T = max(x.shape[2] for x in xs)
    if all(x.shape[2] == T for x in xs):
        return torch.stack(xs)
    L, H, _, D = xs[0].shape
    out = xs[0].new_zeros((len(xs), L, H, T, D))
    for a, x in enumerate(xs):
        out[a, :, :, : x.shape[2]] = x
    return out


def stack_blocks(parts: list[KVBlock]) -> KVBlock:
    """Blocks stacked by :func:`pad_stack`, keys and values (no cache)."""
    return KVBlock(pad_stack([p.k for p in parts]), pad_stack([p.v for p in parts]))


@dataclass
class SlotAnchors:
    """What the correction of one slot needs: its anchors' bases and this agent's deltas."""

    base: list[KVBlock]  # each anchor's base KV, T_a >= T tokens (the pool's length rule)
    slot_deltas: list[KVBlock]  # placeholder deltas (T_a tokens: the slot's first T are used)
    segment_deltas: list[KVBlock]  # deltas of the following segment
    slot_shifts: list[int] = field(default_factory=list)  # each anchor's own shifts when recorded
    segment_shifts: list[int] = field(default_factory=list)
    exact: bool = False  # the content itself is the (only) anchor
    stacked: AnchorStack | None = None  # the same tensors stacked for the kernels (see stacks())
    hashes: list[str] = field(default_factory=list)  # each anchor's content hash, in base's order

    def __len__(self) -> int:
        return len(self.slot_deltas)

    def stacks(self, stack: Callable[[list[KVBlock]], KVBlock] = stack_blocks) -> AnchorStack:
        """The anchors stacked as the kernels take them, built once (``stack``: e.g. a StackCache's)."""
        if self.stacked is None:
            lengths = [b.length for b in self.base]
            ragged = len(set(lengths)) > 1
            slot_deltas = stack(self.slot_deltas)
            self.stacked = AnchorStack(
                slot_deltas=slot_deltas, segment_deltas=stack(self.segment_deltas),
                base=None if self.exact else stack(self.base),
                lengths=lengths if ragged else None,
                # built here, before the correction: channel_weights reads it without a host
                # copy, so the correction stays capturable as a CUDA graph
                lengths_on_device=torch.tensor(lengths, dtype=torch.int32, device=slot_deltas.k.device) if ragged else None,
            )
        return self.stacked


@dataclass
class Piece:
    """One span of the prompt: ``src`` moved by ``shift`` to [start, start+len)."""

    start: int
    src: KVBlock
    shift: int
    anchors: SlotAnchors | None = None
    kind: str = "seg"  # "seg" (weights per channel) or "slot" (weights per token)
    content: KVBlock | None = None  # the slot content whose distances weight a "seg" piece
    correct: bool = True  # False: move only (config.correct_answer_slots off for this answer slot)
    #: the store identity (hash) of the slot content whose distances weight this piece: its anchor
    #: weights are kept under it and the anchors' hashes, whichever tensors hold the KV this call
    content_hash: str | None = None


def assemble(
    pieces: list[Piece],
    total: int,
    inv_freq: torch.Tensor,
    config: KVCommConfig,
    *,
    correct: bool,
    out: KVBlock | None = None,
    workspace: Workspace | None = None,
    timings: dict[str, float] | None = None,
    deviation: torch.Tensor | None = None,
) -> KVBlock:
    """Write every piece (moved, and corrected when ``correct``) into one [L, H, total, D] block.

    ``out`` may be (strided) views of a preallocated cache buffer: the pieces land there directly.
    Where the Triton kernels run (CUDA) the anchors are read stacked (:meth:`SlotAnchors.stacks`);
    elsewhere as a list, through :mod:`kvcomm.deviation` (``workspace``: its scratch, kept by the
    caller across calls). ``timings`` (CPU only, where no sync is needed to time) accumulates the
    milliseconds spent on anchor ``weights`` and on ``apply`` (moving, correcting, rotating).

    ``deviation`` (``[>= total]`` float32): filled with each corrected token's key correction, its
    squared L2 norm over the corrected layers (what the anchors estimate the move got wrong, where
    a boundary recompute by deviation spends its tokens); -1 where a token was moved only.
    """
    from kvcomm.kernels.dispatch import use_triton

    first = pieces[0].src
    L, H, _, D = first.k.shape
    if out is None:
        out = KVBlock(torch.empty(L, H, total, D, dtype=first.k.dtype, device=first.k.device),
                      torch.empty(L, H, total, D, dtype=first.k.dtype, device=first.k.device))
    stacked = use_triton(None, first.k)
    ws = workspace or Workspace()
    if deviation is not None:
        deviation.fill_(-1.0)
    for piece in pieces:
        n = min(piece.src.length, total - piece.start)
        if n <= 0:
            continue
        src = piece.src.slice(0, n)
        corrected = _corrected_tokens(piece, n, correct)
        if corrected < n:  # the tokens with no correction are moved only
            rest = out.slice(piece.start + corrected, piece.start + n)
            shift_keys_into(rest.k, src.k[:, :, corrected:], piece.shift, inv_freq)
            rest.v.copy_(src.v[:, :, corrected:])
        if corrected == 0:
            continue
        anchors = piece.anchors
        assert anchors is not None
        n, src = corrected, src.slice(0, corrected)
        dst = out.slice(piece.start, piece.start + n)
        norms = None
        if deviation is not None:
            norms = deviation[piece.start : piece.start + n].zero_()
        if stacked:
            _correct_stacked(piece, anchors, src, dst, inv_freq, config)
            if norms is not None:
                norms += key_correction_norms(src.k, dst.k, piece.shift, inv_freq, config)
        else:
            _correct_listed(piece, anchors, src, dst, inv_freq, config, ws, timings, norms)
    return out


def _corrected_tokens(piece: Piece, n: int, correct: bool) -> int:
    """How many of a piece's first ``n`` tokens ``assemble`` corrects (the rest it moves only): none
    without a correction or anchors; for a slot, none past its longest anchor (anchors shorter than
    the content, ``min_anchor_coverage`` < 1: those tokens have no measured deviation)."""
    anchors = piece.anchors
    if not correct or not piece.correct or anchors is None or len(anchors) == 0:
        return 0
    if piece.kind == "slot" and not anchors.exact:
        return min(n, max(b.length for b in anchors.slot_deltas))
    return n


def key_correction_norms(src_k: torch.Tensor, dst_k: torch.Tensor, shift: int, inv_freq: torch.Tensor,
                         config: KVCommConfig) -> torch.Tensor:
    """``[n]``: each token's squared L2 norm of ``dst_k - R(shift)(src_k)`` over the corrected
    layers: the key correction a piece got, read back from its result (where the correction ran
    in kernels or a captured graph; the CPU path sums it as it goes)."""
    skip = 0 if config.correct_first_layer else 1
    moved = shift_keys(src_k[skip:], shift, inv_freq)
    return (dst_k[skip:].float() - moved.float()).square_().sum(dim=(0, 1, 3))


def correction_norms(pieces: list[Piece], out: KVBlock, inv_freq: torch.Tensor, config: KVCommConfig, *,
                     correct: bool, deviation: torch.Tensor) -> None:
    """``assemble``'s ``deviation``, read back from its result ``out`` (a captured graph's replay)."""
    deviation.fill_(-1.0)
    total = out.k.shape[2]
    for piece in pieces:
        n = _corrected_tokens(piece, max(0, min(piece.src.length, total - piece.start)), correct)
        if n == 0:
            continue
        deviation[piece.start : piece.start + n] = key_correction_norms(
            piece.src.k[:, :, :n], out.k[:, :, piece.start : piece.start + n], piece.shift, inv_freq, config)


def _scaled(weights: torch.Tensor, anchors: SlotAnchors, config: KVCommConfig) -> torch.Tensor:
    """The anchors' weights times ``correction_scale`` (a new tensor: the weights may be memoised);
    an exact anchor's (the same content's own measured deviation, not an estimate) as they are."""
    if anchors.exact or config.correction_scale == 1.0:
        return weights
    return weights * config.correction_scale


def _correct_stacked(piece: Piece, anchors: SlotAnchors, src: KVBlock, dst: KVBlock, inv_freq: torch.Tensor,
                     config: KVCommConfig) -> None:
    """One piece through the kernels, which read the anchors stacked ``[A, L, H, T, D]``."""
    from kvcomm.kernels import apply_correction, channel_weights, token_weights

    L, H, n, D = src.k.shape
    skip = 0 if config.correct_first_layer else 1
    stack = anchors.stacks()  # right-padded: the windows below are views, no copy
    if piece.kind == "slot":
        # the slot's n tokens: each anchor's first n placeholder deltas [A, L, H, n, D]
        deltas_k, deltas_v = stack.slot_deltas.k[:, :, :, :n], stack.slot_deltas.v[:, :, :, :n]
        shifts = anchors.slot_shifts
        if anchors.exact:
            wk = wv = torch.ones(1, n, device=src.k.device, dtype=torch.float32)
        else:  # base [A, L, H, max T_a, D]: token_weights compares the first n tokens
            assert stack.base is not None
            wk = token_weights(src.k, stack.base.k, tau=config.tau)
            wv = token_weights(src.v, stack.base.v, tau=config.tau)
    else:
        deltas_k, deltas_v = stack.segment_deltas.k[:, :, :, :n], stack.segment_deltas.v[:, :, :, :n]
        shifts = anchors.segment_shifts
        if anchors.exact:
            wk = wv = torch.ones(1, L, H, D, device=src.k.device, dtype=torch.float32)
        else:  # the content [L, H, T, D] against each anchor's last T tokens
            content = piece.content
            assert content is not None and stack.base is not None
            # (the last min(T, shortest anchor) tokens where anchors may be shorter)
            tail = min(content.length, *(stack.lengths or [stack.base.k.shape[3]]))
            ck, cv = content.k[:, :, content.length - tail :], content.v[:, :, content.length - tail :]
            lengths = stack.lengths_on_device if stack.lengths_on_device is not None else stack.lengths
            wk = channel_weights(ck, stack.base.k, tau=config.tau, anchor_lengths=lengths)
            wv = channel_weights(cv, stack.base.v, tau=config.tau, anchor_lengths=lengths)
    wk, wv = _scaled(wk, anchors, config), _scaled(wv, anchors, config)
    rotate = config.rerotate_key_deltas
    if not rotate:
        # reference variant: each anchor's key deltas back in the frame it was measured in
        deltas_k = torch.stack([shift_keys(deltas_k[i], shifts[i], inv_freq) for i in range(len(shifts))])
    apply_correction(src.k, deltas_k, wk, inv_freq=inv_freq, delta_pos=piece.shift, rotate_deltas=rotate,
                     skip_layers=skip, out=dst.k)
    apply_correction(src.v, deltas_v, wv, inv_freq=None, skip_layers=skip, out=dst.v)


def _correct_listed(piece: Piece, anchors: SlotAnchors, src: KVBlock, dst: KVBlock, inv_freq: torch.Tensor,
                    config: KVCommConfig, ws: Workspace, timings: dict[str, float] | None = None,
                    norms: torch.Tensor | None = None) -> None:
    """One piece on the CPU: the anchors read one by one (:mod:`kvcomm.deviation`), no stacking;
    ``norms`` (``[n]``): the keys' correction norms are added to it (``assemble``'s ``deviation``)."""
    t0 = time.perf_counter()
    L, H, n, D = src.k.shape
    skip = 0 if config.correct_first_layer else 1
    if piece.kind == "slot":
        deltas, shifts = anchors.slot_deltas, anchors.slot_shifts
        if anchors.exact:
            wk = wv = torch.ones(1, n, device=src.k.device, dtype=torch.float32)
        else:  # each base's first n tokens (zeros past a shorter anchor's end, as stacked)
            bases_k, bases_v = [b.k for b in anchors.base], [b.v for b in anchors.base]
            # kept under the content's and anchors' hashes, else the content's own tensors (src
            # is a view of them, new on every call)
            names = _weight_names(piece, anchors)
            wk = ws.weights.get(f"slot.k{n}:{config.tau}", [piece.src.k, *bases_k],
                                lambda: deviation.token_weights(src.k, bases_k, config.tau, ws), names=names)
            wv = ws.weights.get(f"slot.v{n}:{config.tau}", [piece.src.v, *bases_v],
                                lambda: deviation.token_weights(src.v, bases_v, config.tau, ws), names=names)
    else:
        deltas, shifts = anchors.segment_deltas, anchors.segment_shifts
        if anchors.exact:
            wk = wv = torch.ones(1, L, H, D, device=src.k.device, dtype=torch.float32)
        else:  # the content's last t tokens against each anchor's last t tokens
            content = piece.content
            assert content is not None
            tail = min(content.length, *(b.length for b in anchors.base))
            ck, cv = content.k[:, :, content.length - tail :], content.v[:, :, content.length - tail :]
            bases_k, bases_v = [b.k for b in anchors.base], [b.v for b in anchors.base]
            names = _weight_names(piece, anchors)
            wk = ws.weights.get(f"seg.k{tail}:{config.tau}", [content.k, *bases_k],
                                lambda: deviation.channel_weights(ck, bases_k, config.tau, ws), names=names)
            wv = ws.weights.get(f"seg.v{tail}:{config.tau}", [content.v, *bases_v],
                                lambda: deviation.channel_weights(cv, bases_v, config.tau, ws), names=names)
    keep_k, wk = deviation.keep_top(wk, config.correction_top_p, config.correction_top_k)
    keep_v, wv = deviation.keep_top(wv, config.correction_top_p, config.correction_top_k)
    wk, wv = _scaled(wk, anchors, config), _scaled(wv, anchors, config)
    t1 = time.perf_counter()
    rerotate = config.rerotate_key_deltas
    for dst_t, src_t, keep, w, rotated in ((dst.k, src.k, keep_k, wk, True), (dst.v, src.v, keep_v, wv, False)):
        chosen = [(deltas[a].k if rotated else deltas[a].v) for a in keep]
        # float32 accumulation: straight into the destination where it is float32
        acc = dst_t if dst_t.dtype == torch.float32 else ws.take("acc", tuple(dst_t.shape), dst_t.device)
        deviation.correct_into(
            acc, src_t, chosen, w, skip_layers=skip, shift=piece.shift if rotated else 0,
            inv_freq=inv_freq if rotated else None,
            delta_shifts=[shifts[a] for a in keep] if rotated and not rerotate else None, ws=ws,
            norms=norms if rotated else None)
        if acc is not dst_t:
            dst_t.copy_(acc)
    if timings is not None:
        timings["weights"] = timings.get("weights", 0.0) + (t1 - t0) * 1e3
        timings["apply"] = timings.get("apply", 0.0) + (time.perf_counter() - t1) * 1e3


def _weight_names(piece: Piece, anchors: SlotAnchors) -> tuple[str, ...] | None:
    """The content-addressed names a piece's anchor weights are kept under: the weighting
    content's hash and its anchors' (the weights depend on those KVs only). None where a hash is
    missing: the weights are then kept under the tensors' identities.

    A content first prefilled in one call reaches the next calls as the store's copy (a Redis
    store hands out new tensors on every read), so tensor identities alone would recompute the
    weights the first call already computed."""
    if piece.content_hash is None or len(anchors.hashes) != len(anchors.base):
        return None
    return (piece.content_hash, *anchors.hashes)


def key_delta(real_k: torch.Tensor, base_k: torch.Tensor, shift: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Key deviation in the base's frame: R(-shift)(real) - base."""
    return shift_keys(real_k, -shift, inv_freq) - base_k


def layer_deviation(reused_v: torch.Tensor, real_v: torch.Tensor) -> torch.Tensor:
    """Per-token L2 deviation of one layer's values [H, T, D] -> [T] (CacheBlend's selection)."""
    return torch.linalg.vector_norm((reused_v - real_v).float(), dim=(0, 2))
