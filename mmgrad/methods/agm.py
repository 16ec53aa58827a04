"""AGM: adaptive gradient modulation (Li et al., ICCV 2023), as in BalanceMM (METHODS.md §8.4).

Per step, from each modality's unimodal response (its Shapley response logits, see
:func:`mmgrad.nn.shapley_logits`) the score ``s_m = mean_i -log softmax(o_m,i)[y_i]``; the ratio
``r_m = exp(M / (M - 1) * (mean_j s_j - s_m))`` (the original two-modality code's
``exp(s_other - s_m)``: above 1 for a modality that learns better than average); the target ratio
is the same expression of the running average of ``s_m`` over all steps so far; and the coefficient
``k_m = exp(alpha * min(target_m - r_m, 7))`` multiplies the modality's weight gradients (tensors
with more than one dimension). Optionally, when any gradient of the fusion parameters exceeds
``fusion_clip`` in magnitude, every gradient is clipped to total norm ``fusion_clip``.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional

import torch

from mmgrad import ops
from mmgrad.aggregators.base import check_option
from mmgrad.distributed import local_tensor
from mmgrad.methods.base import BalancingMethod, StepContext


class AGM(BalancingMethod):
    """Adaptive gradient modulation.

    Args:
        alpha: strength of the exponential coefficient (0.1).
        params: which tensors are scaled (``"weights"``: more than one dimension, the default).
        fusion: the fusion head's parameters, to enable the conditional clipping.
        fusion_clip: the threshold and clip norm of that rule (5.0).
        variant: ``"original"`` (default) as above; ``"balancemm"`` uses BalanceMM's written
            ``exp(M / (M - 1) * (s_m - mean s))`` with the same loss score, which damps the modality
            that lags more than it usually does (measured on mfeat: the weak view's coefficient
            averaged 0.79, the strong view's 1.01), so it is kept only for reproduction.

    ``opt.backward(loss, logits={m: shapley_response_logits_m}, targets=y)`` per micro-batch.
    """

    reports_finite = True

    def __init__(
        self,
        alpha: float = 0.1,
        params: str = "weights",
        fusion: Optional[Iterable[torch.Tensor]] = None,
        fusion_clip: float = 5.0,
        variant: str = "original",
    ):
        super().__init__()
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        check_option("alpha", alpha)
        if not fusion_clip > 0:  # inf: no clipping
            raise ValueError(f"fusion_clip must be > 0, got {fusion_clip}")
        if variant not in ("original", "balancemm"):
            raise ValueError(f"variant must be 'original' or 'balancemm', got {variant!r}")
        self.variant = variant
        self.alpha = float(alpha)
        self.params = params
        self.fusion = list(fusion) if fusion is not None else []
        self.fusion_clip = float(fusion_clip)
        self._score_sum: Optional[torch.Tensor] = None  # this step's summed per-sample CE
        self._count: Optional[torch.Tensor] = None
        self._running: Optional[torch.Tensor] = None  # running average of s_m over steps
        self._steps: Optional[torch.Tensor] = None

    def attach(self, layout) -> None:
        super().attach(layout)
        if len(layout.names) < 2:
            raise ValueError("AGM needs at least two modalities")
        self._table, self._table_modality, _ = layout.filtered(self.params)
        M, dev = len(layout.names), layout.device
        self._score_sum = torch.zeros(M, dtype=torch.float64, device=dev)
        self._count = torch.zeros((), dtype=torch.float64, device=dev)
        self._running = torch.zeros(M, dtype=torch.float64, device=dev)
        self._steps = torch.zeros((), dtype=torch.float64, device=dev)

    def backward(self, optimizer, loss, logits=None, targets=None, **_) -> None:
        if logits is None or targets is None:
            raise ValueError("AGM needs opt.backward(loss, logits={modality: response_logits}, targets=y)")
        for m, name in enumerate(self.layout.names):
            o = logits[name].detach()
            o = o.double() if o.dtype == torch.float64 else o.float()
            ce = torch.nn.functional.cross_entropy(o, targets, reduction="sum")
            self._score_sum[m] += ce.double()
        self._count += targets.numel()
        optimizer._buffer.bind(0)
        loss.backward()

    def batch_statistics(self) -> list:
        return [self._score_sum, self._count]

    def _ratio(self, s: torch.Tensor) -> torch.Tensor:
        M = s.numel()
        centred = s - s.mean() if self.variant == "balancemm" else s.mean() - s
        return torch.exp(M / (M - 1) * centred)

    def edit(self, context: StepContext) -> dict:
        layout = self.layout
        row = layout.buffer.row(0)
        seg = layout.segments
        moments = context.reduce_stats(ops.segment_moments(row, seg.offsets, seg.numels))
        finite = torch.isfinite(moments).all()
        s = self._score_sum / self._count.clamp_min(1)
        # Running average over steps, updated only on finite steps (a skipped step changes nothing).
        taken = context.all_finite(finite)
        steps = self._steps + taken.double()
        running = torch.where(taken, self._running + (s - self._running) / steps.clamp_min(1), self._running)
        ratio, target = self._ratio(s), self._ratio(running)
        coeff = torch.exp(self.alpha * torch.clamp(target - ratio, max=7.0))
        self._running.copy_(running)
        self._steps.copy_(steps)
        self._score_sum.zero_()
        self._count.zero_()
        ops.segment_scale_(row, self._table.offsets, self._table.numels, coeff[self._table_modality])
        if self.fusion:
            self._conditional_clip(context)
        return {"finite": finite, "scores": s, "ratio": ratio, "target_ratio": target, "coeff": coeff}

    def _conditional_clip(self, context: StepContext) -> None:
        # On local tensors (shards of DTensor gradients under FSDP): "some fusion entry exceeds the
        # threshold" as a count and the total squared norm, both sums, made global by reduce_stats.
        fusion_grads = [local_tensor(p.grad) for p in self.fusion if p.grad is not None]
        if not fusion_grads:
            return
        others = [local_tensor(p.grad) for g in context.param_groups for p in g["params"] if p.grad is not None]
        over = torch.stack([(g.abs() > self.fusion_clip).sum() for g in fusion_grads]).sum().double()
        sumsq = torch.stack([torch.linalg.vector_norm(g).double() ** 2 for g in others]).sum()
        over, sumsq = context.reduce_stats(over, sumsq)
        total = sumsq.sqrt()
        factor = torch.where(over > 0, torch.clamp(self.fusion_clip / (total + 1e-6), max=1.0), torch.ones_like(total))
        torch._foreach_mul_(others, factor.to(others[0].dtype))

    def state_dict(self) -> dict:
        return {"running": self._running.clone(), "steps": self._steps.clone()}

    def load_state_dict(self, state: Mapping) -> None:
        self._running.copy_(state["running"])
        self._steps.copy_(state["steps"])

    def reset(self) -> None:
        for t in (self._score_sum, self._count, self._running, self._steps):
            t.zero_()

    def __repr__(self) -> str:
        return f"AGM(alpha={self.alpha}, params={self.params!r}, variant={self.variant!r})"
