"""Fixed-budget, sync-free solvers for the small QPs of the aggregators.

Both solvers are primal-dual active-set (PDAS, a.k.a. semismooth Newton) methods: each iteration
guesses which inequality constraints are tight, solves the equality-constrained problem on that
face with one (batched) ``solve_ex`` of a masked K x K system, and updates the guess from the signs
of the primal values and of the multipliers. Once the guess is right the iterate is the exact
solution and stays put, so after the fixed budget the answer is exact to rounding whenever the
active set was identified (for K = 2 at the first iteration). The budget is fixed, with no early
exit (a branch on a tensor would synchronise); the last feasible iterate is returned.

``G`` must already be normalised (trace 1) and regularised by the caller; ``ridge`` is a tiny
diagonal added to the face systems only so that singular faces (duplicate rows, zero rows) stay
solvable; it moves the solution by O(ridge).

:func:`project_dual_cone` and :func:`min_norm_simplex` are ``torch.library`` custom ops: float64
CPU tensors go to the C++ kernels of ``csrc/cpu/qp.cpp`` when the C++ backend serves the CPU (same
iteration, but it factors only the free block and stops once an iteration exchanges nothing, which
a CPU can do without a sync); float64 tensors the Triton backend serves (CUDA by default), K <= 64,
to the one-launch kernels of ``mmgrad/triton/solvers.py`` (same iteration and stop); every other
case runs the torch solvers ``*_torch`` below.
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

    Measured need (iterations to the fixed point, every solver, Grams of rank 2, K / 2 and of
    more rows than columns): random full-rank problems <= K / 2 + 1; rank-deficient ones up to 8
    at K = 4, 15 at K = 8, 36 at K = 12, 51 at K = 16, 66 at K = 32 (the former default
    ``min(20, K + 2)`` cut some of them short: weights off by up to 14x). The C++ and Triton
    solvers stop at the fixed point, so the budget costs only where it is needed; the torch
    solvers run it whole. MGDA on Grams of K >= 32 rows of rank <= K / 2 can need several hundred:
    pass ``iters`` there."""
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


def min_norm_simplex(G: torch.Tensor, iters: int | None = None, ridge: float = RIDGE,
                     tol: float = TOL) -> torch.Tensor:
    """:func:`min_norm_simplex_torch`, through the custom op that runs the C++ kernel on a float64
    CPU ``G``."""
    if iters is None:
        iters = default_iters(G.shape[0])
    return _min_norm_simplex_op(G, iters, ridge, tol)


@custom_op("mmgrad::min_norm_simplex", mutates_args=())
def _min_norm_simplex_op(G: torch.Tensor, iters: int, ridge: float, tol: float) -> torch.Tensor:
    if use_cpp_solver(G):
        return torch.ops.mmgrad_C.min_norm_simplex(G, iters, ridge, tol, BACKUP)
    if use_triton_solver(G):
        from mmgrad.triton import solvers
        return solvers.min_norm_simplex(G, iters, ridge, tol, BACKUP)
    return min_norm_simplex_torch(G, iters, ridge, tol)


@_min_norm_simplex_op.register_fake
def _(G, iters, ridge, tol):
    return G.new_empty(G.shape[:1])


def min_norm_simplex_torch(G: torch.Tensor, iters: int | None = None, ridge: float = RIDGE,
                           tol: float = TOL) -> torch.Tensor:
    """``argmin_{a in simplex} a^T G a`` (MGDA's min-norm element of the convex hull).

    KKT: ``G a - nu 1 - mu = 0``, ``mu >= 0``, ``a >= 0``, ``mu a = 0``, ``sum a = 1``. On a face
    with free set ``I``: ``a_I = p / sum(p)`` with ``G_II p = 1``, ``nu = 1 / sum(p)``,
    ``mu_A = (G a)_A - nu``. Start: every coordinate free; infeasible coordinates (``a_i < -tol``
    free, ``mu_i < -tol`` tight) are exchanged by :func:`_exchange`. Returns a point of the simplex.
    """
    K = G.shape[0]
    if iters is None:
        iters = default_iters(K)
    tight = torch.zeros(K, dtype=torch.bool, device=G.device)
    one = torch.ones(K, dtype=G.dtype, device=G.device)
    state = (torch.full((), K + 1, device=G.device, dtype=torch.long),
             torch.full((), BACKUP, device=G.device, dtype=torch.long))
    a = one / K
    for it in range(iters):
        free = (~tight).to(G.dtype)
        p = solve(_masked_system(G, free, ridge), free.unsqueeze(-1)).squeeze(-1)
        s = p.sum()
        s = torch.where(s > 0, s, torch.ones_like(s))
        a = p / s
        if it + 1 < iters:
            mu = G @ a - 1.0 / s
            infeasible = torch.where(tight, mu < -tol, a < -tol)
            mask, state = _exchange(infeasible, state)
            tight = tight ^ mask
    a = a.clamp(min=0)
    s = a.sum()
    return torch.where(s > 0, a / torch.where(s > 0, s, torch.ones_like(s)), one / K)


def min_norm_k2(G: torch.Tensor) -> torch.Tensor:
    """Closed form of :func:`min_norm_simplex` for K = 2 (Sener & Koltun, Algorithm 1)."""
    g00, g01, g11 = G[0, 0], G[0, 1], G[1, 1]
    den = g00 + g11 - 2 * g01
    ok = den > 0
    gamma = torch.where(ok, (g11 - g01) / torch.where(ok, den, torch.ones_like(den)),
                        torch.full_like(den, 0.5)).clamp(0, 1)
    return torch.stack([gamma, 1 - gamma])
