"""Pure-PyTorch version of every mmgrad op.

This module is the specification of the ops: the test oracle (run it on float64 inputs) and the
fallback on any device. Every other backend (C++ in ``csrc/``, Triton in ``mmgrad/triton/``, CUDA
C++ in ``kernels/``) must agree with it within the per-dtype tolerances of ``tests/``.

Conventions shared by all backends
----------------------------------
* ``J`` is a (K, P) matrix whose rows are per-objective gradients. Its last dimension must be
  contiguous (``J.stride(1) == 1``); the row stride may be anything >= P.
* Accumulation is float32 for float16 / bfloat16 / float32 inputs and float64 for float64 inputs
  (:func:`accumulation_dtype`). Reductions (``gram``, ``segment_moments``) return that dtype.
* A segment table is two int64 tensors of equal length S on the data's device: ``offsets`` (first
  element of each segment in the flat 1-D buffer) and ``numels`` (its length, may be 0). Segments
  never overlap; elements outside every segment are left alone by the in-place ops.
* Gaussian noise is counter-based (:func:`philox_normal`): element ``i`` of the flat buffer gets the
  same number for a given seed whatever the backend, block size or thread count.
* Random masks are counter-based too (:func:`philox_uniform`): draw ``i`` of a stream is a function
  of ``(seed, i)`` alone, so every backend gives the same mask bit for bit.

The reference favours clarity over speed: the segment ops loop over segments on the host, so on a
CUDA tensor they synchronise. The auto backend policy never picks it for CUDA tensors when Triton is
available.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

__all__ = [
    "accumulation_dtype",
    "gram",
    "combine",
    "segment_moments",
    "segment_gram",
    "segment_combine_",
    "segment_scale_",
    "segment_lerp_",
    "philox4x32",
    "philox_normal",
    "philox_uniform",
    "feature_drop",
    "feature_drop_scale",
    "feature_drop_apply",
]

# Philox4x32-10 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every backend accumulates in (and reduction ops return) for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gram(J: torch.Tensor) -> torch.Tensor:
    """``J @ J.T`` accumulated in :func:`accumulation_dtype`; shape (K, K)."""
    acc = accumulation_dtype(J.dtype)
    Ja = J.to(acc)
    return Ja @ Ja.T


def combine(J: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``w @ J`` accumulated in :func:`accumulation_dtype`, returned in ``J``'s dtype; shape (P,)."""
    acc = accumulation_dtype(J.dtype)
    return (w.to(acc) @ J.to(acc)).to(J.dtype)


def segment_pairs(offsets: torch.Tensor, numels: torch.Tensor, length: int) -> list[tuple[int, int]]:
    """The (offset, numel) pairs of a segment table (read on the host), checked as every backend
    assumes: each segment inside a buffer of ``length`` elements (a negative offset would wrap
    round in a Python slice, an overlong segment be clipped) and no two non-empty ones
    overlapping (the Triton kernels size their grid by that, the in-place ops would race)."""
    pairs = list(zip(offsets.tolist(), numels.tolist()))
    for s, (start, n) in enumerate(pairs):
        if start < 0 or n < 0 or start + n > length:
            raise ValueError(f"segment {s} (offset {start}, numel {n}) lies outside the buffer of {length} elements")
    spans = sorted((start, start + n, s) for s, (start, n) in enumerate(pairs) if n > 0)
    for (a0, a1, sa), (b0, b1, sb) in zip(spans, spans[1:]):
        if b0 < a1:
            raise ValueError(f"segments {sa} and {sb} overlap ([{a0}, {a1}) and [{b0}, {b1}))")
    return pairs


def segment_moments(x: torch.Tensor, offsets: torch.Tensor, numels: torch.Tensor) -> torch.Tensor:
    """Per-segment ``[sum, sum of squares]`` of the flat buffer ``x``; shape (S, 2).

    Norms are ``sqrt(m[:, 1])``; the unbiased std of segment s with n elements is
    ``sqrt((m[s, 1] - m[s, 0]**2 / n) / (n - 1))`` (see :func:`mmgrad.ops.segment_std`).
    """
    acc = accumulation_dtype(x.dtype)
    out = torch.zeros(offsets.numel(), 2, dtype=acc, device=x.device)
    for s, (start, n) in enumerate(segment_pairs(offsets, numels, x.numel())):
        seg = x[start : start + n].to(acc)
        out[s, 0] = seg.sum()
        out[s, 1] = (seg * seg).sum()
    return out


