"""MMPareto (Wei & Hu, ICML 2024), METHODS.md §4.

For every modality encoder m, two objectives touch its parameters: the multimodal loss (gradient
``g_mm``) and its own unimodal loss (``g_u``). With ``cos_m = cos(g_mm, g_u)`` over the whole
encoder, the direction is ``g_new = 2c g_mm + 2(1-c) g_u`` with ``c = 0.5`` when ``cos_m > 0`` and
the two-objective min-norm weight otherwise; the magnitude is restored per tensor:
``g <- gamma * max(||g_sum||, ||g_new||) / ||g_new|| * g_new`` with ``g_sum = g_mm + g_u``.
Heads (parameters outside the modalities) keep the plain summed gradient.

Two backward passes (the reference code uses four): the multimodal loss into row 0, the sum of the
unimodal losses into row 1 (each unimodal loss reaches only its own encoder). Then one fused pass of
per-tensor 2 x 2 Gram matrices (which give every norm and cosine above) and one fused pass writing
the per-tensor combination into row 0.
"""

from __future__ import annotations

from typing import Mapping

import torch

from mmgrad import ops
from mmgrad.aggregators.base import check_option
from mmgrad.methods.base import BalancingMethod, StepContext, _sum_losses


def mgda_two(G: torch.Tensor, clip: float = 0.001) -> torch.Tensor:
    """Weight ``c`` on objective 1 of ``argmin_c ||c g1 + (1-c) g2||^2`` from 2 x 2 Gram matrices
    (..., 2, 2), as the reference min-norm solver computes it: ``1 - clip`` when
    ``<g1,g2> >= ||g1||^2``, ``clip`` when ``<g1,g2> >= ||g2||^2``, the interior optimum otherwise."""
    v11, v12, v22 = G[..., 0, 0], G[..., 0, 1], G[..., 1, 1]
    denom = v11 + v22 - 2 * v12
    interior = (v22 - v12) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(
        v12 >= v11, torch.full_like(v11, 1 - clip), torch.where(v12 >= v22, torch.full_like(v11, clip), interior)
    )


class MMPareto(BalancingMethod):
    """MMPareto gradient integration.

    Args:
        gamma: magnitude enhancement (1.5, hard-coded in the reference code).
        multimodal: key of the multimodal loss in the dict given to ``backward``; the other keys
            must be the modality names (their unimodal losses).
        eps: guards the per-tensor ratio where ``||g_new|| = 0`` (the reference code divides by
            zero there and produces NaN; here such a tensor gets a zero gradient).

    ``opt.backward({"fusion": l_mm, "audio": l_a, "visual": l_v})`` once per micro-batch. The
    unimodal losses are back-propagated together into one row, so each must reach its own
    encoder only (a unimodal head reading another modality's features would mix that gradient in).
    """

    rows = 2
    result_row = 0
    reports_finite = True

    def __init__(self, gamma: float = 1.5, multimodal: str = "fusion", eps: float = 1e-12):
        super().__init__()
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.gamma = float(check_option("gamma", gamma))
        self.multimodal = multimodal
        self.eps = float(check_option("eps", eps, 0.0))

    def attach(self, layout) -> None:
        if self.multimodal in layout.names:
            free = next(k for k in ("fusion", "multimodal", "joint", "all_modalities") if k not in layout.names)
            raise ValueError(f"MMPareto's multimodal loss key {self.multimodal!r} is also a modality name; "
                             f"pass another key, e.g. MMPareto(multimodal={free!r})")
        super().attach(layout)

    def backward(self, optimizer, loss, **_) -> None:
        if not isinstance(loss, Mapping) or self.multimodal not in loss:
            raise ValueError(
                f"MMPareto needs opt.backward({{{self.multimodal!r}: multimodal_loss, modality: unimodal_loss, ...}})"
            )
        names = self.layout.names
        unimodal = {k: v for k, v in loss.items() if k != self.multimodal}
        missing = [n for n in names if n not in unimodal]
        extra = [k for k in unimodal if k not in names]
        if missing or extra:
            raise ValueError(f"MMPareto: unimodal losses must be given for exactly the modalities {names}; "
                             f"missing {missing}, unknown {extra}")
        buffer = optimizer._buffer
        buffer.bind(0)
        loss[self.multimodal].backward(retain_graph=True)
        buffer.bind(1)
        _sum_losses(unimodal).backward()

    def edit(self, context: StepContext) -> dict:
        layout = self.layout
        J = layout.buffer.data
        seg = layout.segments
        # Row 0 (multimodal) may still carry a GradScaler's scale; row 1 is .grad and was unscaled.
        unscale = torch.stack([context.row_scale, torch.ones_like(context.row_scale)]).to(torch.float64)
        # Per-tensor 2 x 2 Grams; with sharded parameters each rank's are partial sums over its
        # shard, and reduce_stats adds them up (4 numbers per tensor cross ranks, no gradient).
        per_tensor = context.reduce_stats(ops.segment_gram(J, seg.offsets, seg.numels).to(torch.float64))
        per_tensor = per_tensor * unscale[:, None] * unscale[None, :]
        finite = torch.isfinite(per_tensor).all()
        per_modality = layout.per_modality_sum(per_tensor)  # (M, 2, 2)
        v11, v12, v22 = per_modality[:, 0, 0], per_modality[:, 0, 1], per_modality[:, 1, 1]
        cos = v12 / (v11 * v22).sqrt().clamp_min(1e-300)
        c = torch.where(cos > 0, torch.full_like(cos, 0.5), mgda_two(per_modality))
        a = (2 * c)[layout.segment_modality]  # (S,) weight on g_mm
        b = (2 * (1 - c))[layout.segment_modality]  # weight on g_u
        G = per_tensor
        new_sq = a * a * G[:, 0, 0] + 2 * a * b * G[:, 0, 1] + b * b * G[:, 1, 1]
        sum_sq = G[:, 0, 0] + 2 * G[:, 0, 1] + G[:, 1, 1]
        new_norm = new_sq.clamp_min(0).sqrt()
        ratio = sum_sq.clamp_min(0).sqrt() / new_norm.clamp_min(self.eps)
        factor = self.gamma * torch.where(ratio > 1, ratio, torch.ones_like(ratio))
        factor = torch.where(new_norm > self.eps, factor, torch.zeros_like(factor))
        weights = torch.stack([factor * a, factor * b], dim=1) * unscale[None, :]
        ops.segment_combine_(layout.buffer.row(0), J, seg.offsets, seg.numels, weights)
        return {
            "finite": finite,
            "cos": cos,
            "c": c,
            "grad_norm_multimodal": v11.sqrt(),
            "grad_norm_unimodal": v22.sqrt(),
        }

    def __repr__(self) -> str:
        return f"MMPareto(gamma={self.gamma})"
