"""Modules and helpers for balanced multimodal models.

* :func:`split_concat_logits`: per-modality logits of a concat fusion head, split by columns (the
  OGM / OPM convention: ``o_m = z_m W_m^T + b / M``).
* :func:`shapley_logits`: exact Shapley response of each modality for any fusion head (AGM).
* :class:`ImpartialBranch`: where several modality branches consume one tensor, receives all their
  gradients in one backward pass and aggregates them (representation-level impartiality block).
* :class:`ImpartialModule`: a module shared by several branches; its parameters' per-branch
  gradients are aggregated (parameter-level impartiality block).
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call

from mmgrad import ops

__all__ = ["split_concat_logits", "shapley_values", "shapley_logits", "ImpartialBranch", "ImpartialModule"]


def split_concat_logits(
    head: nn.Linear, features: Mapping[str, torch.Tensor], bias_share: Optional[float] = None
) -> dict[str, torch.Tensor]:
    """Unimodal logits from a concat head ``out = W [z_1; ...; z_M] + b``: ``o_m = z_m W_m^T + b *
    bias_share`` with ``W_m`` the columns of modality m (``features`` in concatenation order) and
    ``bias_share = 1 / M`` by default. The head's weights are used as they are (detach the result
    for pure measurement, as OGM does)."""
    M = len(features)
    if M == 0:
        raise ValueError("features is empty: give the features of every modality the head concatenates")
    share = 1.0 / M if bias_share is None else bias_share
    widths = [z.shape[-1] for z in features.values()]
    if sum(widths) != head.in_features:
        raise ValueError(f"feature widths {widths} do not add up to the head's in_features {head.in_features}")
    out, start = {}, 0
    for (name, z), w in zip(features.items(), widths):
        logits = z @ head.weight[:, start : start + w].T
        if head.bias is not None:
            logits = logits + head.bias * share
        out[name] = logits
        start += w
    return out


def shapley_values(players: Sequence, value: Callable[[frozenset], object]) -> dict:
    """Exact Shapley values ``phi_m = sum_{S subset of others} |S|!(M-|S|-1)!/M! (v(S+m) - v(S))``
    of ``value(frozenset_of_players)`` (numbers or tensors); ``value`` is called once per subset
    (``2^M`` calls)."""
    players = list(players)
    M = len(players)
    values = {}
    for r in range(M + 1):
        for subset in itertools.combinations(players, r):
            values[frozenset(subset)] = value(frozenset(subset))
    phi = {}
    for m in players:
        others = [p for p in players if p != m]
        total = 0
        for r in range(M):
            weight = math.factorial(r) * math.factorial(M - r - 1) / math.factorial(M)
            for subset in itertools.combinations(others, r):
                S = frozenset(subset)
                total = total + weight * (values[S | {m}] - values[S])
        phi[m] = total
    return phi


def shapley_logits(head: Callable[[dict], torch.Tensor], features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Exact Shapley response of each modality: :func:`shapley_values` of ``f(S) = head(features
    with the modalities outside S zeroed)``, ``2^M`` head evaluations under ``no_grad``. For a
    linear concat head this equals ``z_m W_m^T``."""
    with torch.no_grad():
        return shapley_values(
            list(features),
            lambda S: head({n: (z if n in S else torch.zeros_like(z)) for n, z in features.items()}),
        )


def _aggregate_rows(J: torch.Tensor, aggregator, rescale: bool) -> torch.Tensor:
    """Aggregated row of J (K, P); with ``rescale`` its norm is set to the norm of the plain sum
    (both read off the Gram matrix, so two passes over J in all)."""
    if not getattr(aggregator, "gramian_based", True):
        d = aggregator(J)
        if rescale:
            target = J.sum(0).norm()
            d = d * (target / d.norm().clamp_min(1e-30))
        return d
    G = ops.gram(J)
    w = aggregator.weights(G).to(G.dtype)
    if rescale:
        target = G.sum()
        current = w @ G @ w
        w = w * torch.sqrt(target.clamp_min(0) / current.clamp_min(1e-30))
    return ops.combine(J, w)


def _resolve(aggregator):
    from mmgrad import aggregators

    return aggregators.get(aggregator) if isinstance(aggregator, str) else aggregator


