"""Triton kernel of GradDrop with ``f = identity`` (:func:`mmgrad.aggregators.graddrop.graddrop_identity`).

One pass over J: each program loads a (KP, BLOCK) tile (all K rows of BLOCK columns, K <= MAX_ROWS
padded to a power of two; larger K in chunks of MAX_ROWS rows, each read twice, the second time
from cache), forms the purity ``P = (1 + sum_i J_i / sum_i |J_i|) / 2`` of each column, draws its
uniform ``U`` from the packed Philox stream inline (position ``counter + column``, or
``counter + index[column]`` for a shard: word ``j % 4`` of the block ``j // 4``, as
``ops.philox_uniform(..., packed=True)``; one Philox block per four columns where the positions
allow), keeps row i where ``P > U and J_i > 0`` or ``P < U and J_i < 0`` and writes
``sum_i (leak_i + (1 - leak_i) keep_i) J_i``. The torch path this replaces ran ~10 launches per
32768 columns. Sums are in J's accumulation dtype (float64 for float64, else float32), in the
tile's reduction order: a keep decision can differ from the torch path's only where P and U agree
to rounding.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .kernels import cast_out
from .segments import packed_word, philox4x32, philox_key

#: Most rows a program holds at once: up to this K one tile of all rows, read once; larger K in
#: chunks of this many rows, read twice.
MAX_ROWS = 64
#: Elements of the (KP, BLOCK) tile a program holds: BLOCK = TILE // KP columns.
TILE = 4096


@triton.jit
def _uniforms(seed, counter, index, cols, cmask, HAS_INDEX: tl.constexpr, BLOCK: tl.constexpr):
    """The packed stream's uniforms (24 bits, float32) at ``counter + cols`` (or
    ``counter + index[cols]``). When the positions of the block are contiguous from a multiple
    of 4 (GradDrop's own stream always is: its draws advance it by multiples of 4), each Philox
    block gives four columns: a quarter of the Philox work."""
    k0, k1 = philox_key(seed)
    base = tl.load(counter)
    if HAS_INDEX:
        r = packed_word(base + tl.load(index + cols, mask=cmask, other=0), k0, k1)
    else:
        if (base & 3) == 0:
            q = ((base + tl.program_id(0).to(tl.int64) * BLOCK) >> 2) + \
                tl.arange(0, BLOCK // 4).to(tl.int64)
            r0, r1, r2, r3 = philox4x32(q & 0x3FFFFFFFFFFFFFFF, k0, k1)
            # join(join(r0, r2), join(r1, r3))[i, a, b] = r_{2a+b}[i]: row-major r0 r1 r2 r3
            r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK,))
        else:
            r = packed_word(base + cols, k0, k1)
    return (r >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24: exact, 24 bits


@triton.jit
def _load_rows(J, stride_k, r0, K, cols, cmask, ACC: tl.constexpr, KP: tl.constexpr):
    """Rows ``r0 .. r0 + KP`` of J (zero past K) at ``cols``, in ACC, and which rows are real."""
    rows = r0 + tl.arange(0, KP)
    rmask = rows < K
    x = tl.load(J + rows[:, None].to(tl.int64) * stride_k + cols[None, :],
                mask=rmask[:, None] & cmask[None, :], other=0.0).to(ACC)
    return x, rows, rmask


@triton.jit
def _kept_sum(x, d, leak, rows, rmask, HAS_LEAK: tl.constexpr, ACC: tl.constexpr):
    """``sum_i (leak_i + (1 - leak_i) keep_i) x_i`` over the rows of x, ``d`` = purity - U."""
    keep = ((d > 0) & (x > 0)) | ((d < 0) & (x < 0))  # NaN purity keeps nothing
    m = keep.to(ACC)
    if HAS_LEAK:
        lk = tl.load(leak + rows, mask=rmask, other=0.0).to(ACC)
        m = m * (1.0 - lk)[:, None] + lk[:, None]
    return tl.sum(x * m, axis=0)


@triton.jit
def _graddrop_kernel(J, stride_k, out, seed, counter, index, leak, K, P, HAS_INDEX: tl.constexpr,
                     HAS_LEAK: tl.constexpr, ACC: tl.constexpr, KP: tl.constexpr,
                     CHUNKED: tl.constexpr, BLOCK: tl.constexpr):
    """One program per BLOCK columns. K <= KP: all rows in one (KP, BLOCK) tile, read once.
    CHUNKED (K > KP): the rows in chunks of KP, read twice (the column sums, then the kept sum;
    the second read is of what the first just brought into cache)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    cmask = cols < P
    if CHUNKED:
        s = tl.zeros((BLOCK,), dtype=ACC)
        a = tl.zeros((BLOCK,), dtype=ACC)
        r0 = 0
        while r0 < K:
            x, rows, rmask = _load_rows(J, stride_k, r0, K, cols, cmask, ACC, KP)
            s += tl.sum(x, axis=0)
            a += tl.sum(tl.abs(x), axis=0)
            r0 += KP
    else:
        x, rows, rmask = _load_rows(J, stride_k, 0, K, cols, cmask, ACC, KP)
        s = tl.sum(x, axis=0)
        a = tl.sum(tl.abs(x), axis=0)
    a = tl.where(a > 0, a, 1.0)
    if ACC == tl.float32:  # a compiled float32 "/" divides approximately (2 ulp): keep decisions
        ratio = tl.div_rn(s, a)  # would leave the torch path's
    else:
        ratio = s / a  # float64 "/" is correctly rounded
    purity = 0.5 * (1.0 + ratio)
    u = _uniforms(seed, counter, index, cols, cmask, HAS_INDEX, BLOCK).to(ACC)
    d = (purity - u)[None, :]
    if CHUNKED:
        y = tl.zeros((BLOCK,), dtype=ACC)
        r0 = 0
        while r0 < K:
            x, rows, rmask = _load_rows(J, stride_k, r0, K, cols, cmask, ACC, KP)
            y += _kept_sum(x, d, leak, rows, rmask, HAS_LEAK, ACC)
            r0 += KP
    else:
        y = _kept_sum(x, d, leak, rows, rmask, HAS_LEAK, ACC)
    tl.store(out + cols, cast_out(y, out.dtype.element_ty), mask=cmask)


def serves(J: torch.Tensor) -> bool:
    """Whether the kernel takes ``J`` (K, P): K >= 1 rows of a float dtype."""
    return J.shape[0] >= 1 and J.dtype in (torch.float16, torch.bfloat16, torch.float32,
                                           torch.float64)


def graddrop(J: torch.Tensor, seed: torch.Tensor, counter: torch.Tensor,
             leak: Optional[torch.Tensor], index: Optional[torch.Tensor]) -> torch.Tensor:
    """GradDrop (f = identity) of ``J`` (K, P) with the packed uniforms at
    ``counter + column`` (``counter + index[column]`` with ``index``); ``leak`` (K,) or None. The
    caller advances ``counter``."""
    K, P = J.shape
    if J.stride(1) != 1:
        J = J.contiguous()
    out = torch.empty(P, dtype=J.dtype, device=J.device)
    if P == 0:
        return out
    KP = min(MAX_ROWS, max(2, triton.next_power_of_2(K)))
    BLOCK = TILE // KP
    acc = tl.float64 if J.dtype == torch.float64 else tl.float32
    dummy = counter
    _graddrop_kernel[(triton.cdiv(P, BLOCK),)](
        J, J.stride(0), out, seed, counter, dummy if index is None else index.contiguous(),
        dummy if leak is None else leak.contiguous(), K, P, HAS_INDEX=index is not None,
        HAS_LEAK=leak is not None, ACC=acc, KP=KP, CHUNKED=K > KP, BLOCK=BLOCK, num_warps=4)
    return out
