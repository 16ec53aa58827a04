"""CRMT: certifiable robust multi-modal training (Yang et al., ICLR 2024), METHODS.md §7.

Not gradient surgery: CRMT is a fusion head, an extra loss and a second optimisation stage.

* :class:`CRMTHead`: one linear layer over the concatenated features whose column block of each
  modality is normalised per class row (centred, unit L2 norm); unimodal logits
  ``h_m = z_m W~_m^T`` (no bias) and fused logits ``sum_m a_m * h_m + b`` with learnable per-class
  integration weights ``a_m``.
* Stage 1: :func:`crmt_loss` = cross-entropy of the fused logits + ``rho`` x
  :func:`crmt_margin_loss` (a margin regulariser on every unimodal representation).
* :func:`lipschitz_estimate`: ``L[m, c] = max_i ||d out_c / d x_m||_2`` over the training samples.
* Stage 2: :meth:`CRMTHead.tune_integration` trains only the ``a_m`` to maximise the certified lower
  bound (:func:`certified_lower_bound`, loss :func:`certified_margin_loss`);
  :func:`certified_accuracy` reports the fraction of samples certified at a given radius.

Modalities are identified by the names of the modality declaration ``{name: module or params}``
that :class:`mmgrad.BalancedOptimizer` takes (``opt.modalities``), in the same order.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CRMTOutput",
    "CRMTHead",
    "crmt_margin_loss",
    "crmt_loss",
    "lipschitz_estimate",
    "certified_lower_bound",
    "certified_margin_loss",
    "certified_accuracy",
]


class CRMTOutput(NamedTuple):
    """What :class:`CRMTHead` returns: ``fused`` (N, C) and ``unimodal`` ``{name: h_m (N, C)}``."""

    fused: torch.Tensor
    unimodal: dict[str, torch.Tensor]


class CRMTHead(nn.Module):
    """CRMT's orthogonal fusion head (the reference code's ``orthogonal_linear``).

    One weight ``W`` (C x sum_m d_m); its column block ``W_m`` (C x d_m) for modality m is
    normalised row by row, ``W~_m[c] = (W_m[c] - mean(W_m[c])) / (||W_m[c] - mean(W_m[c])||_2 + eps)``
    (the reference's ``OWNNorm`` with ``norm_groups = C``: one row per group reduces the group
    whitening to centring and scaling to unit norm; ``eps`` keeps a constant row finite, it maps to
    zero). The normalisation is a reparametrisation: gradients reach ``W`` through it.

    Unimodal logits ``h_m = z_m W~_m^T`` (no bias); fused logits ``sum_m a_m * h_m + b`` with
    ``a_m`` (C,) a learnable per-class integration weight.

    Args:
        widths: ``{modality name: feature width d_m}`` in concatenation order (the order of the
            modality declaration); every width must be at least 2 (a one-column block is all zeros
            once centred).
        classes: number of classes C (at least 2).
        integration_init: initial value of every ``a_m`` entry (0.1 in the reference code).
        bias: learn the fused bias ``b`` (C,).
        eps: added to each row norm of the normalisation.

    ``W`` (``weight``), ``b`` (``bias``) and the ``a_m`` (``integration.<index>``, in ``names``
    order) are ordinary parameters of the state dict. ``W`` and ``b`` are initialised like
    :class:`torch.nn.Linear`.
    """

    def __init__(
        self,
        widths: Mapping[str, int],
        classes: int,
        integration_init: float = 0.1,
        bias: bool = True,
        eps: float = 1e-8,
    ):
        super().__init__()
        if not isinstance(widths, Mapping) or not widths:
            raise ValueError("widths must be a non-empty mapping {modality name: feature width}")
        for name, width in widths.items():
            if not isinstance(name, str):
                raise TypeError(f"modality names must be strings, got {name!r}")
            if isinstance(width, bool) or not isinstance(width, int) or width < 2:
                raise ValueError(
                    f"width of modality {name!r} must be an int >= 2 (a one-column block is zero once "
                    f"centred), got {width!r}"
                )
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
            raise ValueError(f"classes must be an int >= 2, got {classes!r}")
        if not math.isfinite(integration_init):
            raise ValueError(f"integration_init must be finite, got {integration_init}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.names = list(widths)
        self.widths = dict(widths)
        self.classes = classes
        self.eps = float(eps)
        total = sum(self.widths.values())
        self.weight = nn.Parameter(torch.empty(classes, total))
        self.bias = nn.Parameter(torch.empty(classes)) if bias else None
        self.integration = nn.ParameterList(
            [nn.Parameter(torch.full((classes,), float(integration_init))) for _ in self.names]
        )
        self._spans = {}
        start = 0
        for name in self.names:
            self._spans[name] = (start, start + self.widths[name])
            start += self.widths[name]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise ``W`` and ``b`` as :class:`torch.nn.Linear` does (the ``a_m`` keep their
        values)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight.shape[1])
            nn.init.uniform_(self.bias, -bound, bound)

    def normalized_weight(self, m: str) -> torch.Tensor:
        """``W~_m`` (C x d_m): modality ``m``'s column block, each row centred and scaled to unit
        norm (differentiable)."""
        if m not in self._spans:
            raise KeyError(f"unknown modality {m!r}; the head has {self.names}")
        start, end = self._spans[m]
        block = self.weight[:, start:end]
        centred = block - block.mean(dim=1, keepdim=True)
        return centred / (torch.linalg.vector_norm(centred, dim=1, keepdim=True) + self.eps)

    def integration_parameters(self) -> list[nn.Parameter]:
        """The integration weights ``a_m`` (each (C,)), in ``names`` order."""
        return list(self.integration)

    def integration_matrix(self) -> torch.Tensor:
        """The ``a_m`` stacked into (M, C), rows in ``names`` order (differentiable)."""
        return torch.stack(list(self.integration))

    def _bias_or_zeros(self) -> torch.Tensor:
        if self.bias is not None:
            return self.bias
        return torch.zeros(self.classes, dtype=self.weight.dtype, device=self.weight.device)

    def forward(self, features: Mapping[str, torch.Tensor]) -> CRMTOutput:
        """``features``: ``{name: z_m (N, d_m)}`` for exactly the head's modalities (any order)."""
        if set(features) != set(self.names):
            raise KeyError(f"features must have exactly the modalities {self.names}, got {list(features)}")
        unimodal = {}
        fused = None
        for name, a in zip(self.names, self.integration):
            z = features[name]
            if z.dim() != 2 or z.shape[1] != self.widths[name]:
                raise ValueError(f"features[{name!r}] must be (N, {self.widths[name]}), got {tuple(z.shape)}")
            h = z @ self.normalized_weight(name).T
            unimodal[name] = h
            fused = a * h if fused is None else fused + a * h
        if self.bias is not None:
            fused = fused + self.bias
        return CRMTOutput(fused, unimodal)

    def tune_integration(
        self,
        unimodal: torch.Tensor,
        targets: torch.Tensor,
        lipschitz: torch.Tensor,
        epochs: int,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-2,
        batch_size: int = 64,
        generator: Optional[torch.Generator] = None,
    ) -> list[float]:
        """CRMT stage 2: train only the integration weights ``a_m`` to maximise the certified lower
        bound, i.e. minimise :func:`certified_margin_loss` by SGD over shuffled mini-batches.

        Everything else is frozen: ``W`` and the encoders do not enter (the unimodal logits come
        precomputed) and ``b`` is used detached, so none of them changes. Because the encoders
        and ``W`` are frozen in this stage, ``h_m`` is the same at every step, so computing it once
        beforehand (encoders in eval mode) is exact, not an approximation. The runner-up class
        ``j`` of each sample is re-selected at every step with the current ``a``.

        Args:
            unimodal: (M, N, C) unimodal logits ``h_m`` of the training set, rows in ``names``
                order (``torch.stack([out.unimodal[m] for m in head.names])``).
            targets: (N,) class indices.
            lipschitz: (M, C) Lipschitz estimates (:func:`lipschitz_estimate`), rows in ``names``
                order.
            epochs: number of passes over the data (the reference runs ``n_epochs // 3 - 1``).
            lr: SGD learning rate (the reference uses 0.03 x the stage-1 learning rate).
            momentum, weight_decay: of the SGD optimiser over the ``a_m`` (reference: 0.9, 1e-2).
            batch_size: mini-batch size; the last batch of an epoch may be smaller.
            generator: random generator of the shuffling (default: torch's global generator).

        Returns:
            The mean loss of each epoch (per-sample average over the epoch's batches, each taken
            before its step).

        The ``.grad`` of the ``a_m`` is restored to what it was before the call.
        """
        M, C = len(self.names), self.classes
        if unimodal.dim() != 3 or unimodal.shape[0] != M or unimodal.shape[2] != C:
            raise ValueError(f"unimodal must be (M={M}, N, C={C}), got {tuple(unimodal.shape)}")
        N = unimodal.shape[1]
        if targets.shape != (N,):
            raise ValueError(f"targets must be ({N},), got {tuple(targets.shape)}")
        if lipschitz.shape != (M, C):
            raise ValueError(f"lipschitz must be ({M}, {C}), got {tuple(lipschitz.shape)}")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if N == 0:
            raise ValueError("unimodal holds no samples")
        params = self.integration_parameters()
        if not all(p.requires_grad for p in params):
            raise ValueError("the integration weights a_m must require grad to be tuned")
        device = params[0].device
        h = unimodal.detach().to(device=device, dtype=params[0].dtype)
        y = targets.to(device)
        L = lipschitz.detach().to(device=device, dtype=params[0].dtype)
        b = self._bias_or_zeros().detach()
        saved_grads = [p.grad for p in params]
        optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        perm_device = generator.device if generator is not None else "cpu"
        history = []
        try:
            for _ in range(epochs):
                order = torch.randperm(N, generator=generator, device=perm_device).to(device)
                total = torch.zeros((), dtype=torch.float64, device=device)
                for start in range(0, N, batch_size):
                    idx = order[start : start + batch_size]
                    with torch.enable_grad():
                        loss = certified_margin_loss(self.integration_matrix(), b, h[:, idx], y[idx], L)
                        grads = torch.autograd.grad(loss, params)
                    for p, g in zip(params, grads):
                        p.grad = g
                    optimizer.step()
                    total += loss.detach().double() * idx.numel()
                history.append(float(total / N))  # one host sync per epoch
        finally:
            for p, g in zip(params, saved_grads):
                p.grad = g
        return history


