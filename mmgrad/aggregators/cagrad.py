"""CAGrad (Liu et al., NeurIPS 2021): conflict-averse gradient descent."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from mmgrad._custom_op import custom_op

from ._linalg import solve
from ._qp import BACKUP, RIDGE, TOL, _exchange, _masked_system, default_iters
from .base import (Aggregator, _PrefMixin, check_gram, check_option, normalized, rounding_ridge,
                   use_cpp_solver, use_triton_solver)

_KAPPA_MAX = 1e8


def cagrad_dual(G: torch.Tensor, b: torch.Tensor, s: torch.Tensor, iters: int | None = None,
                ridge: float = RIDGE, tol: float = TOL) -> torch.Tensor:
    """:func:`cagrad_dual_torch`, through the custom op that runs the C++ kernel of
    ``csrc/cpu/qp.cpp`` on float64 CPU tensors (same iteration on the free block only, stopping
    once an iteration exchanges nothing) and the Triton kernel of ``mmgrad/triton/solvers.py``
    where the Triton backend serves ``G`` (one launch, same iteration and stop)."""
    if iters is None:
        iters = default_iters(G.shape[0])
    return _cagrad_dual_op(G, b, s, iters, ridge, tol)


@custom_op("mmgrad::cagrad_dual", mutates_args=())
def _cagrad_dual_op(G: torch.Tensor, b: torch.Tensor, s: torch.Tensor, iters: int, ridge: float,
                    tol: float) -> torch.Tensor:
    if use_cpp_solver(G, b, s):
        return torch.ops.mmgrad_C.cagrad_dual(G, b, s, iters, ridge, tol, BACKUP, _KAPPA_MAX)
    if use_triton_solver(G):
        from mmgrad.triton import solvers
        return solvers.cagrad_dual(G, b.to(G.dtype), s.to(G.dtype), iters, ridge, tol, BACKUP,
                                   _KAPPA_MAX)
    return cagrad_dual_torch(G, b, s, iters, ridge, tol)


@_cagrad_dual_op.register_fake
def _(G, b, s, iters, ridge, tol):
    return b.new_empty(G.shape[:1])


def cagrad_dual_torch(G: torch.Tensor, b: torch.Tensor, s: torch.Tensor, iters: int | None = None,
                      ridge: float = RIDGE, tol: float = TOL) -> torch.Tensor:
    """``argmin_{w in simplex} b^T w + s sqrt(w^T G w)`` (the CAGrad dual, ``b = G u``,
    ``s = c |g_0|``), by an active-set method whose face problems have a closed form.

    KKT: ``b + G w / kappa - nu 1 - mu = 0`` with ``kappa = |g_w| / s``. On a face with free set
    ``I``, with ``p = G_II^{-1} 1`` and ``q = G_II^{-1} b_I``, ``A2 = 1^T p``, ``A1 = 1^T q``,
    ``A0 = b_I^T q``: ``w = p / A2 + kappa ((A1 / A2) p - q)`` (the two terms are G-orthogonal) and
    ``|g_w|^2 = s^2 kappa^2`` gives ``kappa = (A2 (s^2 - (A0 - A1^2 / A2)))^{-1/2}``. When that is
    not real the face problem is unbounded and ``kappa`` is capped, which drives coordinates
    negative so that the next exchange shrinks the face. Exchanges follow
    :func:`mmgrad.aggregators._qp._exchange`; fixed budget ``iters``, no host sync.
    """
    K = G.shape[0]
    if iters is None:
        iters = default_iters(K)
    tight = torch.zeros(K, dtype=torch.bool, device=G.device)
    state = (torch.full((), K + 1, device=G.device, dtype=torch.long),
             torch.full((), BACKUP, device=G.device, dtype=torch.long))
    one = torch.ones((), dtype=G.dtype, device=G.device)
    w = torch.full((K,), 1.0 / K, dtype=G.dtype, device=G.device)
    for it in range(iters):
        free = (~tight).to(G.dtype)
        PQ = solve(_masked_system(G, free, ridge), torch.stack([free, free * b], dim=1))
        p, q = PQ[:, 0], PQ[:, 1]
        A2 = p.sum()
        A2 = torch.where(A2 > 0, A2, one)
        A1 = q.sum()
        A0 = (free * b) @ q
        Bq = (A0 - A1 * A1 / A2).clamp(min=0)
        den = A2 * (s * s - Bq)
        kappa = torch.where(den > 0, torch.rsqrt(torch.where(den > 0, den, one)),
                            torch.full_like(den, _KAPPA_MAX)).clamp(max=_KAPPA_MAX)
        w = p / A2 + kappa * ((A1 / A2) * p - q)
        if it + 1 < iters:
            nu = (1.0 / kappa + A1) / A2
            mu = b + (G @ w) / kappa - nu
            infeasible = torch.where(tight, mu < -tol, w < -tol)
            mask, state = _exchange(infeasible, state)
            tight = tight ^ mask
    w = w.clamp(min=0)
    tot = w.sum()
    return torch.where(tot > 0, w / torch.where(tot > 0, tot, one), torch.full_like(w, 1.0 / K))


class CAGrad(_PrefMixin, Aggregator):
    """CAGrad as in torchjd 0.18 ``CAGradWeighting(c, norm_eps=1e-4)``.

    ``d = g_0 + (c |g_0| / |g_w|) g_w`` with ``g_0 = J^T u`` (``u = 1/K``) and ``w`` the minimiser
    of the CAGrad dual on the simplex; weights ``u + (c |g_0| / |g_w|) w``, and zero when
    ``|g_w| < norm_eps`` (torchjd: "approximately on the Pareto front"). No ``1/(1+c^2)`` rescale
    (official code's ``rescale=1``; torchjd does not rescale either). ``c`` defaults to 0.5
    (LibMTL / nash-mtl; torchjd has no default, the official NYUv2 run uses 0.4).

    Solver: :func:`cagrad_dual` (budget ``iters``, default
    :func:`~mmgrad.aggregators._qp.default_iters`; one Triton kernel on GPUs for K <= 64, torch ops
    beyond, C++ on the CPU) where torchjd calls cvxpy + Clarabel on the CPU. Norms are computed on
    the trace-normalised ``G`` (as torchjd, which normalises by the trace too), but the normalisation
    itself has no threshold here (torchjd zeroes ``G`` when its trace is below ``norm_eps`` and
    then returns zero weights). A float32 / half ``G`` gets
    :func:`~mmgrad.aggregators.base.rounding_ridge` on the diagonal (its rounding makes a
    rank-deficient Gram indefinite).
    """

    name = "cagrad"

    def __init__(self, c: float = 0.5, norm_eps: float = 1e-4, iters: int | None = None,
                 pref_vector: Optional[Sequence[float] | torch.Tensor] = None) -> None:
        self.c = check_option("c", c, 0.0)
        self.norm_eps = check_option("norm_eps", norm_eps, 0.0)
        self.iters = check_option("iters", iters, 1, integer=True)
        self._init_pref(pref_vector)

    def _options(self):
        return {"c": self.c, "norm_eps": self.norm_eps, "iters": self.iters}

    def weights(self, G: torch.Tensor) -> torch.Tensor:
        check_gram(G)
        Gn = normalized(G, reg=rounding_ridge(G))
        K = G.shape[0]
        u = self._pref_for(K, Gn)
        b = Gn @ u
        s = self.c * (u @ b).clamp(min=0).sqrt()
        w = cagrad_dual(Gn, b, s, self.iters)
        gw = (w @ Gn @ w).clamp(min=0).sqrt()
        ok = gw >= self.norm_eps
        out = torch.where(ok, u + (s / torch.where(ok, gw, torch.ones_like(gw))) * w,
                          torch.zeros_like(w))
        return out.to(G.dtype)
