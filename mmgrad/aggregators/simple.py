"""Mean and Sum: constant weights (torchjd ``Mean`` / ``Sum``)."""

from __future__ import annotations

import torch

from .base import Aggregator, check_gram


class Mean(Aggregator):
    """Average of the rows: weights ``1/K`` (torchjd 0.18 ``Mean``)."""

    name = "mean"

    def weights(self, G: torch.Tensor) -> torch.Tensor:
        check_gram(G)
        K = G.shape[0]
        return torch.full((K,), 1.0 / K, dtype=G.dtype, device=G.device)


class Sum(Aggregator):
    """Sum of the rows: weights ``1`` (torchjd 0.18 ``Sum``)."""

    name = "sum"

    def weights(self, G: torch.Tensor) -> torch.Tensor:
        check_gram(G)
        return torch.ones(G.shape[0], dtype=G.dtype, device=G.device)
