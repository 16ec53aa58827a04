"""MGDA: the minimum-norm element of the convex hull of the gradients."""

from __future__ import annotations

import torch

from . import _qp
from .base import Aggregator, check_gram, check_option, normalized, rounding_ridge, use_triton_eager


def frank_wolfe(G: torch.Tensor, epsilon: float, max_iters: int) -> torch.Tensor:
    """torchjd 0.18's MGDA solver (Frank-Wolfe from the uniform point, exact line search, stop when
    the step ``gamma < epsilon``), with the stop written as a freeze mask so it never syncs."""
    K = G.shape[0]
    alpha = torch.full((K,), 1.0 / K, dtype=G.dtype, device=G.device)
    done = torch.zeros((), dtype=torch.bool, device=G.device)
    eye = torch.eye(K, dtype=G.dtype, device=G.device)
    one = torch.ones((), dtype=G.dtype, device=G.device)
    for _ in range(max_iters):
        Ga = G @ alpha
        t = torch.argmin(Ga)
        e_t = eye[t]
        a = Ga[t]
        b = alpha @ Ga
        c = G[t, t]
        den = b + c - 2 * a
        gamma = torch.where(c <= a, one, torch.where(b <= a, 0 * one,
                            (b - a) / torch.where(den != 0, den, one)))
        gamma = torch.where(done, 0 * one, gamma)
        alpha = (1 - gamma) * alpha + gamma * e_t
        done = done | (gamma < epsilon)
    return alpha


class MGDA(Aggregator):
    """MGDA (Desideri 2012; Sener & Koltun 2018): weights ``argmin_{a in simplex} a^T G a``.

    Solver (default ``solver="exact"``): ``G`` normalised by its trace (plus
    :func:`~mmgrad.aggregators.base.rounding_ridge` for a float32 / half ``G``), then Wolfe's
    minimum-norm-point method, :func:`mmgrad.aggregators._qp.min_norm_simplex`, with a fixed budget
    of ``iters`` steps (default ``2 K + 8``, :func:`~mmgrad.aggregators._qp.min_norm_default_iters`;
    it needs ~K, up to ~2 K on ill-conditioned Grams), closed form for K = 2 (on a GPU one Triton
    launch with the normalisation). It returns the exact minimiser (KKT residual at
    rounding level, tested, rank-deficient Grams included) where torchjd's Frank-Wolfe stops at a
    step below ``epsilon`` (an approximation: the two differ by up to ~1e-2 in the weights). Where
    the minimiser is not unique (duplicate rows, or the origin inside the hull) the weights are one
    of them; the combination ``J^T a`` is the same.

    ``solver="frank_wolfe"`` reproduces torchjd 0.18's ``MGDAWeighting(epsilon, max_iters)``
    (defaults 1e-3 and 100) exactly, sync-free: the early stop is a freeze mask, so it always runs
    ``max_iters`` iterations.
    """

    name = "mgda"

    def __init__(self, solver: str = "exact", iters: int | None = None,
                 epsilon: float = 1e-3, max_iters: int = 100) -> None:
        if solver not in ("exact", "frank_wolfe"):
            raise ValueError(f"solver must be 'exact' or 'frank_wolfe', got {solver!r}")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
        self.solver = solver
        self.iters = check_option("iters", iters, 1, integer=True)
        self.epsilon = check_option("epsilon", epsilon, 0.0)
        self.max_iters = check_option("max_iters", max_iters, 1, integer=True)

    def _options(self):
        return {"solver": self.solver, "iters": self.iters}

    def weights(self, G: torch.Tensor) -> torch.Tensor:
        check_gram(G)
        K = G.shape[0]
        if K == 2 and self.solver == "exact" and use_triton_eager(G):
            from mmgrad.triton import solvers  # normalisation and closed form in one launch
            return solvers.min_norm_k2(G, rounding_ridge(G)).to(G.dtype)
        Gn = normalized(G, reg=rounding_ridge(G) if self.solver == "exact" else 0.0)
        if self.solver == "frank_wolfe":
            w = frank_wolfe(Gn, self.epsilon, self.max_iters)
        elif K == 1:
            w = torch.ones(1, dtype=Gn.dtype, device=Gn.device)
        elif K == 2:
            w = _qp.min_norm_k2(Gn)
        else:
            w = _qp.min_norm_simplex(Gn, self.iters)
        return w.to(G.dtype)
