"""Data-parallel (DDP) and sharded (FSDP2 / DTensor) training with :class:`~mmgrad.BalancedOptimizer`.

Every method is "statistics of the gradient rows, a small solve, an edit of the rows". Across ranks
that splits cleanly (METHODS.md 6.2):

* **Data parallelism** (``DistributedDataParallel`` or plain replicated parameters): each rank's rows
  hold the gradients of its own micro-batches. mmgrad switches DDP's reducer off (its bucket state
  machine allows one backward pass per forward, and the multi-row methods run K of them, some of which
  reach only part of the model) and, once per ``step()``, averages the whole ``(K, P)`` row buffer in
  one all-reduce, the other parameters' gradients in another, and the methods' per-batch statistics
  (OGM / InfoReg confidence scores, AGM's cross-entropy sums and counts) plus the "which parameters
  got a gradient" flags in one small float64 all-reduce. After that every rank holds the same rows
  and the same statistics, so the Gram matrix, the weights and the edit are computed redundantly and
  agree bitwise: the result equals one process on the concatenated batch. Gradient accumulation
  (several ``opt.backward`` per step) reduces once, at the step.
* **Sharded parameters** (``fully_shard`` / FSDP2, or any ``DTensor`` with a ``Shard`` placement):
  each backward pass is reduce-scattered by FSDP itself into the rank's shard of row k (the
  reduction data parallelism needs anyway). The surgery then uses the identity
  ``G = sum_s J_s J_s^T``: each rank computes the partial Gram (or per-tensor moments / per-tensor
  Grams) of its shard in the usual fused pass, :meth:`GradientSync.reduce_stats` sums those few
  numbers over the shard group in one all-reduce, every rank solves the same small problem, and each
  combines its own shard. No gradient is gathered. Gaussian noise (OGM-GE) is keyed by each
  element's index in the *unsharded* buffer, so sharded and unsharded runs draw the same noise.

Cheaper modes (``BalancedOptimizer(..., distributed=...)``, data parallelism only):

* ``"exact"`` (default): as above. Traffic per step: K gradient all-reduces + the other
  parameters' gradients + a few floats.
* ``"local_gram"``: each rank computes its statistics (Gram, moments) from its *local* rows, they are
  averaged (K x K floats), every rank solves the same problem and edits its local rows, and only the
  edited gradient is all-reduced: 1 gradient all-reduce, like plain DDP. The combination is linear,
  so the only difference is the statistics: the average of the local Grams is the Gram of the
  averaged gradients plus the between-rank gradient variance (norms come out larger and conflicts
  look stronger, more so for small per-rank batches). For a one-row method (OGM, AGM, InfoReg) it
  saves nothing; for MMPareto it halves the traffic, for K objectives it divides it by K.
* ``"local"``: as ``"local_gram"`` but the statistics are not reduced at all: each rank solves its
  own problem (cheapest; gives up the guarantee that the aggregated direction does not conflict
  with any *global* objective gradient). Parameters still stay identical on every rank (the edited
  gradients are averaged and the step/skip decision is agreed), but diagnostics and method state
  built from gradient statistics (InfoReg's window, aggregator state) are per rank.
* ``"off"``: no communication at all (independent processes).

Per-batch statistics of the methods (confidence scores, counts) are summed over ranks in every mode
but ``"off"``: they are a few floats.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from mmgrad import ops, reference

__all__ = [
    "MODES",
    "GradientSync",
    "is_dtensor",
    "is_sharded",
    "local_tensor",
    "wrap_grad",
    "global_element_index",
    "scale_segments_",
]

MODES = ("exact", "local_gram", "local", "off")


# --- DTensor helpers (importable without torch.distributed support) ----------------------------


@functools.cache  # called per parameter several times a step: the import machinery costs ~1.5 us
def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover - builds without distributed support
        return None
    return DTensor


def is_dtensor(t) -> bool:
    """True for a ``DTensor`` (or a parameter wrapping one)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def is_sharded(t) -> bool:
    """True for a ``DTensor`` with at least one ``Shard`` placement (FSDP2 parameters)."""
    return is_dtensor(t) and any(p.is_shard() for p in t.placements)


