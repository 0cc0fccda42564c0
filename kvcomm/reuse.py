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

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvcomm.config import KVCommConfig
from kvcomm.kv import KVBlock
from kvcomm.rope import shift_keys
from kvcomm.stacks import AnchorStack, stack_blocks


@dataclass
class SlotAnchors:
    """What the correction of one slot needs: its anchors' bases and this agent's deltas."""

    base: list[KVBlock]  # each anchor's base KV, T_a >= T tokens (the pool's length rule)
    ph: list[KVBlock]  # placeholder deltas (T_a tokens: the slot's first T are used)
    pf: list[KVBlock]  # deltas of the following segment
    ph_shift: list[int] = field(default_factory=list)  # each anchor's own shifts when recorded
    pf_shift: list[int] = field(default_factory=list)
    exact: bool = False  # the content itself is the (only) anchor
    stacked: AnchorStack | None = None  # the same tensors stacked for the kernels (see stacks())

    def __len__(self) -> int:
        return len(self.ph)

    def stacks(self, stack: Callable[[list[KVBlock]], KVBlock] = stack_blocks) -> AnchorStack:
        """The anchors stacked as the kernels take them, built once (``stack``: e.g. a StackCache's)."""
        if self.stacked is None:
            lengths = [b.length for b in self.base]
            ragged = len(set(lengths)) > 1
            ph = stack(self.ph)
            self.stacked = AnchorStack(
                ph=ph, pf=stack(self.pf), base=None if self.exact else stack(self.base),
                lengths=lengths if ragged else None,
                # built here, before the correction: channel_weights reads it without a host
                # copy, so the correction stays capturable as a CUDA graph
                lengths_on_device=torch.tensor(lengths, dtype=torch.int32, device=ph.k.device) if ragged else None,
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


def assemble(
    pieces: list[Piece],
    total: int,
    inv_freq: torch.Tensor,
    config: KVCommConfig,
    *,
    correct: bool,
    out: KVBlock | None = None,
) -> KVBlock:
    """Write every piece (moved, and corrected when ``correct``) into one [L, H, total, D] block.

    ``out`` may be (strided) views of a preallocated cache buffer: the pieces land there directly.
    """
    from kvcomm.kernels import apply_correction, channel_weights, token_weights

    first = pieces[0].src
    L, H, _, D = first.k.shape
    if out is None:
        out = KVBlock(torch.empty(L, H, total, D, dtype=first.k.dtype, device=first.k.device),
                      torch.empty(L, H, total, D, dtype=first.k.dtype, device=first.k.device))
    k_out, v_out = out.k, out.v
    skip = 0 if config.correct_first_layer else 1
    for p in pieces:
        n = min(p.src.length, total - p.start)
        if n <= 0:
            continue
        src = p.src.slice(0, n)
        kd, vd = k_out[:, :, p.start : p.start + n], v_out[:, :, p.start : p.start + n]
        a = p.anchors
        if not correct or not p.correct or a is None or len(a) == 0:
            kd.copy_(shift_keys(src.k, p.shift, inv_freq))
            vd.copy_(src.v)
            continue
        st = a.stacks()  # [A, L, H, T, D] stacks, right-padded: windows below are views, no copy
        if p.kind == "slot" and not a.exact and n > st.ph.k.shape[3]:
            # anchors shorter than the content (min_anchor_coverage < 1): the tokens past the
            # longest one have no measured deviation, they are moved only
            m = st.ph.k.shape[3]
            k_out[:, :, p.start + m : p.start + n].copy_(shift_keys(src.k[:, :, m:], p.shift, inv_freq))
            v_out[:, :, p.start + m : p.start + n].copy_(src.v[:, :, m:])
            n, src, kd, vd = m, src.slice(0, m), kd[:, :, :m], vd[:, :, :m]
        if p.kind == "slot":
            # the slot's n tokens: each anchor's first n placeholder deltas [A, L, H, n, D]
            deltas_k, deltas_v = st.ph.k[:, :, :, :n], st.ph.v[:, :, :, :n]
            shifts = a.ph_shift
            if a.exact:
                wk = wv = torch.ones(1, n, device=src.k.device, dtype=torch.float32)
            else:  # base [A, L, H, max T_a, D]: token_weights compares the first n tokens
                assert st.base is not None
                wk = token_weights(src.k, st.base.k, tau=config.tau)
                wv = token_weights(src.v, st.base.v, tau=config.tau)
        else:
            deltas_k, deltas_v = st.pf.k[:, :, :, :n], st.pf.v[:, :, :, :n]  # [A, L, H, n, D]
            shifts = a.pf_shift
            if a.exact:
                wk = wv = torch.ones(1, L, H, D, device=src.k.device, dtype=torch.float32)
            else:  # the content [L, H, T, D] against each anchor's last T tokens
                content = p.content
                assert content is not None and st.base is not None
                # (the last min(T, shortest anchor) tokens where anchors may be shorter)
                tail = min(content.length, *(st.lengths or [st.base.k.shape[3]]))
                ck, cv = content.k[:, :, content.length - tail :], content.v[:, :, content.length - tail :]
                lengths = st.lengths_on_device if st.lengths_on_device is not None else st.lengths
                wk = channel_weights(ck, st.base.k, tau=config.tau, anchor_lengths=lengths)
                wv = channel_weights(cv, st.base.v, tau=config.tau, anchor_lengths=lengths)
        rotate = config.rerotate_key_deltas
        if not rotate:
            # reference variant: each anchor's key deltas back in the frame it was measured in
            deltas_k = torch.stack([shift_keys(deltas_k[i], shifts[i], inv_freq) for i in range(len(shifts))])
        apply_correction(src.k, deltas_k, wk, inv_freq=inv_freq, delta_pos=p.shift, rotate_deltas=rotate,
                         skip_layers=skip, out=kd)
        apply_correction(src.v, deltas_v, wv, inv_freq=None, skip_layers=skip, out=vd)
    return out


def key_delta(real_k: torch.Tensor, base_k: torch.Tensor, shift: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Key deviation in the base's frame: R(-shift)(real) - base."""
    return shift_keys(real_k, -shift, inv_freq) - base_k


def layer_deviation(reused_v: torch.Tensor, real_v: torch.Tensor) -> torch.Tensor:
    """Per-token L2 deviation of one layer's values [H, T, D] -> [T] (CacheBlend's selection)."""
    return torch.linalg.vector_norm((reused_v - real_v).float(), dim=(0, 2))
