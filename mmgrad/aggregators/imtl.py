"""IMTL-G (Liu et al., ICLR 2021), generalised to linearly dependent rows."""

from __future__ import annotations

import torch

from ._linalg import JACOBI_SWEEPS, check_eig, pinv_apply
from .base import Aggregator, check_gram, check_option, normalized, use_triton_eager


class IMTLG(Aggregator):
    """IMTL-G as in torchjd 0.18 ``IMTLGWeighting``: ``v = pinv(G) sqrt(diag G)``, weights
    ``v / sum(v)``, zero when ``|sum(v)| < 1e-12``.

    ``pinv`` keeps torch's default cut-off (eigenvalues above ``K * eps(G.dtype)`` times the
    largest), computed from a symmetric eigendecomposition (:func:`mmgrad.aggregators._linalg.
    sym_eig`: LAPACK on CPU, fixed-sweep Jacobi on GPU, because ``torch.linalg.pinv`` synchronises;
    where the Triton backend serves ``G`` the whole method is one kernel).
    Difference: ``G`` is normalised by its trace first, so the ``1e-12`` threshold applies to the
    scale-free sum (torchjd's threshold is absolute, so whether it fires depends on the gradients'
    scale).
    """

    name = "imtl_g"

    def __init__(self, rtol: float | None = None, eig: str = "auto") -> None:
        self.rtol, self.eig = check_option("rtol", rtol, 0.0), check_eig(eig)

    def weights(self, G: torch.Tensor) -> torch.Tensor:
        check_gram(G)
        K = G.shape[0]
        rtol = self.rtol if self.rtol is not None else K * torch.finfo(G.dtype).eps
        if self.eig == "auto" and use_triton_eager(G):
            from mmgrad.triton import solvers
            return solvers.pinv_weights(G, None, rtol, JACOBI_SWEEPS).to(G.dtype)
        Gn = normalized(G)
        d = Gn.diagonal().clamp(min=0).sqrt()
        v = pinv_apply(Gn, d, rtol, self.eig)
        s = v.sum()
        ok = s.abs() >= 1e-12
        w = torch.where(ok, v / torch.where(ok, s, torch.ones_like(s)), torch.zeros_like(v))
        return w.to(G.dtype)
