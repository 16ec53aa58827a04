"""UPGrad and DualProj: projections onto the dual cone of the gradients (Jacobian Descent,
Quinton & Rey, arXiv:2406.16232)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _qp
from .base import Aggregator, _PrefMixin, check_gram, check_option, normalized, use_triton_eager


class _DualConeBase(_PrefMixin, Aggregator):
    def __init__(self, pref_vector: Optional[Sequence[float] | torch.Tensor] = None,
                 norm_eps: float = 0.0, reg_eps: float = 1e-4,
                 iters: int | None = None) -> None:
        self._init_pref(pref_vector)
        self.norm_eps = check_option("norm_eps", norm_eps, 0.0)
        self.reg_eps = check_option("reg_eps", reg_eps, 0.0)
        self.iters = check_option("iters", iters, 1, integer=True)

    def _options(self):
        return {"pref_vector": self._pref, "norm_eps": self.norm_eps, "reg_eps": self.reg_eps,
                "iters": self.iters}

    def _closed_form_k2(self, K: int) -> bool:
        """K = 2 with a preference vector >= 0 (a host-side check): the closed form applies."""
        return K == 2 and (self._pref is None or bool((self._pref >= 0).all()))

    def _k2_in_one_launch(self, G: torch.Tensor, upgrad: bool) -> Optional[torch.Tensor]:
        """The weights for the closed-form case where Triton serves ``G`` (plain eager): the
        normalisation, the closed form and the weights in one launch; else None."""
        if not (self._closed_form_k2(G.shape[0]) and use_triton_eager(G)):
            return None
        from mmgrad.triton import solvers
        pref = self._pref_for(2, G, dtype=torch.float64)
        return solvers.dual_cone_k2(G, pref, self.norm_eps, self.reg_eps, upgrad).to(G.dtype)

    def _project(self, Gn: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        """The projections for the rows of ``U``, ``Gn`` from :func:`normalized` (with reg_eps)."""
        if self._closed_form_k2(Gn.shape[0]):
            return _qp.dual_cone_k2(Gn, U)
        return _qp.project_dual_cone(Gn, U, self.iters)


class UPGrad(_DualConeBase):
    """UPGrad: project every row onto the dual cone of all rows, combine with ``pref_vector``.

    Weights ``sum_i v_i`` where ``v_i = argmin_v v^T G v s.t. v >= pref_i e_i`` (torchjd 0.18
    ``UPGradWeighting`` conventions: ``pref_vector`` default 1/K, ``G`` divided by its trace, then
    ``reg_eps * I`` with ``reg_eps = 1e-4`` added). The K QPs are solved by the pivoting active-set
    method :func:`mmgrad.aggregators._qp.project_dual_cone` with a budget of ``iters`` iterations
    (default ``min(100, 4 K + 8)``, :func:`~mmgrad.aggregators._qp.default_iters`): one Triton
    program per QP on GPUs (K <= 64; beyond, batched K x K torch solves); one by one on their free
    blocks in C++ on the CPU; both stop at the fixed point. K = 2 has a closed form (on a GPU one
    Triton launch with the normalisation).
    torchjd solves them one by one with quadprog on the CPU in numpy.

    Deliberate difference: ``norm_eps`` defaults to 0 (torchjd: 1e-4). torchjd replaces ``G`` by
    zero when ``trace(G) < 1e-4``, which makes UPGrad return the plain mean (possibly conflicting)
    for small gradients; here any non-zero ``G`` is normalised. Pass ``norm_eps=1e-4`` for parity.
    """

    name = "upgrad"

    def weights(self, G: torch.Tensor) -> torch.Tensor:
        check_gram(G)
        w = self._k2_in_one_launch(G, upgrad=True)
        if w is not None:
            return w
        Gn = normalized(G, self.norm_eps, self.reg_eps)
        U = self._pref_for(G.shape[0], Gn, diagonal=True)
        return self._project(Gn, U).sum(0).to(G.dtype)


class DualProj(_DualConeBase):
    """DualProj: project ``J^T pref`` onto the dual cone of the rows (GEM's Eq. 11).

    Same conventions, defaults, solver and deliberate difference as :class:`UPGrad` (torchjd 0.18
    ``DualProjWeighting``): one QP ``min_v v^T G v s.t. v >= pref``.
    """

    name = "dualproj"

    def weights(self, G: torch.Tensor) -> torch.Tensor:
        check_gram(G)
        w = self._k2_in_one_launch(G, upgrad=False)
        if w is not None:
            return w
        Gn = normalized(G, self.norm_eps, self.reg_eps)
        u = self._pref_for(G.shape[0], Gn).unsqueeze(0)
        return self._project(Gn, u)[0].to(G.dtype)
