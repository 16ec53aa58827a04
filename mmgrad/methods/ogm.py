"""OGM and OGM-GE: on-the-fly gradient modulation (Peng et al., CVPR 2022), METHODS.md §2-3.

Per step: the confidence score of each modality ``s_m = sum_i softmax(o_m,i)[y_i]`` from its
unimodal logits, the discrepancy ratio ``rho_m``, and the coefficient
``k_m = 1 - tanh(alpha * rho_m)`` for the dominant modality (``rho_m > 1``), 1 for the others. The
modulated gradient tensors of modality m are scaled by ``k_m``; OGM-GE adds Gaussian noise with the
per-tensor std of the *unscaled* gradient to every modulated tensor (both modalities).

Fused: one pass of per-tensor moments (std, norms, finiteness) and one pass of scale + noise.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from mmgrad import ops
from mmgrad.distributed import scale_segments_
from mmgrad.methods.base import BalancingMethod, StepContext

_RATIOS = ("pairwise", "others_mean", "min")


def confidence_scores(logits: Mapping[str, torch.Tensor], targets: torch.Tensor, names) -> torch.Tensor:
    """``s_m = sum_i softmax(logits_m)[i, y_i]`` for each modality in ``names`` order, (M,) float64
    (the softmax runs in float32, or float64 for float64 logits)."""
    scores = []
    for name in names:
        if name not in logits:
            raise KeyError(f"logits has no entry for modality {name!r}; got {sorted(logits)}")
        if logits[name].shape[0] != targets.shape[0]:
            raise ValueError(f"logits[{name!r}] has {logits[name].shape[0]} rows but targets has "
                             f"{targets.shape[0]}: they must come from the same batch")
        o = logits[name].detach()
        o = o.double() if o.dtype == torch.float64 else o.float()
        scores.append(torch.softmax(o, dim=1).gather(1, targets.view(-1, 1)).sum().double())
    return torch.stack(scores)


def discrepancy_ratio(scores: torch.Tensor, mode: str = "pairwise", eps: float = 0.0) -> torch.Tensor:
    """``rho_m`` from the scores (M,). Two modalities: ``s_m / s_other`` in every mode. More:
    ``pairwise`` = mean over j != m of ``s_m / s_j`` (the author's suggestion, BalanceMM's OGM_GE3),
    ``others_mean`` = ``s_m / mean_{j != m} s_j``, ``min`` = ``s_m / min_j s_j`` (BalanceMM's
    OGM_GE)."""
    M = scores.numel()
    if M == 1:
        return torch.ones_like(scores)
    s = scores
    off = ~torch.eye(M, dtype=torch.bool, device=s.device)
    if mode == "pairwise":
        pair = s[:, None] / (s[None, :] + eps)
        return (pair * off).sum(1) / (M - 1)
    if mode == "others_mean":
        others = (s[None, :] * off).sum(1) / (M - 1)
        return s / (others + eps)
    if mode == "min":
        return s / (s.min() + eps)
    raise ValueError(f"unknown ratio mode {mode!r}; choose one of {_RATIOS}")


def ogm_coefficients(ratio: torch.Tensor, alpha: float, shifted: bool = False) -> torch.Tensor:
    """``k = 1 - tanh(alpha * rho)`` where ``rho > 1`` (``alpha * (rho - 1)`` when ``shifted``),
    else 1. The published rule jumps from 1 to ``1 - tanh(alpha)`` as rho crosses 1."""
    arg = alpha * (ratio - 1 if shifted else ratio)
    return torch.where(ratio > 1, 1 - torch.tanh(arg), torch.ones_like(ratio))


class OGM(BalancingMethod):
    """On-the-fly gradient modulation, without noise (mode ``OGM`` of the reference code).

    Args:
        alpha: strength (required; the authors use 0.1 for VGGSound, 0.8 for CREMA-D).
        modulation_starts, modulation_ends: epochs (inclusive) in which the gradients are edited;
            scores and coefficients are computed every step regardless (diagnostics).
        params: which tensors are modulated: ``"conv"`` (4-D gradients only, the paper's code),
            ``"weights"`` (every tensor with more than one dimension, BalanceMM), ``"all"``.
        ratio: rule for more than two modalities (see :func:`discrepancy_ratio`).
        shifted: use ``alpha * (rho - 1)`` (continuous at rho = 1) instead of ``alpha * rho``.
        eps: added to the ratio's denominator (0 in the reference code, 1e-5 in BalanceMM).
        seed: seed of the GE noise (default: drawn from torch's generator at construction).
        scale: ``"gradient"`` (the papers) multiplies the gradient by ``k``; ``"update"`` multiplies
            the parameter update the wrapped optimizer makes instead, which keeps the effect under
            Adam / AdamW (they normalise a constant per-tensor gradient rescale away).

    Under Adam/AdamW a constant per-tensor rescale of the gradient is mostly normalised away
    (use ``scale="update"``); SGD (as in the papers) sees the full effect.

    ``opt.backward(loss, logits={m: unimodal_logits_m}, targets=y)`` once per micro-batch; scores
    accumulate over micro-batches until ``step()``.
    """

    noise = False
    reports_finite = True

    def __init__(
        self,
        alpha: float,
        modulation_starts: int = 0,
        modulation_ends: int = 50,
        params: str = "conv",
        ratio: str = "pairwise",
        shifted: bool = False,
        eps: float = 0.0,
        seed: Optional[int] = None,
        scale: str = "gradient",
    ):
        super().__init__()
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if params not in ("conv", "weights", "all"):
            raise ValueError(f"params must be 'conv', 'weights' or 'all', got {params!r}")
        if ratio not in _RATIOS:
            raise ValueError(f"ratio must be one of {_RATIOS}, got {ratio!r}")
        if modulation_ends < modulation_starts:
            raise ValueError("modulation_ends must be >= modulation_starts")
        self.alpha = float(alpha)
        self.modulation_starts = int(modulation_starts)
        self.modulation_ends = int(modulation_ends)
        self.params = params
        self.ratio_mode = ratio
        self.shifted = shifted
        self.eps = float(eps)
        if scale not in ("gradient", "update"):
            raise ValueError(f"scale must be 'gradient' or 'update', got {scale!r}")
        self.scale_target = scale
        # Drawn from torch's default generator when not given, so torch.manual_seed fixes it.
        self._initial_seed = int(seed) if seed is not None else int(torch.randint(0, 2**62, ()).item())
        self._seed: Optional[torch.Tensor] = None
        self._scores: Optional[torch.Tensor] = None

    def attach(self, layout) -> None:
        if len(layout.names) < 2:
            raise ValueError(f"{type(self).__name__} compares the modalities' confidence: it needs at least two, "
                             f"got {layout.names}")
        super().attach(layout)
        try:
            self._modulated, self._modulated_modality, self._modulated_index = layout.filtered(self.params)
        except ValueError as exc:
            raise ValueError(f"{type(self).__name__}: {exc}") from None
        self._modulated_host_index = self._modulated_index.tolist()
        self._seed = torch.tensor([self._initial_seed], dtype=torch.int64, device=layout.device)
        self._scores = torch.zeros(len(layout.names), dtype=torch.float64, device=layout.device)

    def backward(self, optimizer, loss, logits=None, targets=None, **_) -> None:
        if logits is None or targets is None:
            raise ValueError(f"{type(self).__name__} needs opt.backward(loss, logits={{modality: logits}}, targets=y)")
        self._scores += confidence_scores(logits, targets, self.layout.names).to(self._scores.device)
        optimizer._buffer.bind(0)
        loss.backward()

    def batch_statistics(self) -> list:
        return [self._scores]

    def broadcast_state(self, broadcast) -> None:
        broadcast([self._seed])
        self._initial_seed = int(self._seed.item())  # once, at construction

    def edit(self, context: StepContext) -> dict:
        layout = self.layout
        row = layout.buffer.row(0)
        seg = layout.segments
        # One pass: per-tensor sum and sum of squares of the unscaled gradient (of this rank's
        # shard, summed over shards by reduce_stats when the parameters are sharded).
        moments = context.reduce_stats(ops.segment_moments(row, seg.offsets, seg.numels))
        finite = torch.isfinite(moments).all()
        ratio = discrepancy_ratio(self._scores, self.ratio_mode, self.eps)
        coeff = ogm_coefficients(ratio, self.alpha, self.shifted)
        diagnostics = {
            "finite": finite,
            "scores": self._scores.clone(),
            "ratio": ratio,
            "coeff": coeff,
            "grad_norm": layout.per_modality_sum(moments[:, 1]).sqrt(),
        }
        self._scores.zero_()
        if not (self.modulation_starts <= context.epoch <= self.modulation_ends):
            return diagnostics
        mod = self._modulated
        scale = coeff[self._modulated_modality]
        if self.scale_target == "update":
            # The optimizer scales each modulated tensor's update by k after the inner step; the
            # gradient itself is left unscaled (noise, if any, is still added to it).
            diagnostics["update_scale"] = (self._modulated_host_index, scale)
            scale = torch.ones_like(scale)
        if self.noise:
            # The reference code's sigma = p.grad.std() + 1e-8, of the unscaled gradient.
            std = ops.segment_std(moments, layout.tensor_numels)[self._modulated_index] + 1e-8
            scale_segments_(layout, row, mod, self._modulated_host_index, scale, std, self._seed)
            # Fresh noise next step, advanced on the device (CUDA-graph safe); a skipped
            # (non-finite) step leaves the stream where it was.
            self._seed.add_(context.all_finite(finite).to(torch.int64))
        else:
            ops.segment_scale_(row, mod.offsets, mod.numels, scale)
        return diagnostics

    def state_dict(self) -> dict:
        return {"seed": None if self._seed is None else self._seed.clone(), "initial_seed": self._initial_seed}

    def load_state_dict(self, state: Mapping) -> None:
        self._initial_seed = int(state["initial_seed"])
        if state["seed"] is not None and self._seed is not None:
            self._seed.copy_(state["seed"])

    def reset(self) -> None:
        if self._seed is not None:
            self._seed.fill_(self._initial_seed)
            self._scores.zero_()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(alpha={self.alpha}, window=[{self.modulation_starts}, {self.modulation_ends}], "
            f"params={self.params!r})"
        )


class OGMGE(OGM):
    """OGM with generalisation enhancement: after scaling, every modulated tensor gets Gaussian
    noise ``N(0, std(g)^2)`` where ``std(g)`` is the per-tensor (unbiased) std of its unscaled
    gradient, as in the reference code (``p.grad.std()`` taken before the scaling). Counter-based
    noise: the same seed gives the same noise on every backend (to rounding) and thread count."""

    noise = True
