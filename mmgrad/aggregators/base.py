"""Base class and shared helpers of the multi-objective aggregators.

Every aggregator follows "Gram, solve, combine" (see DESIGN.md): ``__call__(J)`` computes
``G = ops.gram(J)``, asks the method for weights ``w = self.weights(G)`` and returns
``ops.combine(J, w)``. Only the elementwise GradDrop overrides ``__call__``.

Solver rules shared by every method (tested in ``tests/test_aggregators.py``):

* the solve runs in torch on ``G``'s own device, in float64 (float32 on devices without float64);
* fixed iteration budgets: no ``.item()``, no Python branch on a tensor value, no host copy; data
  dependent choices are ``torch.where`` / masks / ``clamp``;
* ``G`` is normalised by its trace before any iterative solver, so that the weights do not depend
  on the scale of the gradients (1e-10 .. 1e10 behave the same); a zero ``G`` or zero rows give
  finite weights;
* weights are returned in ``G``'s dtype.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from mmgrad import ops

__all__ = ["Aggregator", "GramianAggregator"]


def gram(J: torch.Tensor) -> torch.Tensor:
    return ops.gram(J)


def combine(J: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return ops.combine(J, w)


def solve_dtype(device: torch.device) -> torch.dtype:
    """float64 for the K x K solves, except on devices that have no float64 (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def to_solve(G: torch.Tensor) -> torch.Tensor:
    return G.detach().to(solve_dtype(G.device))


def normalize_trace(G: torch.Tensor, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``G / trace(G)`` (zero matrix when ``trace <= eps`` or not finite), and the trace.

    Sync-free: the branch is a ``torch.where``. ``eps = 0`` normalises any non-zero ``G`` whatever
    its scale (torchjd uses an absolute ``eps = 1e-4``, see the per-method docstrings).
    """
    t = G.diagonal().sum()
    ok = (t > eps) & torch.isfinite(t)
    safe = torch.where(ok, t, torch.ones_like(t))
    return torch.where(ok, G / safe, torch.zeros_like(G)), t


def check_gram(G: torch.Tensor) -> None:
    if G.dim() != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"G must be a square (K, K) matrix, got shape {tuple(G.shape)}")
    if G.shape[0] == 0:
        raise ValueError("G must have at least one row (K >= 1)")


def check_matrix(J: torch.Tensor) -> None:
    if J.dim() != 2:
        raise ValueError(f"J must be a (K, P) matrix, got shape {tuple(J.shape)}")
    if J.shape[0] == 0:
        raise ValueError("J must have at least one row (K >= 1)")


class _PrefMixin:
    """Holds an optional preference vector and serves it on the solver's device and dtype."""

    _pref: Optional[torch.Tensor]
    _pref_cache: dict

    def _init_pref(self, pref_vector: Optional[Sequence[float] | torch.Tensor]) -> None:
        if pref_vector is not None:
            pref_vector = torch.as_tensor(pref_vector, dtype=torch.float64).detach()
            if pref_vector.dim() != 1:
                raise ValueError("pref_vector must be a 1-D tensor")
        self._pref = pref_vector
        self._pref_cache = {}

    def _pref_for(self, K: int, ref: torch.Tensor, default: float | None = None) -> torch.Tensor:
        """Preference vector (K,) on ``ref``'s device/dtype; ``default`` fills it when unset
        (``None`` means 1/K)."""
        if self._pref is None:
            fill = (1.0 / K) if default is None else default
            return torch.full((K,), fill, dtype=ref.dtype, device=ref.device)
        if self._pref.shape[0] != K:
            raise ValueError(f"pref_vector has {self._pref.shape[0]} entries but there are {K} rows")
        key = (ref.device, ref.dtype)
        p = self._pref_cache.get(key)
        if p is None:  # one host-to-device copy per device, at the first call
            p = self._pref.to(device=ref.device, dtype=ref.dtype)
            self._pref_cache[key] = p
        return p


class Aggregator:
    """A multi-objective aggregator: ``__call__(J) -> (P,)`` for a (K, P) matrix ``J``."""

    name: str = ""
    gramian_based: bool = True

    def weights(self, G: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} has no Gram-based weights")

    def __call__(self, J: torch.Tensor) -> torch.Tensor:
        check_matrix(J)
        return combine(J, self.weights(gram(J)))

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unexpected = set(state) - set(self.state_dict())
        if unexpected:
            raise KeyError(f"unexpected keys in state_dict of {self.name}: {sorted(unexpected)}")

    def reset(self) -> None:
        """Forget all state (EMA targets, warm starts, random generators)."""

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({opts})"

    def _options(self) -> dict[str, Any]:
        return {}


GramianAggregator = Aggregator


class SeededMixin:
    """A ``torch.Generator`` per device, seeded with ``seed``; its state is in ``state_dict``.

    On CUDA the generator is a device generator, so drawing from it never synchronises.
    """

    seed: int
    _gens: dict

    def _init_gen(self, seed: int) -> None:
        self.seed = int(seed)
        self._gens = {}
        self._pending_gen_state: Optional[dict] = None

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        g = self._gens.get(key)
        if g is None:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            if self._pending_gen_state is not None and key in self._pending_gen_state:
                g.set_state(self._pending_gen_state.pop(key))
            self._gens[key] = g
        return g

    def _gen_state(self) -> dict:
        out = {k: g.get_state() for k, g in self._gens.items()}
        if self._pending_gen_state:
            for k, v in self._pending_gen_state.items():
                out.setdefault(k, v)
        return out

    def _load_gen_state(self, states: dict) -> None:
        self._gens = {}
        self._pending_gen_state = {k: v.clone() for k, v in states.items()}

    def _reset_gen(self) -> None:
        self._gens = {}
        self._pending_gen_state = None
