"""Mean and Sum: constant weights (torchjd ``Mean`` / ``Sum``)."""

from __future__ import annotations

import torch

from mmgrad import reference

from .base import Aggregator, check_gram, check_matrix, combine


class _ConstantWeights(Aggregator):
    """Weights that do not depend on ``G``: ``__call__`` skips the Gram pass (one pass over J)."""

    def _value(self, K: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def weights(self, G: torch.Tensor) -> torch.Tensor:
        check_gram(G)
        K = G.shape[0]
        return torch.full((K,), self._value(K), dtype=G.dtype, device=G.device)

    def __call__(self, J: torch.Tensor) -> torch.Tensor:
        check_matrix(J)
        K = J.shape[0]
        # The dtype weights(gram(J)) would have, so the result is the same bits.
        w = torch.full((K,), self._value(K), dtype=reference.accumulation_dtype(J.dtype), device=J.device)
        return combine(J, w)


class Mean(_ConstantWeights):
    """Average of the rows: weights ``1/K`` (torchjd 0.18 ``Mean``)."""

    name = "mean"

    def _value(self, K: int) -> float:
        return 1.0 / K


class Sum(_ConstantWeights):
    """Sum of the rows: weights ``1`` (torchjd 0.18 ``Sum``)."""

    name = "sum"

    def _value(self, K: int) -> float:
        return 1.0
