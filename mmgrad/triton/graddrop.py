"""Triton kernel of GradDrop with ``f = identity`` (:func:`mmgrad.aggregators.graddrop.graddrop_identity`).

One pass over J: each program loads a (KP, BLOCK) tile (all K rows of BLOCK columns, K <= MAX_K
padded to a power of two), forms the purity ``P = (1 + sum_i J_i / sum_i |J_i|) / 2`` of each
column, draws its uniform ``U`` from the packed Philox stream inline (position ``counter + column``,
or ``counter + index[column]`` for a shard: word ``j % 4`` of the block ``j // 4``, as
``ops.philox_uniform(..., packed=True)``; one Philox block per four columns where the positions
allow), keeps row i where ``P > U and J_i > 0`` or
``P < U and J_i < 0`` and writes ``sum_i (leak_i + (1 - leak_i) keep_i) J_i``. The torch path
this replaces ran ~10 launches per 32768 columns. Sums are in J's accumulation dtype (float64 for
float64, else float32), in the tile's reduction order: a keep decision can differ from the torch
path's only where P and U agree to rounding.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .segments import packed_word, philox4x32, philox_key

#: Largest K the kernel takes (one tile of all rows); larger K keep the torch path.
MAX_K = 64
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
def _graddrop_kernel(J, stride_k, out, seed, counter, index, leak, K, P, HAS_INDEX: tl.constexpr,
                     HAS_LEAK: tl.constexpr, ACC: tl.constexpr, KP: tl.constexpr,
                     BLOCK: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    rows = tl.arange(0, KP)
    cmask = cols < P
    rmask = rows < K
    x = tl.load(J + rows[:, None].to(tl.int64) * stride_k + cols[None, :],
                mask=rmask[:, None] & cmask[None, :], other=0.0).to(ACC)
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
    keep = ((d > 0) & (x > 0)) | ((d < 0) & (x < 0))  # NaN purity keeps nothing
    m = keep.to(ACC)
    if HAS_LEAK:
        lk = tl.load(leak + rows, mask=rmask, other=0.0).to(ACC)
        m = m * (1.0 - lk)[:, None] + lk[:, None]
    y = tl.sum(x * m, axis=0)
    tl.store(out + cols, y.to(out.dtype.element_ty), mask=cmask)


def serves(J: torch.Tensor) -> bool:
    """Whether the kernel takes ``J`` (K, P): K <= MAX_K rows of a float dtype."""
    return 1 <= J.shape[0] <= MAX_K and J.dtype in (torch.float16, torch.bfloat16, torch.float32,
                                                     torch.float64)


def graddrop(J: torch.Tensor, seed: torch.Tensor, counter: torch.Tensor,
             leak: Optional[torch.Tensor], index: Optional[torch.Tensor]) -> torch.Tensor:
    """GradDrop (f = identity) of ``J`` (K, P), K <= MAX_K, with the packed uniforms at
    ``counter + column`` (``counter + index[column]`` with ``index``); ``leak`` (K,) or None. The
    caller advances ``counter``."""
    K, P = J.shape
    if J.stride(1) != 1:
        J = J.contiguous()
    out = torch.empty(P, dtype=J.dtype, device=J.device)
    if P == 0:
        return out
    KP = max(2, triton.next_power_of_2(K))
    BLOCK = TILE // KP
    acc = tl.float64 if J.dtype == torch.float64 else tl.float32
    dummy = counter
    _graddrop_kernel[(triton.cdiv(P, BLOCK),)](
        J, J.stride(0), out, seed, counter, dummy if index is None else index.contiguous(),
        dummy if leak is None else leak.contiguous(), K, P, HAS_INDEX=index is not None,
        HAS_LEAK=leak is not None, ACC=acc, KP=KP, BLOCK=BLOCK, num_warps=4)
    return out