class _ImpartialExpand(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, branches, aggregator, rescale):
        ctx.aggregator, ctx.rescale, ctx.shape = aggregator, rescale, z.shape
        return z.unsqueeze(0).expand(branches, *z.shape)

    @staticmethod
    def backward(ctx, grad):
        K = grad.shape[0]
        J = grad.reshape(K, -1)
        if not J.is_contiguous():
            J = J.contiguous()
        return _aggregate_rows(J, ctx.aggregator, ctx.rescale).view(ctx.shape), None, None, None


class ImpartialBranch(nn.Module):
    """Representation-level impartiality block.

    ``forward(z)`` returns a tuple of ``branches`` zero-copy views of ``z``, one per branch
    (modality head, decoder, ...). In the backward pass the block receives the gradients of all
    branches at once, as a (K, numel(z)) matrix, aggregates them with ``aggregator`` (any method of
    :mod:`mmgrad.aggregators`, Gram -> weights -> combine) and passes the result upstream; with
    ``rescale`` (the reference behaviour) its norm is that of the plain sum of the branch
    gradients. One backward pass, K x the activation's size in memory.
    """

    def __init__(self, branches: int, aggregator="upgrad", rescale: bool = True):
        super().__init__()
        if branches < 1:
            raise ValueError("branches must be >= 1")
        self.branches = branches
        self.aggregator = _resolve(aggregator)
        self.rescale = rescale

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # unbind (not indexing) so each slice's backward writes into one shared (K, ...) gradient.
        return _ImpartialExpand.apply(z, self.branches, self.aggregator, self.rescale).unbind(0)

    def extra_repr(self) -> str:
        return f"branches={self.branches}, aggregator={self.aggregator!r}, rescale={self.rescale}"


class _ImpartialParams(torch.autograd.Function):
    @staticmethod
    def forward(ctx, branches, aggregator, rescale, *params):
        ctx.aggregator, ctx.rescale = aggregator, rescale
        ctx.shapes = [p.shape for p in params]
        return tuple(p.unsqueeze(0).expand(branches, *p.shape) for p in params)

    @staticmethod
    def backward(ctx, *grads):
        K = grads[0].shape[0]
        J = torch.cat([g.reshape(K, -1) for g in grads], dim=1)
        d = _aggregate_rows(J, ctx.aggregator, ctx.rescale)
        out, start = [], 0
        for shape in ctx.shapes:
            n = math.prod(shape)
            out.append(d[start : start + n].view(shape))
            start += n
        return (None, None, None, *out)


class ImpartialModule(nn.Module):
    """Parameter-level impartiality block around a module shared by ``branches`` branches.

    Call :meth:`expand` once per forward pass (it makes one zero-copy (K, ...) view per
    parameter), then ``block(x, branch=k)`` for branch k. In the backward pass the per-branch
    gradients of all the module's parameters form a (K, P) matrix that is aggregated (and, with
    ``rescale``, given the norm of the plain sum) before it reaches the parameters' ``.grad``.
    """

    def __init__(self, module: nn.Module, branches: int, aggregator="upgrad", rescale: bool = True):
        super().__init__()
        if branches < 1:
            raise ValueError("branches must be >= 1")
        self.module = module
        self.branches = branches
        self.aggregator = _resolve(aggregator)
        self.rescale = rescale
        self._expanded: Optional[dict[str, Sequence[torch.Tensor]]] = None

    def expand(self) -> None:
        trainable = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(f"ImpartialModule: {type(self.module).__name__} has no trainable parameter to share "
                             "between the branches (use ImpartialBranch on its output instead)")
        names, params = zip(*trainable)
        views = _ImpartialParams.apply(self.branches, self.aggregator, self.rescale, *params)
        self._expanded = {n: v.unbind(0) for n, v in zip(names, views)}

    def forward(self, *args, branch: int, **kwargs):
        if self._expanded is None:
            raise RuntimeError("call block.expand() once per forward pass before block(x, branch=k)")
        if not 0 <= branch < self.branches:
            raise IndexError(f"branch {branch} out of range for {self.branches} branches")
        params = {n: v[branch] for n, v in self._expanded.items()}
        return functional_call(self.module, params, args, kwargs)