def fsdp_gradient_sync_off(modules) -> bool:
    """Whether FSDP2's gradient reduction is switched off (``set_requires_gradient_sync(False)``)
    in any FSDP module inside ``modules``. Reads FSDP's per-group flag (private; False when absent)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except Exception:  # pragma: no cover - builds without distributed support
        return False
    for module in modules:
        for m in module.modules():
            if isinstance(m, FSDPModule):
                groups = getattr(m._get_fsdp_state(), "_fsdp_param_groups", [])
                if any(getattr(g, "reduce_grads", True) is False for g in groups):
                    return True
    return False


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: the local shard of a ``DTensor`` (sharing its storage), else ``t``."""
    return t._local_tensor if is_dtensor(t) else t


def wrap_grad(view: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """What to assign to ``param.grad`` for the local gradient ``view``: ``view`` itself, or for a
    ``DTensor`` parameter a ``DTensor`` with the parameter's mesh and placements whose local tensor is
    ``view`` (so FSDP2's in-place accumulation writes into the flat buffer)."""
    if not is_dtensor(param):
        return view
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        view, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


def global_element_index(param: torch.Tensor) -> torch.Tensor:
    """Row-major index in the whole tensor of every element of this rank's shard of ``param``,
    shape ``(local numel,)`` int64, in the local shard's row-major order. For a plain tensor, the
    ``arange`` of its numel."""
    device = local_tensor(param).device
    if not is_dtensor(param):
        return torch.arange(param.numel(), dtype=torch.int64, device=device)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape = tuple(param.shape)
    local_shape, offset = compute_local_shape_and_global_offset(shape, param.device_mesh, param.placements)
    index = torch.zeros(local_shape, dtype=torch.int64, device=device)
    stride = 1
    for d in reversed(range(len(shape))):  # row-major strides of the whole tensor
        view = [1] * len(shape)
        view[d] = local_shape[d]
        index += ((torch.arange(local_shape[d], dtype=torch.int64, device=device) + offset[d]) * stride).view(view)
        stride *= shape[d]
    return index.reshape(-1)


def scale_segments_(layout, row: torch.Tensor, table, indices: Sequence[int], scale, noise_std=None, seed=None):
    """``ops.segment_scale_`` on the buffer segments ``indices`` (their table is ``table``), with the
    noise of every element keyed by its index in the *unsharded* buffer.

    Unsharded buffers take the fused op as is. For sharded ones the Philox counter of element j of
    tensor s's shard is ``base_s + global_element_index(p_s)[j]`` (``base_s``: the tensor's offset
    in the unsharded buffer), evaluated with the reference formula (:func:`mmgrad.reference.
    philox_normal`), so a sharded run draws exactly the numbers an unsharded one does under the
    reference backend (the fused kernels evaluate the same formula in float32).
    """
    if noise_std is None or not layout.buffer.sharded:
        return ops.segment_scale_(row, table.offsets, table.numels, scale, noise_std, seed)
    buffer = layout.buffer
    acc = reference.accumulation_dtype(row.dtype)
    scale = torch.as_tensor(scale, device=row.device).to(acc).expand(len(indices))
    noise_std = torch.as_tensor(noise_std, device=row.device).to(acc).expand(len(indices))
    seed = torch.as_tensor(seed, dtype=torch.int64, device=row.device).reshape(1)
    bases = layout.tensor_offsets_host
    with torch.no_grad():
        for k, s in enumerate(indices):
            start, n = buffer.segments.host_offsets[s], buffer.segments.host_numels[s]
            if n == 0:
                continue
            seg = row[start : start + n]
            counter = global_element_index(buffer.params[s]) + bases[s]
            # The reference's expression, so the rounding is the same as the unsharded path's.
            seg.copy_(scale[k] * seg.to(acc) + noise_std[k] * reference.philox_normal(seed, counter).to(acc))
    return row


# --- the per-step synchronisation --------------------------------------------------------------


def _pack(tensors: Sequence[torch.Tensor], dtype: torch.dtype, device) -> torch.Tensor:
    if not tensors:
        return torch.zeros(0, dtype=dtype, device=device)
    return torch.cat([t.detach().reshape(-1).to(device=device, dtype=dtype) for t in tensors])


def _unpack_(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    start = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[start : start + n].view(t.shape))
        start += n


def _shard_group(params) -> tuple[Optional[object], Optional[object]]:
    """(shard group, mesh) of the sharded parameters; every one must shard over the same single
    mesh dimension of one mesh, and no parameter may be a plain tensor next to them (its partial
    statistics would be counted once per rank)."""
    sharded = [p for p in params if is_sharded(p)]
    if not sharded:
        return None, None
    if len(sharded) != len(params):
        raise ValueError(
            "some modality parameters are sharded (DTensor) and some are not; shard all of them "
            "(fully_shard the module that holds every modality) or none"
        )
    mesh = sharded[0].device_mesh
    dims = {i for i, pl in enumerate(sharded[0].placements) if pl.is_shard()}
    for p in sharded:
        if p.device_mesh != mesh or {i for i, pl in enumerate(p.placements) if pl.is_shard()} != dims:
            raise ValueError("the sharded modality parameters must share one device mesh and sharded mesh dimension")
    if len(dims) != 1:
        raise ValueError(f"parameters sharded over {len(dims)} mesh dimensions are not supported (one: FSDP / HSDP)")
    (dim,) = dims
    return mesh.get_group(dim), mesh


class GradientSync:
    """What a :class:`~mmgrad.BalancedOptimizer` communicates each step (see the module docstring).

    Built by the optimizer (``process_group=``, ``ddp=``, ``distributed=`` arguments); methods see
    it only through ``StepContext.reduce_stats``.
    """

    def __init__(self, optimizer, mode: str, group, ddp=None, shard_group=None):
        self.mode = mode
        self.group = group  # data-parallel group: batch statistics, flags, gradient averages
        self.shard_group = shard_group  # sums partial statistics of sharded rows (None: not sharded)
        self.ddp = ddp
        self.world = dist.get_world_size(group)
        self.device = optimizer._layout.device
        self._ours = {id(p) for p in optimizer._layout.buffer.params}
        ignored = getattr(ddp, "parameters_to_ignore", set())
        # (named_parameters builds every name: ~1 ms a step for a 48-layer transformer, so once)
        self._ddp_params = [p for n, p in ddp.module.named_parameters() if n not in ignored] if ddp is not None else []
        #: Parameters outside the flat buffer whose gradients are averaged with the rows (heads);
        #: listed again at every step (a layer unfrozen or a parameter group added since).
        self.others = self._other_params(optimizer)
        if self.sharded:  # FSDP reduces the gradients itself, but only of the parameters it shards
            plain = [p for p in self.others if not is_dtensor(p)]
            if plain:
                raise ValueError(
                    f"the modality parameters are sharded (FSDP2) but {len(plain)} other trainable "
                    f"parameter(s) (shapes {[tuple(p.shape) for p in plain[:3]]}...) are not: their "
                    "gradients would differ across ranks; wrap the root module too, fully_shard(model)")

    def _other_params(self, optimizer) -> list[torch.Tensor]:
        """The trainable parameters of the wrapped optimizer and of the DDP module (heads, layers
        no modality holds) outside the flat buffer, in a fixed order."""
        ours = self._ours
        others, seen = [], set()
        sources = [p for g in optimizer.param_groups for p in g["params"]] + self._ddp_params
        for p in sources:
            if p.requires_grad and id(p) not in ours and id(p) not in seen:
                seen.add(id(p))
                others.append(p)
        return others

    @property
    def sharded(self) -> bool:
        return self.shard_group is not None

    # --- used by methods --------------------------------------------------------------------------

    def reduce_stats(self, *tensors: torch.Tensor):
        """Make statistics computed on this rank's rows global, in place, in one all-reduce: summed
        over the shards (sharded parameters), averaged over ranks (``"local_gram"``), unchanged
        otherwise (the rows are already global, or ``"local"``). Returns the tensor(s)."""
        if self.sharded:
            group, factor = self.shard_group, None
        elif self.mode == "local_gram":
            group, factor = self.group, 1.0 / self.world
        else:
            return tensors[0] if len(tensors) == 1 else tensors
        flat = _pack(tensors, torch.float64, self.device)
        dist.all_reduce(flat, group=group)
        if factor is not None:
            flat.mul_(factor)
        _unpack_(flat, tensors)
        return tensors[0] if len(tensors) == 1 else tensors

    # --- used by the optimizer --------------------------------------------------------------------

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite ``tensors`` with the first rank's (seeds, initial parameters)."""
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        groups: dict = {}
        for t in tensors:
            t = local_tensor(t).detach()
            groups.setdefault((t.dtype, t.device), []).append(t)
        for ts in groups.values():  # one collective per dtype
            flat = torch.cat([t.reshape(-1) for t in ts])
            dist.broadcast(flat, src, group=self.group)
            _unpack_(flat, ts)

    def before_edit(self, optimizer, finite: torch.Tensor) -> torch.Tensor:
        """Before ``method.edit``: average what the edit reads over ranks. Returns the step's
        "every gradient is finite" flag agreed by all ranks (from this rank's ``finite``)."""
        buffer = optimizer._buffer
        works = []
        if self.mode == "exact" and not self.sharded:
            # Pre-divided like DDP (no overflow in the sum); one collective for all K rows.
            buffer.data.div_(self.world)
            works.append(dist.all_reduce(buffer.data, group=self.group, async_op=True))
        stats = optimizer.method.batch_statistics()  # summed: the concatenated batch's statistics
        nonfinite = (~finite).to(torch.float64).reshape(1)
        small = [*stats, nonfinite]
        flags = None
        if not self.sharded:  # which parameters got a gradient on some rank (FSDP agrees by itself)
            flags = self._local_flags(optimizer)
            small.append(flags)
        flat = _pack(small, torch.float64, self.device)
        dist.all_reduce(flat, group=self.group)
        _unpack_(flat, small)
        if flags is not None:
            used = self._union(optimizer, flags)
            if self.mode == "exact":
                works += self._reduce_others(used)
        for w in works:
            w.wait()
        return nonfinite[0] == 0

    def more_gradients(self, optimizer) -> None:
        """A backward pass after :meth:`before_edit` (``synchronize()`` mid-accumulation): the
        statistics it summed over ranks go back to this rank's share (sum / world), so that the
        next sum counts them once. (The averaged rows and gradients need nothing: averaging them
        again with the new local gradients added gives the right average.)"""
        for t in optimizer.method.batch_statistics():
            t.div_(self.world)

    @property
    def checks_rows_first(self) -> bool:
        """``"local"``: each rank edits its own rows and methods read no global statistics, so the
        rows' finite check must come before the edit, in the flag the ranks agree on (else one
        rank's method state would advance on a step the others skip)."""
        return self.mode == "local" and not self.sharded

    def after_edit(self, optimizer, finite: torch.Tensor) -> torch.Tensor:
        """After ``method.edit`` in the local modes: average the edited gradient row and the other
        gradients, and agree on the step/skip decision."""
        if self.mode not in ("local_gram", "local") or self.sharded:
            return finite
        row = optimizer._buffer.row(optimizer.method.result_row)
        row.div_(self.world)
        works = [dist.all_reduce(row, group=self.group, async_op=True)]
        nonfinite = (~finite).to(torch.float64).reshape(1)
        dist.all_reduce(nonfinite, group=self.group)
        works += self._reduce_others(self._used)
        for w in works:
            w.wait()
        return nonfinite[0] == 0

    def after_step(self, optimizer) -> None:
        """As DDP after a synchronised backward: the next forward broadcasts the first rank's module
        buffers (BatchNorm statistics), when the DDP module was built with ``broadcast_buffers``."""
        if self.ddp is not None:
            self.ddp.require_forward_param_sync = True

    def _local_flags(self, optimizer) -> torch.Tensor:
        """1.0 per buffer parameter, then per other parameter, that has a gradient on this rank."""
        buffer = optimizer._buffer
        self.others = self._other_params(optimizer)
        missing = buffer.params_without_grad()
        self._complete = not missing and all(p.grad is not None for p in self.others)
        flags = torch.ones(len(buffer.params) + len(self.others), dtype=torch.float64, device=self.device)
        if not self._complete:
            flags[missing] = 0.0
            for i, p in enumerate(self.others):
                if p.grad is None:
                    flags[len(buffer.params) + i] = 0.0
        return flags

    def _union(self, optimizer, flags: torch.Tensor) -> list[bool]:
        """Record which buffer parameters got a gradient on some rank; return the same for the other
        parameters (host list). Read from the device only when this rank misses one (if it misses
        none, the union is everything)."""
        buffer = optimizer._buffer
        n = len(buffer.params)
        if self._complete:
            used = [True] * len(self.others)
        else:
            host = (flags > 0).tolist()
            buffer.set_received([i for i in range(n) if host[i]])
            used = host[n:]
        self._used = used
        return used

    def _reduce_others(self, used: Sequence[bool]) -> list:
        """Average the other parameters' gradients (zeros where a rank has none; parameters no rank
        reached keep ``grad=None``), one async all-reduce per dtype. Returns the pending works; the
        results are written back when they complete."""
        groups: dict = {}
        for p, u in zip(self.others, used):
            if u:
                groups.setdefault((p.dtype, local_tensor(p).device), []).append(p)
        works = []
        for params in groups.values():
            grads = [local_tensor(p.grad) if p.grad is not None else torch.zeros_like(local_tensor(p)) for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads]).div_(self.world)
            work = dist.all_reduce(flat, group=self.group, async_op=True)
            works.append(_WriteBack(work, flat, params))
        return works


