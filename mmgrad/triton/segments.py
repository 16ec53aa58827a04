"""Triton kernels for the segment ops on a flat buffer: moments, scale (+ Philox noise), lerp;
and on the column segments of a matrix J (K, P): segment_gram, segment_combine_.

Load balancing without a host sync: each segment is cut into tiles of TILE elements, and the
launch has one program per possible tile. The number of tiles is at most
``cdiv(x.numel(), TILE) + S`` (segments don't overlap), a bound known from shapes alone. Each
program finds its tile's segment from the running tile count of the segment table, so a huge
segment gets many programs and empty segments get none; programs past the real tile count do
nothing. For S <= 1024 every program computes that running count itself (one vector load and a
cumsum, from L2) and searches it with one vector compare, which saves a launch; for larger S a
tiny single-program kernel writes it once and programs binary-search it.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from mmgrad.reference import segment_pairs

from .kernels import (_INTERP, _PAIRS_CONFIG, INTERPRET, _check_J, _row_stride,
                      accumulation_dtype, cast_out)

TILE = 16384  # elements per program
BLOCK = 2048  # elements per loop step inside a program
NUM_WARPS = 4
NUM_STAGES = 2  # software pipelining of the element loops (compiled only; 3 was slower for scale_)
SMALL_S = 1024  # up to this many segments, programs scan the table themselves
ALIGN = 16  # loop steps start at multiples of ALIGN elements: aligned vectors, whole Philox blocks

# Philox4x32-10 constants, as in mmgrad.reference.
PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)


# --- tile map -------------------------------------------------------------------------------


@triton.jit
def _tile_map_kernel(numels, tile_end, S, TILE: tl.constexpr, BS: tl.constexpr):
    # tile_end[s] = sum_{s' <= s} cdiv(numels[s'], TILE): an inclusive scan, chunk by chunk.
    carry = tl.full([], 0, tl.int64)
    s0 = S * 0
    while s0 < S:  # while, not range(), which the interpreter can't run (see kernels.py)
        s = s0 + tl.arange(0, BS)
        m = s < S
        n = tl.load(numels + s, mask=m, other=0)
        nt = (tl.maximum(n, 0) + (TILE - 1)) // TILE
        tl.store(tile_end + s, tl.cumsum(nt, axis=0) + carry, mask=m)
        carry += tl.sum(nt, axis=0)
        s0 += BS


@triton.jit
def _locate(t, tile_end, offsets, numels, S, nsteps, N, TILE: tl.constexpr, BS: tl.constexpr):
    """Segment of tile t, and the [base, base + cnt) element range of that tile (cnt = 0 when t is
    past the last tile): the first s with tile_end[s] > t. The range is clipped to [0, N), the
    buffer: a table with segments outside it (unchecked on a GPU: reading it would synchronise)
    then never makes a program touch memory outside the buffer.

    BS > 0 (S <= BS): tile_end is computed here from numels and searched with a vector compare.
    BS == 0: binary search in the precomputed tile_end; nsteps >= ceil(log2(S + 1)) from the host.
    """
    if BS > 0:
        idx = tl.arange(0, BS)
        nt = (tl.maximum(tl.load(numels + idx, mask=idx < S, other=0), 0) + (TILE - 1)) // TILE
        ends = tl.cumsum(nt, axis=0)  # lanes >= S hold the total, so never count while t is valid
        lo = tl.sum((ends <= t).to(tl.int32), axis=0)
        valid = lo < S
        s = tl.minimum(lo, S - 1)
        end = tl.sum(tl.where(idx == s, ends, 0), axis=0)
    else:
        s, valid, end = _binary_search(t, tile_end, S, nsteps)
    n = tl.load(numels + s)
    off = tl.load(offsets + s)
    first = end - (n + (TILE - 1)) // TILE  # index of the segment's first tile
    begin = (t - first) * TILE
    cnt = tl.where(valid, tl.minimum(n - begin, TILE), 0)
    lo = tl.maximum(off + begin, 0)
    hi = tl.minimum(off + begin + cnt, N)
    return s, lo, tl.maximum(hi - lo, 0)


@triton.jit
def _binary_search(t, tile_end, S, nsteps):
    lo = t * 0
    hi = lo + S
    step = nsteps * 0
    while step < nsteps:
        mid = (lo + hi) // 2
        e = tl.load(tile_end + mid, mask=mid < S, other=0)
        active = lo < hi
        right = e <= t
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & (e > t), mid, hi)
        step += 1
    valid = lo < S
    s = tl.minimum(lo, S - 1)
    return s, valid, tl.load(tile_end + s)


# --- Philox4x32-10 + Box-Muller ---------------------------------------------------------------


@triton.jit
def _sincos_2pi(v):
    """sin and cos of 2 pi v for v in [0, 1). The quadrant reduction is exact (v is a multiple of
    2^-24): 2 pi v = j pi/2 + r with j = round(4 v), r = 2 pi (v - j/4), |r| <= pi/4; then
    Cephes' single-precision minimax polynomials for sin and cos on [-pi/4, pi/4]. About 1e-7
    absolute error, and one shared reduction for both values: libdevice sinf + cosf each redo a
    general reduction, and made the noise kernel compute-bound."""
    j = tl.floor(v * 4.0 + 0.5)
    r = (v - j * 0.25) * 6.283185307179586
    r2 = r * r
    sin_r = r + r * r2 * (-1.6666654611e-1 + r2 * (8.3321608736e-3 + r2 * -1.9515295891e-4))
    cos_r = 1.0 - 0.5 * r2 + r2 * r2 * (4.166664568298827e-2 + r2 * (-1.388731625493765e-3
                                                                    + r2 * 2.443315711809948e-5))
    q = j.to(tl.int32) & 3
    sin_t = tl.where(q == 0, sin_r, tl.where(q == 1, cos_r, tl.where(q == 2, -sin_r, -cos_r)))
    cos_t = tl.where(q == 0, cos_r, tl.where(q == 1, -sin_r, tl.where(q == 2, -cos_r, sin_r)))
    return sin_t, cos_t


@triton.jit
def _box_muller(ru, rv, PRECISE: tl.constexpr):
    u = ((ru >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08  # (0, 1], exact
    v = (rv >> 8).to(tl.float32) * 5.9604644775390625e-08  # [0, 1), exact
    if PRECISE:
        # libdevice logf, not a hardware approximation: for u close to 1, lg2.approx's absolute
        # error exceeds |ln u| itself.
        ln_u = libdevice.log(u)
    else:  # interpreter: numpy's float32 log
        ln_u = tl.log(u)
    radius = tl.sqrt(-2.0 * ln_u)
    sin_t, cos_t = _sincos_2pi(v)
    return radius * cos_t, radius * sin_t


@triton.jit
def philox_key(seed):
    """The Philox key (k0, k1) of the int64 seed at ``seed``, read on the device: no host sync,
    and a captured CUDA graph sees a new seed written in place."""
    sv = tl.load(seed)
    return (sv & 0xFFFFFFFF).to(tl.uint32), ((sv >> 32) & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def packed_word(j, k0, k1):
    """The packed stream's word at each position of the int64 tensor ``j``: word ``j % 4`` of the
    Philox block at counter ``j // 4`` (``j`` read as unsigned), as mmgrad.reference."""
    r0, r1, r2, r3 = philox4x32((j >> 2) & 0x3FFFFFFFFFFFFFFF, k0, k1)
    w = j & 3
    return tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))


