"""PCGrad and GradVac, written in coefficient space.

Each modified gradient is kept as a row of a K x K coefficient matrix ``C`` (``g_i' = C_i J``), so
every dot product is Gram algebra: ``g_i' . g_j = (C G)_ij`` and ``|g_i'|^2 = C_i G C_i^T``. The K
modified gradients are independent of each other, so the K sequential inner loops of the original
algorithms run side by side: step ``t`` treats pair ``(i, order[i, t])`` for every ``i`` at once
(K steps of a few K-vector ops). The visiting orders are drawn from the aggregator's own seeded
stream (:class:`SeededMixin`) on ``G``'s device (``rand(K, K).argsort(1)``), never the global RNG,
and never on the host.

On float64 CPU tensors with the C++ backend selected (:func:`use_cpp_solver`) the coefficient
loops run in C++ (``csrc/cpu/projection.cpp``: each row's K steps in turn, same arithmetic); where
the Triton backend serves ``G`` (:func:`use_triton_solver`: CUDA, K <= 64) in one Triton kernel
(``mmgrad/triton/solvers.py``: the K steps on register tiles); elsewhere the torch solvers below
(``*_torch``) run. Both are wrapped in one custom op per method, so
``torch.compile`` sees a single opaque call either way.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from mmgrad._custom_op import custom_op

from .base import (Aggregator, SeededMixin, check_gram, check_option, normalized, use_cpp_solver,
                   use_triton_eager, use_triton_solver)


def _orders(K: int, uniform) -> torch.Tensor:
    """(K, K) int64: row ``i`` is a random permutation of ``0..K-1`` (``i`` itself is skipped);
    ``uniform(n)`` draws the random numbers."""
    return uniform(K * K).view(K, K).argsort(dim=1)


def pcgrad_coefficients_torch(G: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """PCGrad (Yu et al. 2020, Algorithm 1) in coefficient space; returns ``C`` (K, K).

    For each ``i`` and ``j = order[i, t]`` (``j != i``): if ``g_i' . g_j < 0`` then
    ``g_i' -= (g_i' . g_j / |g_j|^2) g_j``, i.e. ``C[i, j] -= (C_i G_j) / G_jj``.
    """
    K = G.shape[0]
    ar = torch.arange(K, device=G.device)
    C = torch.eye(K, dtype=G.dtype, device=G.device)
    d = G.diagonal()
    for t in range(K):
        j = order[:, t]
        inner = (C * G[j]).sum(1)  # g_i' . g_j   (G symmetric: G[j] is column j)
        dj = d[j]
        ok = (j != ar) & (inner < 0) & (dj > 0)
        step = torch.where(ok, -inner / torch.where(dj > 0, dj, torch.ones_like(dj)),
                           torch.zeros_like(inner))
        C = C.index_put((ar, j), step, accumulate=True)
    return C


def gradvac_coefficients_torch(G: torch.Tensor, order: torch.Tensor, phi_t: torch.Tensor, beta: float,
                               eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GradVac (Wang et al. 2021) in coefficient space, as torchjd 0.18 ``GradVacWeighting``.

    For each ``i`` and ``j = order[i, t] != i``: ``phi = cos(g_i', g_j)``; if ``phi < phi_t[i, j]``
    add ``w g_j`` to ``g_i'`` with
    ``w = |g_i'| (phi_t sqrt(1 - phi^2) - phi sqrt(1 - phi_t^2)) / (|g_j| sqrt(1 - phi_t^2) + eps)``;
    then ``phi_t[i, j] <- (1 - beta) phi_t[i, j] + beta phi``. Returns ``(C, new phi_t)``.
    """
    K = G.shape[0]
    ar = torch.arange(K, device=G.device)
    C = torch.eye(K, dtype=G.dtype, device=G.device)
    cG = G.clone()  # row i: g_i' . g_k for every k
    norm_j_all = G.diagonal().clamp(min=0).sqrt()
    phi_t = phi_t.clone()
    zero = torch.zeros(K, dtype=G.dtype, device=G.device)
    for t in range(K):
        j = order[:, t]
        valid = j != ar
        dot = cG.gather(1, j.unsqueeze(1)).squeeze(1)
        norm_i = (cG * C).sum(1).clamp(min=0).sqrt()
        norm_j = norm_j_all[j]
        phi = dot / (norm_i * norm_j + eps)
        hat = phi_t[ar, j]
        s_phi = (1 - phi * phi).clamp(min=0).sqrt()
        s_hat = (1 - hat * hat).clamp(min=0).sqrt()
        w = norm_i * (hat * s_phi - phi * s_hat) / (norm_j * s_hat + eps)
        w = torch.where(valid & (phi < hat), w, zero)
        C = C.index_put((ar, j), w, accumulate=True)
        cG = cG + w.unsqueeze(1) * G[j]
        phi_t = phi_t.index_put((ar, j), torch.where(valid, (1 - beta) * hat + beta * phi, hat))
    return C, phi_t


