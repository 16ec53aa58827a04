"""Aligned-MTL (Senushkin et al., CVPR 2023)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._linalg import JACOBI_SWEEPS, check_eig, sym_eig
from .base import Aggregator, _PrefMixin, check_gram, normalized, use_triton_eager


class AlignedMTL(_PrefMixin, Aggregator):
    """Aligned-MTL as in torchjd 0.18 ``AlignedMTLWeighting(pref_vector, scale_mode="min")``.

    ``G = V diag(l) V^T``; eigenvalues ``<= max(l) * K * eps(G.dtype)`` are dropped (rank
    truncation); ``B = sqrt(sigma) V diag(l^{-1/2}) V^T`` on the kept ones, ``sigma`` = smallest kept
    eigenvalue (``"min"``), lower median (``"median"``) or mean (``"rmse"``); weights
    ``B @ pref`` (pref default 1/K), ``pref`` when the rank is 0. The rank is a mask, not a Python
    int, so nothing synchronises; the eigendecomposition is LAPACK on CPU and a fixed-sweep Jacobi
    elsewhere (``torch.linalg.eigh`` synchronises on CUDA); where the Triton backend serves ``G``
    the whole method is one kernel. ``G`` is normalised by its trace
    (B is scale-invariant).
    """

    name = "aligned_mtl"

    def __init__(self, pref_vector: Optional[Sequence[float] | torch.Tensor] = None,
                 scale_mode: str = "min", eig: str = "auto") -> None:
        if scale_mode not in ("min", "median", "rmse"):
            raise ValueError(f"scale_mode must be 'min', 'median' or 'rmse', got {scale_mode!r}")
        self._init_pref(pref_vector)
        self.scale_mode, self.eig = scale_mode, check_eig(eig)

    def _options(self):
        return {"pref_vector": self._pref, "scale_mode": self.scale_mode}

    def weights(self, G: torch.Tensor) -> torch.Tensor:
        check_gram(G)
        K = G.shape[0]
        if self.eig == "auto" and use_triton_eager(G):  # the whole method in one kernel
            from mmgrad.triton import solvers
            pref = self._pref_for(K, G, dtype=torch.float64)
            mode = ("min", "median", "rmse").index(self.scale_mode)
            return solvers.aligned_weights(G, pref, K * torch.finfo(G.dtype).eps, mode,
                                           JACOBI_SWEEPS).to(G.dtype)
        Gn = normalized(G)
        pref = self._pref_for(K, Gn)
        lam, V = sym_eig(Gn, self.eig)  # ascending
        tol = lam.max() * K * torch.finfo(G.dtype).eps
        keep = lam > tol
        rank = keep.sum()
        one = torch.ones((), dtype=Gn.dtype, device=Gn.device)
        safe = torch.where(keep, lam, one)
        first = K - rank  # kept eigenvalues are lam[first:]
        # gather with a tensor index: ``lam[t]`` with a 0-dim tensor t would call .item()
        if self.scale_mode == "min":
            scale = lam.gather(0, first.clamp(max=K - 1).reshape(1))[0]
        elif self.scale_mode == "median":  # torch.median: lower median
            pos = (first + (rank - 1).clamp(min=0) // 2).clamp(max=K - 1)
            scale = lam.gather(0, pos.reshape(1))[0]
        else:
            scale = (lam * keep).sum() / rank.clamp(min=1)
        inv_sqrt = torch.where(keep, torch.rsqrt(safe), torch.zeros_like(lam))
        w = scale.clamp(min=0).sqrt() * (V @ (inv_sqrt * (V.T @ pref)))
        w = torch.where(rank > 0, w, pref)
        return w.to(G.dtype)
