"""Triton kernel of ``feature_drop`` (OPM's feature dropping, :func:`mmgrad.reference.feature_drop`).

One launch per modality, over its column range: program (r, c) handles BR rows x BC columns of the
modality. Every program draws the keep bit of its rows itself (M Philox calls per row in all,
recomputed by each column block: cheaper than a second launch), the column-block-0 programs also
store it. The seed and the counter are read on the device, so the launch never synchronises and a
captured CUDA graph sees the counter the module advances in place.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from mmgrad.reference import feature_drop_scale

from .kernels import _tl_dtype, accumulation_dtype, cast_out
from .segments import philox4x32, philox_key

BR = 16  # rows per program
BC = 256  # columns per program
NUM_WARPS = 4


@triton.jit
def _feature_drop_kernel(z, out, keep, drop_prob, scale, seed, counter, N, ldz, col0, width, m, M,
                         D, BR: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    cb = tl.program_id(1)
    rmask = rows < N
    k0, k1 = philox_key(seed)
    r0, _r1, _r2, _r3 = philox4x32(tl.load(counter) + rows * M + m, k0, k1)
    u = (r0 >> 8).to(tl.float64) * 5.9604644775390625e-08  # exact: 24 bits
    kp = u >= tl.load(drop_prob + m)
    tl.store(keep + rows * M + m, kp, mask=rmask & (cb == 0))
    cols = cb * BC + tl.arange(0, BC)
    mask = rmask[:, None] & (cols < width)[None, :]
    x = tl.load(z + rows[:, None] * ldz + (col0 + cols)[None, :], mask=mask, other=0.0).to(ACC)
    sc = tl.load(scale).to(ACC)
    r = tl.where(kp[:, None], x * sc, 0.0)
    tl.store(out + rows[:, None] * D + (col0 + cols)[None, :], cast_out(r, out.dtype.element_ty),
             mask=mask)


def feature_drop(z: torch.Tensor, widths: Sequence[int], drop_prob: torch.Tensor, seed: torch.Tensor,
                 counter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, keep) of :func:`mmgrad.reference.feature_drop`; ``z`` (N, D) with unit column stride,
    ``drop_prob`` (M,) float64, ``seed`` and ``counter`` one-element int64 tensors, all on one
    device."""
    if z.dim() != 2 or (z.shape[1] > 1 and z.stride(1) != 1):
        raise ValueError("z must be a 2-D tensor with unit column stride")
    N, D = z.shape
    M = len(widths)
    if sum(widths) != D or any(w < 0 for w in widths):
        raise ValueError(f"widths {list(widths)} must be non-negative and add up to {D}")
    for name, t in (("drop_prob", drop_prob), ("seed", seed), ("counter", counter)):
        if t.device != z.device:
            raise ValueError(f"{name} must be on z's device {z.device}")
    if drop_prob.dtype != torch.float64 or drop_prob.shape != (M,):
        raise ValueError(f"drop_prob must be a float64 tensor of shape ({M},)")
    if seed.dtype != torch.int64 or seed.numel() != 1 or counter.dtype != torch.int64 or counter.numel() != 1:
        raise ValueError("seed and counter must be int64 tensors of one element")
    out = torch.empty(N, D, dtype=z.dtype, device=z.device)
    keep = torch.empty(N, M, dtype=torch.bool, device=z.device)
    if N == 0:
        return out, keep
    drop_prob = drop_prob.contiguous()
    scale = feature_drop_scale(widths, drop_prob)
    ldz = z.stride(0) if N > 1 else D
    acc = _tl_dtype(accumulation_dtype(z.dtype))
    col0 = 0
    for m, w in enumerate(widths):
        grid = (triton.cdiv(N, BR), max(1, triton.cdiv(w, BC)))
        _feature_drop_kernel[grid](z, out, keep, drop_prob, scale, seed, counter, N, ldz, col0, w, m,
                                   M, D, BR=BR, BC=BC, ACC=acc, num_warps=NUM_WARPS)
        col0 += w
    return out, keep
