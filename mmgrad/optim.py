"""``BalancedOptimizer``: the gradient-editing methods behind the torch.optim interface."""

from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from mmgrad import distributed as _dist
from mmgrad.buffers import FlatGradBuffer
from mmgrad.methods.base import BalancingMethod, ModalityLayout, StepContext, params_of

__all__ = ["BalancedOptimizer", "NonFiniteGradientError"]

ParamSource = Union[nn.Module, Iterable[torch.nn.Parameter], torch.nn.Parameter]


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``step()`` under ``nonfinite="raise"`` when a gradient holds inf or NaN."""


def _outside_graph(fn: Callable) -> Callable:
    """``fn`` as is, or under ``torch.compile`` excluded from the traced graph (host bookkeeping:
    a graph break). Decided per call so that eager users never import torch._dynamo."""
    if torch.compiler.is_compiling():
        return torch.compiler.disable(fn)
    return fn


class BalancedOptimizer(torch.optim.Optimizer):
    """Wraps any ``torch.optim.Optimizer`` and edits the modality gradients before each step.

    Args:
        optimizer: the optimizer that updates the parameters (SGD, Adam, AdamW, ...). Its
            ``param_groups`` and ``state`` are shared, not copied: LR schedulers and
            ``torch.amp.GradScaler`` work on this wrapper as on the wrapped optimizer.
        modalities: ``{name: module or parameters}``, one entry per modality encoder. Every
            parameter must belong to at most one modality and be owned by ``optimizer``.
        method: a :class:`~mmgrad.methods.BalancingMethod` (``mmgrad.OGMGE(alpha=0.8)``,
            ``mmgrad.MMPareto()``, ...), or an aggregator (name or object from
            :mod:`mmgrad.aggregators`) for the multi-objective mode.
        shared: multi-objective mode: the parameters shared by all objectives (instead of
            ``modalities``); ``backward([loss_1, ..., loss_K])`` then aggregates their K gradients
            with the aggregator given as ``method``.
        nonfinite: ``"skip"`` (default) leaves parameters and optimizer state untouched on a step
            whose gradients hold inf/NaN; ``"raise"`` raises :class:`NonFiniteGradientError`. The
            check reads one flag on the host per step unless the wrapped optimizer is a fused one
            (``fused=True``), which skips on the device.
        grad_scaler: the ``torch.amp.GradScaler`` in use, if any, so that gradient rows kept apart
            from ``.grad`` are unscaled like ``.grad`` (multi-row methods need it).
        process_group: data-parallel group (see :mod:`mmgrad.distributed`). By default: ``ddp``'s
            group, else the sharded (FSDP2 / DTensor) parameters' mesh, else ``torch.distributed``'s
            default group when it is initialised with more than one rank; a single process
            otherwise.
        ddp: the ``DistributedDataParallel`` module that wraps the model, if any. mmgrad then runs
            every backward pass as under ``ddp.no_sync()`` and averages the gradients itself, once
            per ``step()`` (DDP's reducer allows one backward pass per forward).
        distributed: ``"exact"`` (default: the result equals one process on the concatenated
            batch), ``"local_gram"`` or ``"local"`` (cheaper data-parallel approximations, see
            :mod:`mmgrad.distributed`), or ``"off"`` (independent processes).

    Usage::

        opt = mmgrad.BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=2e-3, momentum=0.9),
                                       modalities={"audio": model.audio, "visual": model.visual},
                                       method=mmgrad.OGMGE(alpha=0.8))
        opt.zero_grad()
        opt.backward(loss, logits={"audio": la, "visual": lv}, targets=y)
        opt.step()
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        modalities: Optional[Mapping[str, ParamSource]] = None,
        method: Any = None,
        *,
        shared: Optional[ParamSource] = None,
        nonfinite: str = "skip",
        grad_scaler: Optional["torch.amp.GradScaler"] = None,
        process_group=None,
        ddp: Optional[nn.Module] = None,
        distributed: str = "exact",
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, BalancedOptimizer):
            raise TypeError("optimizer is already a BalancedOptimizer; wrap the inner optimizer once")
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        if (modalities is None) == (shared is None):
            raise ValueError("give exactly one of modalities={name: module or params} or shared=params")
        if shared is not None:
            from mmgrad.methods.multi_objective import MultiObjective

            modalities = {"shared": shared}
            method = MultiObjective(method if method is not None else "upgrad")
        elif method is None:
            raise ValueError("method is required, e.g. method=mmgrad.OGMGE(alpha=0.8)")
        elif not isinstance(method, BalancingMethod):
            from mmgrad.methods.multi_objective import MultiObjective

            method = MultiObjective(method)
        self.optimizer = optimizer
        self.method: BalancingMethod = method
        self.nonfinite = nonfinite
        self.grad_scaler = grad_scaler
        self.epoch = 0
        self._announced_epoch: Optional[int] = None  # the last epoch set_epoch passed to the method
        self.diagnostics: dict[str, torch.Tensor] = {}
        self._step_count = 0
        self._warned_no_grad: set[str] = set()
        self._warned_unfrozen: set[str] = set()
        self._stepped = False  # a step() ran since the last zero_grad()
        self._modality_modules = {n: s for n, s in modalities.items() if isinstance(s, nn.Module)}

        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        layout = self._build_layout(modalities, owned)
        # torch.optim.Optimizer.__init__ installs the hook machinery (step pre/post hooks,
        # profiling); the groups and state are then replaced by the wrapped optimizer's own.
        super().__init__([p for g in optimizer.param_groups for p in g["params"]], dict(optimizer.defaults))
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.defaults = optimizer.defaults
        self._layout = layout
        self._buffer = layout.buffer
        self.method.attach(layout)
        self._sync = _dist.setup(self, process_group=process_group, ddp=ddp, mode=distributed)
        self._synced: Optional[torch.Tensor] = None  # agreed finite flag once synchronize() ran

    # --- construction ---------------------------------------------------------------------------

    def _build_layout(self, modalities: Mapping[str, ParamSource], owned: set) -> ModalityLayout:
        if not modalities:
            raise ValueError("modalities is empty: name at least one modality and its parameters")
        names, params, seg_mod, param_names, spans = [], [], [], [], []
        seen: dict[int, str] = {}
        start = 0
        for m_index, (name, source) in enumerate(modalities.items()):
            ps = params_of(source)
            if not ps:
                raise ValueError(f"modality {name!r} has no trainable parameters")
            named = dict()
            if isinstance(source, nn.Module):
                named = {id(p): n for n, p in source.named_parameters()}
            for p in ps:
                if not isinstance(p, torch.Tensor) or not p.requires_grad:
                    raise ValueError(f"modality {name!r} lists a tensor that does not require grad")
                if id(p) in seen:
                    raise ValueError(
                        f"a parameter of shape {tuple(p.shape)} is in both modality {seen[id(p)]!r} and {name!r}; "
                        "each parameter may belong to one modality only"
                    )
                if id(p) not in owned:
                    raise ValueError(
                        f"a parameter of modality {name!r} (shape {tuple(p.shape)}) is not in the wrapped "
                        "optimizer's param_groups; pass the same parameters to both"
                    )
                if p.is_sparse:
                    raise ValueError(f"modality {name!r} has a sparse parameter; sparse gradients are not supported")
                if params and (p.dtype, p.device) != (params[0].dtype, params[0].device):
                    raise ValueError(
                        f"modality {name!r} has a {p.dtype} parameter on {p.device}, but the first modality "
                        f"parameter is {params[0].dtype} on {params[0].device}: all modality parameters share one "
                        "flat gradient buffer, so give them one dtype and device (e.g. model.to(dtype))"
                    )
                seen[id(p)] = name
                params.append(p)
                seg_mod.append(m_index)
                param_names.append(f"{name}.{named.get(id(p), len(param_names))}")
            end = start + sum(p.numel() for p in ps)
            spans.append((start, end))
            start = end
            names.append(name)
        for module_source in modalities.values():
            if isinstance(module_source, nn.Module):
                for mod in module_source.modules():
                    if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) and getattr(mod, "sparse", False):
                        raise ValueError("a modality has an embedding with sparse=True; sparse gradients are not supported")
        buffer = FlatGradBuffer(params, rows=self._rows_needed())
        segment_modality = torch.tensor(seg_mod, dtype=torch.int64, device=buffer.device)
        return ModalityLayout(names, buffer, spans, segment_modality, seg_mod, param_names)

    def _rows_needed(self) -> int:
        return self.method.rows

    # --- the training-loop interface --------------------------------------------------------------

    @property
    def modalities(self) -> dict[str, list[torch.Tensor]]:
        """The modality declaration: each modality's name and its parameters, in buffer order (the
        forward-, data- and schedule-level methods such as :class:`mmgrad.methods.OPM` and
        :class:`mmgrad.methods.Relearning` take it from here)."""
        layout = self._layout
        out: dict[str, list[torch.Tensor]] = {name: [] for name in layout.names}
        for p, m in zip(layout.buffer.params, layout.segment_modality_host):
            out[layout.names[m]].append(p)
        return out

    def set_epoch(self, epoch: int) -> None:
        """Tell the method which epoch runs now (modulation windows, warm-ups, epoch statistics);
        call it at the start of every epoch. Announcing the current epoch again does nothing, so a
        resumed run may start its loop with the epoch its checkpoint was taken in."""
        self.epoch = int(epoch)
        self._warn_parameters_unfrozen_since_construction()
        if self.epoch != self._announced_epoch:
            self._announced_epoch = self.epoch
            self.method.on_epoch(self.epoch, self)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero every gradient. The modality parameters' ``.grad`` are ``None`` until a backward pass
        reaches them (``set_to_none=True``, as in torch) and views of the flat buffer afterwards.
        ``model.zero_grad()`` or the wrapped optimizer's ``zero_grad()`` give the same steps; this
        one is cheaper (nothing is written until the gradients arrive)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self.method.on_zero_grad()
        # set_to_none: nothing is written now, each row segment takes its first gradient by a copy.
        self._buffer.zero_(lazy=set_to_none)
        self._synced = None
        self._stepped = False

    def synchronize(self) -> None:
        """Under data parallelism, average the gradients (and the methods' per-batch statistics)
        over ranks now rather than at the start of ``step()``; a no-op in a single process or when
        already done for this step. Call it before ``scaler.step(opt)`` when a ``GradScaler`` is in
        use, so that its inf/NaN check sees the averaged gradients and every rank takes the same
        decision (otherwise one rank may skip ``step()`` while the others wait for it)."""
        if self._sync is not None and self._synced is None:
            self._buffer.materialize()
            local = self._sync.mode in ("local_gram", "local") and not self._sync.sharded
            # Local modes: a GradScaler then checks this rank's .grad only, so the agreed flag must
            # cover the rows too (an inf in one rank's modality gradient).
            self._synced = self._sync.before_edit(self, self._local_finite(rows=local))
            if local:
                self._show_agreed_flag_to_grad_scaler(self._synced)

    def backward(self, loss, **batch) -> None:
        """Back-propagate one micro-batch the way the method needs (one or several passes into the
        buffer rows). ``loss`` is a tensor, or a list / dict of losses for multi-objective methods;
        ``batch`` holds what the method reads (``logits=``, ``targets=``, ...). Call it once per
        micro-batch; gradients accumulate until ``step()``."""
        self._check_set_up_unchanged()
        if self._synced is not None:  # synchronize() ran and more gradients come: synchronise again
            self._sync.more_gradients(self)
        self._synced = None
        if self._buffer.zeroed_from_outside():  # model.zero_grad(): a new step, as opt.zero_grad()
            self.method.on_zero_grad()
        if self._stepped:
            self._start_step_without_zero_grad()
        try:
            self.method.backward(self, loss, **batch)
        except RuntimeError as exc:
            from_ddp = any(m in str(exc) for m in ("mark a variable ready only once", "DDP reducer",
                                                    "DistributedDataParallel"))
            if self._sync is not None and self._sync.ddp is None and from_ddp:
                raise RuntimeError(
                    "DistributedDataParallel's reducer failed in mmgrad's backward pass(es): pass the DDP module "
                    "as BalancedOptimizer(..., ddp=model) so that mmgrad reduces the gradients itself"
                ) from exc
            raise
        if self._sync is not None and self._sync.sharded and self.method.rows > 1 and \
                _dist.fsdp_gradient_sync_off(self._modality_modules.values()):
            raise RuntimeError(
                f"FSDP's gradient sync is off (set_requires_gradient_sync(False)), so it summed the "
                f"{self.method.rows} backward passes of {type(self.method).__name__} into one gradient: "
                "accumulate with the sync left on; this step's gradients are mixed, call opt.zero_grad()")

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """Edit the gradients with the method, then step the wrapped optimizer (skipped when a
        gradient is not finite and ``nonfinite="skip"``). Returns the closure's loss, if any.

        Under ``torch.compile`` the edit (finite check, statistics, the fused ops) is traced into
        one graph; the host bookkeeping around it (binding checks, warnings, the wrapped
        optimizer's step and its skip decision) runs eagerly on either side."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        others, row_scale = _outside_graph(self._prepare_step)()
        finite = self._edit(others, row_scale)
        _outside_graph(self._finish_step)(finite)
        return loss

    # --- step internals ---------------------------------------------------------------------------

    def _check_set_up_unchanged(self) -> None:
        """The method object serves this optimizer, and the parameters are still of the buffer's
        dtype and device (``model.to(...)`` after construction would make every gradient miss it)."""
        buffer = self._buffer
        for p in buffer.params:
            if p.dtype != buffer.dtype or p.device != buffer.device:
                raise RuntimeError(
                    f"a modality parameter is now {p.dtype} on {p.device}, but the BalancedOptimizer was "
                    f"built for {buffer.dtype} on {buffer.device}: build the optimizer (as any torch "
                    "optimizer) after model.to(...)"
                )
        if self.method.layout is not self._layout:
            raise RuntimeError(
                f"this optimizer's {type(self.method).__name__} object was given to another "
                "BalancedOptimizer since; give each optimizer its own method object"
            )

    def _start_step_without_zero_grad(self) -> None:
        """The first backward after a ``step()`` that no ``opt.zero_grad()`` followed (the user
        zeroed with ``model.zero_grad()`` or the wrapped optimizer's, or not at all). ``.grad`` is
        the result row and behaves as in torch: zeroed in place it is zero, set to ``None`` the
        buffer sees it (:meth:`FlatGradBuffer.bind`), left alone it accumulates. The other rows
        hold the last step's per-objective gradients, which nobody can zero from outside: they
        start this step empty."""
        self._stepped = False
        buffer = self._buffer
        others = [r for r in range(buffer.rows) if r != buffer.active_row]
        if others:
            buffer.zero_(others, lazy=True)

    def _prepare_step(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Host bookkeeping before the edit: check the set-up, complete the buffer rows; returns the
        gradients outside the buffer and the GradScaler's unscale factor."""
        self._check_set_up_unchanged()
        unsynced = self._sync is not None and self._synced is None
        multi_row_unscaled = self.grad_scaler is None and self.method.rows > 1
        # (one walk up the stack, only where a GradScaler caller would be an error)
        by_scaler = (unsynced or multi_row_unscaled) and _called_by_grad_scaler()
        if unsynced and by_scaler:
            raise RuntimeError(
                "scaler.step(opt) under data parallelism without opt.synchronize() first: each rank's "
                "GradScaler would check its own gradients, and a rank that skips the step leaves the others "
                "waiting in its collectives; call opt.synchronize() before scaler.step(opt)")
        if multi_row_unscaled and by_scaler:
            raise ValueError(
                f"scaler.step(opt) with a {type(self.method).__name__}, which keeps {self.method.rows} gradient rows "
                "of which the GradScaler unscales only .grad: pass the scaler to the optimizer, "
                "BalancedOptimizer(..., grad_scaler=scaler); no parameter was updated")
        # Fold in gradients a plain loss.backward() left elsewhere, zero what no backward reached.
        self._buffer.materialize()
        return self._other_grads(), self._row_scale()

    def _edit(self, others: list[torch.Tensor], row_scale: torch.Tensor) -> torch.Tensor:
        """The finite check and the method's edit (device work only); returns the device bool
        "every gradient was finite"."""
        sync = self._sync
        if sync is None:
            finite = self._local_finite(others)
        elif self._synced is not None:  # synchronize() ran: its flag is the one all ranks agreed on
            finite = self._synced
        else:
            # Average the rows, the other gradients and the per-batch statistics over ranks.
            finite = sync.before_edit(self, self._local_finite(others))
        context = StepContext(self._layout, self.epoch, self._step_count, row_scale, self.param_groups,
                              finite=finite)
        if sync is not None:
            context.reduce_stats = sync.reduce_stats
        self.diagnostics = self.method.edit(context)
        if self.method.reports_finite:
            finite = finite & self.diagnostics["finite"]
        if sync is not None:
            finite = sync.after_edit(self, finite)  # local modes: average the edited gradient
        self.diagnostics["finite"] = finite  # whether this step is taken
        return finite

    def _finish_step(self, finite: torch.Tensor) -> None:
        """Warn about modalities without a gradient, point ``.grad`` at the method's result row and
        step the wrapped optimizer (or skip)."""
        buffer, sync = self._buffer, self._sync
        self._warn_modalities_without_grad()  # after the ranks' union of who got a gradient
        if self.method.result_row != buffer.active_row:
            buffer.bind(self.method.result_row)
        self._inner_step(finite)
        buffer.release_retired()  # after the step, as plain training frees its gradients late
        self._stepped = True
        if sync is not None:
            sync.after_step(self)
            self._synced = None
        self._step_count += 1

    def _row_scale(self) -> torch.Tensor:
        one = torch.ones((), device=self._buffer.device, dtype=torch.float32)
        scaler = self._enabled_grad_scaler()
        if scaler is None:
            return one
        # GradScaler.scale() of a one is the current scale as a device tensor (no host sync).
        return 1.0 / scaler.scale(one)

    def _enabled_grad_scaler(self) -> Optional["torch.amp.GradScaler"]:
        scaler = self.grad_scaler
        return scaler if scaler is not None and scaler.is_enabled() else None

    def _local_finite(self, others: Optional[list[torch.Tensor]] = None, rows: bool = False) -> torch.Tensor:
        """Device bool: this rank's gradients are finite (the rows when ``rows``, when the method
        does not report it from its own statistics, or when the ranks must agree on them before the
        edit); ``others``: the gradients outside the buffer."""
        finite = self._others_finite(self._other_grads() if others is None else others)
        if rows or not self.method.reports_finite or (self._sync is not None and self._sync.checks_rows_first):
            finite = finite & torch.isfinite(self._buffer.data).all()  # an extra read of the rows
        return finite

    def _other_grads(self) -> list[torch.Tensor]:
        """The gradients outside the flat buffer (heads, ...), this rank's shards under FSDP2."""
        ours = self._buffer.data.untyped_storage().data_ptr()
        local = _dist.local_tensor
        return [
            local(p.grad)
            for g in self.param_groups
            for p in g["params"]
            if p.grad is not None and local(p.grad).untyped_storage().data_ptr() != ours
        ]

    def _others_finite(self, others: list[torch.Tensor]) -> torch.Tensor:
        """Device bool: the gradients ``others`` are all finite."""
        if not others:
            return torch.ones((), dtype=torch.bool, device=self._buffer.device)
        norms = torch.stack([n.to(self._buffer.device) for n in torch._foreach_norm(others)])
        return torch.isfinite(norms).all()

    def _inner_step(self, finite: torch.Tensor) -> None:
        update_scale = self.diagnostics.pop("update_scale", None)
        if update_scale is None:
            self._wrapped_step(finite)
            return
        # theta <- theta_old + k * (theta_new - theta_old) for the scaled tensors.
        indices, scale = update_scale  # host list of buffer parameter indices, (len,) device factors
        params = [_dist.local_tensor(self._buffer.params[i]) for i in indices]
        before = [p.detach().clone() for p in params]
        self._wrapped_step(finite)
        with torch.no_grad():
            torch._foreach_lerp_(before, [p.detach() for p in params], list(scale.to(params[0].dtype).unbind()))
            torch._foreach_copy_([p.detach() for p in params], before)

    def _show_agreed_flag_to_grad_scaler(self, finite: torch.Tensor) -> None:
        """Local modes: ``.grad`` is not averaged before the edit, so a GradScaler's inf check
        would see this rank's gradients only, and a rank whose were finite would step into the
        edit's collectives while another skipped. Where the ranks agreed on "not finite", one
        element of the first modality gradient becomes NaN on every rank: every scaler skips (also
        one not passed as ``grad_scaler=``; the step would be skipped anyway)."""
        grad = next((p.grad for p in self._buffer.params if p.grad is not None), None)
        if grad is None:
            return
        first = _dist.local_tensor(grad).view(-1)[:1]
        first.copy_(torch.where(finite, first, torch.full_like(first, float("nan"))))

    def _report_to_grad_scaler(self, finite: torch.Tensor) -> None:
        """Inside ``scaler.step(opt)``: add "not finite" to the scaler's inf record for this
        optimizer, so that ``scaler.update()`` backs off. Its own check saw ``.grad`` only, not
        the rows kept apart (MMPareto's multimodal row, the other objectives' rows). A device op
        on GradScaler's per-optimizer record (private, stable since torch 1.6)."""
        scaler = self._enabled_grad_scaler()
        if scaler is None:
            return
        found = getattr(scaler, "_per_optimizer_states", {}).get(id(self), {}).get("found_inf_per_device")
        if not found:  # step() called outside scaler.step(): nothing to report to
            return
        device = self._buffer.device
        flag = (~finite).to(device=device, dtype=torch.float32)
        found[device] = torch.maximum(found[device], flag) if device in found else flag

    def _wrapped_step(self, finite: torch.Tensor) -> None:
        self._report_to_grad_scaler(finite)
        opt = self.optimizer
        unused = self._buffer.params_without_grad()
        saved = [(self._buffer.params[i], self._buffer.params[i].grad) for i in unused]
        for p, _ in saved:  # as without mmgrad: a parameter no backward reached has no gradient
            p.grad = None
        try:
            if getattr(opt, "_step_supports_amp_scaling", False):
                # Fused optimizers skip on the device when found_inf is non-zero: no host sync.
                opt.found_inf = (~finite).to(torch.float32)
                opt.grad_scale = None
                try:
                    opt.step()
                finally:
                    del opt.found_inf, opt.grad_scale
                if self.nonfinite == "raise" and not bool(finite):
                    raise NonFiniteGradientError("a gradient holds inf or NaN; the step was skipped")
                return
            if not bool(finite):  # one host read per step
                if self.nonfinite == "raise":
                    raise NonFiniteGradientError("a gradient holds inf or NaN; the step was skipped")
                return
            opt.step()
        finally:
            for p, g in saved:
                p.grad = g

    def _warn_parameters_unfrozen_since_construction(self) -> None:
        """The modality layout is fixed when the optimizer is built: a parameter of a modality
        module that was frozen then and trains now is not balanced. Checked at ``set_epoch``."""
        known = {id(p) for p in self._buffer.params}
        for name, module in self._modality_modules.items():
            if name in self._warned_unfrozen:
                continue
            late = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in known]
            if late:
                self._warned_unfrozen.add(name)
                warnings.warn(
                    f"modality {name!r} has {len(late)} trainable parameter(s) that were frozen when the "
                    f"BalancedOptimizer was built ({', '.join(late[:3])}{', ...' if len(late) > 3 else ''}); "
                    "mmgrad does not balance them. Build the optimizer after unfreezing them (warned once "
                    "per modality)",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def _warn_modalities_without_grad(self) -> None:
        unused = set(self._buffer.params_without_grad())
        if not unused:
            return
        layout = self._layout
        for m, name in enumerate(layout.names):
            seg = [i for i, mod in enumerate(layout.segment_modality_host) if mod == m]
            if seg and all(i in unused for i in seg) and name not in self._warned_no_grad:
                self._warned_no_grad.add(name)
                warnings.warn(
                    f"modality {name!r} received no gradient in this step; its parameters are left as they are "
                    "(warned once per modality)",
                    RuntimeWarning,
                    stacklevel=3,
                )

    # --- torch.optim contract ---------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        # Before __init__ finishes, torch.optim.Optimizer.__init__ adds its own group; afterwards new
        # groups go to the wrapped optimizer (whose param_groups list this wrapper shares).
        if not hasattr(self, "_layout"):
            return super().add_param_group(param_group)
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "epoch": self.epoch,
            "announced_epoch": self._announced_epoch,
            "step": self._step_count,
            "set_up": self._set_up(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a :meth:`state_dict`. A checkpoint of another set-up (method, aggregator, modality
        names or their order) is refused before anything changes; if loading fails part way, the
        wrapped optimizer and the method keep their state. Without its ``"optimizer"`` entry, the
        wrapped optimizer is left alone (restored apart, e.g. by ``torch.distributed.checkpoint``
        through ``opt.optimizer``)."""
        if not isinstance(state_dict, Mapping) or "method" not in state_dict:
            keys = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
            hint = (" It looks like a plain torch optimizer's state_dict: load it with "
                    "opt.optimizer.load_state_dict(...)." if isinstance(state_dict, Mapping)
                    and "param_groups" in state_dict else "")
            raise ValueError(f"not a BalancedOptimizer state_dict (keys: {keys}).{hint}")
        saved = state_dict.get("set_up")  # absent from older checkpoints
        if saved is not None and saved != self._set_up():
            raise ValueError(f"this checkpoint was saved by a BalancedOptimizer set up as {saved}; "
                             f"this one is {self._set_up()}: build the optimizer as the saved run did")
        optimizer_before, method_before = self.optimizer.state_dict(), self.method.state_dict()
        try:
            self.method.load_state_dict(state_dict["method"])
            if "optimizer" in state_dict:
                self.optimizer.load_state_dict(state_dict["optimizer"])
        except BaseException:
            self.method.load_state_dict(method_before)
            self.optimizer.load_state_dict(optimizer_before)
            raise
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.epoch = state_dict["epoch"]
        self._announced_epoch = state_dict.get("announced_epoch", self.epoch)
        self._step_count = state_dict["step"]

    def _set_up(self) -> dict:
        """What a checkpoint must match: the method (and its aggregator), the modalities in order."""
        method = type(self.method).__name__
        aggregator = getattr(self.method, "aggregator", None)
        if aggregator is not None:
            method += f"({getattr(aggregator, 'name', type(aggregator).__name__)})"
        return {"method": method, "modalities": list(self._layout.names)}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{n}: {e - s}" for n, (s, e) in zip(self._layout.names, self._layout.spans))
        return f"BalancedOptimizer({type(self.optimizer).__name__}, method={self.method!r}, modalities={{{sizes}}})"


def _called_by_grad_scaler(depth: int = 8) -> bool:
    """Whether an enabled ``torch.amp.GradScaler``'s method is among the callers of the caller (its
    ``step`` calls ``optimizer.step()`` through torch's step wrappers; a disabled one only calls
    ``step()``)."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        caller = frame.f_locals.get("self")
        if isinstance(caller, torch.amp.GradScaler):
            return caller.is_enabled()
        frame = frame.f_back
    return False
