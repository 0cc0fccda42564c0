"""The correction where no Triton kernel runs (CPU): each piece's deviation estimated from its
anchors and added in place, reading the anchors as a list, never stacked.

Same arithmetic as the kernels' references (:mod:`kvcomm.kernels`, tested against them), laid
out for a CPU:

- anchors are read one at a time from the tensors the store holds: a new combination of anchors
  costs nothing (the stacked ``[A, L, H, T, D]`` layout is only built for the Triton kernels);
- no ``[A, L, H, T, D]`` or ``[L, H, T, D]`` float32 temporaries: distances run over a few layers
  at a time in one reused scratch buffer (:class:`Workspace`), the corrected KV is accumulated
  straight into the destination (a view of the engine's KV buffer) and rotated there in place.
  On these VMs fresh memory costs page faults: writing into memory already touched is ~5x cheaper;
- only the anchors inside ``top_p`` of the weight mass (at most ``top_k``) are read, their weights
  renormalised to sum to 1 again (``top_p=1``: every anchor, the paper's estimate).

Shapes: a piece's ``src`` is ``[L, H, n, D]``; an anchor's base and deltas ``[L, H, T_a, D]``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

#: the loops below step over layers, as many per step as fit in about this many bytes of float32
#: rows: few enough for the rows to stay in cache, and a short piece done in one step (each step
#: costs a few dozen small ops of dispatch: at 30 tokens, 2-layer steps took 3.6x one step's time)
STEP_BYTES = 3 << 19
#: at least this many layers per step of the distance loops
LAYER_CHUNK = 4
#: at least this many layers per step of the correction's apply (copy, add each anchor's delta, rotate)
APPLY_LAYER_CHUNK = 2


def layers_per_step(shape: torch.Size | tuple[int, ...], least: int) -> int:
    """Layers per step for a ``[L, H, n, D]`` piece: :data:`STEP_BYTES` of it, at least ``least``."""
    L, H, n, D = shape
    return max(least, min(L, STEP_BYTES // max(1, 4 * H * n * D)))


def layer_steps(shape: torch.Size | tuple[int, ...], least: int) -> Iterator[tuple[int, int]]:
    """The ``[lo, hi)`` layer ranges the loops below step over (:func:`layers_per_step` each)."""
    L, step = shape[0], layers_per_step(shape, least)
    for lo in range(0, L, step):
        yield lo, min(L, lo + step)


class Workspace:
    """Scratch buffers kept across calls, grown when too small (one per engine; not thread-safe:
    the engine serialises its calls)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self.weights = WeightMemo()

    def take(self, name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """A float32 tensor of ``shape`` (uninitialised) backed by the buffer ``name``."""
        numel = 1
        for size in shape:
            numel *= size
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.device != device:
            buf = torch.empty(numel, dtype=torch.float32, device=device)
            self._buffers[name] = buf
        return buf[:numel].view(shape)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


class WeightMemo:
    """Anchor weights kept across calls: they depend only on the content and the anchors' bases,
    not on the consuming agent, so every agent reading one content reuses the first one's.

    Keyed by ``names`` where the caller has them: the content-addressed store identities (hashes)
    of the content and its anchors, which name one KV each whichever tensors hold it (a store
    copies on write and a Redis store hands out new tensors on every read). Else by the identity
    of the tensors they were computed from, remembered weakly with their version counters (as
    :class:`kvcomm.fastpath.stacks.StackCache`): a tensor freed, replaced or edited in place is
    never matched again. At most ``size`` entries, oldest out.
    """

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self.hits = 0
        self._items: dict[tuple[Any, ...], tuple[list[weakref.ref[torch.Tensor]], list[int | None], torch.Tensor]] = {}

    def get(self, tag: str, tensors: list[torch.Tensor], compute: Callable[[], torch.Tensor],
            names: tuple[str, ...] | None = None) -> torch.Tensor:
        """The weights kept under ``tag`` and ``names`` (else ``tensors``), or ``compute()``'s, kept."""
        if names is not None:
            key: tuple[Any, ...] = (tag, "names", *names)
            item = self._items.get(key)
            if item is not None:
                self.hits += 1
                return item[2]
            refs: list[weakref.ref[torch.Tensor]] = []
            versions: list[int | None] = []
        else:
            key = (tag, *(id(t) for t in tensors))
            item = self._items.get(key)
            versions = [_version(t) for t in tensors]
            if item is not None and all(r() is t for r, t in zip(item[0], tensors, strict=True)) \
                    and None not in versions and item[1] == versions:
                self.hits += 1
                return item[2]
            refs = [weakref.ref(t) for t in tensors]
        value = compute()
        self._items.pop(key, None)
        while len(self._items) >= self.size:
            self._items.pop(next(iter(self._items)))
        self._items[key] = (refs, versions, value)
        return value


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


def token_weights(src: torch.Tensor, bases: list[torch.Tensor], tau: float, ws: Workspace) -> torch.Tensor:
    """``[A, n]``: softmax over anchors of ``-mean_{l,h,d} |src - base_a[:, :, :n]| / tau``."""
    L, H, n, D = src.shape
    dist = torch.zeros(len(bases), n, dtype=torch.float32, device=src.device)
    for lo, hi in layer_steps(src.shape, LAYER_CHUNK):
        scratch = ws.take("dist", (hi - lo, H, n, D), src.device)
        for a, base in enumerate(bases):
            m = min(n, base.shape[2])  # a shorter anchor (min_anchor_coverage < 1) reads as zeros past its end
            torch.sub(src[lo:hi, :, :m], base[lo:hi, :, :m], out=scratch[:, :, :m]).abs_()
            if m < n:
                torch.abs(src[lo:hi, :, m:], out=scratch[:, :, m:])
            # the contiguous channel axis first (a strided reduction over three axes is slower)
            dist[a] += scratch.sum(dim=3).sum(dim=(0, 1))
    return torch.softmax(dist.div_(-(L * H * D) * tau), dim=0)


def channel_weights(content: torch.Tensor, bases: list[torch.Tensor], tau: float, ws: Workspace) -> torch.Tensor:
    """``[A, L, H, D]``: softmax over anchors of ``-||content - base_a's last t tokens||_2 / tau``.

    ``content`` is ``[L, H, t, D]`` (the slot content's last t tokens, t <= every T_a).
    """
    L, H, t, D = content.shape
    dist = torch.empty(len(bases), L, H, D, dtype=torch.float32, device=content.device)
    for lo, hi in layer_steps(content.shape, LAYER_CHUNK):
        scratch = ws.take("dist", (hi - lo, H, t, D), content.device)
        for a, base in enumerate(bases):
            n = base.shape[2]
            torch.sub(content[lo:hi], base[lo:hi, :, n - t : n], out=scratch).square_()
            torch.sum(scratch, dim=2, out=dist[a, lo:hi])
    return torch.softmax(dist.sqrt_().div_(-tau), dim=0)


def keep_top(weights: torch.Tensor, top_p: float, top_k: int) -> tuple[list[int], torch.Tensor]:
    """The anchors inside ``top_p`` of the weight mass (at most ``top_k``; 0: no limit), and
    their weights renormalised to sum to 1 over the kept anchors.

    An anchor's mass is its mean weight over positions (tokens or channels), so the masses of
    all anchors sum to 1.
    """
    A = weights.shape[0]
    limit = A if top_k <= 0 else min(A, top_k)
    if top_p >= 1.0 and limit == A:
        return list(range(A)), weights
    mass = weights.reshape(A, -1).mean(dim=1)
    order = torch.argsort(mass, descending=True).tolist()
    keep, total = [], 0.0
    for a in order[:limit]:
        keep.append(a)
        total += float(mass[a])
        if total >= top_p:
            break
    keep.sort()
    kept = weights[keep]
    return keep, kept / kept.sum(dim=0, keepdim=True).clamp_min(1e-30)


def rotate_(x: torch.Tensor, delta: int, inv_freq: torch.Tensor, ws: Workspace) -> torch.Tensor:
    """``x [..., T, D]`` (float32) rotated by ``delta`` positions in place (RoPE by halves)."""
    if delta == 0:
        return x
    half = x.shape[-1] // 2
    angles = float(delta) * inv_freq.to(device=x.device, dtype=torch.float32)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half], x[..., half:]
    first = ws.take("rotate", tuple(x1.shape), x.device)
    first.copy_(x1)
    x1.mul_(cos).addcmul_(x2, sin, value=-1.0)  # x1 c - x2 s
    x2.mul_(cos).addcmul_(first, sin)  # x2 c + x1 s
    return x


