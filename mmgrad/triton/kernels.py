"""Triton kernels for the dense ops: ``gram`` (J @ J.T) and ``combine`` (w @ J).

Both are memory-bound streams over J (K, P). Every element of J is read from DRAM once; reductions
over P are two-phase with a partition fixed by the shapes (no atomics), so results are bitwise
reproducible run after run on a given device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Decided at import, like triton.jit itself (TRITON_INTERPRET is read when kernels are decorated).
INTERPRET = bool(triton.knobs.runtime.interpret)
_INTERP = tl.constexpr(INTERPRET)

# gram phase 1 launches at most this many column chunks per row-block pair; fixed, so the
# partition (hence the rounding) depends on the shapes only, never on the device.
_GRAM_MAX_CHUNKS = 1024


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.float64: tl.float64}[dtype]


@triton.jit
def cast_out(v, DT: tl.constexpr):
    """v.to(DT), rounding to nearest even also in the interpreter, whose fp32 -> bf16 cast
    truncates; compiled, this is the plain cast."""
    if _INTERP and DT == tl.bfloat16 and v.dtype == tl.float32:
        b = v.to(tl.uint32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        return (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DT)


# --------------------------------------------------------------------------------------------
# Loops. Compiled, the hot loops are `tl.range(..., num_stages=NS)` for loops, which Triton
# software-pipelines (the next tiles are fetched while the current one is used): measured on an
# H100, 2.2 -> 3.0 TB/s for gram. The interpreter cannot run range() over a runtime scalar (with
# numpy 2 it fails converting the 1-element array to an int), so under TRITON_INTERPRET the same
# loop body runs in a while loop instead. Loop bodies are jit helpers shared by both forms.
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# gram, phase 1, "pairs" form (fp32 / fp64, and fp16 / bf16 with K <= 8 or K > 64):
# broadcast-multiply into (RB, RB, BLOCK) register accumulators.
#
# tl.dot in ieee fp32 lowers to an FMA loop that re-reads its operands from shared memory for
# every product (and would pad K to 16), so we multiply rows ourselves: each thread owns whole
# columns, accumulates all RB x RB products of its columns in registers and reduces across threads
# once, at the end of its chunk. K > RB is split into row blocks; program (pair, chunk) handles
# the row-block pair (bi, bj), bi <= bj. Pairs of the same chunk are adjacent in launch order, so
# a row block re-read by another pair comes from L2, not DRAM. Each loop step reads U tiles of
# BLOCK columns, all loads first, for more bytes in flight.
# --------------------------------------------------------------------------------------------


@triton.jit
def _ld_tile(p, cols, cend, rmask, ACC: tl.constexpr):
    return tl.load(p + cols[None, :], mask=rmask & (cols < cend)[None, :], other=0.0).to(ACC)


@triton.jit
def _pairs_step(acc, pa, pb, ma, mb, cols, cend, BLOCK: tl.constexpr, U: tl.constexpr,
                SINGLE: tl.constexpr, ACC: tl.constexpr):
    a0 = _ld_tile(pa, cols, cend, ma, ACC)
    a1 = a0
    if U >= 2:
        a1 = _ld_tile(pa, cols + BLOCK, cend, ma, ACC)
    if SINGLE:  # K <= RB: one row block, each element read once
        b0 = a0
        b1 = a1
    else:  # on diagonal pairs these reloads of the same rows hit L1
        b0 = _ld_tile(pb, cols, cend, mb, ACC)
        b1 = b0
        if U >= 2:
            b1 = _ld_tile(pb, cols + BLOCK, cend, mb, ACC)
    acc += a0[:, None, :] * b0[None, :, :]
    if U >= 2:
        acc += a1[:, None, :] * b1[None, :, :]
    return acc


@triton.jit
def _gram_pairs_kernel(J, part, K, P, ld, tpp, NB, KP, RB: tl.constexpr, BLOCK: tl.constexpr,
                       U: tl.constexpr, NS: tl.constexpr, ACC: tl.constexpr,
                       SINGLE: tl.constexpr):
    q = tl.program_id(0)
    chunk = tl.program_id(1).to(tl.int64)
    bi = q // NB
    bj = q % NB
    # Only the upper triangle of row-block pairs; the lower one is mirrored in phase 2.
    if bi <= bj:
        ri = bi * RB + tl.arange(0, RB)
        rj = bj * RB + tl.arange(0, RB)
        ma = (ri < K)[:, None]
        mb = (rj < K)[:, None]
        pa = J + ri.to(tl.int64)[:, None] * ld
        pb = J + rj.to(tl.int64)[:, None] * ld
        cbeg = chunk * tpp * BLOCK  # this chunk: columns [cbeg, cend), tpp tiles (U | tpp)
        cend = tl.minimum(cbeg + tpp * BLOCK, P)
        cols = cbeg + tl.arange(0, BLOCK).to(tl.int64)
        acc = tl.zeros((RB, RB, BLOCK), dtype=ACC)
        if _INTERP:
            t = tpp * 0
            while t < tpp:
                acc = _pairs_step(acc, pa, pb, ma, mb, cols, cend, BLOCK, U, SINGLE, ACC)
                cols += U * BLOCK
                t += U
        else:
            for _t in tl.range(0, tpp, U, num_stages=NS):
                acc = _pairs_step(acc, pa, pb, ma, mb, cols, cend, BLOCK, U, SINGLE, ACC)
                cols += U * BLOCK
        res = tl.sum(acc, axis=2)
        dst = part + chunk * KP * KP + ri[:, None] * KP + rj[None, :]
        tl.store(dst, res)


# gram, phase 1, "dot" form (fp16 / bf16 with 8 < K <= 64): tensor-core dot of the (KP, BLOCK)
# tile with its transpose, KP >= 16. Half-precision products are exact in fp32 and the MMA
# accumulates in fp32. (For K <= 8 the padding to 16 rows made this slower than the pairs form.)
@triton.jit
def _dot_step(acc, zero, ptr, cols, P, rm, UPCAST: tl.constexpr):
    a = tl.load(ptr + cols[None, :], mask=rm & (cols < P)[None, :], other=0.0)
    if UPCAST:
        # The interpreter's dot is numpy matmul, which cannot read bf16 (stored as uint16).
        a = a.to(tl.float32)
    # The tensor cores' fp32 accumulation truncates; chained over a whole chunk (thousands of MMAs)
    # its bias reached 3e-4 relative error at P = 64M. So each tile's dot starts from `zero` and is
    # added to `acc` with ordinary round-to-nearest adds (1e-6). `zero` is a runtime tensor, not
    # a literal, so that Triton doesn't fold `acc + dot(a, b, 0)` back into `dot(a, b, acc)`.
    return acc + tl.dot(a, tl.trans(a), zero, input_precision="ieee", out_dtype=tl.float32)


@triton.jit
def _gram_dot_kernel(J, part, K, P, ld, tpp, fzero, KP: tl.constexpr, BLOCK: tl.constexpr,
                     NS: tl.constexpr):
    chunk = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, KP)
    rm = (r < K)[:, None]
    ptr = J + r.to(tl.int64)[:, None] * ld
    cols = chunk * tpp * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    acc = tl.zeros((KP, KP), dtype=tl.float32)
    zero = tl.full((KP, KP), 0.0, tl.float32) + fzero  # fzero: a 0.0 kernel argument
    if _INTERP:
        t = tpp * 0
        while t < tpp:
            acc = _dot_step(acc, zero, ptr, cols, P, rm, True)
            cols += BLOCK
            t += 1
    else:
        for _t in tl.range(0, tpp, num_stages=NS):
            acc = _dot_step(acc, zero, ptr, cols, P, rm, False)
            cols += BLOCK
    dst = part + chunk * KP * KP + r[:, None] * KP + r[None, :]
    tl.store(dst, acc)


# gram, phase 2: out[i, j] = sum over chunks of part[c, min(i,j), max(i,j)] in a fixed order.
# Reading the upper triangle for both (i, j) and (j, i) makes the result exactly symmetric.
@triton.jit
def _gram_reduce_kernel(part, out, K, nchunks, KP, BLOCK_E: tl.constexpr, RP: tl.constexpr):
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    em = e < K * K
    i = e // K
    j = e % K
    src = tl.minimum(i, j) * KP + tl.maximum(i, j)
    acc = tl.zeros((RP, BLOCK_E), dtype=out.dtype.element_ty)
    p0 = nchunks * 0
    while p0 < nchunks:
        p = p0 + tl.arange(0, RP)
        ptr = part + p.to(tl.int64)[:, None] * (KP * KP) + src[None, :]
        acc += tl.load(ptr, mask=(p < nchunks)[:, None] & em[None, :], other=0.0)
        p0 += RP
    tl.store(out + e, tl.sum(acc, axis=0), mask=em)


def _check_J(J: torch.Tensor) -> None:
    if J.dim() != 2:
        raise ValueError(f"J must be 2-D (K, P), got shape {tuple(J.shape)}")
    if J.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"unsupported dtype {J.dtype}")
    if J.shape[1] > 1 and J.stride(1) != 1:
        raise ValueError("J's last dimension must be contiguous (J.stride(1) == 1)")


def _row_stride(J: torch.Tensor) -> int:
    # A single row may report any stride; any value >= P is then valid (only row 0 is read).
    return J.stride(0) if J.shape[0] > 1 else max(J.shape[1], 1)


# (half input, RB) -> (num_warps, columns per thread VEC, unroll U, pipeline stages NS), tuned on
# an H100 at P = 64M: fp32 2.7 / 2.9 / 2.8 / 2.5 TB/s for K = 2 / 4 / 8 / 16; bf16 2.5 / 2.7 /
# 2.6 TB/s for K = 2 / 4 / 8 (a plain read reaches 3.0). VEC > 1 multiplies the accumulator
# registers, so only small row blocks of half inputs (2 bytes per load) use it.
_PAIRS_CONFIG = {
    (False, 1): (4, 1, 2, 3), (False, 2): (4, 1, 2, 3), (False, 4): (4, 1, 2, 3),
    (False, 8): (4, 1, 2, 3),
    (True, 1): (4, 4, 2, 3), (True, 2): (4, 4, 2, 3), (True, 4): (4, 2, 2, 3),
    (True, 8): (4, 2, 2, 3),
}


def _chunks(n_tiles: int, unroll: int = 1):
    """(number of chunks, tiles per chunk): at most _GRAM_MAX_CHUNKS chunks, tiles per chunk a
    multiple of the loop's unroll factor."""
    tpp = triton.cdiv(triton.cdiv(n_tiles, min(n_tiles, _GRAM_MAX_CHUNKS)), unroll) * unroll
    return triton.cdiv(n_tiles, tpp), tpp