def crmt_margin_loss(unimodal: Mapping[str, torch.Tensor], targets: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """CRMT's margin regulariser
    ``mean_i log( sum_m sum_{k != y_i} exp(h_m,i,k - h_m,i,y_i) + eps )``.

    Computed as ``logaddexp(LSE_i, log eps)`` with ``LSE_i`` the log-sum-exp over all modalities and
    non-label classes, so large logit gaps neither overflow nor lose the ``+ eps``.

    Args:
        unimodal: ``{name: h_m (N, C)}`` (e.g. ``CRMTOutput.unimodal``); C >= 2.
        targets: (N,) class indices.
        eps: added inside the log (1e-5 in the reference code); >= 0.
    """
    if not unimodal:
        raise ValueError("unimodal is empty")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    logits = list(unimodal.values())
    shape = logits[0].shape
    if len(shape) != 2 or shape[1] < 2:
        raise ValueError(f"unimodal logits must be (N, C) with C >= 2, got {tuple(shape)}")
    if any(h.shape != shape for h in logits):
        raise ValueError(f"unimodal logits must share one shape, got {[tuple(h.shape) for h in logits]}")
    if targets.shape != (shape[0],):
        raise ValueError(f"targets must be ({shape[0]},), got {tuple(targets.shape)}")
    y = targets.view(-1, 1)
    label = torch.zeros(shape, dtype=torch.bool, device=logits[0].device).scatter_(1, y, True)
    gaps = [(h - h.gather(1, y)).masked_fill(label, float("-inf")) for h in logits]
    lse = torch.logsumexp(torch.cat(gaps, dim=1), dim=1)
    # new_full fills on the device: torch.tensor(value, device=cuda) would copy from the host (a sync)
    log_eps = lse.new_full((), math.log(eps) if eps > 0 else float("-inf"))
    return torch.logaddexp(lse, log_eps).mean()


def crmt_loss(output: CRMTOutput, targets: torch.Tensor, rho: float = 2.0, eps: float = 1e-5) -> torch.Tensor:
    """CRMT stage-1 loss: ``CE(fused, y) + rho * crmt_margin_loss(unimodal, y, eps)`` (``rho`` = 2 in
    every reference config)."""
    return F.cross_entropy(output.fused, targets) + rho * crmt_margin_loss(output.unimodal, targets, eps)


def lipschitz_estimate(
    forward: Callable[[dict[str, torch.Tensor]], Union[torch.Tensor, Mapping[str, torch.Tensor]]],
    inputs: Union[Mapping[str, torch.Tensor], Iterable[Mapping[str, torch.Tensor]]],
    classes: int,
    names: Optional[Sequence[str]] = None,
) -> torch.Tensor:
    """Empirical Lipschitz constants ``L[m, c] = max_i ||d out_c / d x_m (sample i)||_2`` (M, C).

    Per-sample gradients come from one backward pass per class (and modality) on
    ``out[:, c].sum()``: that sum's gradient wrt sample i's input is sample i's own gradient only
    when samples do not interact, so ``forward`` must be in eval mode and free of batch-coupling
    layers (batch norm in training mode, attention across the batch, ...). A warning is given when
    ``forward`` is an ``nn.Module`` with a submodule in training mode.

    Args:
        forward: maps ``{name: x_m (N, ...)}`` to the output, either one (N, C) tensor (the
            reference code passes the fused logits, so its ``L_m`` already carries the ``a_m`` of
            the time of the estimate, and stage 2 multiplies by ``a_m`` again) or a dict
            ``{name: (N, C)}``, in which case ``L[m]`` is taken from ``output[name]`` wrt ``x_m``
            (e.g. ``lambda x: model(x).unimodal`` for the Lipschitz constants of ``h_m`` that the
            certified bound assumes).
        inputs: one batch ``{name: x_m}`` or an iterable of such batches (a data loader).
        classes: number of output columns C.
        names: the modalities (rows of ``L``) in order; default: the first batch's keys.

    Runs under ``torch.enable_grad`` on detached copies of the inputs (which must be floating
    point); the result is detached, in the output's dtype (at least float32).
    """
    if isinstance(forward, nn.Module) and any(m.training for m in forward.modules()):
        warnings.warn(
            "lipschitz_estimate: forward has modules in training mode; per-sample gradients assume "
            "independent samples (call .eval())",
            stacklevel=2,
        )
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise ValueError(f"classes must be an int >= 1, got {classes!r}")
    batches = [inputs] if isinstance(inputs, Mapping) else inputs
    L = None
    for batch in batches:
        if not isinstance(batch, Mapping):
            raise TypeError(f"each batch must be a dict {{modality name: input}}, got {type(batch).__name__}")
        if names is None:
            names = list(batch)
        if set(batch) != set(names):
            raise KeyError(f"batch has modalities {list(batch)}, expected {list(names)}")
        xs = {}
        for m in names:
            if not batch[m].is_floating_point():
                raise TypeError(f"input {m!r} must be floating point to be differentiated, got {batch[m].dtype}")
            xs[m] = batch[m].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = forward(xs)
            per_modality = isinstance(out, Mapping)
            outs = {m: (out[m] if per_modality else out) for m in names}
            for m, o in outs.items():
                if o.dim() != 2 or o.shape[1] != classes:
                    raise ValueError(f"forward output for {m!r} must be (N, {classes}), got {tuple(o.shape)}")
            if L is None:
                dtype = torch.promote_types(outs[names[0]].dtype, torch.float32)
                L = torch.zeros(len(names), classes, dtype=dtype, device=outs[names[0]].device)
            for c in range(classes):
                # retain_graph throughout: the graph is freed with ``out`` at the end of the batch
                if per_modality:
                    grads = [_input_grad(outs[m][:, c].sum(), [xs[m]])[0] for m in names]
                else:
                    grads = _input_grad(out[:, c].sum(), [xs[m] for m in names])
                for i, g in enumerate(grads):
                    if g is None or g.shape[0] == 0:
                        continue  # the output does not depend on this input: gradient zero
                    norms = torch.linalg.vector_norm(g.reshape(g.shape[0], -1).to(L.dtype), dim=1)
                    L[i, c] = torch.maximum(L[i, c], norms.max().to(L.device))
    if L is None:
        raise ValueError("inputs holds no batch")
    return L


def _input_grad(scalar: torch.Tensor, xs: list[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """``d scalar / d x`` for each x (None where it does not depend on x)."""
    if not scalar.requires_grad:
        return [None] * len(xs)
    return list(torch.autograd.grad(scalar, xs, retain_graph=True, allow_unused=True))


def certified_lower_bound(
    a: torch.Tensor,
    b: torch.Tensor,
    unimodal: torch.Tensor,
    targets: torch.Tensor,
    lipschitz: torch.Tensor,
    eps: float = 1e-12,
) -> torch.Tensor:
    """CRMT's certified lower bound per sample (N,):

    ``(sum_m (a_m[y] h_m[y] - a_m[j] h_m[j]) + b_y - b_j) / sqrt(sum_m (a_m[y] L_m[y] + a_m[j] L_m[j])^2 + eps)``

    where ``j`` is the highest non-label class of the fused logits ``sum_m a_m * h_m + b`` (selected
    with the given ``a`` and ``b``, without gradient). The numerator is the fused margin
    ``out_y - out_j``. When ``L_m`` bounds the Lipschitz constants of ``h_m`` wrt ``x_m`` and
    ``a >= 0``, an l2 perturbation of the joint input smaller than the bound cannot make ``j``
    overtake ``y`` (the paper's bound; it considers the runner-up class only). ``eps`` under the
    square root keeps the bound finite (and differentiable) when every ``a L`` term is zero.

    Args:
        a: (M, C) integration weights; b: (C,) fused bias; unimodal: (M, N, C) logits ``h_m``;
        targets: (N,) class indices; lipschitz: (M, C).
    """
    if unimodal.dim() != 3:
        raise ValueError(f"unimodal must be (M, N, C), got {tuple(unimodal.shape)}")
    M, N, C = unimodal.shape
    if C < 2:
        raise ValueError("the certified bound needs at least 2 classes")
    if a.shape != (M, C) or lipschitz.shape != (M, C) or b.shape != (C,):
        raise ValueError(
            f"expected a ({M}, {C}), b ({C},), lipschitz ({M}, {C}); got {tuple(a.shape)}, {tuple(b.shape)}, "
            f"{tuple(lipschitz.shape)}"
        )
    if targets.shape != (N,):
        raise ValueError(f"targets must be ({N},), got {tuple(targets.shape)}")
    fused = (a[:, None, :] * unimodal).sum(0) + b  # (N, C)
    y = targets.view(-1, 1)
    with torch.no_grad():
        j = fused.scatter(1, y, float("-inf")).argmax(dim=1, keepdim=True)
    margin = (fused.gather(1, y) - fused.gather(1, j)).squeeze(1)
    aL = a * lipschitz  # (M, C)
    spread = aL[:, targets] + aL[:, j.squeeze(1)]  # (M, N)
    return margin / torch.sqrt((spread * spread).sum(0) + eps)


def certified_margin_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    unimodal: torch.Tensor,
    targets: torch.Tensor,
    lipschitz: torch.Tensor,
    eps: float = 1e-12,
) -> torch.Tensor:
    """CRMT stage-2 loss: minus the mean :func:`certified_lower_bound` over the samples."""
    return -certified_lower_bound(a, b, unimodal, targets, lipschitz, eps).mean()


def certified_accuracy(
    a: torch.Tensor,
    b: torch.Tensor,
    unimodal: torch.Tensor,
    targets: torch.Tensor,
    lipschitz: torch.Tensor,
    radius: float,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Fraction of samples whose :func:`certified_lower_bound`
    ``margin / sqrt(sum_m (a_m[y] L_m[y] + a_m[j] L_m[j])^2)`` exceeds ``radius`` (a 0-dim float
    tensor). At radius 0 it is the fused accuracy (strictly correct predictions); a larger radius
    counts the samples certified robust to l2 perturbations of that size."""
    bound = certified_lower_bound(a, b, unimodal, targets, lipschitz, eps)
    return (bound > radius).to(torch.promote_types(bound.dtype, torch.float32)).mean()