def correct_into(
    out: torch.Tensor,
    src: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: torch.Tensor,
    *,
    skip_layers: int,
    shift: int = 0,
    inv_freq: torch.Tensor | None = None,
    delta_shifts: list[int] | None = None,
    ws: Workspace,
    norms: torch.Tensor | None = None,
) -> None:
    """``out = R(shift)(src + sum_a w_a * delta_a)`` in place (keys; values: no rotation).

    ``weights`` is ``[A, n]`` (per token) or ``[A, L, H, D]`` (per channel); ``out`` may be a
    strided view of a KV buffer, float32. Layers below ``skip_layers`` get no correction.
    ``delta_shifts`` (the reference code's variant, ``rerotate_key_deltas=False``): each anchor's
    key deltas are rotated into the frame they were measured in and added after the rotation,
    ``out = R(shift)(src) + sum_a w_a * R(delta_shifts[a])(delta_a)``.

    ``norms`` (``[n]`` float32): each token's squared L2 norm of the correction it got, summed over
    the corrected layers, heads and channels, is added to it (rotations keep norms, so it is the
    same before or after one). Computed while each step's rows are still in cache.
    """
    n = src.shape[2]
    rotated_after = inv_freq is not None and delta_shifts is not None
    # a few layers at a time, so that the copy, every anchor's add and the rotation pass over rows
    # still in cache (one pass over the whole piece per step would stream it from memory each time)
    for lo, hi in layer_steps(src.shape, APPLY_LAYER_CHUNK):
        chunk = out[lo:hi]
        chunk.copy_(src[lo:hi])
        if inv_freq is not None and rotated_after:
            rotate_(chunk, shift, inv_freq, ws)
        first = max(lo, skip_layers)
        before = None
        if norms is not None and first < hi:
            # what the rows hold before the anchors' deltas: src, or (reference variant) src rotated
            before = src[first:hi] if not rotated_after else ws.take("before", (hi - first, *src.shape[1:]),
                                                                   out.device).copy_(out[first:hi])
        for a, delta in enumerate(deltas if first < hi else ()):
            d = delta[first:hi, :, :n]
            m = d.shape[2]  # < n: a shorter anchor has no deviation past its end
            w = weights[a]
            w = w[None, None, :m, None] if weights.dim() == 2 else w[first:hi, :, None, :]
            if rotated_after:
                assert inv_freq is not None and delta_shifts is not None
                d = rotate_(ws.take("delta", tuple(d.shape), out.device).copy_(d), delta_shifts[a], inv_freq, ws)
            out[first:hi, :, :m].addcmul_(d, w)
        if before is not None:
            assert norms is not None
            diff = ws.take("norm", tuple(before.shape), out.device)
            torch.sub(out[first:hi], before, out=diff)
            norms += diff.square_().sum(dim=3).sum(dim=(0, 1))
        if inv_freq is not None and not rotated_after:
            rotate_(chunk, shift, inv_freq, ws)


__all__ = ["WeightMemo", "Workspace", "channel_weights", "correct_into", "keep_top", "layer_steps", "layers_per_step",
           "rotate_", "token_weights"]
