"""Multi-objective aggregators: ``G = J J^T`` -> weights ``w`` (K,) -> ``w^T J`` (P,).

>>> import mmgrad
>>> agg = mmgrad.aggregators.get("upgrad")
>>> d = agg(J)                      # (P,)  == ops.combine(J, agg.weights(ops.gram(J)))
>>> w = mmgrad.weights(G, "mgda")   # (K,)  Gram-based methods only

Names (:data:`NAMES`): mean, sum, mgda, pcgrad, cagrad, imtl_g, nash_mtl, aligned_mtl, upgrad,
dualproj, gradvac, config, graddrop. Conventions follow torchjd 0.18 (each class's docstring
lists the deliberate differences). Every solver is torch-only, sync-free, with a fixed budget.
"""

from __future__ import annotations

from typing import Any

import torch

from .aligned import AlignedMTL
from .base import Aggregator
from .cagrad import CAGrad
from .config import ConFIG
from .dual_cone import DualProj, UPGrad
from .graddrop import GradDrop
from .imtl import IMTLG
from .minnorm import MGDA
from .nash import NashMTL
from .projection import GradVac, PCGrad
from .simple import Mean, Sum

_REGISTRY: dict[str, type[Aggregator]] = {
    "mean": Mean,
    "sum": Sum,
    "mgda": MGDA,
    "pcgrad": PCGrad,
    "cagrad": CAGrad,
    "imtl_g": IMTLG,
    "nash_mtl": NashMTL,
    "aligned_mtl": AlignedMTL,
    "upgrad": UPGrad,
    "dualproj": DualProj,
    "gradvac": GradVac,
    "config": ConFIG,
    "graddrop": GradDrop,
}

#: Every method name accepted by :func:`get`.
NAMES: tuple[str, ...] = tuple(_REGISTRY)
#: The methods with Gram-based weights (all but the elementwise GradDrop).
GRAM_NAMES: tuple[str, ...] = tuple(n for n, c in _REGISTRY.items() if c.gramian_based)

__all__ = [
    "NAMES", "GRAM_NAMES", "get", "aggregate", "weights", "Aggregator",
    "Mean", "Sum", "MGDA", "PCGrad", "CAGrad", "IMTLG", "NashMTL", "AlignedMTL", "UPGrad",
    "DualProj", "GradVac", "ConFIG", "GradDrop",
]


def _canon(name: str) -> str:
    key = name.lower().replace("-", "_")
    key = {"imtlg": "imtl_g", "nashmtl": "nash_mtl", "alignedmtl": "aligned_mtl",
           "dual_proj": "dualproj", "grad_vac": "gradvac", "grad_drop": "graddrop",
           "pc_grad": "pcgrad", "ca_grad": "cagrad", "up_grad": "upgrad"}.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(f"unknown aggregator {name!r}; expected one of {', '.join(NAMES)}")
    return key


def get(name: str, **options: Any) -> Aggregator:
    """A new aggregator object for ``name`` (see :data:`NAMES`), built with ``options``."""
    return _REGISTRY[_canon(name)](**options)


def aggregate(J: torch.Tensor, name: str, **options: Any) -> torch.Tensor:
    """``get(name, **options)(J)``: the (P,) aggregate of the (K, P) matrix ``J``.

    A fresh object per call: stateful methods (gradvac, nash_mtl) start from empty state and
    randomised ones (pcgrad, gradvac, graddrop) from their seed. Keep a :func:`get` object to carry
    state across steps.
    """
    return get(name, **options)(J)


def weights(G: torch.Tensor, name: str, **options: Any) -> torch.Tensor:
    """``get(name, **options).weights(G)``: the (K,) weights for the (K, K) Gram matrix ``G``."""
    agg = get(name, **options)
    if not agg.gramian_based:
        raise TypeError(f"{name!r} is elementwise and has no Gram-based weights")
    return agg.weights(G)
