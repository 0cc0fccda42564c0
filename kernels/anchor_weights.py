"""Anchor weights: how much each anchor's measured deviation counts for a new content.

Two granularities (DESIGN §3.4), both a softmax over the A anchors of negative distances::

    token_weights   [A, T]       = softmax_A(-mean_{l,h,d} |base - anchor[:, :, :T]|   / tau)
    channel_weights [A, L, H, D] = softmax_A(-||base - anchor[:, :, -T:]||_2 over T  / tau)

token_weights serves a slot's own tokens (the anchor's *first* T tokens); channel_weights the
text segment that follows a slot (the anchor's *last* T tokens). Anchors may be longer than the
content (T_a >= T, the pool's length rule): the kernels read the window through strides, no copy.
Ragged anchors may come as one right-padded stack: channel_weights(anchor_lengths=) then reads
each anchor's own last T tokens.
Distances are accumulated in float32 whatever the input dtype; the weights are float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvcomm.errors import KernelError
from kvcomm.kernels._checks import check_float, check_same_device
from kvcomm.kernels._triton import cdiv, jit, next_power_of_2, target_programs, tl
from kvcomm.kernels.dispatch import use_triton

# Stage 1, token distances. Shapes / strides:
#   base [L, H, T, D] (rows r = l*H + h: row stride b_stride_h, needs b_stride_l == H*b_stride_h,
#   which any view sliced on T or D keeps), anchors [A, L, H, T_a, D] read at tokens 0..T-1,
#   partial [S, A, T] float32 contiguous: sum over the rows of split s of sum_d |b - a|.
# Grid: (cdiv(T, BLOCK_T), S). A program loads each base tile once and compares it with every
# anchor, keeping the A running sums as rows of an [A_P2, BLOCK_T] accumulator (A_P2 =
# next_pow2(A)), so base is read once in total and each anchor window once. S splits the L*H
# rows so that short contents still fill the GPU.


@jit
def _token_dist_kernel(
    base_ptr, anc_ptr, part_ptr,
    A, T, R, ROWS,
    b_stride_r, b_stride_t, b_stride_d,
    a_stride_a, a_stride_r, a_stride_t, a_stride_d,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, A_P2: tl.constexpr,
):
    pid_t = tl.program_id(0)
    split = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_a = tl.arange(0, A_P2)
    mask = (offs_t < T)[:, None] & (offs_d < D)[None, :]
    b_off = offs_t[:, None] * b_stride_t + offs_d[None, :] * b_stride_d
    a_off = offs_t[:, None] * a_stride_t + offs_d[None, :] * a_stride_d

    acc = tl.zeros([A_P2, BLOCK_T], dtype=tl.float32)
    row0 = split.to(tl.int64) * ROWS
    b_row = base_ptr + row0 * b_stride_r
    a_row = anc_ptr + row0 * a_stride_r
    for _ in range(row0, tl.minimum(row0 + ROWS, R)):
        b = tl.load(b_row + b_off, mask=mask, other=0.0).to(tl.float32)
        a_ptr = a_row
        for a in range(0, A):
            x = tl.load(a_ptr + a_off, mask=mask, other=0.0).to(tl.float32)
            s = tl.sum(tl.abs(b - x), axis=1)  # [BLOCK_T]
            acc = tl.where((offs_a == a)[:, None], acc + s[None, :], acc)
            a_ptr += a_stride_a
        b_row += b_stride_r
        a_row += a_stride_r
    p_off = (split * A + offs_a)[:, None] * T + offs_t[None, :]
    tl.store(part_ptr + p_off, acc, mask=(offs_a < A)[:, None] & (offs_t < T)[None, :])


# Stage 1, channel distances. Shapes / strides:
#   base [L, H, T, D] as rows r = l*H + h; anchors [A, L, H, T_a, D], anchor a read at tokens
#   start_a..start_a+T-1 (HAS_LEN: start_a = len[a] - T, its last T valid tokens; else 0, the
#   caller offsets the pointer to the last T); partial [S, A, R*D] float32: sum over split s's
#   tokens of (b - a)^2 per (row, channel).
# Grid: (cdiv(A, A_CH), R, S). A program owns A_CH anchors of one row (layer, head) and a 1/S
# share of the tokens: per step it loads a [BLOCK_T, D] tile of base and the [A_CH, BLOCK_T, D]
# tile of its anchors and adds their squared differences into an accumulator of that tile's
# shape, reduced over tokens once at the end (no per-anchor select over a wide accumulator, no
# per-step cross-thread reduction). Base is read once per anchor chunk; the chunk axis varies
# fastest, so the chunks of one row run side by side and all but the first base read come from L2.


@jit
def _channel_dist_kernel(
    base_ptr, anc_ptr, len_ptr, part_ptr,
    A, T, T_A, R, TOKENS,
    b_stride_r, b_stride_t, b_stride_d,
    a_stride_a, a_stride_r, a_stride_t, a_stride_d,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, A_CH: tl.constexpr,
    HAS_LEN: tl.constexpr,
):
    chunk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    offs_a = chunk * A_CH + tl.arange(0, A_CH)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask_a = offs_a < A
    mask_d = offs_d < D
    if HAS_LEN:
        n_a = tl.load(len_ptr + offs_a, mask=mask_a, other=0).to(tl.int64)  # [A_CH]
        # clamped: lengths given as a device tensor are not checked on the host (no sync), and
        # a bad value must not read outside the stack
        start_a = tl.minimum(tl.maximum(n_a, T), T_A) - T
    else:
        start_a = tl.zeros([A_CH], dtype=tl.int64)
    b_off = offs_t[:, None] * b_stride_t + offs_d[None, :] * b_stride_d  # [BLOCK_T, BLOCK_D]
    a_first = offs_a.to(tl.int64) * a_stride_a + start_a * a_stride_t  # [A_CH]
    a_tile = offs_t[:, None] * a_stride_t + offs_d[None, :] * a_stride_d  # [BLOCK_T, BLOCK_D]
    a_off = a_first[:, None, None] + a_tile[None, :, :]  # [A_CH, BLOCK_T, BLOCK_D]

    # summed over tokens only once, after the loop: a per-step reduction over the token axis (the
    # middle one) would shuffle values between threads every step; an elementwise accumulator
    # of the tile's shape keeps the loop to loads and FMAs
    acc = tl.zeros([A_CH, BLOCK_T, BLOCK_D], dtype=tl.float32)
    t0 = split * TOKENS
    t1 = tl.minimum(t0 + TOKENS, T)
    b_blk = base_ptr + row * b_stride_r + t0 * b_stride_t
    a_blk = anc_ptr + row * a_stride_r + t0 * a_stride_t
    for start in range(t0, t1, BLOCK_T):
        mask = ((start + offs_t) < t1)[:, None] & mask_d[None, :]  # [BLOCK_T, BLOCK_D]
        b = tl.load(b_blk + b_off, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(a_blk + a_off, mask=mask_a[:, None, None] & mask[None, :, :], other=0.0).to(tl.float32)
        diff = b[None, :, :] - x  # [A_CH, BLOCK_T, BLOCK_D]
        acc += diff * diff
        b_blk += BLOCK_T * b_stride_t
        a_blk += BLOCK_T * a_stride_t
    p_off = (split * A + offs_a).to(tl.int64)[:, None] * (R * D) + row * D + offs_d[None, :]
    tl.store(part_ptr + p_off, tl.sum(acc, axis=1), mask=mask_a[:, None] & mask_d[None, :])


# Stage 2, shared: partial [S, A, M] float32 -> weights [A, M] float32.
#   dist = (sum over S) * scale, sqrt'ed when SQRT; weights = softmax over A of -dist / tau.
# Grid: (cdiv(M, BLOCK_M),), each program holds an [A_P2, BLOCK_M] tile.


@jit
def _anchor_softmax_kernel(
    part_ptr, out_ptr, A, M, S, scale, neg_inv_tau,
    SQRT: tl.constexpr, BLOCK_M: tl.constexpr, A_P2: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_a = tl.arange(0, A_P2)
    mask = (offs_a < A)[:, None] & (offs_m < M)[None, :]
    off = offs_a.to(tl.int64)[:, None] * M + offs_m[None, :]
    dist = tl.zeros([A_P2, BLOCK_M], dtype=tl.float32)
    for _ in range(0, S):
        dist += tl.load(part_ptr + off, mask=mask, other=0.0)
        off += A * M
    dist = dist * scale
    if SQRT:
        dist = tl.sqrt(dist)
    # padding anchors/columns get a finite floor (not -inf: -inf - -inf would be NaN in padding)
    logits = tl.where(mask, dist * neg_inv_tau, -1.0e30)
    top = tl.max(logits, axis=0)
    e = tl.exp(logits - top[None, :])
    w = e / tl.sum(e, axis=0)[None, :]
    tl.store(out_ptr + offs_a[:, None] * M + offs_m[None, :], w, mask=mask)


CHANNEL_ANCHOR_CHUNK = 4  # anchors per channel-distance program (A_CH)


INTERPRETER_PROGRAMS = 4  # CPU interpreter: few, large programs


def _softmax_stage(part: torch.Tensor, A: int, M: int, scale: float, tau: float, sqrt: bool) -> torch.Tensor:
    out = torch.empty((A, M), dtype=torch.float32, device=part.device)
    a_p2 = next_power_of_2(A)
    block_m = max(16, min(1024, 4096 // a_p2, next_power_of_2(M)))
    _anchor_softmax_kernel[(cdiv(M, block_m),)](
        part, out, A, M, part.shape[0], scale, -1.0 / tau, SQRT=sqrt, BLOCK_M=block_m, A_P2=a_p2,
    )
    return out


def token_weights_forward(base: torch.Tensor, anchors: torch.Tensor, tau: float) -> torch.Tensor:
    """Launch the two token-weight kernels (arguments already checked)."""
    L, H, T, D = base.shape
    A, R = anchors.shape[0], L * H
    block_d = next_power_of_2(D)
    a_p2 = next_power_of_2(A)
    block_t = max(1, min(next_power_of_2(T), 2048 // block_d))
    n_t = cdiv(T, block_t)
    splits = max(1, min(R, cdiv(target_programs(base.device, INTERPRETER_PROGRAMS), n_t)))
    rows = cdiv(R, splits)
    splits = cdiv(R, rows)
    part = torch.empty((splits, A, T), dtype=torch.float32, device=base.device)
    _token_dist_kernel[(n_t, splits)](
        base, anchors, part, A, T, R, rows,
        base.stride(1), base.stride(2), base.stride(3),
        anchors.stride(0), anchors.stride(2), anchors.stride(3), anchors.stride(4),
        D=D, BLOCK_T=block_t, BLOCK_D=block_d, A_P2=a_p2,
    )
    return _softmax_stage(part, A, T, 1.0 / (R * D), tau, sqrt=False)


def channel_weights_forward(
    base: torch.Tensor, anchors: torch.Tensor, tau: float, anchor_lengths: list[int] | torch.Tensor | None = None
) -> torch.Tensor:
    """Launch the two channel-weight kernels (arguments already checked)."""
    L, H, T, D = base.shape
    A, R = anchors.shape[0], L * H
    block_d = next_power_of_2(D)
    a_ch = min(CHANNEL_ANCHOR_CHUNK, next_power_of_2(A))
    block_t = max(1, min(next_power_of_2(T), 4096 // (a_ch * block_d)))  # [A_CH, BLOCK_T, D] tiles
    chunks = cdiv(A, a_ch)
    splits = max(1, min(cdiv(T, block_t), cdiv(target_programs(base.device, INTERPRETER_PROGRAMS), R * chunks)))
    tokens = cdiv(cdiv(T, splits), block_t) * block_t  # whole tiles per split
    splits = cdiv(T, tokens)
    if anchor_lengths is None:
        window, lengths = anchors[:, :, :, anchors.shape[3] - T :, :], base  # last T tokens (a view)
    else:  # ragged anchors: the kernel offsets each one to its own last T tokens
        window = anchors
        lengths = (anchor_lengths if isinstance(anchor_lengths, torch.Tensor)
                   else torch.tensor(anchor_lengths, dtype=torch.int32, device=base.device))
    part = torch.empty((splits, A, R * D), dtype=torch.float32, device=base.device)
    _channel_dist_kernel[(chunks, R, splits)](
        base, window, lengths, part, A, T, anchors.shape[3], R, tokens,
        base.stride(1), base.stride(2), base.stride(3),
        window.stride(0), window.stride(2), window.stride(3), window.stride(4),
        D=D, BLOCK_T=block_t, BLOCK_D=block_d, A_CH=a_ch, HAS_LEN=anchor_lengths is not None,
    )
    return _softmax_stage(part, A, R * D, 1.0, tau, sqrt=True).view(A, L, H, D)


def token_weights_reference(base: torch.Tensor, anchors: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Plain-torch token_weights (same contract)."""
    tau = _check(base, anchors, tau)
    T = base.shape[2]
    b = base.to(torch.float32)
    L, H, _, D = base.shape
    # one anchor at a time: no [A, L, H, T, D] float32 temporary; the mean over (L, H, D) sums
    # the contiguous channel axis first (a strided reduction over three axes is slower on CPU)
    dist = torch.stack([(b - a[:, :, :T].to(torch.float32)).abs_().sum(dim=3).sum(dim=(0, 1)) for a in anchors])
    dist = dist / (L * H * D)
    return torch.softmax(-dist / tau, dim=0)


