"""Generic multi-objective mode: K losses, any aggregator, on the shared parameters.

``opt.backward([loss_1, ..., loss_K])`` (or a dict) runs one backward pass per loss into row k of
the flat buffer of the shared parameters; ``step()`` computes the K x K Gram matrix (one pass),
the aggregator's weights (on the device) and writes ``w @ J`` into row 0 (one pass). Parameters
outside the shared set receive the plain sum of the losses' gradients.
"""

from __future__ import annotations

from typing import Mapping

import torch

from mmgrad import ops
from mmgrad.methods.base import BalancingMethod, StepContext


class MultiObjective(BalancingMethod):
    """Aggregate the gradients of K objectives with ``aggregator`` (a name from
    ``mmgrad.aggregators.NAMES`` or an aggregator object, built with ``options``). K is taken from
    the first ``backward`` call (the buffer grows to K rows once) and must stay the same."""

    result_row = 0
    reports_finite = True

    def __init__(self, aggregator="upgrad", **options):
        super().__init__()
        from mmgrad import aggregators

        if isinstance(aggregator, type):
            raise TypeError(f"{aggregator.__name__} is a class: pass an object, e.g. method={aggregator.__name__}(...)")
        self.aggregator = aggregators.get(aggregator, **options) if isinstance(aggregator, str) else aggregator
        needs = "weights" if getattr(self.aggregator, "gramian_based", True) else "__call__"
        if not callable(getattr(self.aggregator, needs, None)):
            hint = (" (a forward-pass method such as OPM is a module of the model, not an optimizer method)"
                    if isinstance(aggregator, torch.nn.Module) else "")
            raise TypeError(f"method must be a balancing method (mmgrad.OGMGE(...), ...), an aggregator name or "
                            f"an aggregator object with .{needs}(); got {aggregator!r}{hint}")
        self.rows = 1
        self._objectives = None
        self._loaded_objectives = None  # K of a loaded checkpoint, checked at the first backward

    def attach(self, layout) -> None:
        super().attach(layout)
        self._whole = ops.table([layout.segments.total], layout.device)

    def backward(self, optimizer, loss, **_) -> None:
        losses = list(loss.values()) if isinstance(loss, Mapping) else list(loss) if not isinstance(loss, torch.Tensor) else [loss]
        buffer = optimizer._buffer
        if self._objectives is None:
            if not losses:
                raise ValueError("backward() needs at least one loss")
            if self._loaded_objectives not in (None, len(losses)):
                raise ValueError(f"got {len(losses)} losses; the loaded checkpoint aggregated "
                                 f"{self._loaded_objectives} objectives")
            self._objectives = self.rows = len(losses)
            buffer.resize_rows(self.rows)
        elif len(losses) != self._objectives:
            raise ValueError(f"got {len(losses)} losses; this optimizer aggregates {self._objectives} objectives")
        for k, l in enumerate(losses):
            buffer.bind(k)
            l.backward(retain_graph=k + 1 < len(losses))

    def edit(self, context: StepContext) -> dict:
        buffer = self.layout.buffer
        J = buffer.data
        # Rows other than the last bound one may still carry a GradScaler's scale.
        rows = torch.arange(self.rows, device=J.device)
        scale = torch.where(rows == buffer.active_row, torch.ones_like(context.row_scale), context.row_scale)
        # G = sum over shards of J_s J_s^T: with sharded parameters only these K x K numbers cross ranks.
        G = context.reduce_stats(ops.gram(J)) * scale[:, None] * scale[None, :]
        finite = torch.isfinite(G).all()
        if hasattr(self.aggregator, "settle_stream"):
            self.aggregator.settle_stream(J.device)
        before = _tensors_cloned(self.state_dict())
        if getattr(self.aggregator, "gramian_based", True):
            w = self.aggregator.weights(G).to(G.dtype) * scale
            # w @ J straight into row 0 (every element reads its column before it is written).
            ops.segment_combine_(buffer.row(0), J, self._whole[0], self._whole[1], w[None, :])
        else:  # GradDrop: elementwise, needs the unscaled rows themselves
            J.mul_(scale[:, None].to(J.dtype))
            if buffer.sharded:  # random draws keyed by each element's index in the unsharded buffer
                buffer.row(0).copy_(self.aggregator(J, columns=self._columns(), total=sum(buffer.global_numels)))
            else:
                buffer.row(0).copy_(self.aggregator(J))
            w = None
        # A skipped step leaves the aggregator's state (EMA targets, warm start, random stream) as
        # it was: its tensors are chosen on the device, no host sync.
        self.load_state_dict(_where(context.all_finite(finite), self.state_dict(), before))
        diagnostics = {"finite": finite, "gram": G}
        if w is not None:
            diagnostics["weights"] = w
        return diagnostics

    def _columns(self) -> torch.Tensor:
        """Index of every local element of a sharded buffer in the unsharded one."""
        from mmgrad.distributed import global_element_index

        layout = self.layout
        return torch.cat([global_element_index(p) + base for p, base in zip(layout.buffer.params, layout.tensor_offsets_host)])

    def broadcast_state(self, broadcast) -> None:
        seed = getattr(self.aggregator, "seed", None)  # the seeded aggregators' random stream
        if isinstance(seed, int):
            t = torch.tensor([seed], dtype=torch.int64, device=self.layout.device)
            broadcast([t])
            self.aggregator.seed = int(t.item())  # once, at construction

    def state_dict(self) -> dict:
        sd = getattr(self.aggregator, "state_dict", None)
        return {"aggregator": sd() if sd else {}, "objectives": self._objectives}

    def load_state_dict(self, state: Mapping) -> None:
        K = state.get("objectives")  # absent from older checkpoints
        if K is not None and self._objectives not in (None, K):
            raise ValueError(f"the checkpoint aggregated {K} objectives; this optimizer aggregates "
                             f"{self._objectives}")
        if hasattr(self.aggregator, "load_state_dict"):
            self.aggregator.load_state_dict(state["aggregator"])
        self._loaded_objectives = K

    def reset(self) -> None:
        if hasattr(self.aggregator, "reset"):
            self.aggregator.reset()

    def __repr__(self) -> str:
        return f"MultiObjective({self.aggregator!r}, num_objectives={self.rows})"


def _tensors_cloned(tree):
    """``tree`` (nested dicts) with every tensor cloned."""
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, Mapping):
        return {k: _tensors_cloned(v) for k, v in tree.items()}
    return tree


def _where(cond, new, old):
    """``new`` with each tensor that ``old`` holds too (same shape) replaced by
    ``torch.where(cond, new, old)``; host values and tensors ``old`` lacks stay as in ``new``."""
    if isinstance(new, torch.Tensor):
        if isinstance(old, torch.Tensor) and old.shape == new.shape:
            return torch.where(cond.to(new.device), new, old.to(new.dtype))
        return new
    if isinstance(new, Mapping):
        old = old if isinstance(old, Mapping) else {}
        return {k: _where(cond, v, old.get(k)) for k, v in new.items()}
    return new

