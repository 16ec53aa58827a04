"""ConFIG (Liu et al., ICLR 2025): conflict-free inverse gradients."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._linalg import JACOBI_SWEEPS, check_eig, pinv_apply
from .base import Aggregator, _PrefMixin, check_gram, check_option, normalized, use_triton_eager


class ConFIG(_PrefMixin, Aggregator):
    """ConFIG as in torchjd 0.18 ``ConFIG(pref_vector)`` (pref default: ones), in Gram form.

    torchjd: unit rows ``U = D^-1 J``, ``b = pinv(U) @ pref``, ``d = (sum_i g_i . b^) b^``. Since
    ``pinv(U) = U^T (U U^T)^+``, ``b = J^T c`` with ``c = D^-1 Ghat^+ pref`` and ``Ghat`` the cosine
    matrix, so the weights are ``c (1^T G c) / (c^T G c)``: Gram-only, so ConFIG also gets
    ``weights(G)`` here. Zero rows stay zero (torchjd's ``nan_to_num``).

    Difference: torch's default ``pinv`` cut-off for the K x P matrix ``U`` is ``max(K, P) * eps``
    relative on singular values, i.e. it depends on P (0.12 for P = 1M in float32: nearly parallel
    gradients are merged). Here ``Ghat`` = ``U U^T`` is what is decomposed, so its eigenvalues (the
    squared singular values of ``U``) carry the rounding of G's dtype: those below
    ``K * eps(G.dtype)`` times the largest (and below 1e-14 in any case) are noise and dropped. A
    given ``rtol`` (relative, on the singular values of ``U``) drops those below ``rtol**2``
    besides; pass ``rtol=max(K, P) * eps`` to reproduce torchjd. Where the Triton backend serves
    ``G`` the whole method is one kernel.
    """

    name = "config"

    def __init__(self, pref_vector: Optional[Sequence[float] | torch.Tensor] = None,
                 rtol: float | None = None, eig: str = "auto") -> None:
        self._init_pref(pref_vector)
        self.rtol, self.eig = check_option("rtol", rtol, 0.0), check_eig(eig)

    def _options(self):
        return {"pref_vector": self._pref, "rtol": self.rtol}

    def weights(self, G: torch.Tensor) -> torch.Tensor:
        check_gram(G)
        K = G.shape[0]
        # relative cut-off on the eigenvalues of the cosine matrix (squared singular values of U)
        cut = max(K * torch.finfo(G.dtype).eps, 1e-14, (self.rtol or 0.0) ** 2)
        if self.eig == "auto" and use_triton_eager(G):  # the whole method in one kernel
            from mmgrad.triton import solvers
            pref = self._pref_for(K, G, default=1.0, dtype=torch.float64)
            return solvers.pinv_weights(G, pref, cut, JACOBI_SWEEPS).to(G.dtype)
        Gn = normalized(G)
        pref = self._pref_for(K, Gn, default=1.0)
        d = Gn.diagonal().clamp(min=0).sqrt()
        inv_d = torch.where(d > 0, 1.0 / torch.where(d > 0, d, torch.ones_like(d)),
                            torch.zeros_like(d))
        cos = inv_d.unsqueeze(1) * Gn * inv_d.unsqueeze(0)
        c = inv_d * pinv_apply(cos, pref, cut, self.eig)
        Gc = Gn @ c
        nb2 = c @ Gc
        ok = nb2 > 0
        w = torch.where(ok, c * (Gc.sum() / torch.where(ok, nb2, torch.ones_like(nb2))),
                        torch.zeros_like(c))
        return w.to(G.dtype)
