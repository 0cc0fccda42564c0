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

from dataclasses import dataclass, field

import torch

from kvcomm.config import KVCommConfig
from kvcomm.kv import KVBlock
from kvcomm.rope import shift_keys


@dataclass
class SlotAnchors:
    """What the correction of one slot needs: its anchors' bases and this agent's deltas."""

    base_first: list[KVBlock]  # each anchor's first T tokens
    base_last: list[KVBlock]  # each anchor's last T tokens
    ph: list[KVBlock]  # placeholder deltas (first T tokens)
    pf: list[KVBlock]  # deltas of the following segment
    ph_shift: list[int] = field(default_factory=list)  # each anchor's own shifts when recorded
    pf_shift: list[int] = field(default_factory=list)
    exact: bool = False  # the content itself is the (only) anchor

    def __len__(self) -> int:
        return len(self.ph)


@dataclass
class Piece:
    """One span of the prompt: ``src`` moved by ``shift`` to [start, start+len)."""

    start: int
    src: KVBlock
    shift: int
    anchors: SlotAnchors | None = None
    kind: str = "seg"  # "seg" (weights per channel) or "slot" (weights per token)
    content: KVBlock | None = None  # the slot content whose distances weight a "seg" piece


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
        if not correct or a is None or len(a) == 0:
            kd.copy_(shift_keys(src.k, p.shift, inv_freq))
            vd.copy_(src.v)
            continue
        if p.kind == "slot":
            deltas_k = torch.stack([d.k[:, :, :n] for d in a.ph])
            deltas_v = torch.stack([d.v[:, :, :n] for d in a.ph])
            shifts = a.ph_shift
            if a.exact:
                wk = wv = torch.ones(1, n, device=src.k.device, dtype=torch.float32)
            else:
                anc_k = torch.stack([b.k[:, :, :n] for b in a.base_first])
                anc_v = torch.stack([b.v[:, :, :n] for b in a.base_first])
                wk = token_weights(src.k, anc_k, tau=config.tau)
                wv = token_weights(src.v, anc_v, tau=config.tau)
        else:
            deltas_k = torch.stack([d.k[:, :, :n] for d in a.pf])
            deltas_v = torch.stack([d.v[:, :, :n] for d in a.pf])
            shifts = a.pf_shift
            if a.exact:
                wk = wv = torch.ones(1, L, H, D, device=src.k.device, dtype=torch.float32)
            else:
                content = p.content
                assert content is not None
                anc_k = torch.stack([b.k for b in a.base_last])
                anc_v = torch.stack([b.v for b in a.base_last])
                wk = channel_weights(content.k, anc_k, tau=config.tau)
                wv = channel_weights(content.v, anc_v, tau=config.tau)
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
