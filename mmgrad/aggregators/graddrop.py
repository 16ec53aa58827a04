"""GradDrop (Chen et al., NeurIPS 2020): gradient sign dropout (elementwise, no weights)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from .base import Aggregator, SeededMixin, check_matrix

#: Columns processed per block: both passes of a block run while it is in cache, so J is read
#: from memory once.
GRADDROP_BLOCK = 1 << 15


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class GradDrop(SeededMixin, Aggregator):
    """GradDrop as in torchjd 0.18 ``GradDrop(f=identity, leak=None)`` (lines 10-15 of Algorithm 1).

    Per coordinate: purity ``P = (1 + sum_i J_i / sum_i |J_i|) / 2``, ``U ~ Uniform(0, 1)``; row i is
    kept where ``f(P) > U and J_i > 0`` or ``f(P) < U and J_i < 0``; output
    ``sum_i (leak_i + (1 - leak_i) M_i) J_i``. Vectorised over K and blocked over P (no Python loop
    over rows, no host sync). Coordinates where every row is zero give 0 (torchjd: 0 too, via NaN
    comparisons). Difference: ``U`` comes from this object's seeded generator (state in
    ``state_dict``), not the global RNG. Elementwise, so there is no ``weights(G)``.
    """

    name = "graddrop"
    gramian_based = False

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor] = _identity,
                 leak: Optional[Sequence[float] | torch.Tensor] = None, seed: int = 0,
                 block: int = GRADDROP_BLOCK) -> None:
        self.f = f
        if leak is not None:
            leak = torch.as_tensor(leak, dtype=torch.float64)
            if leak.dim() != 1:
                raise ValueError("leak must be a 1-D tensor")
        self.leak = leak
        self.block = int(block)
        self._leak_cache: dict = {}
        self._init_gen(seed)

    def weights(self, G: torch.Tensor) -> torch.Tensor:
        raise TypeError("GradDrop is elementwise: it has no Gram-based weights; call it on J")

    def __call__(self, J: torch.Tensor, columns: Optional[torch.Tensor] = None, total: Optional[int] = None) -> torch.Tensor:
        """``columns`` / ``total``: ``J`` holds the columns ``columns`` (int64, (P,)) of a (K, total)
        matrix (a shard of it): the random draws are those of the whole matrix at these columns."""
        check_matrix(J)
        K, P = J.shape
        out = torch.empty(P, dtype=J.dtype, device=J.device)
        acc = torch.float64 if J.dtype == torch.float64 else torch.float32
        if columns is not None:  # drawn (and the stream advanced) even for an empty shard
            draws = self._uniform_at(columns.to(J.device), P if total is None else total, acc)
        else:
            # All P draws up front, in large pieces: the Philox stream is ~100 elementwise torch
            # ops, so drawing per 32K-column block would cost ~100 kernel launches per block.
            draws = torch.cat([self._uniform(min(1 << 22, P - i), J.device, acc) for i in range(0, P, 1 << 22)]) if P else None
        if P == 0:
            return out
        leak = None
        if self.leak is not None:
            if self.leak.shape[0] != K:
                raise ValueError(f"leak has {self.leak.shape[0]} entries but J has {K} rows")
            key = (J.device, acc)
            leak = self._leak_cache.get(key)
            if leak is None:
                leak = self.leak.to(device=J.device, dtype=acc).unsqueeze(1)
                self._leak_cache[key] = leak
        for start in range(0, P, self.block):
            Jb = J[:, start:start + self.block].to(acc)
            s = Jb.sum(0)
            a = Jb.abs().sum(0)
            purity = 0.5 * (1.0 + s / torch.where(a > 0, a, torch.ones_like(a)))
            fP = self.f(purity)
            U = draws[start:start + self.block]
            keep = ((fP > U) & (Jb > 0)) | ((fP < U) & (Jb < 0))
            if leak is None:
                r = (Jb * keep).sum(0)
            else:
                r = ((leak + (1 - leak) * keep) * Jb).sum(0)
            out[start:start + self.block] = r
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"generators": self._gen_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._load_gen_state(state.get("generators", {}))

    def reset(self) -> None:
        self._reset_gen()
