"""Triton kernels of the aggregators' K x K solvers: the dual-cone projection (UPGrad, DualProj),
the min-norm point of the simplex (MGDA), the CAGrad dual, PCGrad's and GradVac's coefficient loops,
the whole solve of Nash-MTL (damped Newton) and of IMTL-G, ConFIG and Aligned-MTL (Jacobi
eigensolver), and the trace normalisation in front of the others.

The torch solvers of :mod:`mmgrad.aggregators._qp` are sync-free but launch some twenty kernels per
active-set iteration (a batched LU solve among them), hundreds per call: on an H100 that made
UPGrad's K x K solve take 0.5-19 ms, longer than torchjd's host solvers. Here one launch runs the
whole solve. Each program owns one problem, holds the K x K matrix (K padded to a power of two
KP <= MAX_K) in registers and runs the same iteration (the primal-dual active-set method with the
exchange rule of :func:`mmgrad.aggregators._qp._exchange`, or MGDA's Wolfe method), budget, ridge
and tolerance. Two differences, neither changing the result beyond rounding:

* the face system is solved by LU with partial pivoting on the tile, with the pivot rows recorded
  rather than swapped (same pivots as the torch solve; the sums in another order);
* a program stops once an iteration exchanges nothing (or Wolfe's method stops): the face, hence
  the iterate, would repeat (the C++ solver stops there too). A branch inside a kernel costs no
  host sync.

Padding coordinates (K <= i < KP) are tight from the start with ``u = 0`` and identity rows, so they
stay at 0 and never become infeasible.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

#: Largest K the kernels take: a 64 x 64 float64 tile (and a copy being eliminated) is what one
#: program keeps in registers; larger K use the torch solvers.
MAX_K = 64


@triton.jit
def _f64(x: tl.constexpr):
    """The float64 scalar of a Python float (a bare float literal or a float argument would be
    float32 in a kernel: 1e-4 -> 9.99999974738e-05)."""
    return tl.full((), x, tl.float64)


@triton.jit
def _solve_face(A, b, c, rows, cols, KP: tl.constexpr):
    """``(A^{-1} b, A^{-1} c)`` for a (KP, KP) tile ``A``: LU with partial pivoting, as the torch
    solve. Column k is eliminated from the rows not yet used as pivots with the one of largest
    ``|A[r, k]|`` (the first such row); rows are never moved, the pivot row of each column is
    recorded, and back substitution reads the rows in reverse pivot order. A zero pivot gives
    inf / NaN, as LU's division by a zero pivot does. (Gauss-Jordan, which also eliminates above
    the pivots, needs no back substitution but lost up to 0.4 of the CAGrad weights on faces that
    are singular up to the ridge.) Two right-hand sides because CAGrad needs two; the others pass
    zeros for ``c``."""
    used = rows < 0
    pivot_row = cols * 0  # pivot_row[k]: the row that pivoted column k
    for k in range(KP):
        col = tl.sum(tl.where(cols[None, :] == k, A, 0.0), axis=1)
        cand = tl.where(used, -1.0, tl.abs(col))
        p = tl.min(tl.where(cand == tl.max(cand, axis=0), rows, KP), axis=0)
        is_p = rows == p
        used = used | is_p
        row_p = tl.sum(tl.where(is_p[:, None], A, 0.0), axis=0)
        factor = tl.where(used, 0.0, col / tl.sum(tl.where(is_p, col, 0.0), axis=0))
        A = A - factor[:, None] * row_p[None, :]
        b = b - factor * tl.sum(tl.where(is_p, b, 0.0), axis=0)
        c = c - factor * tl.sum(tl.where(is_p, c, 0.0), axis=0)
        pivot_row = tl.where(cols == k, p, pivot_row)
    x = tl.zeros((KP,), tl.float64)
    y = x
    for i in range(KP):
        k = KP - 1 - i
        is_p = rows == tl.sum(tl.where(cols == k, pivot_row, 0), axis=0)
        row_p = tl.sum(tl.where(is_p[:, None], A, 0.0), axis=0)
        pivot = tl.sum(tl.where(cols == k, row_p, 0.0), axis=0)
        later = tl.where(cols > k, row_p, 0.0)
        xk = (tl.sum(tl.where(is_p, b, 0.0), axis=0) - tl.sum(later * x, axis=0)) / pivot
        yk = (tl.sum(tl.where(is_p, c, 0.0), axis=0) - tl.sum(later * y, axis=0)) / pivot
        x = tl.where(cols == k, xk, x)
        y = tl.where(cols == k, yk, y)
    return x, y


@triton.jit
def _exchange(tight, infeasible, cols, best, tries, BACKUP: tl.constexpr):
    """One step of the block pivoting rule of ``_qp._exchange`` for one problem: ``tight`` with the
    exchanged coordinates flipped, the new (best, tries), and the number of infeasible ones."""
    n = tl.sum(infeasible.to(tl.int32), axis=0)
    better = n < best
    full = better | (tries > 0)
    last = tl.max(tl.where(infeasible, cols + 1, 0), axis=0)
    mask = infeasible & (full | (cols + 1 == last))
    tries = tl.where(better, BACKUP, tries - 1)
    return tight ^ mask, tl.minimum(n, best), tries, n


@triton.jit
def _nan_if_not_finite(x, G, iters):
    """x, or NaN everywhere when G has a non-finite entry and an iteration ran (the C++ solvers'
    rule: a NaN multiplier compares false and would otherwise end the iteration with finite,
    meaningless weights)."""
    finite = tl.abs(G) < float("inf")  # false for inf and NaN
    bad = tl.sum(tl.sum(tl.where(finite, 0, 1), axis=1), axis=0) > 0
    return tl.where(bad & (iters > 0), float("nan"), x)


@triton.jit
def _square(G_ptr, K, KP: tl.constexpr):
    """Row and column indices of the (KP, KP) tile, the valid columns, the (K, K) G at ``G_ptr``
    as a tile (zero outside), the identity mask."""
    rows = tl.arange(0, KP)
    cols = tl.arange(0, KP)
    G = _tile(G_ptr, rows, cols, K, 0.0)
    return rows, cols, cols < K, G, rows[:, None] == cols[None, :]


@triton.jit
def _tile(ptr, rows, cols, K, other):
    """The (KP, KP) tile of a row-major (K, K) matrix at ``ptr``, ``other`` outside it."""
    inside = (rows < K)[:, None] & (cols < K)[None, :]
    return tl.load(ptr + rows[:, None] * K + cols[None, :], mask=inside, other=other)


@triton.jit
def _store_tile(ptr, x, rows, cols, K):
    tl.store(ptr + rows[:, None] * K + cols[None, :], x,
             mask=(rows < K)[:, None] & (cols < K)[None, :])


@triton.jit
def _onto_simplex(w, uniform):
    """As the torch solvers end: clamp at 0 (NaN stays NaN), divide by the sum, or the uniform
    point when nothing positive is left."""
    w = tl.where(w < 0, 0.0, w)
    total = tl.sum(w, axis=0)
    return tl.where(total > 0, w / tl.where(total > 0, total, 1.0), uniform)


@triton.jit
def _face_system(G, free, eye, ridge):
    """G + ridge I on the free block, identity elsewhere (``_qp._masked_system``)."""
    return tl.where(free[:, None] & free[None, :], G + ridge * eye.to(tl.float64),
                    eye.to(tl.float64))


@triton.jit
def _dual_cone_kernel(G_ptr, U_ptr, out_ptr, K, iters, RIDGE: tl.constexpr, TOL: tl.constexpr,
                      BACKUP: tl.constexpr, KP: tl.constexpr):
    """Row ``program_id`` of ``project_dual_cone``: ``min v^T G v s.t. v >= u``, started with every
    constraint tight; multipliers ``(G^T v)``."""
    b = tl.program_id(0).to(tl.int64)
    ridge, tol = _f64(RIDGE), _f64(TOL)
    rows, cols, valid, G, eye = _square(G_ptr, K, KP)
    u = tl.load(U_ptr + b * K + cols, mask=valid, other=0.0)
    v = u
    tight = cols >= 0
    best, tries, it, go = K + 1, BACKUP, 0, K > 0  # exchange state, iteration, not converged
    while go & (it < iters):
        mu = tl.sum(v[:, None] * G, axis=0)
        infeasible = tl.where(tight, mu < -tol, v < u - tol) & valid
        tight, best, tries, n = _exchange(tight, infeasible, cols, best, tries, BACKUP)
        go = n > 0
        if go:
            free = (tight == 0) & valid
            ua = tl.where(free, 0.0, u)
            rhs = tl.where(free, -tl.sum(ua[:, None] * G, axis=0), ua)
            v, _ = _solve_face(_face_system(G, free, eye, ridge), rhs, 0.0 * rhs, rows,
                               cols, KP)
        it += 1
    v = tl.maximum(v, u, propagate_nan=tl.PropagateNan.ALL)
    tl.store(out_ptr + b * K + cols, _nan_if_not_finite(v, G, iters), mask=valid)


@triton.jit
def _min_norm_kernel(G_ptr, out_ptr, K, iters, RIDGE: tl.constexpr, TOL: tl.constexpr,
                     KP: tl.constexpr):
    """``min_norm_simplex``: ``argmin_{a in simplex} a^T G a`` by Wolfe's method, step for step as
    ``_qp.min_norm_simplex_torch`` (start at the vertex of least ``G_ii``; on the support ``S``,
    ``y_S = p / sum(p)`` with ``G_SS p = 1``; a major step moves to ``y`` and adds the outside
    vertex of least ``(G y)_i``, a minor step moves towards ``y`` and drops what reaches 0)."""
    ridge, tol = _f64(RIDGE), _f64(TOL)
    rows, cols, valid, G, eye = _square(G_ptr, K, KP)
    uniform = tl.where(valid, 1.0 / (K * _f64(1.0)), 0.0)  # K may be a constexpr 1
    inf = _f64(float("inf"))
    diag = tl.where(valid, tl.sum(tl.where(eye, G, 0.0), axis=0), inf)
    first = _first_least(diag, tol, cols, KP)
    support = cols == first
    x = support.to(tl.float64)
    it, go = 0, K > 0
    while go & (it < iters):
        ones = support.to(tl.float64)
        p, _ = _solve_face(_face_system(G, support, eye, ridge), ones, 0.0 * ones, rows, cols, KP)
        total = tl.sum(p, axis=0)
        solvable = total > 0
        y = p / tl.where(solvable, total, 1.0)
        blocking = support & ((y > 0) == 0)  # NaN blocks too, as in the torch solver
        major = tl.sum(blocking.to(tl.int32), axis=0) == 0
        Gy = tl.sum(G * y[None, :], axis=1)
        outside = tl.where(support | (valid == 0), inf, Gy)
        enter = _first_least(outside, tol, cols, KP)
        grows = tl.sum(y * Gy, axis=0) - tl.min(outside, axis=0) > tol
        ratio = tl.where(blocking, x / tl.where(blocking, x - y, 1.0), inf)
        leave = _first_least(ratio, tol, cols, KP)
        x_minor = x + tl.min(ratio, axis=0) * (y - x)
        drop = support & ((x_minor <= 0) | (cols == leave))
        go = solvable & ((major == 0) | grows)
        x = tl.where(solvable, tl.where(major, y, tl.where(drop, 0.0, x_minor)), x)
        support = tl.where(go, tl.where(major, support | (cols == enter), support & (drop == 0)),
                           support)
        it += 1
    tl.store(out_ptr + cols, _nan_if_not_finite(_onto_simplex(x, uniform), G, iters), mask=valid)


@triton.jit
def _first_least(v, tol, cols, KP: tl.constexpr):
    """The lowest index ``i`` with ``v_i <= min(v) + tol`` (``_qp._first_least``)."""
    return tl.min(tl.where(v <= tl.min(v, axis=0) + tol, cols, KP), axis=0)


@triton.jit
def _cagrad_kernel(G_ptr, b_ptr, s_ptr, out_ptr, K, iters, RIDGE: tl.constexpr, TOL: tl.constexpr,
                   KAPPA_MAX: tl.constexpr, BACKUP: tl.constexpr, KP: tl.constexpr):
    """``cagrad_dual``: ``argmin_{w in simplex} b^T w + s |g_w|``, started with every coordinate
    free. On a face, with ``p = G_FF^{-1} 1`` and ``q = G_FF^{-1} b_F``: ``w = p / A2 + kappa
    ((A1 / A2) p - q)``, kappa capped at ``kappa_max`` where it is not real; multipliers
    ``b + G w / kappa - nu`` (see ``cagrad.cagrad_dual_torch``)."""
    ridge, tol, kappa_max = _f64(RIDGE), _f64(TOL), _f64(KAPPA_MAX)
    rows, cols, valid, G, eye = _square(G_ptr, K, KP)
    bvec = tl.load(b_ptr + cols, mask=valid, other=0.0)
    s = tl.load(s_ptr)
    uniform = tl.where(valid, 1.0 / (K * _f64(1.0)), 0.0)  # K may be a constexpr 1
    w = uniform
    tight = cols >= K
    best, tries, it, go = K + 1, BACKUP, 0, K > 0  # exchange state, iteration, not converged
    while go & (it < iters):
        free = (tight == 0) & valid
        ones = free.to(tl.float64)
        p, q = _solve_face(_face_system(G, free, eye, ridge), ones, ones * bvec, rows, cols, KP)
        A2 = tl.sum(p, axis=0)
        A2 = tl.where(A2 > 0, A2, 1.0)
        A1 = tl.sum(q, axis=0)
        A0 = tl.sum(ones * bvec * q, axis=0)
        excess = A0 - A1 * A1 / A2
        den = A2 * (s * s - tl.where(excess < 0, 0.0, excess))
        kappa = tl.where(den > 0, 1.0 / tl.sqrt(tl.where(den > 0, den, 1.0)), kappa_max)
        kappa = tl.minimum(kappa, kappa_max, propagate_nan=tl.PropagateNan.ALL)
        w = p / A2 + kappa * ((A1 / A2) * p - q)
        go = it + 1 < iters
        if go:
            nu = (1.0 / kappa + A1) / A2
            mu = bvec + tl.sum(G * w[None, :], axis=1) / kappa - nu
            infeasible = tl.where(tight, mu < -tol, w < -tol) & valid
            tight, best, tries, n = _exchange(tight, infeasible, cols, best, tries, BACKUP)
            go = n > 0
        it += 1
    tl.store(out_ptr + cols, _nan_if_not_finite(_onto_simplex(w, uniform), G, iters), mask=valid)


@triton.jit
def _jacobi(A, rows, cols, eye, K, sweeps, KP: tl.constexpr):
    """The parallel cyclic Jacobi method of ``_linalg.jacobi_eigh`` on a symmetric (KP, KP) tile
    (zero outside the K x K block): each round rotates KP / 2 disjoint pairs at once (the
    circle-method schedule over KP; a pair with a padding index is the identity),
    ``A <- R^T A R`` and ``V <- V R`` as tile products. Stops after a sweep that leaves the
    off-diagonal part below 1e-15 of A's norm (one more sweep changes nothing at float64
    resolution), else after ``sweeps``. Returns (A, V): the eigenvalues on A's diagonal, the
    eigenvectors in V's columns, unsorted."""
    V = tl.where(eye, 1.0, 0.0).to(tl.float64)
    n1 = KP - 1
    norm2 = tl.sum(tl.sum(A * A, axis=1), axis=0)
    sweep = 0
    go = K > 1
    while go & (sweep < sweeps):
        for r in range(KP - 1):
            A = 0.5 * (A + tl.trans(A))
            # circle method: index 0 stays at position 0, the others turn by r positions; the
            # pairs are the positions (j, KP - 1 - j)
            pos = tl.where(rows == 0, 0, (rows - 1 - r + n1) % n1 + 1)
            ppos = KP - 1 - pos
            partner = tl.where(ppos == 0, 0, (ppos - 1 + r) % n1 + 1)
            top = pos < KP // 2
            at_partner = cols[None, :] == partner[:, None]
            diag = tl.sum(tl.where(eye, A, 0.0), axis=0)
            d_own = tl.sum(tl.where(eye, A, 0.0), axis=1)
            d_partner = tl.sum(tl.where(at_partner, diag[None, :], 0.0), axis=1)
            apq = tl.sum(tl.where(at_partner, A, 0.0), axis=1)
            app = tl.where(top, d_own, d_partner)
            aqq = tl.where(top, d_partner, d_own)
            nz = apq != 0
            tau = (aqq - app) / (2.0 * tl.where(nz, apq, 1.0))
            t = tl.where(nz, tl.where(tau >= 0, 1.0, -1.0)
                         / (tl.abs(tau) + tl.sqrt(1.0 + tau * tau)), 0.0)
            c = 1.0 / tl.sqrt(1.0 + t * t)
            sgn_s = tl.where(top, t * c, -(t * c))
            R = tl.where(eye, c[:, None], tl.where(at_partner, sgn_s[:, None], 0.0))
            A = tl.dot(tl.trans(R), tl.dot(A, R))
            V = tl.dot(V, R)
        off = tl.sum(tl.sum(tl.where(eye, 0.0, A * A), axis=1), axis=0)
        go = off > 1e-30 * norm2
        sweep += 1
    return A, V