def segment_gram(J: torch.Tensor, offsets: torch.Tensor, numels: torch.Tensor) -> torch.Tensor:
    """Per-segment Gram matrices of the rows of ``J`` (K, P): ``out[s] = J[:, seg] @ J[:, seg].T``,
    shape (S, K, K), in :func:`accumulation_dtype`. Segments are column ranges of ``J``.

    Per-tensor norms of any linear combination ``a @ J`` follow as ``a @ out[s] @ a``, so a method
    that rescales each tensor of a combined gradient (MMPareto) needs one pass over ``J``.
    """
    acc = accumulation_dtype(J.dtype)
    K = J.shape[0]
    out = torch.zeros(offsets.numel(), K, K, dtype=acc, device=J.device)
    for s, (start, n) in enumerate(segment_pairs(offsets, numels, J.shape[1])):
        block = J[:, start : start + n].to(acc)
        out[s] = block @ block.T
    return out


def segment_combine_(
    out: torch.Tensor, J: torch.Tensor, offsets: torch.Tensor, numels: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """In place: ``out[seg s] = weights[s] @ J[:, seg s]`` with per-segment weights (S, K),
    accumulated in :func:`accumulation_dtype` and stored in ``out``'s dtype (``J``'s).

    ``out`` may be a row of ``J``: every element reads its column of ``J`` before it is written.
    Elements outside every segment are left alone.
    """
    acc = accumulation_dtype(J.dtype)
    weights = weights.to(acc)
    for s, (start, n) in enumerate(segment_pairs(offsets, numels, J.shape[1])):
        if n == 0:
            continue
        out[start : start + n].copy_(weights[s] @ J[:, start : start + n].to(acc))
    return out


def segment_scale_(
    x: torch.Tensor,
    offsets: torch.Tensor,
    numels: torch.Tensor,
    scale: torch.Tensor,
    noise_std: Optional[torch.Tensor] = None,
    seed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """In place: ``x[seg s] = scale[s] * x[seg s] + noise_std[s] * N(0, 1)``.

    The noise of element ``i`` of ``x`` is ``philox_normal(seed, i)``. Without ``noise_std`` it is a
    plain per-segment scaling. Arithmetic in :func:`accumulation_dtype`, stored in ``x``'s dtype.
    """
    acc = accumulation_dtype(x.dtype)
    scale = scale.to(acc)
    if noise_std is not None:
        noise_std = noise_std.to(acc)
    for s, (start, n) in enumerate(segment_pairs(offsets, numels, x.numel())):
        if n == 0:
            continue
        seg = x[start : start + n]
        new = scale[s] * seg.to(acc)
        if noise_std is not None:
            idx = torch.arange(start, start + n, dtype=torch.int64, device=x.device)
            new = new + noise_std[s] * philox_normal(seed, idx).to(acc)
        seg.copy_(new)
    return x


def segment_lerp_(
    x: torch.Tensor,
    y: torch.Tensor,
    offsets: torch.Tensor,
    numels: torch.Tensor,
    weight: torch.Tensor,
) -> torch.Tensor:
    """In place: ``x[seg s] = weight[s] * y[seg s] + (1 - weight[s]) * x[seg s]``.

    Re-learning's soft re-initialisation (``x`` current weights, ``y`` initial weights).
    """
    acc = accumulation_dtype(x.dtype)
    weight = weight.to(acc)
    for s, (start, n) in enumerate(segment_pairs(offsets, numels, x.numel())):
        if n == 0:
            continue
        xs = x[start : start + n]
        xs.copy_(weight[s] * y[start : start + n].to(acc) + (1 - weight[s]) * xs.to(acc))
    return x


# --- counter-based Gaussian noise -------------------------------------------------------------


def _mulhilo32(a: int, b: torch.Tensor):
    """High and low 32 bits of the 64-bit product of the constant ``a`` and uint32 values ``b``.

    int64 tensors cannot hold a full 64-bit unsigned product, so ``a`` is split into 16-bit halves
    and every intermediate stays below 2**50.
    """
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_lo = b * a_lo  # < 2**48
    p_hi = b * a_hi  # < 2**48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2**49
    lo = mid & _MASK32
    hi = (p_hi >> 16) + (mid >> 32)
    return hi & _MASK32, lo


def philox4x32(counter: torch.Tensor, seed: torch.Tensor):
    """Philox4x32-10 on counters ``(lo32(counter), hi32(counter), 0, 0)`` with key
    ``(lo32(seed), hi32(seed))``. ``counter`` is an int64 tensor of non-negative values; returns
    four int64 tensors holding uint32 values."""
    seed = seed.reshape(()).to(torch.int64)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c0 = counter & _MASK32
    c1 = (counter >> 32) & _MASK32
    c2 = torch.zeros_like(counter)
    c3 = torch.zeros_like(counter)
    for r in range(PHILOX_ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_normal(seed: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Standard normal number for each flat element ``index`` (int64), as float64.

    Element ``i`` uses Philox block ``i >> 2``; the block's four uint32 outputs ``r0..r3`` make two
    Box-Muller pairs: ``u = ((r >> 8) + 1) / 2**24`` in (0, 1], ``v = (r' >> 8) / 2**24`` in [0, 1),
    ``z = sqrt(-2 ln u) * (cos | sin)(2 pi v)``, with ``(r0, r1)`` giving elements 0 and 1 of the
    block and ``(r2, r3)`` elements 2 and 3. Kernels evaluate the same formula in float32.
    """
    r0, r1, r2, r3 = philox4x32(index >> 2, seed)
    lane = index & 3
    first_pair = lane < 2
    ru = torch.where(first_pair, r0, r2)
    rv = torch.where(first_pair, r1, r3)
    u = ((ru >> 8) + 1).to(torch.float64) * 2.0**-24
    v = (rv >> 8).to(torch.float64) * 2.0**-24
    radius = torch.sqrt(-2.0 * torch.log(u))
    angle = 2.0 * math.pi * v
    use_cos = (lane & 1) == 0
    return radius * torch.where(use_cos, torch.cos(angle), torch.sin(angle))


def philox_uniform(seed: torch.Tensor, index: torch.Tensor, dtype: torch.dtype = torch.float64,
                   packed: bool = False) -> torch.Tensor:
    """Uniform number in [0, 1) for each stream position ``index`` (int64): the top 24 bits of the
    first Philox4x32-10 output word of the block at counter ``index``, ``(r0 >> 8) * 2**-24``, in
    ``dtype`` (exact in float32 and float64). ``packed``: four positions per block instead, word
    ``index % 4`` of the block at counter ``index // 4`` (``index`` read as unsigned). The
    conventions of :class:`mmgrad.aggregators.base.SeededMixin` and of the fused op
    :func:`mmgrad.ops.philox_uniform`."""
    if not packed:
        r0, _, _, _ = philox4x32(index, seed)
        return (r0 >> 8).to(dtype) * 2.0**-24
    words = torch.stack(philox4x32((index >> 2) & ((1 << 62) - 1), seed), dim=-1)
    r = words.gather(-1, (index & 3).unsqueeze(-1)).squeeze(-1)
    return (r >> 8).to(dtype) * 2.0**-24


# --- feature dropping (OPM) -------------------------------------------------------------------


def feature_drop_scale(widths: Sequence[int], drop_prob: torch.Tensor) -> torch.Tensor:
    """The rescale factor of :func:`feature_drop`, a 0-dim float64 tensor on ``drop_prob``'s device:
    ``1 / (1 - theta)`` with ``theta = sum_m widths[m] * drop_prob[m] / D`` (the dimension-weighted
    mean drop rate, summed in modality order in float64), and 0 when ``theta >= 1`` (everything is
    dropped). No host synchronisation."""
    p = drop_prob.to(torch.float64)
    D = sum(widths)
    theta = torch.zeros((), dtype=torch.float64, device=p.device)
    for m, w in enumerate(widths):
        theta = theta + w * p[m]
    if D > 0:
        theta = theta / D
    return torch.where(theta < 1, 1 / (1 - theta), torch.zeros_like(theta))


def feature_drop_apply(x: torch.Tensor, widths: Sequence[int], keep: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``out[i, cols of m] = x[i, cols of m] * scale`` where ``keep[i, m]``, else exactly 0 (also for
    non-finite ``x``), computed in :func:`accumulation_dtype` and returned in ``x``'s dtype.

    The forward of :func:`feature_drop` once the mask is drawn, and its backward (``x`` the
    incoming gradient); plain tensor ops, differentiable, no host synchronisation."""
    acc = accumulation_dtype(x.dtype)
    N = x.shape[0]
    cols = torch.cat([keep[:, m : m + 1].expand(N, w) for m, w in enumerate(widths)], dim=1)
    return torch.where(cols, x.to(acc) * scale.to(acc), torch.zeros((), dtype=acc, device=x.device)).to(x.dtype)


def feature_drop(
    z: torch.Tensor,
    widths: Sequence[int],
    drop_prob: torch.Tensor,
    seed: torch.Tensor,
    counter: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OPM's feature dropping on the concatenated features ``z`` (N, D), modality m owning the
    ``widths[m]`` columns after those of modalities ``0 .. m-1``.

    ``keep[i, m] = philox_uniform(seed, counter + i * M + m) >= drop_prob[m]`` (compared in
    float64), ``out[i, cols of m] = z[i, cols of m] * scale`` where ``keep[i, m]`` and 0 elsewhere,
    with ``scale`` from :func:`feature_drop_scale`. Returns ``(out, keep)``: ``out`` (N, D) in
    ``z``'s dtype, ``keep`` (N, M) bool. The counter is read, not advanced.
    """
    N, M = z.shape[0], len(widths)
    p = drop_prob.to(torch.float64)
    index = counter.reshape(()).to(torch.int64) + torch.arange(N * M, dtype=torch.int64, device=z.device).view(N, M)
    keep = philox_uniform(seed, index) >= p[None, :]
    return feature_drop_apply(z, widths, keep, feature_drop_scale(widths, p)), keep
