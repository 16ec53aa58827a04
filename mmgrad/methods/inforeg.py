"""InfoReg (CVPR 2025, "Adaptive unimodal regulation"), METHODS.md §9.

While the "prime learning window" is open, the dominant modality's encoder gets a proximal
gradient ``g <- g + beta * (theta - theta_bar)`` that pulls it towards its weights at the start of
the epoch, so the weaker modality can catch up. The window is read from the Fisher-information
trace of the monitored encoder (sum over its weight tensors of mean(grad^2), accumulated over the
epoch): with MA10 the moving average of the last ten epochs' traces (pre-filled with zeros),
``k = (MA10_t - MA10_{t-1}) / MA10_t`` and the window stays open while ``k > threshold``.
Dominance per step compares the confidence scores of OGM (``sum_i softmax(o_m)[y_i]``):
``beta = base_m * exp(tanh(s_dominant - s_other))`` with ``base = (0.95, 0.1)`` for (first,
second) modality as in the reference code (audio, visual).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from mmgrad import ops
from mmgrad.aggregators.base import check_option
from mmgrad.distributed import local_tensor
from mmgrad.methods.base import BalancingMethod, StepContext
from mmgrad.methods.ogm import confidence_scores


class InfoReg(BalancingMethod):
    """Proximal regulation of the dominant modality inside the prime learning window (two
    modalities).

    Args:
        base: per-modality base strength of the proximal term, in modality order.
        threshold: the window is open while the relative growth of the Fisher trace's 10-epoch
            moving average exceeds it (0.05).
        monitor: the modality whose Fisher trace opens the window (the first one by default).
        window: number of epochs in the moving average (10).

    ``opt.backward(loss, logits={m: unimodal_logits_m}, targets=y)``; call ``opt.set_epoch(e)`` at
    the start of every epoch (it snapshots the weights and updates the window).
    """

    reports_finite = True

    def __init__(self, base: Sequence[float] = (0.95, 0.1), threshold: float = 0.05, monitor: Optional[str] = None, window: int = 10):
        super().__init__()
        if len(base) != 2:
            raise ValueError("InfoReg is defined for two modalities: give base=(first, second)")
        self.base = [float(check_option("base", b, 0.0)) for b in base]
        self.threshold = float(check_option("threshold", threshold))
        self.monitor = monitor
        self.window = check_option("window", window, 1, integer=True)

    def attach(self, layout) -> None:
        super().attach(layout)
        if len(layout.names) != 2:
            raise ValueError(f"InfoReg is defined for two modalities, got {len(layout.names)}")
        monitor = self.monitor if self.monitor is not None else layout.names[0]
        if monitor not in layout.names:
            raise ValueError(f"monitor={monitor!r} is not one of the modalities {layout.names}")
        self._monitor_index = layout.names.index(monitor)
        table, mods, index = layout.filtered("weights")
        keep = (mods == self._monitor_index)
        self._fisher_index = index[keep]
        self._fisher_numel = layout.tensor_numels[index[keep]].double()
        dev = layout.device
        # Local tensors: the proximal term is elementwise, so sharded parameters need no communication.
        self._params = [list() for _ in layout.names]
        self._grads = [list() for _ in layout.names]
        for p, g, m in zip(layout.buffer.params, layout.buffer.views(0), layout.segment_modality_host):
            self._params[m].append(local_tensor(p))
            self._grads[m].append(local_tensor(g))
        self._snapshot = [[p.detach().clone() for p in ps] for ps in self._params]
        self._base = torch.tensor(self.base, dtype=torch.float64, device=dev)
        self._scores = torch.zeros(2, dtype=torch.float64, device=dev)
        self._fisher_epoch = torch.zeros((), dtype=torch.float64, device=dev)
        self._history = torch.zeros(self.window + 1, dtype=torch.float64, device=dev)  # last window+1 traces
        self._open = torch.ones((), dtype=torch.bool, device=dev)

    def on_epoch(self, epoch: int, optimizer) -> None:
        # Close the finished epoch: push its trace, update the window from the moving averages.
        if epoch > 0:
            h = torch.cat([self._history[1:], self._fisher_epoch.reshape(1)])
            ma_now, ma_prev = h[1:].mean(), h[:-1].mean()
            k = (ma_now - ma_prev) / torch.where(ma_now != 0, ma_now, torch.ones_like(ma_now))
            self._open.copy_(k > self.threshold)
            self._history.copy_(h)
            self._fisher_epoch.zero_()
        for snap, ps in zip(self._snapshot, self._params):
            torch._foreach_copy_(snap, [p.detach() for p in ps])

    def backward(self, optimizer, loss, logits=None, targets=None, **_) -> None:
        if logits is None or targets is None:
            raise ValueError("InfoReg needs opt.backward(loss, logits={modality: logits}, targets=y)")
        self._scores += confidence_scores(logits, targets, self.layout.names).to(self._scores.device)
        optimizer._buffer.bind(0)
        loss.backward()

    def batch_statistics(self) -> list:
        return [self._scores]

    def edit(self, context: StepContext) -> dict:
        layout = self.layout
        row = layout.buffer.row(0)
        seg = layout.segments
        moments = context.reduce_stats(ops.segment_moments(row, seg.offsets, seg.numels))
        finite = torch.isfinite(moments).all()
        fisher = (moments[self._fisher_index, 1].double() / self._fisher_numel).sum()
        self._fisher_epoch += torch.where(context.all_finite(finite), fisher, torch.zeros_like(fisher))
        s = self._scores.clone()
        gap = s - s.flip(0)  # s_m - s_other
        beta = torch.where((gap > 0) & self._open, self._base * torch.exp(torch.tanh(gap)), torch.zeros_like(gap))
        self._scores.zero_()
        for m, (ps, snap, grads) in enumerate(zip(self._params, self._snapshot, self._grads)):
            diffs = torch._foreach_sub([p.detach() for p in ps], snap)
            torch._foreach_mul_(diffs, beta[m].to(ps[0].dtype))
            torch._foreach_add_(grads, diffs)
        return {"finite": finite, "scores": s, "beta": beta, "window_open": self._open.clone(), "fisher": fisher}

    def state_dict(self) -> dict:
        return {
            "snapshot": [[t.clone() for t in snap] for snap in self._snapshot],
            "fisher_epoch": self._fisher_epoch.clone(),
            "history": self._history.clone(),
            "open": self._open.clone(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        for snap, saved in zip(self._snapshot, state["snapshot"]):
            torch._foreach_copy_(snap, list(saved))
        self._fisher_epoch.copy_(state["fisher_epoch"])
        self._history.copy_(state["history"])
        self._open.copy_(state["open"])

    def reset(self) -> None:
        for snap, ps in zip(self._snapshot, self._params):  # the re-initialised weights
            torch._foreach_copy_(snap, [p.detach() for p in ps])
        self._fisher_epoch.zero_()
        self._history.zero_()
        self._open.fill_(True)
        self._scores.zero_()

    def __repr__(self) -> str:
        return f"InfoReg(base={tuple(self.base)}, threshold={self.threshold})"