def gram(J: torch.Tensor) -> torch.Tensor:
    """J @ J.T accumulated in fp32 (fp64 for fp64 J); shape (K, K)."""
    _check_J(J)
    K, P = J.shape
    acc_dtype = accumulation_dtype(J.dtype)
    if K == 0 or P == 0:
        return torch.zeros(K, K, dtype=acc_dtype, device=J.device)
    ld = _row_stride(J)
    half = J.dtype in (torch.float16, torch.bfloat16)
    if half and 8 < K <= 64:  # beyond 64 rows the dot tile gets too large; pairs scale to any K
        KP = max(16, triton.next_power_of_2(K))
        BLOCK = 128 if KP <= 32 else 64
        nchunks, tpp = _chunks(triton.cdiv(P, BLOCK))
        part = torch.empty(nchunks, KP, KP, dtype=torch.float32, device=J.device)
        _gram_dot_kernel[(nchunks,)](J, part, K, P, ld, tpp, 0.0, KP=KP, BLOCK=BLOCK, NS=3,
                                     num_warps=4)
    else:
        RB = min(8, triton.next_power_of_2(K))
        NB = triton.cdiv(K, RB)
        KP = NB * RB
        num_warps, VEC, U, NS = _PAIRS_CONFIG[(half, RB)]
        BLOCK = 32 * num_warps * VEC
        nchunks, tpp = _chunks(triton.cdiv(P, BLOCK), U)
        part = torch.empty(nchunks, KP, KP, dtype=acc_dtype, device=J.device)
        _gram_pairs_kernel[(NB * NB, nchunks)](J, part, K, P, ld, tpp, NB, KP, RB=RB, BLOCK=BLOCK,
                                               U=U, NS=NS, ACC=_tl_dtype(acc_dtype),
                                               SINGLE=NB == 1, num_warps=num_warps)
    out = torch.empty(K, K, dtype=acc_dtype, device=J.device)
    BLOCK_E = min(128, triton.next_power_of_2(K * K))
    _gram_reduce_kernel[(triton.cdiv(K * K, BLOCK_E),)](part, out, K, nchunks, KP, BLOCK_E=BLOCK_E,
                                                        RP=32, num_warps=4)
    return out