def channel_weights_reference(
    base: torch.Tensor, anchors: torch.Tensor, tau: float = 1.0, *, anchor_lengths: Sequence[int] | None = None
) -> torch.Tensor:
    """Plain-torch channel_weights (same contract)."""
    tau = _check(base, anchors, tau)
    ends = _check_lengths(anchor_lengths, base, anchors) or [anchors.shape[3]] * anchors.shape[0]
    T = base.shape[2]
    b = base.to(torch.float32)
    # anchor a's last T valid tokens: [n_a - T, n_a)
    dist = torch.stack([
        (b - a[:, :, n - T : n].to(torch.float32)).square_().sum(dim=2).sqrt()
        for a, n in zip(anchors, ends, strict=True)
    ])
    return torch.softmax(-dist / tau, dim=0)


def token_weights(
    base: torch.Tensor, anchors: torch.Tensor, tau: float = 1.0, *, backend: str | None = None
) -> torch.Tensor:
    """Per-token anchor weights for a slot's own tokens.

    Args:
        base: ``[L, H, T, D]`` the new content's base K or V.
        anchors: ``[A, L, H, T_a, D]`` the anchors' base K or V, ``T_a >= T``: the first T
            tokens are compared.
        tau: softmax temperature (> 0).
        backend: see :func:`kvcomm.kernels.get_backend`.

    Returns:
        ``[A, T]`` float32, ``softmax_A(-mean_{l,h,d} |base - anchor| / tau)``: sums to 1 over A.

    Raises:
        KernelError: bad shapes, dtypes, devices or tau.
    """
    tau = _check(base, anchors, tau)
    if use_triton(backend, base, anchors):
        return token_weights_forward(base, anchors, tau)
    return token_weights_reference(base, anchors, tau)