@custom_op("mmgrad::pcgrad_coefficients", mutates_args=())
def pcgrad_coefficients(G: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """:func:`pcgrad_coefficients_torch`, in C++ on CPU tensors and in one Triton kernel where the
    Triton backend serves ``G`` (see the module docstring)."""
    if use_cpp_solver(G):
        return torch.ops.mmgrad_C.pcgrad_coefficients(G, order)
    if use_triton_solver(G):
        from mmgrad.triton import solvers
        return solvers.pcgrad_coefficients(G, order)
    return pcgrad_coefficients_torch(G, order)


@pcgrad_coefficients.register_fake
def _(G, order):
    return G.new_empty(G.shape)


@custom_op("mmgrad::gradvac_coefficients", mutates_args=())
def gradvac_coefficients(G: torch.Tensor, order: torch.Tensor, phi_t: torch.Tensor, beta: float,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gradvac_coefficients_torch`, in C++ on CPU tensors and in one Triton kernel where the
    Triton backend serves ``G`` (see the module docstring)."""
    if use_cpp_solver(G):
        return torch.ops.mmgrad_C.gradvac_coefficients(G, order, phi_t, beta, eps)
    if use_triton_solver(G):
        from mmgrad.triton import solvers
        return solvers.gradvac_coefficients(G, order, phi_t, beta, eps)
    return gradvac_coefficients_torch(G, order, phi_t, beta, eps)


@gradvac_coefficients.register_fake
def _(G, order, phi_t, beta, eps):
    return G.new_empty(G.shape), phi_t.new_empty(phi_t.shape)


class PCGrad(SeededMixin, Aggregator):
    """PCGrad (Yu et al. 2020) as in torchjd 0.18 ``PCGradWeighting``: weights = sum of the rows of
    the coefficient matrix (``reduction="sum"``, torchjd's convention; the original
    Pytorch-PCGrad averages: ``reduction="mean"``).

    Differences with torchjd: the orders come from this object's own ``torch.Generator`` (seeded
    with ``seed``, state in ``state_dict``) instead of the global RNG, and ``G`` is normalised by
    its trace (the weights are scale-invariant in exact arithmetic). For K = 2 the order is
    irrelevant and PCGrad equals UPGrad with ``pref_vector = [1, 1]`` (tested); where Triton serves
    ``G`` the K = 2 weights are then one scalar kernel, and the stream advances as the undrawn
    order would advance it.
    """

    name = "pcgrad"

    def __init__(self, seed: int = 0, reduction: str = "sum") -> None:
        if reduction not in ("sum", "mean"):
            raise ValueError("reduction must be 'sum' or 'mean'")
        self._init_gen(seed)
        self.reduction = reduction

    def _options(self):
        return {"seed": self.seed, "reduction": self.reduction}

    def weights(self, G: torch.Tensor, order: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``order`` (K, K) overrides the random visiting orders (tests, reproduction)."""
        check_gram(G)
        K = G.shape[0]
        if K == 2 and order is None and use_triton_eager(G):
            # one launch (normalisation included); the order, irrelevant at K = 2, is not drawn
            # but the stream advances as if it were
            from mmgrad.triton import solvers
            self._skip(K * K, G.device)
            return solvers.pcgrad_k2(G, 1.0 if self.reduction == "sum" else 1.0 / K).to(G.dtype)
        Gn = normalized(G)
        if order is None:
            order = _orders(K, lambda n: self._uniform(n, G.device))
        w = pcgrad_coefficients(Gn, order).sum(0)
        if self.reduction == "mean":
            w = w / K
        return w.to(G.dtype)


class GradVac(SeededMixin, Aggregator):
    """Gradient Vaccine (Wang et al., ICLR 2021) as in torchjd 0.18 ``GradVacWeighting``
    (``beta = 0.5`` EMA decay, ``eps = 1e-8``, weights = sum of the coefficient rows).

    State: the EMA targets ``phi_t`` (K x K, float64, on ``G``'s device; re-initialised to zero when
    K changes, like torchjd) and the generator; both in ``state_dict``; :meth:`reset` clears them.

    Differences with torchjd: own seeded generator instead of the global RNG; ``G`` normalised by
    its trace first, so ``eps`` is relative to the gradient norms (torchjd adds ``eps`` to raw
    norms, which makes the cosines collapse to 0 for gradients smaller than ~1e-4).
    """

    name = "gradvac"

    def __init__(self, beta: float = 0.5, eps: float = 1e-8, seed: int = 0) -> None:
        self.beta = check_option("beta", beta, 0.0, 1.0)
        self.eps = check_option("eps", eps, 0.0)
        self._init_gen(seed)
        self.phi_t: Optional[torch.Tensor] = None

    def _options(self):
        return {"beta": self.beta, "eps": self.eps, "seed": self.seed}

    def weights(self, G: torch.Tensor, order: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_gram(G)
        Gn = normalized(G)
        K = G.shape[0]
        phi = self.phi_t
        if phi is None or phi.shape[0] != K:
            phi = torch.zeros(K, K, dtype=Gn.dtype, device=Gn.device)
        elif phi.device != Gn.device or phi.dtype != Gn.dtype:
            phi = phi.to(device=Gn.device, dtype=Gn.dtype)
        if order is None:
            order = _orders(K, lambda n: self._uniform(n, G.device))
        C, self.phi_t = gradvac_coefficients(Gn, order, phi, self.beta, self.eps)
        return C.sum(0).to(G.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "phi_t": self.phi_t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        phi = state.get("phi_t")
        self.phi_t = None if phi is None else phi.clone()

    def reset(self) -> None:
        super().reset()
        self.phi_t = None