# --------------------------------------------------------------------------------------------
# combine: out[p] = sum_k w[k] J[k, p]. One program per BLOCK columns; rows are read KC at a
# time so several independent row loads are in flight per thread. No cross-program reduction.
# --------------------------------------------------------------------------------------------


@triton.jit
def _combine_kernel(J, w, out, K, P, ld, KC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    cols = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    cm = (cols < P)[None, :]
    rr = tl.arange(0, KC)
    acc = tl.zeros((BLOCK,), dtype=w.dtype.element_ty)
    k0 = K * 0
    while k0 < K:
        r = k0 + rr
        rm = r < K
        wk = tl.load(w + r, mask=rm, other=0.0)
        x = tl.load(J + r.to(tl.int64)[:, None] * ld + cols[None, :], mask=rm[:, None] & cm,
                    other=0.0).to(w.dtype.element_ty)
        acc += tl.sum(wk[:, None] * x, axis=0)
        k0 += KC
    tl.store(out + cols, cast_out(acc, out.dtype.element_ty), mask=cols < P)


def combine(J: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w @ J accumulated in fp32 (fp64 for fp64 J), returned in J's dtype; shape (P,)."""
    _check_J(J)
    K, P = J.shape
    acc_dtype = accumulation_dtype(J.dtype)
    if w.shape != (K,):
        raise ValueError(f"w must have shape ({K},), got {tuple(w.shape)}")
    if w.dtype != acc_dtype:
        raise TypeError(f"w must be {acc_dtype} for J of dtype {J.dtype}, got {w.dtype}")
    if w.device != J.device:
        raise ValueError("w and J must be on the same device")
    w = w.contiguous()
    if K == 0 or P == 0:
        return torch.zeros(P, dtype=J.dtype, device=J.device)
    out = torch.empty(P, dtype=J.dtype, device=J.device)
    BLOCK = 1024
    _combine_kernel[(triton.cdiv(P, BLOCK),)](J, w, out, K, P, _row_stride(J), KC=4, BLOCK=BLOCK,
                                              num_warps=4)
    return out
