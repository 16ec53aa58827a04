"""Nash-MTL (Navon et al., ICML 2022): the Nash bargaining solution."""

from __future__ import annotations

from typing import Any, Optional

import torch

from mmgrad._custom_op import custom_op

from ._linalg import solve
from .base import (Aggregator, check_gram, check_option, to_solve, use_cpp_solver, use_triton_solver,
                   use_triton_eager)

#: Ridge added to the Frobenius-normalised Gramian so that the barrier problem has a minimiser
#: even when a positive combination of the gradients vanishes (torchjd's ECOS path fails there).
NASH_RIDGE = 1e-8


def nash_newton_torch(G: torch.Tensor, alpha0: torch.Tensor, iters: int) -> torch.Tensor:
    """Solve ``G a = 1 / a`` (``a > 0``): the minimiser of ``F(a) = a^T G a / 2 - sum log a``.

    F is self-concordant, so damped Newton (step ``1 / (1 + lambda)`` with ``lambda`` the Newton
    decrement, full steps once ``lambda < 1/4``) stays in ``a > 0`` and converges from any start:
    at least 0.026 decrease of F per damped step, then quadratically. Fixed budget ``iters``.
    """
    a = alpha0
    one = torch.ones((), dtype=G.dtype, device=G.device)
    for _ in range(iters):
        g = G @ a - 1.0 / a
        H = G + torch.diag(1.0 / (a * a))
        delta = -solve(H, g.unsqueeze(-1)).squeeze(-1)
        lam = (-(g @ delta)).clamp(min=0).sqrt()
        step = torch.where(lam < 0.25, one, 1.0 / (1.0 + lam))
        a = (a + step * delta).clamp(min=1e-30)
    return a


@custom_op("mmgrad::nash_newton", mutates_args=())
def nash_newton(G: torch.Tensor, alpha0: torch.Tensor, iters: int) -> torch.Tensor:
    """:func:`nash_newton_torch`; on float64 CPU tensors with the C++ backend selected
    (:func:`use_cpp_solver`) it runs in C++ (``csrc/cpu/nash.cpp``: Cholesky solves,
    and the loop stops early once an iteration leaves ``a`` unchanged bit for bit), where the
    Triton backend serves ``G`` in one Triton kernel (``mmgrad/triton/solvers.py``, same stop)."""
    if use_cpp_solver(G, alpha0):
        return torch.ops.mmgrad_C.nash_newton(G, alpha0, iters)
    if use_triton_solver(G):
        from mmgrad.triton import solvers
        return solvers.nash_newton(G, alpha0.to(G.dtype), iters)
    a = nash_newton_torch(G, alpha0, iters)
    return a.clone() if a is alpha0 else a  # iters == 0: a custom op's output may not alias its input


@nash_newton.register_fake
def _(G, alpha0, iters):
    return alpha0.new_empty(alpha0.shape)