@triton.jit
def _trace_normalized_tile(G_ptr, stride0, stride1, rows, cols, eye, K, eps):
    """A (K, K) G of any float dtype and strides in float64 over its trace (zero when the trace
    is <= eps or not finite), as a tile: ``base.normalize_trace``."""
    inside = (rows < K)[:, None] & (cols < K)[None, :]
    G = tl.load(G_ptr + rows[:, None] * stride0 + cols[None, :] * stride1, mask=inside,
                other=0.0).to(tl.float64)
    t = tl.sum(tl.sum(tl.where(eye, G, 0.0), axis=1), axis=0)
    ok = (t > eps) & (tl.abs(t) < float("inf"))
    return tl.where(ok, G / tl.where(ok, t, 1.0), 0.0)


@triton.jit
def _pinv_weights_kernel(G_ptr, stride0, stride1, pref_ptr, out_ptr, K, sweeps,
                         RTOL: tl.constexpr, CONFIG: tl.constexpr, KP: tl.constexpr):
    """The whole ``weights(G)`` of IMTL-G (``CONFIG`` false: ``v = pinv(Gn) sqrt(diag Gn)``, then
    ``v / sum(v)``, zero when ``|sum(v)| < 1e-12``) or of ConFIG (``c = D^-1 pinv(Ghat) pref``
    with ``Ghat`` the cosine matrix, then ``c (1^T Gn c) / (c^T Gn c)``), as ``imtl.IMTLG`` and
    ``config.ConFIG`` compute them: Gn = G over its trace, pinv from :func:`_jacobi` with the
    relative cut-off RTOL on the eigenvalues."""
    rows = tl.arange(0, KP)
    cols = tl.arange(0, KP)
    eye = rows[:, None] == cols[None, :]
    Gn = _trace_normalized_tile(G_ptr, stride0, stride1, rows, cols, eye, K, _f64(0.0))
    d = tl.sum(tl.where(eye, Gn, 0.0), axis=1)
    d = tl.sqrt(tl.where(d > 0, d, 0.0))
    if CONFIG:
        inv_d = tl.where(d > 0, 1.0 / tl.where(d > 0, d, 1.0), 0.0)
        inv_d_c = tl.sum(tl.where(eye, inv_d[:, None], 0.0), axis=0)
        M = inv_d[:, None] * Gn * inv_d_c[None, :]
        b = tl.load(pref_ptr + rows, mask=rows < K, other=0.0)
    else:
        M = Gn
        b = d
    A, V = _jacobi(M, rows, cols, eye, K, sweeps, KP)
    lam = tl.sum(tl.where(eye, A, 0.0), axis=0)
    keep = tl.abs(lam) > _f64(RTOL) * tl.max(tl.abs(lam), axis=0)
    inv = tl.where(keep, 1.0 / tl.where(keep, lam, 1.0), 0.0)
    x = tl.sum(V * (inv * tl.sum(V * b[:, None], axis=0))[None, :], axis=1)  # pinv(M) b
    if CONFIG:
        c = inv_d * x
        c_c = tl.sum(tl.where(eye, c[:, None], 0.0), axis=0)
        Gc = tl.sum(Gn * c_c[None, :], axis=1)
        nb2 = tl.sum(c * Gc, axis=0)
        w = tl.where(nb2 > 0, c * (tl.sum(Gc, axis=0) / tl.where(nb2 > 0, nb2, 1.0)), 0.0)
    else:
        total = tl.sum(x, axis=0)
        ok = tl.abs(total) >= _f64(1e-12)
        w = tl.where(ok, x / tl.where(ok, total, 1.0), 0.0)
    tl.store(out_ptr + rows, w, mask=rows < K)


