"""Fixed-budget, sync-free solvers for the small QPs of the aggregators.

The dual-cone projection (UPGrad, DualProj) and, in :mod:`.cagrad`, the CAGrad dual are
primal-dual active-set (PDAS, a.k.a. semismooth Newton) methods: each iteration guesses which
inequality constraints are tight, solves the equality-constrained problem on that face with one
(batched) ``solve_ex`` of a masked K x K system, and updates the guess from the signs of the primal
values and of the multipliers. Once the guess is right the iterate is the exact solution and stays
put, so after the fixed budget the answer is exact to rounding whenever the active set was
identified (for K = 2 at the first iteration). MGDA's min-norm point (:func:`min_norm_simplex`) is
Wolfe's method instead, a primal active-set method with the same masked face solves: PDAS could
cycle for thousands of exchanges on rank-deficient Grams there. The budgets are fixed, with no early
exit (a branch on a tensor would synchronise).

``G`` must already be normalised (trace 1) and regularised by the caller; ``ridge`` is a tiny
diagonal added to the face systems only so that singular faces (duplicate rows, zero rows) stay
solvable; it moves the solution by O(ridge).

:func:`project_dual_cone` and :func:`min_norm_simplex` are ``torch.library`` custom ops: float64
CPU tensors go to the C++ kernels of ``csrc/cpu/qp.cpp`` when the C++ backend serves the CPU (same
iteration, but it factors only the free block and stops once done, which a CPU can do without a
sync); float64 tensors the Triton backend serves (CUDA by default), K <= 64, to the one-launch
kernels of ``mmgrad/triton/solvers.py`` (same iteration and stop); every other case runs the torch
solvers ``*_torch`` below.
"""

from __future__ import annotations

import torch

from mmgrad._custom_op import custom_op

from ._linalg import solve
from .base import use_cpp_solver, use_triton_solver

#: Cap of the default budgets (:func:`default_iters`).
MAX_DEFAULT_ITERS = 100


def default_iters(K: int) -> int:
    """Default fixed budget for K objectives: ``min(100, 4 K + 8)`` iterations.

    Measured need (iterations to the fixed point over the PDAS solvers, MGDA's then among them;
    Grams of rank 2, K / 2 and of more rows than columns): random full-rank problems <= K / 2 + 1; rank-deficient ones up to 8
    at K = 4, 15 at K = 8, 36 at K = 12, 51 at K = 16, 66 at K = 32 (the former default
    ``min(20, K + 2)`` cut some of them short: weights off by up to 14x). The C++ and Triton
    solvers stop at the fixed point, so the budget costs only where it is needed; the torch
    solvers run it whole. (MGDA's solver has its own, :func:`min_norm_default_iters`.)"""
    return min(MAX_DEFAULT_ITERS, 4 * K + 8)


RIDGE = 1e-12
#: Feasibility tolerance of the pivoting rule (G has trace 1).
TOL = 1e-13
#: Extra full exchanges allowed without progress before the single-exchange backup rule.
BACKUP = 3


def _masked_system(G: torch.Tensor, free: torch.Tensor, ridge: float) -> torch.Tensor:
    """``D G D + (I - D) + ridge D`` for the 0/1 float mask(s) ``free`` (..., K): the face system
    in which fixed coordinates get identity rows."""
    K = G.shape[-1]
    eye = torch.eye(K, dtype=G.dtype, device=G.device)
    fb = free > 0
    return torch.where(fb.unsqueeze(-1) & fb.unsqueeze(-2), G + ridge * eye, eye)