class NashMTL(Aggregator):
    """Nash-MTL as in torchjd 0.18 ``NashMTL(n_tasks, max_norm=1.0, update_weights_every=1,
    optim_niter=20)`` (``n_tasks`` is not needed: K is read from ``G``).

    Weights ``a`` with ``(G a)_i = 1 / a_i``: ``G`` is divided by its Frobenius norm, the
    normalised problem is solved, and ``a`` is rescaled to the original ``G`` (as torchjd, whose
    constraints use the unnormalised ``G``). Then, if ``max_norm > 0`` and ``|J^T a| > max_norm``,
    ``a`` is scaled to ``|J^T a| = max_norm`` (a ``torch.where``; ``|J^T a|^2 = a^T G a``). With
    ``update_weights_every = n`` the solve runs on every n-th call and the other calls reuse the
    last solution (a host-side call counter; in :class:`mmgrad.BalancedOptimizer` a step skipped
    for non-finite gradients keeps the warm start but still counts as a call); a call with no
    solution to reuse (the first, or K changed) solves. A zero or non-finite ``G`` keeps the
    previous solution (ones before the first), so the weights stay bounded.

    Solver: damped Newton (:func:`nash_newton`), ``optim_niter`` iterations (default 20) warm-started
    from the previous solution (state), cold start ``a_i = 1/sqrt(G_ii)`` scaled so that
    ``a^T G a = K``. torchjd solves up to 20 convexified problems with cvxpy + ECOS on the CPU and
    stops at ``|G a - 1/a| < 1e-3``; here the exact barrier minimiser is found (plus the
    ``NASH_RIDGE`` ridge, which keeps zero and cancelling rows finite).

    Where the Triton backend serves ``G`` the solve is one kernel (normalisation, start, Newton,
    rescale: :func:`mmgrad.triton.solvers.nash_solve`); the max-norm scaling after it is the same
    few torch ops on every path (inside the kernel it miscompiled for sm_90).

    State (``state_dict``): ``alpha`` (the last solution) and ``step`` (call counter).
    """

    name = "nash_mtl"

    def __init__(self, max_norm: float = 1.0, update_weights_every: int = 1,
                 optim_niter: int = 20, n_tasks: Optional[int] = None) -> None:
        self.max_norm = check_option("max_norm", max_norm, 0.0)
        self.update_weights_every = check_option("update_weights_every", update_weights_every, 1,
                                                 integer=True)
        self.optim_niter = check_option("optim_niter", optim_niter, 1, integer=True)
        self.n_tasks = n_tasks
        self.reset()

    def _options(self):
        return {"max_norm": self.max_norm, "update_weights_every": self.update_weights_every,
                "optim_niter": self.optim_niter}

    def reset(self) -> None:
        self.alpha: Optional[torch.Tensor] = None
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        a = state.get("alpha")
        self.alpha = None if a is None else a.clone()
        self.step = int(state.get("step", 0))

    def weights(self, G: torch.Tensor) -> torch.Tensor:
        check_gram(G)
        K = G.shape[0]
        if self.n_tasks is not None and self.n_tasks != K:
            raise ValueError(f"n_tasks={self.n_tasks} but G is {K} x {K}")
        prev = self.alpha
        if prev is not None and (prev.shape[0] != K or prev.device != G.device):
            prev = None
        # a call between two solves with no solution to reuse (the first with this K) solves too
        solving = self.step % self.update_weights_every == 0 or prev is None
        Gs = to_solve(G)
        if not solving:
            alpha = prev.to(Gs.dtype)
        elif use_triton_eager(G):
            from mmgrad.triton import solvers  # normalisation, start, Newton, rescale: one kernel
            alpha = solvers.nash_solve(G, None if prev is None else prev.to(torch.float64),
                                       self.optim_niter, NASH_RIDGE)
        else:
            nf = torch.linalg.matrix_norm(Gs)
            ok = (nf > 0) & torch.isfinite(nf)
            nf = torch.where(ok, nf, torch.ones_like(nf))
            Gn = torch.where(ok, Gs / nf, torch.zeros_like(Gs))
            root = nf.sqrt()
            Gr = Gn + NASH_RIDGE * torch.eye(K, dtype=Gs.dtype, device=Gs.device)
            if prev is None:
                d = Gr.diagonal()
                a0 = torch.rsqrt(d)
                a0 = a0 * (K / (a0 @ Gr @ a0)).sqrt()
            else:
                a0 = (prev.to(Gs.dtype) * root).clamp(min=1e-30)
            alpha = nash_newton(Gr, a0, self.optim_niter) / root
            # a zero or non-finite G has no bargaining solution: keep the previous one (ones at
            # first), not the ridge's 1 / sqrt(NASH_RIDGE)
            kept = prev.to(Gs.dtype) if prev is not None else torch.ones_like(alpha)
            alpha = torch.where(ok, alpha, kept)
        self.step += 1
        self.alpha = alpha
        if self.max_norm > 0:
            norm = (alpha @ Gs @ alpha).clamp(min=0).sqrt()
            big = norm > self.max_norm
            alpha = torch.where(big, alpha * (self.max_norm / torch.where(big, norm, torch.ones_like(norm))), alpha)
        return alpha.to(G.dtype)