@triton.jit
def _aligned_kernel(G_ptr, stride0, stride1, pref_ptr, out_ptr, K, sweeps,
                    TOL: tl.constexpr, MODE: tl.constexpr, KP: tl.constexpr):
    """The whole ``weights(G)`` of Aligned-MTL, as ``aligned.AlignedMTL``: eigenvalues of Gn at
    most ``max(l) * TOL`` dropped, ``w = sqrt(sigma) V diag(l^-1/2) V^T pref`` on the kept ones
    with sigma their smallest (MODE 0), lower median (1) or mean (2); ``pref`` at rank 0."""
    rows = tl.arange(0, KP)
    cols = tl.arange(0, KP)
    eye = rows[:, None] == cols[None, :]
    valid = cols < K
    Gn = _trace_normalized_tile(G_ptr, stride0, stride1, rows, cols, eye, K, _f64(0.0))
    pref = tl.load(pref_ptr + rows, mask=rows < K, other=0.0)
    A, V = _jacobi(Gn, rows, cols, eye, K, sweeps, KP)
    lam = tl.sum(tl.where(eye, A, 0.0), axis=0)
    lam_max = tl.max(tl.where(valid, lam, -float("inf")), axis=0)
    keep = (lam > lam_max * _f64(TOL)) & valid
    rank = tl.sum(keep.to(tl.int32), axis=0)
    if MODE == 0:
        scale = tl.min(tl.where(keep, lam, float("inf")), axis=0)
    elif MODE == 1:
        lam_r = tl.sum(tl.where(eye, A, 0.0), axis=1)
        keep_r = tl.sum(tl.where(eye, keep[None, :], 0), axis=1) > 0
        # position among the kept ones, ascending, ties by index
        before = keep_r[:, None] & ((lam_r[:, None] < lam[None, :]) | (
            (lam_r[:, None] == lam[None, :]) & (rows[:, None] < cols[None, :])))
        order = tl.sum(before.to(tl.int32), axis=0)
        median = keep & (order == (rank - 1) // 2)
        scale = tl.sum(tl.where(median, lam, 0.0), axis=0)
    else:
        scale = tl.sum(tl.where(keep, lam, 0.0), axis=0) / tl.maximum(rank, 1).to(tl.float64)
    inv_sqrt = tl.where(keep, 1.0 / tl.sqrt(tl.where(keep, lam, 1.0)), 0.0)
    w = tl.sum(V * (inv_sqrt * tl.sum(V * pref[:, None], axis=0))[None, :], axis=1)
    w = tl.sqrt(tl.where(scale > 0, scale, 0.0)) * w
    tl.store(out_ptr + rows, tl.where(rank > 0, w, pref), mask=rows < K)


@triton.jit
def _nash_newton_loop(G, a, valid, eye, iters, rows, cols, K, KP: tl.constexpr):
    """Damped Newton on ``a^T G a / 2 - sum log a`` from ``a``, as ``nash.nash_newton_torch``;
    stops once an iteration leaves ``a`` unchanged bit for bit (as the C++ solver). Padding
    coordinates (G zero there) have gradient 0 and Hessian 1, so they stay put."""
    it = 0
    go = K > 0
    while go & (it < iters):
        g = tl.where(valid, tl.sum(G * a[None, :], axis=1) - 1.0 / a, 0.0)
        H = G + tl.where(eye, tl.where(valid, 1.0 / (a * a), 1.0)[:, None], 0.0)
        delta, _ = _solve_face(H, -g, 0.0 * g, rows, cols, KP)
        dec = -tl.sum(g * delta, axis=0)
        lam = tl.sqrt(tl.where(dec > 0, dec, 0.0))
        step = tl.where(lam < 0.25, 1.0, 1.0 / (1.0 + lam))
        new = a + step * delta
        floor = _f64(1e-30)
        new = tl.where(new < floor, floor, new)  # clamp(min=1e-30): NaN stays NaN
        go = tl.sum(tl.where(new != a, 1, 0), axis=0) > 0
        a = new
        it += 1
    return a


@triton.jit
def _nash_kernel(G_ptr, a0_ptr, out_ptr, K, iters, KP: tl.constexpr):
    """``nash_newton`` (:func:`_nash_newton_loop`) from ``a0``."""
    rows, cols, valid, G, eye = _square(G_ptr, K, KP)
    a = tl.load(a0_ptr + cols, mask=valid, other=1.0)
    a = _nash_newton_loop(G, a, valid, eye, iters, rows, cols, K, KP)
    tl.store(out_ptr + cols, a, mask=valid)


@triton.jit
def _nash_weights_kernel(G_ptr, stride0, stride1, prev_ptr, alpha_ptr, K, iters,
                         HAS_PREV: tl.constexpr, RIDGE: tl.constexpr, KP: tl.constexpr):
    """The solve of ``nash.NashMTL.weights``: G (any float dtype and strides) over its Frobenius
    norm plus RIDGE I, the start (the previous solution rescaled, or the cold start
    ``1 / sqrt(diag)`` scaled to ``a^T G a = K``), :func:`_nash_newton_loop`, the solution back on
    G's scale, written to ``alpha_ptr`` (the warm start of the next call; a zero or non-finite G
    keeps the previous one, or ones)."""
    rows = tl.arange(0, KP)
    cols = tl.arange(0, KP)
    eye = rows[:, None] == cols[None, :]
    valid = cols < K
    inside = (rows < K)[:, None] & valid[None, :]
    Gs = tl.load(G_ptr + rows[:, None] * stride0 + cols[None, :] * stride1, mask=inside,
                 other=0.0).to(tl.float64)
    nf = tl.sqrt(tl.sum(tl.sum(Gs * Gs, axis=1), axis=0))
    ok = (nf > 0) & (nf < float("inf"))
    nf = tl.where(ok, nf, 1.0)
    Gr = tl.where(ok, Gs / nf, 0.0) + tl.where(eye & inside, _f64(RIDGE), 0.0)
    root = tl.sqrt(nf)
    if HAS_PREV:
        a = tl.load(prev_ptr + cols, mask=valid, other=1.0) * root
        floor = _f64(1e-30)
        a = tl.where(valid, tl.where(a < floor, floor, a), 1.0)  # clamp(min=1e-30)
    else:
        d = tl.sum(tl.where(eye, Gr, 0.0), axis=0)
        a = tl.where(valid, 1.0 / tl.sqrt(tl.where(valid, d, 1.0)), 0.0)
        quad = tl.sum(a * tl.sum(Gr * a[None, :], axis=1), axis=0)
        a = tl.where(valid, a * tl.sqrt((K * _f64(1.0)) / quad), 1.0)
    alpha = _nash_newton_loop(Gr, a, valid, eye, iters, rows, cols, K, KP) / root
    if HAS_PREV:  # a zero or non-finite G keeps the previous solution (ones at first)
        kept = tl.load(prev_ptr + cols, mask=valid, other=0.0)
    else:
        kept = tl.where(valid, _f64(1.0), 0.0)
    tl.store(alpha_ptr + cols, tl.where(ok, alpha, kept), mask=valid)


@triton.jit
def _visit(order, t, rows, cols, K):
    """Step t of the projection methods' visiting orders: for every row i its partner
    ``j_i = order[i, t]`` as a one-hot (KP, KP) float64 selector ``S[i, m] = (m == j_i)`` (all
    zero on padding rows), and whether the pair is a real one (``j_i != i``)."""
    j = tl.sum(tl.where(cols[None, :] == t, order, 0), axis=1)
    S = (cols[None, :] == j[:, None]) & (rows < K)[:, None]
    return S, (j != rows) & (rows < K)


@triton.jit
def _pcgrad_kernel(G_ptr, order_ptr, out_ptr, K, KP: tl.constexpr):
    """``pcgrad_coefficients``: PCGrad in coefficient space, all rows side by side as
    ``projection.pcgrad_coefficients_torch``; the rows ``G[j_i]`` are one-hot products."""
    rows = tl.arange(0, KP)
    cols = tl.arange(0, KP)
    G = _tile(G_ptr, rows, cols, K, 0.0)
    order = _tile(order_ptr, rows, cols, K, 0).to(tl.int32)
    eye = rows[:, None] == cols[None, :]
    d = tl.sum(tl.where(eye, G, 0.0), axis=0)
    C = tl.where(eye, 1.0, 0.0).to(tl.float64)
    for t in range(KP):
        S, real = _visit(order, t, rows, cols, K)
        Gj = tl.dot(S.to(tl.float64), G)
        inner = tl.sum(C * Gj, axis=1)
        dj = tl.sum(tl.where(S, d[None, :], 0.0), axis=1)
        ok = real & (inner < 0) & (dj > 0) & (t < K)
        step = tl.where(ok, -inner / tl.where(dj > 0, dj, 1.0), 0.0)
        C = C + tl.where(S, step[:, None], 0.0)
    _store_tile(out_ptr, C, rows, cols, K)


@triton.jit
def _gradvac_kernel(G_ptr, order_ptr, phi_ptr, C_ptr, phi_out_ptr, K, BETA: tl.constexpr,
                    EPS: tl.constexpr, KP: tl.constexpr):
    """``gradvac_coefficients``: GradVac in coefficient space with its EMA targets ``phi_t``, as
    ``projection.gradvac_coefficients_torch``."""
    beta, eps = _f64(BETA), _f64(EPS)
    rows = tl.arange(0, KP)
    cols = tl.arange(0, KP)
    G = _tile(G_ptr, rows, cols, K, 0.0)
    order = _tile(order_ptr, rows, cols, K, 0).to(tl.int32)
    phi_t = _tile(phi_ptr, rows, cols, K, 0.0)
    eye = rows[:, None] == cols[None, :]
    diag = tl.sum(tl.where(eye, G, 0.0), axis=0)
    norms = tl.sqrt(tl.where(diag > 0, diag, 0.0))
    C = tl.where(eye, 1.0, 0.0).to(tl.float64)
    cG = G  # row i: g_i' . g_k for every k
    for t in range(KP):
        S, real = _visit(order, t, rows, cols, K)
        real = real & (t < K)
        dot = tl.sum(tl.where(S, cG, 0.0), axis=1)
        n2 = tl.sum(cG * C, axis=1)
        norm_i = tl.sqrt(tl.where(n2 > 0, n2, 0.0))
        norm_j = tl.sum(tl.where(S, norms[None, :], 0.0), axis=1)
        phi = dot / (norm_i * norm_j + eps)
        hat = tl.sum(tl.where(S, phi_t, 0.0), axis=1)
        s_phi = 1 - phi * phi
        s_phi = tl.sqrt(tl.where(s_phi > 0, s_phi, 0.0))
        s_hat = 1 - hat * hat
        s_hat = tl.sqrt(tl.where(s_hat > 0, s_hat, 0.0))
        w = norm_i * (hat * s_phi - phi * s_hat) / (norm_j * s_hat + eps)
        w = tl.where(real & (phi < hat), w, 0.0)
        C = C + tl.where(S, w[:, None], 0.0)
        cG = cG + w[:, None] * tl.dot(S.to(tl.float64), G)
        phi_t = tl.where(S & real[:, None], ((1 - beta) * hat + beta * phi)[:, None], phi_t)
    _store_tile(C_ptr, C, rows, cols, K)
    _store_tile(phi_out_ptr, phi_t, rows, cols, K)


@triton.jit
def _trace_normalized_kernel(G_ptr, out_ptr, K, stride0, stride1, EPS: tl.constexpr,
                             REG: tl.constexpr, KP: tl.constexpr):
    """``base.normalized``: G in float64 over its trace (zero when the trace is <= eps or not
    finite), plus reg on the diagonal."""
    rows = tl.arange(0, KP)
    cols = tl.arange(0, KP)
    eye = rows[:, None] == cols[None, :]
    Gn = _trace_normalized_tile(G_ptr, stride0, stride1, rows, cols, eye, K, _f64(EPS))
    _store_tile(out_ptr, Gn + tl.where(eye, _f64(REG), 0.0), rows, cols, K)


@triton.jit
def _normalized_k2(G_ptr, stride0, stride1, EPS: tl.constexpr, REG: tl.constexpr):
    """The entries (n00, n01, n10, n11) of ``base.normalized(G, EPS, REG)`` for a (2, 2) G, in
    float64 scalars."""
    g00 = tl.load(G_ptr).to(tl.float64)
    g01 = tl.load(G_ptr + stride1).to(tl.float64)
    g10 = tl.load(G_ptr + stride0).to(tl.float64)
    g11 = tl.load(G_ptr + stride0 + stride1).to(tl.float64)
    t = g00 + g11
    ok = (t > _f64(EPS)) & (tl.abs(t) < float("inf"))
    safe = tl.where(ok, t, 1.0)
    reg = _f64(REG)
    return (tl.where(ok, g00 / safe, 0.0) + reg, tl.where(ok, g01 / safe, 0.0),
            tl.where(ok, g10 / safe, 0.0), tl.where(ok, g11 / safe, 0.0) + reg)


@triton.jit
def _relu(x):
    """``torch.relu``: NaN stays NaN."""
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _min_norm_k2_kernel(G_ptr, stride0, stride1, out_ptr, REG: tl.constexpr):
    """MGDA's weights for K = 2 whole, in scalars: ``base.normalized(G, reg=REG)`` (G in float64
    over its trace, zero when the trace is <= 0 or not finite, plus REG on the diagonal), then the
    closed form ``_qp.min_norm_k2``. Scalar code only: no tile, so no layout conversion (the kind
    of code that miscompiled in Nash-MTL's KP = 2 kernel)."""
    n00, n01, _, n11 = _normalized_k2(G_ptr, stride0, stride1, 0.0, REG)
    den = n00 + n11 - 2.0 * n01
    pos = den > 0
    gamma = tl.where(pos, (n11 - n01) / tl.where(pos, den, 1.0), 0.5)
    # clamp(0, 1) keeping NaN (inf / inf), as torch's: the default min / max compile to PTX
    # min / max, which return the other operand
    gamma = tl.minimum(tl.maximum(gamma, 0.0, propagate_nan=tl.PropagateNan.ALL), 1.0,
                       propagate_nan=tl.PropagateNan.ALL)
    tl.store(out_ptr, gamma)
    tl.store(out_ptr + 1, 1.0 - gamma)


@triton.jit
def _dual_cone_k2_kernel(G_ptr, stride0, stride1, pref_ptr, out_ptr, EPS: tl.constexpr,
                         REG: tl.constexpr, UPGRAD: tl.constexpr):
    """UPGrad's (rows ``pref_i e_i``, projections summed) or DualProj's (the row ``pref``) weights
    for K = 2 and ``pref >= 0`` whole, in scalars: ``base.normalized(G, EPS, REG)`` and the
    closed form ``_qp.dual_cone_k2`` (``v = u + e_i relu(-(u^T G)_i) / G_ii``)."""
    n00, n01, n10, n11 = _normalized_k2(G_ptr, stride0, stride1, EPS, REG)
    p0 = tl.load(pref_ptr).to(tl.float64)
    p1 = tl.load(pref_ptr + 1).to(tl.float64)
    s00 = tl.where(n00 > 0, n00, 1.0)
    s11 = tl.where(n11 > 0, n11, 1.0)
    if UPGRAD:  # rows (p0, 0) and (0, p1); the zero products kept, as in the matmul U @ G (an
        # infinite entry times 0 gives NaN there)
        w0 = p0 + tl.where(n00 > 0, _relu(-(p0 * n00 + 0.0 * n10)) / s00, 0.0)
        w1 = tl.where(n11 > 0, _relu(-(p0 * n01 + 0.0 * n11)) / s11, 0.0)
        w0 += tl.where(n00 > 0, _relu(-(0.0 * n00 + p1 * n10)) / s00, 0.0)
        w1 += p1 + tl.where(n11 > 0, _relu(-(0.0 * n01 + p1 * n11)) / s11, 0.0)
    else:
        w0 = p0 + tl.where(n00 > 0, _relu(-(p0 * n00 + p1 * n10)) / s00, 0.0)
        w1 = p1 + tl.where(n11 > 0, _relu(-(p0 * n01 + p1 * n11)) / s11, 0.0)
    tl.store(out_ptr, w0)
    tl.store(out_ptr + 1, w1)


@triton.jit
def _pcgrad_k2_kernel(G_ptr, stride0, stride1, out_ptr, SCALE: tl.constexpr):
    """PCGrad's weights for K = 2 whole, in scalars (the order is irrelevant at K = 2):
    ``base.normalized(G)``, then as ``projection.pcgrad_coefficients_torch`` each row projected
    off the other where their product is < 0 (a NaN product projects nothing), the coefficient
    rows summed and scaled by SCALE (1, or 1/2 for ``reduction="mean"``)."""
    n00, n01, n10, n11 = _normalized_k2(G_ptr, stride0, stride1, 0.0, 0.0)
    s00 = tl.where(n00 > 0, n00, 1.0)
    s11 = tl.where(n11 > 0, n11, 1.0)
    c10 = tl.where((n01 < 0) & (n00 > 0), -n01 / s00, 0.0)  # row 1 off g_0: (e_1 . G e_0) = n01
    c01 = tl.where((n10 < 0) & (n11 > 0), -n10 / s11, 0.0)
    tl.store(out_ptr, (1.0 + c10) * _f64(SCALE))
    tl.store(out_ptr + 1, (c01 + 1.0) * _f64(SCALE))


def _padded(K: int) -> int:
    return max(2, triton.next_power_of_2(K))


def _eig_padded(K: int) -> int:
    """The tile of the kernels that multiply tiles: tl.dot takes 16 and more."""
    return max(16, _padded(K))


def _num_warps(KP: int) -> int:
    """Few warps (fewer cross-warp reductions), enough that the tiles fit in registers: ptxas for
    sm_90 gives at most 96 registers at KP <= 8, 168 at 16, 242 at 32, and 255 plus a spill stack
    of 0.1-1.6 KB at 64; ``python tests/test_triton_compile.py 90`` prints them."""
    return {2: 1, 4: 1, 8: 1, 16: 2, 32: 4}.get(KP, 8)


def serves(G: torch.Tensor) -> bool:
    """Whether these kernels take ``G``: float64 with 1 <= K <= MAX_K."""
    return G.dtype == torch.float64 and 1 <= G.shape[-1] <= MAX_K


def min_norm_k2(G: torch.Tensor, reg: float) -> torch.Tensor:
    """MGDA's float64 weights of a (2, 2) G of any float dtype and strides in one launch: trace
    normalisation with ``reg`` on the diagonal, then the closed form (``_min_norm_k2_kernel``),
    where the torch ops are about fifteen launches."""
    out = torch.empty(2, dtype=torch.float64, device=G.device)
    _min_norm_k2_kernel[(1,)](G, G.stride(0), G.stride(1), out, REG=float(reg), num_warps=1)
    return out


def dual_cone_k2(G: torch.Tensor, pref: torch.Tensor, eps: float, reg: float,
                 upgrad: bool) -> torch.Tensor:
    """UPGrad's (``upgrad``) or DualProj's float64 weights of a (2, 2) G of any float dtype and
    strides, ``pref`` (2,) >= 0, in one launch: trace normalisation (``eps``, ``reg``) and the
    closed form (``_dual_cone_k2_kernel``), where the torch ops are about ten launches."""
    out = torch.empty(2, dtype=torch.float64, device=G.device)
    _dual_cone_k2_kernel[(1,)](G, G.stride(0), G.stride(1), pref.contiguous(), out, EPS=float(eps),
                               REG=float(reg), UPGRAD=upgrad, num_warps=1)
    return out


def pcgrad_k2(G: torch.Tensor, scale: float) -> torch.Tensor:
    """PCGrad's float64 weights of a (2, 2) G of any float dtype and strides, times ``scale``, in
    one launch (``_pcgrad_k2_kernel``)."""
    out = torch.empty(2, dtype=torch.float64, device=G.device)
    _pcgrad_k2_kernel[(1,)](G, G.stride(0), G.stride(1), out, SCALE=float(scale), num_warps=1)
    return out


def trace_normalized(G: torch.Tensor, eps: float, reg: float) -> torch.Tensor:
    """``base.normalized`` in one program (the torch ops are six to eight launches): a float64
    (K, K) copy of ``G`` (any float dtype and strides, K <= MAX_K) over its trace, plus ``reg``
    on the diagonal."""
    K = G.shape[0]
    out = torch.empty(K, K, dtype=torch.float64, device=G.device)
    KP = _padded(K)
    _trace_normalized_kernel[(1,)](G, out, K, G.stride(0), G.stride(1), EPS=float(eps),
                                   REG=float(reg), KP=KP, num_warps=_num_warps(KP))
    return out


def project_dual_cone(G: torch.Tensor, U: torch.Tensor, iters: int, ridge: float, tol: float,
                      backup: int) -> torch.Tensor:
    """Every row of ``U`` (B, K) projected as ``_qp.project_dual_cone_torch`` does: one program a
    row. ``G`` (K, K) float64, K <= MAX_K."""
    K = G.shape[0]
    G = G.contiguous()
    U = U.contiguous()
    out = torch.empty_like(U)
    if U.shape[0] > 0:
        KP = _padded(K)
        _dual_cone_kernel[(U.shape[0],)](G, U, out, K, iters, RIDGE=ridge, TOL=tol, BACKUP=backup, KP=KP,
                                         num_warps=_num_warps(KP))
    return out


def min_norm_simplex(G: torch.Tensor, iters: int, ridge: float, tol: float) -> torch.Tensor:
    """``_qp.min_norm_simplex_torch`` in one program. ``G`` (K, K) float64, K <= MAX_K."""
    K = G.shape[0]
    G = G.contiguous()
    out = G.new_empty(K)
    KP = _padded(K)
    _min_norm_kernel[(1,)](G, out, K, iters, RIDGE=ridge, TOL=tol, KP=KP, num_warps=_num_warps(KP))
    return out


def cagrad_dual(G: torch.Tensor, b: torch.Tensor, s: torch.Tensor, iters: int, ridge: float,
                tol: float, backup: int, kappa_max: float) -> torch.Tensor:
    """``cagrad.cagrad_dual_torch`` in one program. ``G`` (K, K), ``b`` (K,), ``s`` (one element),
    all float64, K <= MAX_K."""
    K = G.shape[0]
    out = G.new_empty(K)
    KP = _padded(K)
    _cagrad_kernel[(1,)](G.contiguous(), b.contiguous(), s.reshape(1).contiguous(), out, K, iters,
                         RIDGE=ridge, TOL=tol, KAPPA_MAX=kappa_max, BACKUP=backup, KP=KP,
                         num_warps=_num_warps(KP))
    return out


def nash_newton(G: torch.Tensor, alpha0: torch.Tensor, iters: int) -> torch.Tensor:
    """``nash.nash_newton_torch`` in one program: float64 ``G`` (K, K), ``alpha0`` (K,),
    K <= MAX_K."""
    K = G.shape[0]
    out = alpha0.new_empty(K)
    KP = _padded(K)
    _nash_kernel[(1,)](G.contiguous(), alpha0.contiguous(), out, K, iters, KP=KP,
                       num_warps=_num_warps(KP))
    return out


def pcgrad_coefficients(G: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``projection.pcgrad_coefficients_torch`` in one program: the (K, K) coefficients for the
    visiting orders ``order`` (K, K) of a float64 ``G``, K <= MAX_K."""
    K = G.shape[0]
    C = G.new_empty(K, K)
    KP = _eig_padded(K)
    _pcgrad_kernel[(1,)](G.contiguous(), order.contiguous(), C, K, KP=KP,
                         num_warps=_num_warps(KP))
    return C


def gradvac_coefficients(G: torch.Tensor, order: torch.Tensor, phi_t: torch.Tensor, beta: float,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``projection.gradvac_coefficients_torch`` in one program: ``(C, new phi_t)``."""
    K = G.shape[0]
    C = G.new_empty(K, K)
    phi_out = G.new_empty(K, K)
    KP = _eig_padded(K)
    _gradvac_kernel[(1,)](G.contiguous(), order.contiguous(), phi_t.to(G.dtype).contiguous(), C,
                          phi_out, K, BETA=float(beta), EPS=float(eps), KP=KP,
                          num_warps=_num_warps(KP))
    return C, phi_out


def pinv_weights(G: torch.Tensor, pref: Optional[torch.Tensor], rtol: float,
                 sweeps: int) -> torch.Tensor:
    """IMTL-G's weights (``pref`` None) or ConFIG's (``pref`` (K,) float64) of a (K, K) G of any
    float dtype, K <= MAX_K, in one program: float64, ``rtol`` the cut-off relative to the
    largest eigenvalue (ConFIG: on the cosine matrix, already squared)."""
    K = G.shape[0]
    out = torch.empty(K, dtype=torch.float64, device=G.device)
    KP = _eig_padded(K)
    _pinv_weights_kernel[(1,)](G, G.stride(0), G.stride(1), out if pref is None else pref, out, K,
                               sweeps, RTOL=float(rtol), CONFIG=pref is not None, KP=KP,
                               num_warps=_num_warps(KP))
    return out


def aligned_weights(G: torch.Tensor, pref: torch.Tensor, tol: float, mode: int,
                    sweeps: int) -> torch.Tensor:
    """Aligned-MTL's weights of a (K, K) G of any float dtype, K <= MAX_K, in one program:
    float64; ``tol`` the cut-off relative to the largest eigenvalue, ``mode`` 0 / 1 / 2 for the
    smallest / lower median / mean kept eigenvalue as the scale."""
    K = G.shape[0]
    out = torch.empty(K, dtype=torch.float64, device=G.device)
    KP = _eig_padded(K)
    _aligned_kernel[(1,)](G, G.stride(0), G.stride(1), pref.contiguous(), out, K, sweeps,
                          TOL=float(tol), MODE=mode, KP=KP, num_warps=_num_warps(KP))
    return out


def nash_solve(G: torch.Tensor, prev: Optional[torch.Tensor], iters: int, ridge: float) -> torch.Tensor:
    """The solve of Nash-MTL's weights for a (K, K) G of any float dtype, K <= MAX_K, in one
    program: the float64 solution on G's scale (the next warm start); ``prev`` the previous one
    (float64) or None for the cold start. The max-norm scaling after it is the caller's, in torch:
    inside the kernel, compiled for sm_90 by Triton 3.6, the same lines left the solution unscaled
    (the interpreter scaled it)."""
    K = G.shape[0]
    alpha = torch.empty(K, dtype=torch.float64, device=G.device)
    KP = _padded(K)
    _nash_weights_kernel[(1,)](G, G.stride(0), G.stride(1), alpha if prev is None else prev, alpha,
                               K, iters, HAS_PREV=prev is not None, RIDGE=float(ridge), KP=KP,
                               num_warps=_num_warps(KP))
    return alpha
