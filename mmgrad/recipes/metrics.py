"""What the recipes measure: accuracy, linear probes on frozen encoders, exact Shapley
contributions of the modalities to test accuracy, the OGM discrepancy ratio, and the share of a
probe gap a method closes."""

from __future__ import annotations

import math
from typing import Callable, Hashable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmgrad.methods.ogm import confidence_scores, discrepancy_ratio
from mmgrad.nn import shapley_values as nn_shapley_values

__all__ = [
    "accuracy",
    "linear_probe",
    "shapley_values",
    "shapley_accuracy",
    "confidence_scores",
    "discrepancy_ratio",
    "gap_closed",
]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max is the label."""
    return (logits.argmax(1) == labels).double().mean().item()


def linear_probe(train_z, train_y, test_z, test_y, classes: int = 10, steps: int = 200, l2: float = 1e-3) -> float:
    """Test accuracy of a multinomial logistic regression on frozen features.

    Features are standardised with training statistics; the probe is fit full-batch with L-BFGS
    (deterministic: same features give the same accuracy) and a small L2 penalty.
    """
    if not (torch.isfinite(train_z).all() and torch.isfinite(test_z).all()):
        return float("nan")  # a diverged run: no probe to fit; the report shows NaN
    mean, std = train_z.mean(0), train_z.std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # dead units (ReLU) stay at 0
    a, b = (train_z - mean) / std, (test_z - mean) / std
    g = torch.Generator().manual_seed(0)  # a fixed probe initialisation, independent of the run
    probe = nn.Linear(a.shape[1], classes)
    with torch.no_grad():
        bound = 1 / math.sqrt(a.shape[1])
        probe.weight.copy_(torch.rand(probe.weight.shape, generator=g) * 2 * bound - bound)
        probe.bias.zero_()
    opt = torch.optim.LBFGS(probe.parameters(), lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(a), train_y) + l2 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return accuracy(probe(b), test_y)


def shapley_values(players: Sequence[Hashable], value: Callable[[frozenset], float]) -> dict:
    """Exact Shapley values of a numeric ``value(frozenset_of_players)`` (see
    :func:`mmgrad.nn.shapley_values`), as floats."""
    return {m: float(v) for m, v in nn_shapley_values(players, lambda S: float(value(S))).items()}


def shapley_accuracy(
    head: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
    features: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    empty_value: float = 0.0,
) -> dict[str, float]:
    """Per-modality Shapley contribution to accuracy: ``v(S)`` is the accuracy of ``head`` when the
    features of the modalities outside S are zeroed, and ``v(empty) = empty_value`` (0, as in
    the sample-level valuation of METHODS.md §6.1, so the contributions add up to the fused
    accuracy)."""

    def value(S: frozenset) -> float:
        if not S:
            return empty_value
        with torch.no_grad():
            feats = {m: (z if m in S else torch.zeros_like(z)) for m, z in features.items()}
            return accuracy(head(feats), labels)

    return shapley_values(list(features), value)


def gap_closed(method_probe: float, baseline_probe: float, ceiling_probe: float) -> float:
    """Share of the probe gap (ceiling - baseline) the method closes: 1 = reaches the ceiling,
    0 = no better than the baseline, negative = worse; NaN when there is no gap."""
    gap = ceiling_probe - baseline_probe
    if gap <= 0:
        return float("nan")
    return (method_probe - baseline_probe) / gap
