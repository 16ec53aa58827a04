"""Flat gradient buffers and their segment tables.

A :class:`FlatGradBuffer` owns one contiguous ``(rows, P)`` storage for a set of parameters of one
dtype and device, and makes each parameter's ``.grad`` a view into one row. ``backward()`` then
accumulates straight into the flat buffer (autograd adds in place into an existing ``.grad``), so
the fused ops read every objective's gradient with no ``torch.cat`` and no per-parameter copy.
Binding row k before a backward pass gathers that pass's gradient into row k.

Sharded parameters (``DTensor``, e.g. FSDP2's ``fully_shard``) work the same way on their local
shards: the buffer holds this rank's shard of every row, and ``.grad`` is a ``DTensor`` whose local
tensor is a view of the row (FSDP2 accumulates its reduce-scattered gradient into it in place).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Optional, Sequence

import torch

from mmgrad.distributed import is_sharded, local_tensor, wrap_grad

__all__ = ["SegmentTable", "FlatGradBuffer", "flat_grad_buffers"]


class SegmentTable:
    """Non-overlapping segments ``(offset, numel)`` of a flat buffer of ``total`` elements.

    Keeps a host copy (for validation and layout decisions, never read on the hot path) and int64
    device tensors ``offsets`` / ``numels`` that the segment ops take.
    """

    def __init__(
        self,
        offsets: Sequence[int],
        numels: Sequence[int],
        total: int,
        device: torch.device | str = "cpu",
        names: Optional[Sequence[str]] = None,
    ):
        self.host_offsets = [int(o) for o in offsets]
        self.host_numels = [int(n) for n in numels]
        if len(self.host_offsets) != len(self.host_numels):
            raise ValueError("offsets and numels must have the same length")
        self.total = int(total)
        self.names = list(names) if names is not None else None
        if self.names is not None and len(self.names) != len(self.host_offsets):
            raise ValueError("names must have one entry per segment")
        end = 0
        for start, n in sorted(zip(self.host_offsets, self.host_numels)):
            if start < 0 or n < 0 or start + n > self.total:
                raise ValueError(f"segment ({start}, {n}) lies outside the buffer of {self.total} elements")
            if n and start < end:
                raise ValueError(f"segment ({start}, {n}) overlaps the previous one (ends at {end})")
            end = max(end, start + n)
        self.device = torch.device(device)
        self.offsets = torch.tensor(self.host_offsets, dtype=torch.int64, device=self.device)
        self.numels = torch.tensor(self.host_numels, dtype=torch.int64, device=self.device)

    def __len__(self) -> int:
        return len(self.host_offsets)

    def __repr__(self) -> str:
        return f"SegmentTable({len(self)} segments over {self.total} elements on {self.device})"

    def select(self, indices: Iterable[int]) -> "SegmentTable":
        """The table of the segments at ``indices`` (same buffer)."""
        idx = list(indices)
        names = [self.names[i] for i in idx] if self.names is not None else None
        return SegmentTable(
            [self.host_offsets[i] for i in idx], [self.host_numels[i] for i in idx], self.total, self.device, names
        )

    def tile_rows(self, rows: int, row_stride: int) -> "SegmentTable":
        """The same segments repeated for each of ``rows`` rows of a ``(rows, row_stride)`` buffer
        viewed as 1-D: segment ``s`` of row ``k`` becomes segment ``k * len(self) + s``."""
        offsets = [k * row_stride + o for k in range(rows) for o in self.host_offsets]
        numels = self.host_numels * rows
        return SegmentTable(offsets, numels, rows * row_stride, self.device)


class FlatGradBuffer:
    """One contiguous ``(rows, P)`` gradient storage for ``params`` (one dtype, one device).

    Each parameter occupies ``[offset, offset + numel)`` of every row; ``bind(k)`` makes every
    parameter's ``.grad`` a view of row k. For a sharded parameter (``DTensor``) ``numel`` is that
    of the local shard and ``.grad`` a ``DTensor`` over the view; :attr:`global_numels` holds the
    full tensors' sizes. Parameters that received no gradient since the last
    :meth:`zero_` are reported by :meth:`params_without_grad` (autograd's post-accumulate hooks mark
    the others), because their ``.grad`` is a zero view rather than ``None``.

    ``zero_(lazy=True)`` (what :meth:`mmgrad.BalancedOptimizer.zero_grad` does) writes nothing: it
    marks the rows' segments *stale* and sets ``.grad`` to ``None``, so that autograd hands each
    parameter a fresh gradient, which a post-accumulate hook copies into the row (one read and
    one write, instead of zeroing the row and accumulating into it: a write, two reads and a
    write). :meth:`materialize` zeroes what no backward reached before the rows are read.

    On CPU the copied-from gradients are kept until :meth:`release_retired` (the optimizer calls
    it after its step): freed one by one during the backward, glibc hands their memory back to the
    system and the next backward page-faults it in again (27K faults, ~20 ms per step for two
    ResNet-18 encoders), whereas plain training keeps its gradients alive until ``zero_grad``.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], rows: int = 1, names: Optional[Sequence[str]] = None):
        self.params = list(params)
        if not self.params:
            raise ValueError("FlatGradBuffer needs at least one parameter")
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        first = self.params[0]
        self.dtype, self.device = first.dtype, first.device
        seen = set()
        for p in self.params:
            if not p.requires_grad:
                raise ValueError("FlatGradBuffer got a parameter that does not require grad (frozen)")
            if p.dtype != self.dtype or p.device != self.device:
                raise ValueError(
                    f"all parameters of one buffer must share dtype and device ({self.dtype}, {self.device}); "
                    f"got ({p.dtype}, {p.device}); use flat_grad_buffers() to group them"
                )
            if p.is_sparse or p.layout != torch.strided:
                raise ValueError("FlatGradBuffer supports dense (strided) parameters only")
            if id(p) in seen:
                raise ValueError("the same parameter appears twice")
            seen.add(id(p))
        self.sharded = any(is_sharded(p) for p in self.params)
        numels = [local_tensor(p).numel() for p in self.params]
        #: numel of each whole parameter (equal to the segment sizes unless sharded).
        self.global_numels = [p.numel() for p in self.params]
        offsets, total = [], 0
        for n in numels:
            offsets.append(total)
            total += n
        self.numel = total
        self.rows = rows
        self.data = torch.zeros(rows, total, dtype=self.dtype, device=self.device)
        self.segments = SegmentTable(offsets, numels, total, self.device, names)
        self.active_row = 0
        self._views = [self._make_views(r) for r in range(rows)]
        self._received: set[int] = set()
        # Per row, the parameters whose segment holds leftovers of an earlier step (lazy zeroing).
        self._stale: list[set[int]] = [set() for _ in range(rows)]
        # CPU: gradients copied into the rows this step, freed together by release_retired().
        self._retire = self.device.type == "cpu"
        self._retired: list[torch.Tensor] = []
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._on_accumulated(i)) for i, p in enumerate(self.params)
        ]
        self.bind(0)

    def resize_rows(self, rows: int) -> None:
        """Change the number of rows, keeping the rows that remain (new rows are zero). Existing
        views of removed rows become stale; the active row is rebound (row 0 if it was removed)."""
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        if rows == self.rows:
            return
        data = torch.zeros(rows, self.numel, dtype=self.dtype, device=self.device)
        keep = min(rows, self.rows)
        data[:keep].copy_(self.data[:keep])
        bound = [p.grad is not None and self._owns(p.grad) for p in self.params]
        self.data, self.rows = data, rows
        self._views = [self._make_views(r) for r in range(rows)]
        self._stale = self._stale[:keep] + [set() for _ in range(rows - keep)]
        active = self.active_row if self.active_row < rows else 0
        stale = self._stale[active]
        for i, p in enumerate(self.params):  # the old views move to the new rows (not folded in)
            if bound[i]:
                p.grad = None if i in stale else self._views[active][i]
        self.bind(active)

    def _on_accumulated(self, index: int):
        def hook(param):
            self._received.add(index)
            stale = self._stale[self.active_row]
            if index in stale:  # the first gradient since a lazy zero_: move it into the row
                view = self._views[self.active_row][index]
                g = param.grad
                if g is not None and g is not view:
                    if g.is_sparse:  # e.g. nn.Embedding(sparse=True) given as a parameter list
                        raise ValueError(f"parameter {index} of the modalities got a sparse gradient; mmgrad's "
                                         "flat buffers need dense ones (build the embedding with sparse=False)")
                    local_tensor(view).copy_(local_tensor(g))
                    if self._retire:
                        self._retired.append(g)
                    param.grad = view
                    stale.discard(index)

        return hook

    def views(self, row: int) -> list[torch.Tensor]:
        """Each parameter's slice of ``row``, shaped like the parameter (cached views)."""
        return self._views[row]

    def _make_views(self, row: int) -> list[torch.Tensor]:
        flat = self.data[row]
        return [
            wrap_grad(_grad_view(flat, o, local_tensor(p)), p)
            for p, o in zip(self.params, self.segments.host_offsets)
        ]

    def row(self, row: int) -> torch.Tensor:
        """Row ``row`` as a 1-D view of P elements."""
        return self.data[row]

    def bind(self, row: int = 0) -> None:
        """Point every parameter's ``.grad`` at its slice of ``row``; the next backward
        accumulates there. Gradients already in ``.grad`` that live elsewhere are added into the row
        first, so nothing computed is lost. A parameter whose segment of ``row`` is stale (lazily
        zeroed) keeps ``.grad = None`` until its first gradient arrives.

        A bound parameter whose ``.grad`` is ``None`` was zeroed behind the buffer's back
        (``model.zero_grad()``, the wrapped optimizer's ``zero_grad()``): its segments of every row
        become stale, as a lazy :meth:`zero_` of that parameter would make them."""
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} out of range for a buffer of {self.rows} rows")
        active_stale = self._stale[self.active_row]
        for i, p in enumerate(self.params):
            if p.grad is None and i not in active_stale:
                for stale in self._stale:
                    stale.add(i)
                self._received.discard(i)
        stale = self._stale[row]
        for i, (p, view) in enumerate(zip(self.params, self.views(row))):
            g = p.grad
            if g is not None and not self._owns(g):
                if g.is_sparse:
                    raise ValueError("sparse gradients are not supported by mmgrad's flat buffers")
                if i in stale:
                    local_tensor(view).copy_(local_tensor(g))
                    stale.discard(i)
                else:
                    local_tensor(view).add_(local_tensor(g))
                self._received.add(i)  # also a .grad assigned by hand (no accumulate hook ran)
            p.grad = None if i in stale else view
        self.active_row = row

    def zeroed_from_outside(self) -> bool:
        """Whether every ``.grad`` is ``None`` while some segment of the active row holds a
        gradient: a ``model.zero_grad()`` (or the wrapped optimizer's) since the last backward."""
        stale = self._stale[self.active_row]
        return len(stale) < len(self.params) and all(p.grad is None for p in self.params)

    def materialize(self) -> None:
        """Make every row hold exactly the gradients computed since the last :meth:`zero_`: fold in
        gradients left outside the buffer, zero the segments no backward reached, and bind the
        active row. Call it before reading the rows (the optimizer does, at ``step()``)."""
        self.bind(self.active_row)
        unbound = list(self._stale[self.active_row])  # .grad still None: no gradient reached them
        for r, stale in enumerate(self._stale):
            if stale:
                row = self.data[r]
                for i in stale:
                    start = self.segments.host_offsets[i]
                    row[start : start + self.segments.host_numels[i]].zero_()
                stale.clear()
        views = self.views(self.active_row)
        for i in unbound:
            self.params[i].grad = views[i]

    def _owns(self, t: torch.Tensor) -> bool:
        return local_tensor(t).untyped_storage().data_ptr() == self.data.untyped_storage().data_ptr()

    def is_bound(self) -> bool:
        """True when every parameter's ``.grad`` is still the view of the active row, or ``None``
        awaiting its first gradient after a lazy :meth:`zero_` (a ``zero_grad(set_to_none=True)``
        or a hand-assigned ``.grad`` breaks the binding)."""
        stale = self._stale[self.active_row]
        return all(
            (p.grad is None and i in stale) or (p.grad is not None and _same_view(p.grad, v))
            for i, (p, v) in enumerate(zip(self.params, self.views(self.active_row)))
        )

    def zero_(self, rows: Optional[Iterable[int]] = None, *, lazy: bool = False) -> None:
        """Zero the given rows (all by default), rebind the active row and forget which parameters
        received gradients. ``lazy=True`` writes nothing now: the rows' segments are overwritten
        by the first gradient they receive, and :meth:`materialize` zeroes the others."""
        rows = range(self.rows) if rows is None else list(rows)
        for r in rows:
            if lazy:
                self._stale[r] = set(range(len(self.params)))
            else:
                self.data[r].zero_()
                self._stale[r] = set()
        if lazy and self.active_row in rows:
            for p in self.params:  # bind() must not fold the old views back in
                if p.grad is not None and self._owns(p.grad):
                    p.grad = None
        self._received.clear()
        self._retired.clear()
        self.bind(self.active_row)

    def release_retired(self) -> None:
        """Free the gradients the hooks copied into the rows since the last call (CPU only keeps
        them; see the class docstring)."""
        self._retired.clear()

    def params_without_grad(self) -> list[int]:
        """Indices of the parameters no backward pass reached since the last :meth:`zero_`."""
        return [i for i in range(len(self.params)) if i not in self._received]

    def set_received(self, indices: Iterable[int]) -> None:
        """Replace the set of parameters reported as having received a gradient (data-parallel
        training makes it the union over ranks)."""
        self._received = set(int(i) for i in indices)

    def close(self) -> None:
        """Remove the hooks and detach the ``.grad`` views from the buffer."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._retired.clear()
        for p in self.params:
            if p.grad is not None:
                p.grad = p.grad.clone()


def _grad_view(flat: torch.Tensor, offset: int, p: torch.Tensor) -> torch.Tensor:
    """The slice of ``flat`` that serves as ``p.grad``, with ``p``'s strides when ``p`` is a dense
    permutation of a contiguous tensor (a transposed or channels-last weight), so autograd's
    gradient-layout contract holds and accumulation stays in place without a layout warning."""
    if p.is_contiguous() or not _is_dense_permutation(p):
        return flat[offset : offset + p.numel()].view(p.shape)
    return flat.as_strided(p.shape, p.stride(), flat.storage_offset() + offset)


def _is_dense_permutation(p: torch.Tensor) -> bool:
    expected = 1
    for size, stride in sorted(zip(p.shape, p.stride()), key=lambda d: d[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = local_tensor(a), local_tensor(b)
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def flat_grad_buffers(
    params: Iterable[torch.nn.Parameter], rows: int = 1
) -> "OrderedDict[tuple[torch.device, torch.dtype], FlatGradBuffer]":
    """Group the trainable parameters by (device, dtype) and give each group its own buffer.
    Frozen parameters (``requires_grad=False``) are skipped."""
    groups: "OrderedDict[tuple[torch.device, torch.dtype], list]" = OrderedDict()
    for p in params:
        if p.requires_grad:
            groups.setdefault((p.device, p.dtype), []).append(p)
    return OrderedDict((key, FlatGradBuffer(ps, rows)) for key, ps in groups.items())