def channel_weights(
    base: torch.Tensor,
    anchors: torch.Tensor,
    tau: float = 1.0,
    *,
    backend: str | None = None,
    anchor_lengths: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-(layer, head, channel) anchor weights for the text segment that follows a slot.

    Args:
        base: ``[L, H, T, D]`` the segment's base K or V.
        anchors: ``[A, L, H, T_a, D]``, ``T_a >= T``: the last T tokens are compared.
        tau: softmax temperature (> 0).
        backend: see :func:`kvcomm.kernels.get_backend`.
        anchor_lengths: optional ``A`` ints, ``T <= n_a <= T_a``: anchor ``a`` holds ``n_a``
            tokens at ``[0, n_a)`` (a right-padded stack of ragged anchors) and its tokens
            ``[n_a - T, n_a)`` are compared. Default: every anchor is ``T_a`` long. May be an
            int32/int64 tensor on the anchors' device: the kernel then reads it without a host
            sync (so the call can be captured in a CUDA graph) and clamps each value to
            ``[T, T_a]`` instead of checking it; the reference checks the values.

    Returns:
        ``[A, L, H, D]`` float32, ``softmax_A(-||base - anchor||_2 over T / tau)``.

    Raises:
        KernelError: bad shapes, dtypes, devices or tau.
    """
    tau = _check(base, anchors, tau)
    lengths = _check_lengths(anchor_lengths, base, anchors)
    if use_triton(backend, base, anchors):
        return channel_weights_forward(base, anchors, tau, lengths)
    if isinstance(lengths, torch.Tensor):
        lengths = _check_lengths(lengths.tolist(), base, anchors)  # the reference checks the values
        assert not isinstance(lengths, torch.Tensor)  # a list in gives a list out
    return channel_weights_reference(base, anchors, tau, anchor_lengths=lengths)


def _check_lengths(lengths: object, base: torch.Tensor, anchors: torch.Tensor) -> list[int] | torch.Tensor | None:
    if lengths is None:
        return None
    A, T, T_a = anchors.shape[0], base.shape[2], anchors.shape[3]
    if isinstance(lengths, torch.Tensor):
        # kept on the device: reading its values would be a host sync (and break graph capture)
        if lengths.shape != (A,) or lengths.dtype not in (torch.int32, torch.int64):
            raise KernelError(
                f"anchor_lengths as a tensor must be int32/int64 of shape [{A}], got {lengths.dtype} {tuple(lengths.shape)}"
            )
        check_same_device(anchors=anchors, anchor_lengths=lengths)
        return lengths
    if not isinstance(lengths, (list, tuple)) or len(lengths) != A:
        raise KernelError(f"anchor_lengths must be a sequence of {A} ints (one per anchor), got {lengths!r}")
    if any(isinstance(n, bool) or not isinstance(n, int) or not T <= n <= T_a for n in lengths):
        raise KernelError(f"anchor_lengths must be ints in [T={T}, T_a={T_a}], got {list(lengths)}")
    return list(lengths)


# typed as the public signature; the checks still reject whatever else a caller passes at runtime
def _check(base: torch.Tensor, anchors: torch.Tensor, tau: float) -> float:
    base = check_float("base", base)
    if base.dim() != 4:
        raise KernelError(f"base must be [L, H, T, D], got shape {tuple(base.shape)}")
    L, H, T, D = base.shape
    anchors = check_float("anchors", anchors)
    if anchors.dim() != 5 or (anchors.shape[1], anchors.shape[2], anchors.shape[4]) != (L, H, D):
        raise KernelError(f"anchors must be [A, {L}, {H}, T_a, {D}] to match base, got {tuple(anchors.shape)}")
    if anchors.shape[0] < 1:
        raise KernelError("anchors must hold at least one anchor (A >= 1)")
    if anchors.shape[3] < T:
        raise KernelError(f"anchors must be at least as long as base: T_a={anchors.shape[3]} < T={T}")
    if T < 1:
        raise KernelError("base must hold at least one token")
    if base.stride(0) != H * base.stride(1) or anchors.stride(1) != H * anchors.stride(2):
        # the kernels walk (layer, head) as one row axis; true of any tensor sliced on T or D
        base_ok = base.stride(0) == H * base.stride(1)
        raise KernelError(f"{'anchors' if base_ok else 'base'} must have its layer and head axes mergeable (strides)")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
        raise KernelError(f"tau must be a positive number, got {tau!r}")
    check_same_device(base=base, anchors=anchors)
    return float(tau)