def _exchange(infeasible: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
    """Block principal pivoting rule of Judice & Pires (1994), vectorised over problems.

    Exchange the whole infeasible set while the number of infeasibilities keeps dropping (or for
    ``BACKUP`` more tries); otherwise exchange only the infeasible coordinate with the largest
    index (Murty's rule, finite for P-matrices). Returns the exchange mask and the new state
    ``(best count, tries left)``."""
    best, tries = state
    n = infeasible.sum(-1)
    better = n < best
    full = better | (tries > 0)
    idx = torch.arange(1, infeasible.shape[-1] + 1, device=infeasible.device)
    last = (infeasible * idx).amax(-1, keepdim=True)
    mask = infeasible & (full.unsqueeze(-1) | (idx == last))
    tries = torch.where(better, BACKUP, tries - 1)
    return mask, (torch.minimum(n, best), tries)


def project_dual_cone(G: torch.Tensor, U: torch.Tensor, iters: int | None = None,
                      ridge: float = RIDGE, tol: float = TOL) -> torch.Tensor:
    """:func:`project_dual_cone_torch`, through the custom op that runs the C++ kernel on float64
    CPU tensors."""
    if iters is None:
        iters = default_iters(G.shape[0])
    return _project_dual_cone_op(G, U, iters, ridge, tol)


@custom_op("mmgrad::project_dual_cone", mutates_args=())
def _project_dual_cone_op(G: torch.Tensor, U: torch.Tensor, iters: int, ridge: float,
                          tol: float) -> torch.Tensor:
    if use_cpp_solver(G, U):
        return torch.ops.mmgrad_C.project_dual_cone(G, U, iters, ridge, tol, BACKUP)
    if use_triton_solver(G):
        from mmgrad.triton import solvers
        return solvers.project_dual_cone(G, U.to(G.dtype), iters, ridge, tol, BACKUP)
    return project_dual_cone_torch(G, U, iters, ridge, tol)


@_project_dual_cone_op.register_fake
def _(G, U, iters, ridge, tol):
    return U.new_empty(U.shape)


def project_dual_cone_torch(G: torch.Tensor, U: torch.Tensor, iters: int | None = None,
                            ridge: float = RIDGE, tol: float = TOL) -> torch.Tensor:
    """Weights of the projection of ``J^T u`` onto the dual cone of the rows of ``J``.

    Solves, for every row ``u`` of ``U`` (B, K), ``min_v v^T G v  s.t.  v >= u`` (Proposition 1 of
    Jacobian Descent, arXiv:2406.16232). KKT: ``G v >= 0`` (non-conflict), ``v >= u``,
    ``(G v)_i (v_i - u_i) = 0``; the multipliers are ``G v`` itself.

    Start: all constraints tight (``v = u``). Iteration: a tight coordinate is infeasible when its
    multiplier ``(G v)_i < -tol``, a free one when ``v_i < u_i - tol``; infeasible coordinates are
    exchanged by :func:`_exchange`, then on the free set ``I`` we solve ``G_II v_I = -G_IA u_A``.
    Returns ``max(v, u)`` (feasible).
    """
    if iters is None:
        iters = default_iters(G.shape[0])
    tight = torch.ones_like(U, dtype=torch.bool)
    V = U
    state = (torch.full(U.shape[:-1], U.shape[-1] + 1, device=U.device, dtype=torch.long),
             torch.full(U.shape[:-1], BACKUP, device=U.device, dtype=torch.long))
    for _ in range(iters):
        mu = V @ G
        infeasible = torch.where(tight, mu < -tol, V < U - tol)
        mask, state = _exchange(infeasible, state)
        tight = tight ^ mask
        free = (~tight).to(G.dtype)
        ua = U * (1.0 - free)
        rhs = ua - free * (ua @ G)
        V = solve(_masked_system(G, free, ridge), rhs.unsqueeze(-1)).squeeze(-1)
    return torch.maximum(V, U)


def dual_cone_k2(G: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """Closed form of :func:`project_dual_cone` for K = 2 and ``U >= 0``.

    ``u^T G u >= 0`` means at most one multiplier ``(G u)_i`` is negative; freeing that coordinate
    alone solves the KKT system: ``v = u + e_i relu(-(G u)_i) / G_ii``.
    """
    mu = U @ G
    d = G.diagonal()
    safe = torch.where(d > 0, d, torch.ones_like(d))
    return U + torch.where(d > 0, torch.relu(-mu) / safe, torch.zeros_like(mu))


def min_norm_default_iters(K: int) -> int:
    """Default budget of :func:`min_norm_simplex` for K objectives: ``2 K + 8`` steps.

    Each step of Wolfe's method either adds a vertex or drops at least one, and every major step
    lowers the norm, so it ends after finitely many steps; measured (20 Grams of each kind: full
    rank, rank K / 4, K / 2, 3 K / 4, more rows than columns, zero, duplicate and near-parallel
    rows, float32 Grams) it needs at most 9 steps at K = 8, 17 at K = 16, 69 at K = 64 and 110 at
    K = 128, and up to ~2 K on ill-conditioned ones (53 at K = 25 in a search over 2400 of them;
    one K = 85 Gram with the origin at rounding distance from the hull ran past the budget with a
    KKT residual of 2e-13). The C++ and Triton solvers stop when done, so the margin costs only the
    torch solver, which runs the whole budget."""
    return 2 * K + 8


def min_norm_simplex(G: torch.Tensor, iters: int | None = None, ridge: float = RIDGE,
                     tol: float = TOL) -> torch.Tensor:
    """:func:`min_norm_simplex_torch`, through the custom op that runs the C++ kernel on a float64
    CPU ``G``."""
    if iters is None:
        iters = min_norm_default_iters(G.shape[0])
    return _min_norm_simplex_op(G, iters, ridge, tol)


@custom_op("mmgrad::min_norm_simplex", mutates_args=())
def _min_norm_simplex_op(G: torch.Tensor, iters: int, ridge: float, tol: float) -> torch.Tensor:
    if use_cpp_solver(G):
        return torch.ops.mmgrad_C.min_norm_simplex(G, iters, ridge, tol)
    if use_triton_solver(G):
        from mmgrad.triton import solvers
        return solvers.min_norm_simplex(G, iters, ridge, tol)
    return min_norm_simplex_torch(G, iters, ridge, tol)


@_min_norm_simplex_op.register_fake
def _(G, iters, ridge, tol):
    return G.new_empty(G.shape[:1])


def min_norm_simplex_torch(G: torch.Tensor, iters: int | None = None, ridge: float = RIDGE,
                           tol: float = TOL) -> torch.Tensor:
    """``argmin_{a in simplex} a^T G a`` (MGDA's min-norm element of the convex hull), by Wolfe's
    minimum-norm-point method (Wolfe 1976), written sync-free.

    The iterate ``x`` is a point of the simplex supported on a set ``S`` of vertices. A step solves
    the affine problem on ``S``: ``y_S = p / sum(p)`` with ``(G_SS + ridge I) p = 1``. Major step
    (every ``y_S > 0``): ``x = y``; the vertex ``i`` outside ``S`` with the least ``(G y)_i`` joins
    ``S`` if ``y^T G y - (G y)_i > tol``, otherwise ``x`` meets the KKT conditions and the method
    stops. Minor step: ``x`` moves towards ``y`` until a coordinate reaches 0, and leaves ``S``.
    Start: the vertex of least ``G_ii``. Each choice takes the lowest index among the values within
    ``tol`` of the least (:func:`_first_least`), so that duplicate rows, equal only to rounding,
    are chosen alike by the C++ and Triton solvers, whose sums round differently.

    Unlike the primal-dual active-set method of the dual-cone and CAGrad solvers (which this solver
    replaced), every major step lowers the norm, so the method cannot cycle: that method needed
    thousands of exchanges on some K = 64 Grams of rank 32, Wolfe's at most 69 steps. It also stops
    at a face whose system gives ``sum(p) <= 0``, which only a ``G`` that rounding made indefinite
    has (a float64 G cast from a float32 Gram: give MGDA the float32 G, which gets a ridge at its
    rounding level); the iterate is then feasible but not optimal. A non-finite ``G`` gives NaN
    weights (after at least one step). Returns a point of the simplex.
    """
    K = G.shape[0]
    if iters is None:
        iters = min_norm_default_iters(K)
    idx = torch.arange(K, device=G.device)
    support = idx == _first_least(G.diagonal(), tol)
    x = support.to(G.dtype)
    done = torch.zeros((), dtype=torch.bool, device=G.device)
    inf = torch.full((), float("inf"), dtype=G.dtype, device=G.device)
    for _ in range(iters):
        s_mask = support.to(G.dtype)
        p = solve(_masked_system(G, s_mask, ridge), s_mask.unsqueeze(-1)).squeeze(-1)
        total = p.sum()
        solvable = total > 0
        y = p / torch.where(solvable, total, torch.ones_like(total))
        blocking = support & ~(y > 0)
        major = ~blocking.any()
        # major step: y is inside its face; the most violated vertex outside S joins
        Gy = G @ y
        outside = torch.where(support, inf, Gy)
        enter = _first_least(outside, tol)
        grows = y @ Gy - outside.min() > tol
        # minor step: x moves towards y until the first blocking coordinate reaches 0
        ratio = torch.where(blocking, x / torch.where(blocking, x - y, torch.ones_like(x)), inf)
        leave = _first_least(ratio, tol)
        x_minor = x + ratio.min() * (y - x)
        drop = support & ((x_minor <= 0) | (idx == leave))
        x_minor = torch.where(drop, 0.0, x_minor)
        stop = done | ~solvable | (major & ~grows)
        x = torch.where(done | ~solvable, x, torch.where(major, y, x_minor))
        support = torch.where(stop, support, torch.where(major, support | (idx == enter), support & ~drop))
        done = stop
    w = x.clamp(min=0)
    w = w / w.sum()
    return torch.where(torch.isfinite(G).all() | (iters == 0), w, torch.full_like(w, float("nan")))


def _first_least(v: torch.Tensor, tol: float) -> torch.Tensor:
    """The lowest index ``i`` with ``v_i <= min(v) + tol``."""
    return torch.argmax((v <= v.min() + tol).to(torch.uint8))


def min_norm_k2(G: torch.Tensor) -> torch.Tensor:
    """Closed form of :func:`min_norm_simplex` for K = 2 (Sener & Koltun, Algorithm 1)."""
    g00, g01, g11 = G[0, 0], G[0, 1], G[1, 1]
    den = g00 + g11 - 2 * g01
    ok = den > 0
    gamma = torch.where(ok, (g11 - g01) / torch.where(ok, den, torch.ones_like(den)),
                        torch.full_like(den, 0.5)).clamp(0, 1)
    return torch.stack([gamma, 1 - gamma])