class _WriteBack:
    """A pending all-reduce of flattened gradients; ``wait()`` copies the result back."""

    def __init__(self, work, flat, params):
        self.work, self.flat, self.params = work, flat, params

    def wait(self) -> None:
        self.work.wait()
        start = 0
        for p in self.params:
            n = p.numel()
            value = self.flat[start : start + n].view(p.shape)
            if p.grad is None:
                p.grad = value.clone()
            else:
                p.grad.copy_(value)
            start += n


def setup(optimizer, process_group=None, ddp=None, mode: str = "exact") -> Optional[GradientSync]:
    """The :class:`GradientSync` of a new optimizer, or None for a single process.

    ``process_group`` None: the ``DistributedDataParallel`` module's group when ``ddp`` is given,
    else the sharded parameters' mesh, else ``torch.distributed``'s default group when it is
    initialised with more than one rank.
    """
    if mode not in MODES:
        raise ValueError(f"distributed must be one of {MODES}, got {mode!r}")
    layout = optimizer._layout
    shard_group, mesh = _shard_group(layout.buffer.params)
    if shard_group is not None and mode != "exact":
        raise ValueError(
            f"distributed={mode!r} needs replicated parameters; sharded ones (FSDP2 / DTensor) use 'exact' "
            "(FSDP reduce-scatters each objective's gradient itself; the surgery adds only K x K numbers)"
        )
    if mode != "off" and process_group is not None and dist.is_initialized() and dist.get_rank(process_group) < 0:
        raise ValueError("this rank is not a member of process_group: give each rank a group it belongs to "
                         "(a rank that trains alone: distributed='off')")
    if mode == "off":
        if ddp is not None:  # DDP's own all-reduce would then run in every backward pass
            raise ValueError("ddp= and distributed='off' contradict each other: 'off' means independent "
                             "processes, so train the plain module (not DistributedDataParallel) and drop ddp=")
        return None
    if not (dist.is_available() and dist.is_initialized()):
        if ddp is not None:
            raise RuntimeError("ddp= was given but torch.distributed is not initialised")
        return None
    if ddp is not None:
        if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            raise TypeError(f"ddp must be a DistributedDataParallel module, got {type(ddp).__name__}")
        if getattr(ddp, "static_graph", False):
            raise ValueError("DistributedDataParallel(static_graph=True) is not supported: mmgrad runs its own reduction")
        if shard_group is not None:
            raise ValueError("ddp= was given but the modality parameters are sharded DTensors")
    group = process_group
    if group is None:
        if ddp is not None:
            group = ddp.process_group
        elif mesh is not None and mesh.ndim == 1:
            group = mesh.get_group()
        else:
            group = dist.group.WORLD
    if dist.get_world_size(group) == 1 and shard_group is None:
        return None
    sync = GradientSync(optimizer, mode, group, ddp, shard_group)
    if ddp is not None:
        # Every backward pass runs as under ddp.no_sync(): the reducer's bucket state machine
        # expects one backward per forward and would all-reduce (or reject) K partial passes.
        ddp.require_backward_grad_sync = False
    elif shard_group is None:
        # Plain replicated parameters without DDP: start every rank from the first rank's
        # parameters, as DDP's constructor does.
        sync.broadcast_([p for g in optimizer.param_groups for p in g["params"]])
    # Random streams (OGM-GE's seed) must be the same on every rank.
    optimizer.method.broadcast_state(sync.broadcast_)
    return sync
