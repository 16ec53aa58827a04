"""What a balancing method sees and implements.

A :class:`~mmgrad.BalancedOptimizer` lays the modality parameters out in one flat gradient buffer,
modality after modality, and describes it with a :class:`ModalityLayout`. A method decides how many
buffer rows it needs (one per objective it keeps apart), runs the backward pass(es) of a
micro-batch into those rows (:meth:`BalancingMethod.backward`), and at ``step()`` rewrites the
gradient row the parameters' ``.grad`` point at (:meth:`BalancingMethod.edit`) with the fused ops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch

from mmgrad.buffers import FlatGradBuffer, SegmentTable


@dataclass
class ModalityLayout:
    """The flat buffer of the modality parameters and how it splits by modality and by tensor.

    ``buffer.data`` is (rows, P); modality ``m`` owns columns ``spans[m] = (start, end)``; segment
    ``s`` (one per parameter tensor, in buffer order) belongs to modality ``segment_modality[s]``.
    """

    names: list[str]
    buffer: FlatGradBuffer
    spans: list[tuple[int, int]]
    segment_modality: torch.Tensor  # (S,) int64 on the buffer's device
    segment_modality_host: list[int]
    param_names: list[str] = field(default_factory=list)

    @property
    def segments(self) -> SegmentTable:
        return self.buffer.segments

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    def __post_init__(self) -> None:
        # Plain attributes, not cached properties: torch.compile traces an edit that reads them
        # (functools.cached_property takes a lock, which graph-breaks dynamo on Python < 3.12).
        #: (S,) int64 on the device: the numel of each whole parameter tensor (the segment sizes,
        #: unless the parameters are sharded: then segments hold this rank's shard).
        self.tensor_numels = torch.tensor(self.buffer.global_numels, dtype=torch.int64, device=self.device)
        #: Each tensor's offset in the unsharded buffer (host ints): the Philox counter base of its
        #: noise, so that sharded and unsharded runs draw the same numbers.
        self.tensor_offsets_host: list[int] = []
        total = 0
        for n in self.buffer.global_numels:
            self.tensor_offsets_host.append(total)
            total += n

    def select(self, keep: Sequence[bool]) -> tuple[SegmentTable, torch.Tensor]:
        """The segments flagged in ``keep`` and their modality indices (device tensor)."""
        idx = [i for i, k in enumerate(keep) if k]
        mods = torch.tensor([self.segment_modality_host[i] for i in idx], dtype=torch.int64, device=self.device)
        return self.segments.select(idx), mods

    def filtered(self, which: str) -> tuple[SegmentTable, torch.Tensor, torch.Tensor]:
        """The parameter tensors a method edits: ``"conv"`` (4-D, the OGM paper's code),
        ``"weights"`` (more than one dimension: conv and linear weights, no biases or norms) or
        ``"all"``. Every modality must have one (else that modality would silently never be edited).
        Returns their segment table, modality indices and positions among all segments (device
        tensors)."""
        shapes = [p.shape for p in self.buffer.params]
        if which == "conv":
            keep = [len(s) == 4 for s in shapes]
        elif which == "weights":
            keep = [len(s) > 1 for s in shapes]
        elif which == "all":
            keep = [True] * len(shapes)
        else:
            raise ValueError(f"unknown tensor filter {which!r}; choose 'conv', 'weights' or 'all'")
        kept = {m for k, m in zip(keep, self.segment_modality_host) if k}
        missing = [n for m, n in enumerate(self.names) if m not in kept]
        if missing:  # that modality would never be edited, silently
            raise ValueError(f"no parameter tensor of modalit{'y' if len(missing) == 1 else 'ies'} "
                             f"{missing} matches params={which!r}"
                             + (" (4-D conv kernels)" if which == "conv" else "")
                             + "; use params='weights' or 'all'")
        table, mods = self.select(keep)
        index = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.int64, device=self.device)
        return table, mods, index

    def per_modality_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum per-segment values (S, ...) into per-modality values (M, ...), on the device."""
        out = values.new_zeros((len(self.names),) + tuple(values.shape[1:]))
        return out.index_add_(0, self.segment_modality, values)


class BalancingMethod:
    """Base class of the gradient-editing methods.

    Subclasses set :attr:`rows` and override :meth:`backward` and :meth:`edit`. Methods keep every
    per-step quantity on the device (no ``.item()``); what they want to report goes into the dict
    :meth:`edit` returns (the optimizer's ``diagnostics``).
    """

    #: Buffer rows the method needs (objectives it keeps apart).
    rows: int = 1
    #: Row the parameters' ``.grad`` point at when ``edit`` returns.
    result_row: int = 0
    #: True when ``edit`` returns ``diagnostics["finite"]``: a device bool, every entry of the rows
    #: was finite, read off statistics the method computes anyway (norms, Gram diagonals). Such a
    #: method must leave its own state unchanged when that flag or :meth:`StepContext.all_finite`
    #: is false (the step is skipped). Otherwise the optimizer checks the rows with a pass of its
    #: own before ``edit``.
    reports_finite: bool = False

    def __init__(self) -> None:
        self.layout: Optional[ModalityLayout] = None

    # --- set-up ---------------------------------------------------------------------------------

    def attach(self, layout: ModalityLayout) -> None:
        """Called once by the optimizer when the buffer exists; precompute device tables here. A
        method object serves the optimizer it was attached to last (an earlier one that still uses
        it gets an error from :meth:`mmgrad.BalancedOptimizer.backward` and ``step``)."""
        self.layout = layout

    def on_zero_grad(self) -> None:
        """A new step begins (``opt.zero_grad()``, or every gradient set to ``None`` from outside):
        drop the per-step statistics that ``backward`` accumulated (:meth:`batch_statistics`), also
        those of a batch whose step was skipped (a GradScaler's inf check, say)."""
        for t in self.batch_statistics():
            t.zero_()

    def on_epoch(self, epoch: int, optimizer) -> None:
        """Called by ``optimizer.set_epoch(epoch)`` when a new epoch starts."""

    # --- distributed training (mmgrad.distributed) ------------------------------------------------

    def batch_statistics(self) -> list[torch.Tensor]:
        """The per-step statistics ``backward`` accumulated that are *sums over samples* (scores,
        counts). Under data parallelism the optimizer sums them over ranks, in place, before
        ``edit``, so the step sees the statistics of the concatenated batch."""
        return []

    def broadcast_state(self, broadcast: Callable[[Sequence[torch.Tensor]], None]) -> None:
        """Called once at construction under data parallelism: pass ``broadcast`` the state tensors
        that must be equal on every rank (random seeds); they get the first rank's values."""

    # --- per micro-batch --------------------------------------------------------------------------

    def backward(self, optimizer, loss, **batch) -> None:
        """Run the backward pass(es) of one micro-batch into the buffer rows; the default sums the
        losses (a tensor, a list or a dict) and back-propagates them into row 0."""
        total = _sum_losses(loss)
        optimizer._buffer.bind(0)
        total.backward()

    # --- per step ---------------------------------------------------------------------------------

    def edit(self, context: "StepContext") -> dict[str, torch.Tensor]:
        """Rewrite the gradient rows in place; return diagnostics (device tensors). A method that
        scales parameter updates rather than gradients returns ``diagnostics["update_scale"] =
        (buffer parameter indices, per-tensor factors)``; the optimizer applies it around the
        wrapped optimizer's step."""
        raise NotImplementedError


    # --- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        pass

    def reset(self) -> None:
        """Forget every running statistic (between runs, or after re-initialising the model)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@dataclass
class StepContext:
    """What :meth:`BalancingMethod.edit` gets at ``step()``."""

    layout: ModalityLayout
    epoch: int
    step: int
    # Multiplies rows that are still loss-scaled (GradScaler) to unscale them; 1 otherwise.
    row_scale: torch.Tensor
    # The optimizer's param_groups (for methods that touch gradients outside the modalities).
    param_groups: list = field(default_factory=list)
    #: ``reduce_stats(*tensors)``: make statistics computed from this rank's part of the rows
    #: (Gram entries, per-tensor moments, counts: sums over gradient elements) global, in place,
    #: in one all-reduce; returns them. Identity in a single process. Call it before using them.
    reduce_stats: Callable = field(default=lambda *t: t[0] if len(t) == 1 else t)
    #: Device bool: what the optimizer found finite before the edit (the gradients outside the
    #: rows; the rows too for methods that do not report). None: nothing checked.
    finite: Optional[torch.Tensor] = None

    def all_finite(self, own: torch.Tensor) -> torch.Tensor:
        """``own`` (the method's finite flag of its rows) and :attr:`finite`: whether this step is
        taken. State a method carries to the next step changes only where this is true."""
        return own if self.finite is None else own & self.finite


def params_of(source) -> list[torch.Tensor]:
    """The parameters a modality declares: a module's that require grad, a single tensor, or the
    tensors of an iterable (what :class:`~mmgrad.BalancedOptimizer` takes per modality)."""
    if isinstance(source, torch.nn.Module):
        return [p for p in source.parameters() if p.requires_grad]
    if isinstance(source, torch.Tensor):
        return [source]
    return list(source)


def modality_names(modalities, at_least: int = 1, method: str = "this method") -> list[str]:
    """The modality names of a declaration: a :class:`~mmgrad.BalancedOptimizer` (its
    :attr:`~mmgrad.BalancedOptimizer.modalities`), a mapping ``{name: module or parameters}`` or a
    sequence of names; in order, distinct strings, at least ``at_least`` of them."""
    if isinstance(getattr(modalities, "modalities", None), Mapping):  # a BalancedOptimizer
        modalities = modalities.modalities
    if isinstance(modalities, Mapping):
        names = list(modalities.keys())
    elif isinstance(modalities, (str, bytes)) or not isinstance(modalities, Sequence):
        raise TypeError(
            "modalities must be a sequence of modality names, a {name: params} mapping or a "
            f"BalancedOptimizer, got {type(modalities).__name__}"
        )
    else:
        names = list(modalities)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"modality names must be strings, got {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"modality names must be distinct (one repeats), got {names}")
    if len(names) < at_least:
        raise ValueError(f"{method} needs at least {at_least} modalit{'y' if at_least == 1 else 'ies'}, "
                         f"got {names}")
    return names


def _sum_losses(loss) -> torch.Tensor:
    if isinstance(loss, torch.Tensor):
        return loss
    values = list(loss.values()) if isinstance(loss, Mapping) else list(loss)
    if not values:
        raise ValueError("no loss to back-propagate")
    total = values[0]
    for v in values[1:]:
        total = total + v
    return total