@triton.jit
def philox4x32(counter, k0, k1):
    """Philox4x32-10 on the counters (lo32(counter), hi32(counter), 0, 0) of the int64 tensor
    ``counter``, key (k0, k1) (uint32): the four output words, as mmgrad.reference.philox4x32.
    The one Philox of the Triton kernels (noise, feature dropping, uniforms)."""
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = tl.zeros(counter.shape, dtype=tl.uint32)
    c3 = tl.zeros(counter.shape, dtype=tl.uint32)
    for _r in tl.static_range(10):
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + PHILOX_W0  # the key bump after the last round is unused
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def _normal_block(q0, k0, k1, BLOCK: tl.constexpr, PRECISE: tl.constexpr):
    """philox_normal(seed, q0 + arange(BLOCK)) in float32, for q0 a multiple of 4. One Philox call
    per block of 4 elements (counter = element index >> 2) gives all four of its normals."""
    blk = (q0 >> 2) + tl.arange(0, BLOCK // 4).to(tl.int64)
    c0, c1, c2, c3 = philox4x32(blk, k0, k1)
    z0, z1 = _box_muller(c0, c1, PRECISE)
    z2, z3 = _box_muller(c2, c3, PRECISE)
    # join(join(z0, z2), join(z1, z3))[i, a, b] = z_{2a+b}[i]: row-major it is z0 z1 z2 z3.
    z = tl.join(tl.join(z0, z2), tl.join(z1, z3))
    return tl.reshape(z, (BLOCK,))


# --- kernels --------------------------------------------------------------------------------
# Each program handles one tile: elements [base, base + cnt). The loop steps start at a multiple of
# ALIGN elements at or below base (aligned vector accesses; whole Philox blocks of 4) and mask to
# the tile. Compiled, the loop is a pipelined tl.range; in the interpreter a while loop (see
# kernels.py). Loop bodies are the *_step helpers.


@triton.jit
def _moments_step(a1, a2, x, q0, base, cnt, BLOCK: tl.constexpr, ACC: tl.constexpr):
    q = q0 + tl.arange(0, BLOCK)
    v = tl.load(x + q, mask=(q >= base) & (q < base + cnt), other=0.0).to(ACC)
    return a1 + v, a2 + v * v


@triton.jit
def _moments_partial_kernel(x, tile_end, offsets, numels, part, S, nsteps, N, TILE: tl.constexpr,
                            BS: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr,
                            NS: tl.constexpr, ACC: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    s, base, cnt = _locate(t, tile_end, offsets, numels, S, nsteps, N, TILE, BS)
    head = tl.where(cnt > 0, base % ALIGN, 0)
    start = base - head
    a1 = tl.zeros((BLOCK,), dtype=ACC)
    a2 = tl.zeros((BLOCK,), dtype=ACC)
    if _INTERP:
        i = cnt * 0
        while i < cnt + head:
            a1, a2 = _moments_step(a1, a2, x, start + i, base, cnt, BLOCK, ACC)
            i += BLOCK
    else:
        for i in tl.range(0, cnt + head, BLOCK, num_stages=NS):
            a1, a2 = _moments_step(a1, a2, x, tl.multiple_of(start + i, ALIGN), base, cnt, BLOCK,
                                   ACC)
    tl.store(part + 2 * t, tl.sum(a1, axis=0))
    tl.store(part + 2 * t + 1, tl.sum(a2, axis=0))


@triton.jit
def _segment_tiles(tile_end, numels, s, TILE: tl.constexpr, BS: tl.constexpr):
    """Index of segment s's first tile among all segments' tiles, and its number of tiles."""
    n = tl.load(numels + s)
    nt = (tl.maximum(n, 0) + (TILE - 1)) // TILE
    if BS > 0:  # no tile_end array: recompute this segment's end
        idx = tl.arange(0, BS)
        nts = (tl.maximum(tl.load(numels + idx, mask=idx <= s, other=0), 0) + (TILE - 1)) // TILE
        first = tl.sum(nts, axis=0) - nt
    else:
        first = tl.load(tile_end + s) - nt
    return first, nt


@triton.jit
def _moments_reduce_kernel(part, tile_end, numels, out, S, TILE: tl.constexpr, BS: tl.constexpr,
                           RP: tl.constexpr):
    # Per segment, add its tiles' partials in a fixed order.
    s = tl.program_id(0).to(tl.int64)
    first, nt = _segment_tiles(tile_end, numels, s, TILE, BS)
    a1 = tl.zeros((RP,), dtype=out.dtype.element_ty)
    a2 = tl.zeros((RP,), dtype=out.dtype.element_ty)
    j0 = nt * 0
    while j0 < nt:
        j = j0 + tl.arange(0, RP)
        m = j < nt
        a1 += tl.load(part + 2 * (first + j), mask=m, other=0.0)
        a2 += tl.load(part + 2 * (first + j) + 1, mask=m, other=0.0)
        j0 += RP
    tl.store(out + 2 * s, tl.sum(a1, axis=0))
    tl.store(out + 2 * s + 1, tl.sum(a2, axis=0))


@triton.jit
def _scale_step(x, q0, base, cnt, sc, sd, k0, k1, BLOCK: tl.constexpr, ACC: tl.constexpr,
                HAS_NOISE: tl.constexpr, PRECISE: tl.constexpr):
    q = q0 + tl.arange(0, BLOCK)
    m = (q >= base) & (q < base + cnt)
    r = sc * tl.load(x + q, mask=m, other=0.0).to(ACC)
    if HAS_NOISE:
        r = r + sd * _normal_block(q0, k0, k1, BLOCK, PRECISE).to(ACC)
    tl.store(x + q, cast_out(r, x.dtype.element_ty), mask=m)


@triton.jit
def _scale_kernel(x, tile_end, offsets, numels, scale, noise_std, seed, S, nsteps, N,
                  TILE: tl.constexpr, BS: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr,
                  NS: tl.constexpr, ACC: tl.constexpr, HAS_NOISE: tl.constexpr,
                  PRECISE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    s, base, cnt = _locate(t, tile_end, offsets, numels, S, nsteps, N, TILE, BS)
    head = tl.where(cnt > 0, base % ALIGN, 0)
    start = base - head
    sc = tl.load(scale + s).to(ACC)
    if HAS_NOISE:
        sd = tl.load(noise_std + s).to(ACC)
        k0, k1 = philox_key(seed)
    else:
        sd = sc
        k0 = tl.full([], 0, tl.uint32)
        k1 = k0
    if _INTERP:
        i = cnt * 0
        while i < cnt + head:
            _scale_step(x, start + i, base, cnt, sc, sd, k0, k1, BLOCK, ACC, HAS_NOISE, PRECISE)
            i += BLOCK
    else:
        for i in tl.range(0, cnt + head, BLOCK, num_stages=NS):
            _scale_step(x, tl.multiple_of(start + i, ALIGN), base, cnt, sc, sd, k0, k1, BLOCK,
                        ACC, HAS_NOISE, PRECISE)


@triton.jit
def _lerp_step(x, y, q0, base, cnt, wt, BLOCK: tl.constexpr, ACC: tl.constexpr):
    q = q0 + tl.arange(0, BLOCK)
    m = (q >= base) & (q < base + cnt)
    xv = tl.load(x + q, mask=m, other=0.0).to(ACC)
    yv = tl.load(y + q, mask=m, other=0.0).to(ACC)
    tl.store(x + q, cast_out(wt * yv + (1 - wt) * xv, x.dtype.element_ty), mask=m)


@triton.jit
def _lerp_kernel(x, y, tile_end, offsets, numels, weight, S, nsteps, N, TILE: tl.constexpr,
                 BS: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr, NS: tl.constexpr,
                 ACC: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    s, base, cnt = _locate(t, tile_end, offsets, numels, S, nsteps, N, TILE, BS)
    head = tl.where(cnt > 0, base % ALIGN, 0)
    start = base - head
    wt = tl.load(weight + s).to(ACC)
    if _INTERP:
        i = cnt * 0
        while i < cnt + head:
            _lerp_step(x, y, start + i, base, cnt, wt, BLOCK, ACC)
            i += BLOCK
    else:
        for i in tl.range(0, cnt + head, BLOCK, num_stages=NS):
            _lerp_step(x, y, tl.multiple_of(start + i, ALIGN), base, cnt, wt, BLOCK, ACC)


# --- column-segment ops on J (K, P): segment_gram, segment_combine_ --------------------------
# Same tile map, over the columns of J: tile t is columns [base, base + cnt) of segment s, all K
# rows. Row pointers are J + r * ld (int64).


@triton.jit
def _ld_cols(p, cols, lo, hi, rmask, ACC: tl.constexpr):
    return tl.load(p + cols[None, :], mask=rmask & ((cols >= lo) & (cols < hi))[None, :],
                   other=0.0).to(ACC)


@triton.jit
def _sgram_step(acc, pa, pb, ma, mb, cols, lo, hi, BLOCK: tl.constexpr, U: tl.constexpr,
                SINGLE: tl.constexpr, ACC: tl.constexpr):
    # As kernels._pairs_step, with a lower column bound too (the aligned head of a tile).
    a0 = _ld_cols(pa, cols, lo, hi, ma, ACC)
    a1 = a0
    if U >= 2:
        a1 = _ld_cols(pa, cols + BLOCK, lo, hi, ma, ACC)
    if SINGLE:
        b0 = a0
        b1 = a1
    else:
        b0 = _ld_cols(pb, cols, lo, hi, mb, ACC)
        b1 = b0
        if U >= 2:
            b1 = _ld_cols(pb, cols + BLOCK, lo, hi, mb, ACC)
    acc += a0[:, None, :] * b0[None, :, :]
    if U >= 2:
        acc += a1[:, None, :] * b1[None, :, :]
    return acc


@triton.jit
def _sgram_partial_kernel(J, tile_end, offsets, numels, part, K, ld, S, nsteps, N, NB, KP,
                          TILE: tl.constexpr, BS: tl.constexpr, RB: tl.constexpr,
                          BLOCK: tl.constexpr, U: tl.constexpr, ALIGN: tl.constexpr,
                          NS: tl.constexpr, ACC: tl.constexpr, SINGLE: tl.constexpr):
    # Phase 1: program (tile t, row-block pair q) writes the (RB, RB) block (bi, bj) of its tile's
    # partial Gram, part[t]; only pairs bi <= bj (phase 2 reads the upper triangle). Tiles are on
    # grid axis 0 (up to 2^31 - 1 programs), pairs on axis 1.
    t = tl.program_id(0).to(tl.int64)
    q = tl.program_id(1)
    bi = q // NB
    bj = q % NB
    if bi <= bj:
        s, base, cnt = _locate(t, tile_end, offsets, numels, S, nsteps, N, TILE, BS)
        head = tl.where(cnt > 0, base % ALIGN, 0)
        start = base - head
        hi = base + cnt
        ri = bi * RB + tl.arange(0, RB)
        rj = bj * RB + tl.arange(0, RB)
        ma = (ri < K)[:, None]
        mb = (rj < K)[:, None]
        pa = J + ri.to(tl.int64)[:, None] * ld
        pb = J + rj.to(tl.int64)[:, None] * ld
        acc = tl.zeros((RB, RB, BLOCK), dtype=ACC)
        if _INTERP:
            i = cnt * 0
            while i < cnt + head:
                cols = start + i + tl.arange(0, BLOCK).to(tl.int64)
                acc = _sgram_step(acc, pa, pb, ma, mb, cols, base, hi, BLOCK, U, SINGLE, ACC)
                i += U * BLOCK
        else:
            for i in tl.range(0, cnt + head, U * BLOCK, num_stages=NS):
                cols = tl.multiple_of(start + i, ALIGN) + tl.arange(0, BLOCK).to(tl.int64)
                acc = _sgram_step(acc, pa, pb, ma, mb, cols, base, hi, BLOCK, U, SINGLE, ACC)
        res = tl.sum(acc, axis=2)
        tl.store(part + t * KP * KP + ri[:, None] * KP + rj[None, :], res)


@triton.jit
def _sgram_reduce_kernel(part, tile_end, numels, out, K, KP, TILE: tl.constexpr,
                         BS: tl.constexpr, BLOCK_E: tl.constexpr, RP: tl.constexpr):
    # Phase 2: out[s, i, j] = sum over the tiles of segment s of part[tile, min(i,j), max(i,j)], in
    # a fixed order; reading the upper triangle for (i, j) and (j, i) makes out exactly symmetric.
    s = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    em = e < K * K
    src = tl.minimum(e // K, e % K) * KP + tl.maximum(e // K, e % K)
    first, nt = _segment_tiles(tile_end, numels, s, TILE, BS)
    acc = tl.zeros((RP, BLOCK_E), dtype=out.dtype.element_ty)
    j0 = nt * 0
    while j0 < nt:
        j = j0 + tl.arange(0, RP)
        ptr = part + (first + j)[:, None] * (KP * KP) + src[None, :]
        acc += tl.load(ptr, mask=(j < nt)[:, None] & em[None, :], other=0.0)
        j0 += RP
    tl.store(out + s * K * K + e, tl.sum(acc, axis=0), mask=em)


@triton.jit
def _scombine_step(J, out, weights, w0, s, K, ld, q0, base, hi, KC: tl.constexpr,
                   NKC: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    # out[q] = sum_k w[k] J[k, q] for the step's columns. All K rows of the columns are loaded
    # before the store, so out may be a row of J (no other program touches these columns).
    q = q0 + tl.arange(0, BLOCK)
    m = (q >= base) & (q < hi)
    r = tl.arange(0, KC)
    x = tl.load(J + r.to(tl.int64)[:, None] * ld + q[None, :], mask=(r < K)[:, None] & m[None, :],
                other=0.0).to(ACC)
    acc = tl.sum(w0[:, None] * x, axis=0)
    for c in tl.static_range(1, NKC):  # K > KC: further row chunks (unrolled)
        rc = c * KC + r
        wc = tl.load(weights + s * K + rc, mask=rc < K, other=0.0)
        x = tl.load(J + rc.to(tl.int64)[:, None] * ld + q[None, :],
                    mask=(rc < K)[:, None] & m[None, :], other=0.0).to(ACC)
        acc += tl.sum(wc[:, None] * x, axis=0)
    tl.store(out + q, cast_out(acc, out.dtype.element_ty), mask=m)


@triton.jit
def _scombine_kernel(J, out, tile_end, offsets, numels, weights, K, ld, S, nsteps, N,
                     TILE: tl.constexpr, BS: tl.constexpr, KC: tl.constexpr, NKC: tl.constexpr,
                     BLOCK: tl.constexpr, ALIGN: tl.constexpr, NS: tl.constexpr,
                     ACC: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    s, base, cnt = _locate(t, tile_end, offsets, numels, S, nsteps, N, TILE, BS)
    head = tl.where(cnt > 0, base % ALIGN, 0)
    start = base - head
    hi = base + cnt
    r = tl.arange(0, KC)
    w0 = tl.load(weights + s * K + r, mask=(r < K) & (cnt > 0), other=0.0)
    if _INTERP:
        i = cnt * 0
        while i < cnt + head:
            _scombine_step(J, out, weights, w0, s, K, ld, start + i, base, hi, KC, NKC, BLOCK,
                           ACC)
            i += BLOCK
    else:
        for i in tl.range(0, cnt + head, BLOCK, num_stages=NS):
            _scombine_step(J, out, weights, w0, s, K, ld, tl.multiple_of(start + i, ALIGN), base,
                           hi, KC, NKC, BLOCK, ACC)


# --- launchers --------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check(x: torch.Tensor, offsets: torch.Tensor, numels: torch.Tensor, *per_segment) -> int:
    if x.dim() != 1 or not x.is_contiguous():
        raise ValueError("x must be a contiguous 1-D tensor")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"unsupported dtype {x.dtype}")
    if offsets.dtype != torch.int64 or numels.dtype != torch.int64:
        raise TypeError("offsets and numels must be int64")
    if offsets.dim() != 1 or offsets.shape != numels.shape:
        raise ValueError("offsets and numels must be 1-D of equal length")
    S = offsets.numel()
    for t in (offsets, numels) + per_segment:
        if t.device != x.device:
            raise ValueError("the segment table and per-segment tensors must be on x's device")
    for t in per_segment:
        if t.numel() != S:
            raise ValueError(f"per-segment tensors must have {S} elements")
    _check_host_table(offsets, numels, x.numel())
    return S


def _check_host_table(offsets: torch.Tensor, numels: torch.Tensor, length: int) -> None:
    """A table on the CPU (the interpreter's) is read and checked as the reference backend does.
    On a GPU that read would synchronise: there the caller promises disjoint segments inside the
    buffer (SegmentTable checks its own on the host) and _locate clips each tile to the buffer."""
    if offsets.device.type == "cpu" and not torch.compiler.is_compiling():
        segment_pairs(offsets, numels, length)


def _tile_map(x: torch.Tensor, offsets: torch.Tensor, numels: torch.Tensor,
              n: Optional[int] = None):
    """Launch parameters, from shapes only: (tile_end, BS, grid size, binary-search steps).
    For S <= SMALL_S the kernels scan the table themselves (BS > 0) and tile_end is a dummy.
    ``n``: the length of the indexed range (x.numel() by default; the columns of J for the
    column-segment ops)."""
    S = offsets.numel()
    grid = triton.cdiv(x.numel() if n is None else n, TILE) + S
    if S <= SMALL_S:
        return numels, max(16, triton.next_power_of_2(S)), grid, 0
    tile_end = torch.empty(S, dtype=torch.int64, device=x.device)
    _tile_map_kernel[(1,)](numels, tile_end, S, TILE=TILE, BS=1024, num_warps=4)
    return tile_end, 0, grid, S.bit_length()


def _common(x):
    return dict(TILE=TILE, BLOCK=BLOCK, ALIGN=ALIGN, NS=NUM_STAGES, ACC=_tl_acc(x.dtype),
                num_warps=NUM_WARPS)


def segment_moments(x: torch.Tensor, offsets: torch.Tensor, numels: torch.Tensor) -> torch.Tensor:
    """Per-segment [sum, sum of squares] of x, (S, 2) in the accumulation dtype."""
    S = _check(x, offsets, numels)
    acc = accumulation_dtype(x.dtype)
    out = torch.empty(S, 2, dtype=acc, device=x.device)
    if S == 0:
        return out
    offsets, numels = offsets.contiguous(), numels.contiguous()
    tile_end, BS, grid, nsteps = _tile_map(x, offsets, numels)
    part = torch.empty(grid, 2, dtype=acc, device=x.device)
    _moments_partial_kernel[(grid,)](x, tile_end, offsets, numels, part, S, nsteps, x.numel(), BS=BS,
                                     **_common(x))
    _moments_reduce_kernel[(S,)](part, tile_end, numels, out, S, TILE=TILE, BS=BS, RP=256,
                                 num_warps=4)
    return out


def segment_scale_(
    x: torch.Tensor,
    offsets: torch.Tensor,
    numels: torch.Tensor,
    scale: torch.Tensor,
    noise_std: Optional[torch.Tensor] = None,
    seed: Optional[torch.Tensor] = None,
) -> None:
    """In place: x[seg s] = scale[s] * x[seg s] + noise_std[s] * philox_normal(seed, index)."""
    per_seg = (scale,) if noise_std is None else (scale, noise_std)
    S = _check(x, offsets, numels, *per_seg)
    if noise_std is not None:
        if seed is None:
            raise ValueError("noise_std needs a seed: an int64 tensor of one element on x's device")
        if seed.numel() != 1 or seed.dtype != torch.int64 or seed.device != x.device:
            raise ValueError("seed must be an int64 tensor of one element on x's device")
    if S == 0:
        return None
    offsets, numels, scale = offsets.contiguous(), numels.contiguous(), scale.contiguous()
    has_noise = noise_std is not None
    if has_noise:
        noise_std = noise_std.contiguous()
    tile_end, BS, grid, nsteps = _tile_map(x, offsets, numels)
    _scale_kernel[(grid,)](
        x, tile_end, offsets, numels, scale,
        noise_std if has_noise else scale,  # unused placeholders without noise
        seed if has_noise else offsets,
        S, nsteps, x.numel(), BS=BS, HAS_NOISE=has_noise, PRECISE=not INTERPRET, **_common(x),
    )
    return None


def segment_lerp_(x: torch.Tensor, y: torch.Tensor, offsets: torch.Tensor, numels: torch.Tensor,
                  weight: torch.Tensor) -> None:
    """In place: x[seg s] = weight[s] * y[seg s] + (1 - weight[s]) * x[seg s]."""
    S = _check(x, offsets, numels, weight)
    if y.shape != x.shape or y.dtype != x.dtype or y.device != x.device or not y.is_contiguous():
        raise ValueError("y must be a contiguous tensor with x's shape, dtype and device")
    if S == 0:
        return None
    offsets, numels, weight = offsets.contiguous(), numels.contiguous(), weight.contiguous()
    tile_end, BS, grid, nsteps = _tile_map(x, offsets, numels)
    _lerp_kernel[(grid,)](x, y, tile_end, offsets, numels, weight, S, nsteps, x.numel(), BS=BS,
                          **_common(x))
    return None


def _check_columns(J: torch.Tensor, offsets: torch.Tensor, numels: torch.Tensor) -> int:
    _check_J(J)
    if offsets.dtype != torch.int64 or numels.dtype != torch.int64:
        raise TypeError("offsets and numels must be int64")
    if offsets.dim() != 1 or offsets.shape != numels.shape:
        raise ValueError("offsets and numels must be 1-D of equal length")
    if offsets.device != J.device or numels.device != J.device:
        raise ValueError("the segment table must be on J's device")
    _check_host_table(offsets, numels, J.shape[1])
    return offsets.numel()


def segment_gram(J: torch.Tensor, offsets: torch.Tensor, numels: torch.Tensor) -> torch.Tensor:
    """Per-segment Gram matrices J[:, seg] @ J[:, seg].T of the column segments of J (K, P):
    (S, K, K) in the accumulation dtype, exactly symmetric.

    One pass over J for K <= 8 (one row block: each element is loaded once). Larger K is split
    into row blocks of 8 and one program per tile and upper-triangle block pair, as in
    kernels.gram: correct for any K, but a row block is re-read by each of its pairs (mostly from
    L2), so the traffic grows with K / 8.
    """
    S = _check_columns(J, offsets, numels)
    K, P = J.shape
    acc = accumulation_dtype(J.dtype)
    if S == 0 or K == 0 or P == 0:  # P == 0: every (valid) segment is empty
        return torch.zeros(S, K, K, dtype=acc, device=J.device)
    offsets, numels = offsets.contiguous(), numels.contiguous()
    half = J.dtype in (torch.float16, torch.bfloat16)
    RB = min(8, triton.next_power_of_2(K))
    NB = triton.cdiv(K, RB)
    KP = NB * RB
    num_warps, VEC, U, NS = _PAIRS_CONFIG[(half, RB)]
    tile_end, BS, grid, nsteps = _tile_map(J, offsets, numels, P)
    part = torch.empty(grid, KP, KP, dtype=acc, device=J.device)
    _sgram_partial_kernel[(grid, NB * NB)](
        J, tile_end, offsets, numels, part, K, _row_stride(J), S, nsteps, P, NB, KP, TILE=TILE, BS=BS,
        RB=RB, BLOCK=32 * num_warps * VEC, U=U, ALIGN=ALIGN, NS=NS, ACC=_tl_acc(J.dtype),
        SINGLE=NB == 1, num_warps=num_warps)
    out = torch.empty(S, K, K, dtype=acc, device=J.device)
    BLOCK_E = min(256, triton.next_power_of_2(K * K))
    _sgram_reduce_kernel[(S, triton.cdiv(K * K, BLOCK_E))](
        part, tile_end, numels, out, K, KP, TILE=TILE, BS=BS, BLOCK_E=BLOCK_E,
        RP=max(1, 1024 // BLOCK_E), num_warps=4)
    return out


def segment_combine_(out: torch.Tensor, J: torch.Tensor, offsets: torch.Tensor,
                     numels: torch.Tensor, weights: torch.Tensor) -> None:
    """In place: out[seg s] = weights[s] @ J[:, seg s], accumulated in the accumulation dtype and
    stored in out's dtype (J's). out may be a row of J. One pass over J; any K (rows are read in
    unrolled chunks of up to 16)."""
    S = _check_columns(J, offsets, numels)
    K, P = J.shape
    acc = accumulation_dtype(J.dtype)
    if out.dim() != 1 or not out.is_contiguous() or out.shape[0] != P or out.dtype != J.dtype:
        raise ValueError(f"out must be a contiguous ({P},) tensor of J's dtype {J.dtype}")
    if out.device != J.device or weights.device != J.device:
        raise ValueError("out and weights must be on J's device")
    if weights.shape != (S, K) or weights.dtype != acc:
        raise ValueError(f"weights must be a ({S}, {K}) tensor of {acc}")
    if S == 0 or P == 0:
        return None
    offsets, numels, weights = offsets.contiguous(), numels.contiguous(), weights.contiguous()
    KC = min(16, triton.next_power_of_2(max(K, 1)))
    NKC = max(1, triton.cdiv(K, KC))
    # About 4096 elements of J per loop step (2048 columns for K <= 2, 256 for K >= 16).
    block = max(256, min(2048, 4096 // KC))
    tile_end, BS, grid, nsteps = _tile_map(J, offsets, numels, P)
    # Compiled on an H100, writing into a row of J in place gave results that differ from the
    # unaliased ones (seen for K = 2..8; not in the interpreter). Until the kernel is fixed, an
    # aliased out goes through a copy: two extra passes over P, correct results.
    aliased = K > 0 and out.untyped_storage().data_ptr() == J.untyped_storage().data_ptr()
    target = out.clone() if aliased else out
    _scombine_kernel[(grid,)](
        J if K > 0 else target,  # K == 0: nothing of J is read (segments become 0)
        target, tile_end, offsets, numels, weights, K, _row_stride(J), S, nsteps, P, TILE=TILE, BS=BS,
        KC=KC, NKC=NKC, BLOCK=block, ALIGN=ALIGN, NS=NUM_STAGES, ACC=_tl_acc(J.dtype),
        num_warps=NUM_WARPS)
    if aliased:
        out.copy_(target)
    return None
