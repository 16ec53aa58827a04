"""Diagnosing & Re-learning (Wei et al., ECCV 2024), METHODS.md §5.

Not gradient surgery but an epoch-level callback. Every ``every`` epochs (at most ``max_times``
times) the learning state of each modality encoder is diagnosed from the separability of its
features: the clustering purity ``P`` of its pooled features on the training split and on a held-out
validation split (MinMax scaling to [-1, 1], k-means with one cluster per class, each cluster
labelled with its majority class). A modality whose train/validation purities drift apart is
over-fitting ("well learnt"), so it is pushed back towards its initial weights the harder:

    alpha_m = tanh(lam * |P_train,m - P_val,m|)
    theta <- alpha_m * theta_init + (1 - alpha_m) * theta        for every parameter of encoder m

in place, so the optimizer's references and state (momentum) stay valid. Only parameters are
interpolated: BatchNorm running statistics (buffers) and every parameter outside the modality
declaration (the fusion head) are left alone. The interpolation is the fused per-segment op
:func:`mmgrad.ops.segment_lerp_` over one flat buffer per modality, device and dtype.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Mapping, Optional, Sequence

import torch

from mmgrad import ops
from mmgrad.buffers import SegmentTable
from mmgrad.distributed import local_tensor
from mmgrad.methods.base import params_of

__all__ = ["clustering_purity", "minmax_scale", "Relearning", "declared_parameters"]


def declared_parameters(modalities) -> dict[str, list[torch.Tensor]]:
    """The modality declaration as ``{name: [parameters]}``, from a
    :class:`~mmgrad.BalancedOptimizer` (its :attr:`~mmgrad.BalancedOptimizer.modalities`) or a
    mapping ``{name: nn.Module or parameters}`` as ``BalancedOptimizer`` takes it (a module
    contributes its parameters that require grad, as in the optimizer). A parameter may belong to
    one modality only."""
    from mmgrad.optim import BalancedOptimizer  # lazy: mmgrad.optim imports mmgrad.methods

    if isinstance(modalities, BalancedOptimizer):
        declared = modalities.modalities
    elif isinstance(modalities, Mapping):
        declared = {name: params_of(source) for name, source in modalities.items()}
    else:
        raise TypeError(
            "modalities must be a BalancedOptimizer or a mapping {name: nn.Module or parameters}, "
            f"got {type(modalities).__name__}"
        )
    if not declared:
        raise ValueError("modalities is empty: name at least one modality and its parameters")
    seen: dict[int, str] = {}
    for name, params in declared.items():
        if not isinstance(name, str):
            raise TypeError(f"modality names must be strings, got {name!r}")
        if not params:
            raise ValueError(f"modality {name!r} has no parameters")
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"modality {name!r} lists a {type(p).__name__}, not a tensor")
            if id(p) in seen:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} is in both modality {seen[id(p)]!r} and {name!r}")
            seen[id(p)] = name
    return declared


def minmax_scale(features: torch.Tensor) -> torch.Tensor:
    """Each column of ``features`` (N, d) mapped linearly onto [-1, 1] (min to -1, max to 1), as a
    float64 CPU tensor; a constant column becomes 0 (it carries no distance information)."""
    x = features.detach().to("cpu", torch.float64)
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"features must be (N, d) with N >= 1, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("features hold inf or NaN")
    lo, hi = x.min(0).values, x.max(0).values
    span = hi - lo
    varying = span > 0
    return torch.where(varying, 2 * (x - lo) / torch.where(varying, span, 1) - 1, torch.zeros_like(x))


def clustering_purity(
    features: torch.Tensor, labels: torch.Tensor, clusters: int, seed: int = 0, *, n_init: int = 10
) -> float:
    """Purity of a k-means clustering of ``features`` (N, d) against ``labels`` (N,): the fraction
    of samples whose label is the majority label of their cluster.

    Each feature column is MinMax-scaled to [-1, 1] first (:func:`minmax_scale`), then
    ``KMeans(n_clusters=clusters, random_state=seed, n_init=n_init)`` runs in float64. ``n_init`` is
    fixed explicitly (10, scikit-learn's default before 1.4 changed it to ``"auto"``, i.e. 1 run for
    k-means++) so that every scikit-learn version gives the same clustering. Needs scikit-learn.
    """
    try:
        from sklearn.cluster import KMeans
    except ImportError as exc:
        raise ImportError(
            "clustering_purity (Diagnosing & Re-learning) needs scikit-learn: pip install scikit-learn"
        ) from exc
    if features.dim() != 2:
        raise ValueError(f"features must be (N, d), got shape {tuple(features.shape)}")
    labels = _check_labels(labels, features.shape[0], "labels")
    n = features.shape[0]
    if not 1 <= clusters <= n:
        raise ValueError(f"clusters must be in [1, N={n}], got {clusters}")
    scaled = minmax_scale(features)
    assignment = KMeans(n_clusters=int(clusters), random_state=int(seed), n_init=int(n_init)).fit_predict(
        scaled.numpy()
    )
    assignment = torch.from_numpy(assignment).long()
    lab = labels.cpu()
    width = int(lab.max()) + 1
    counts = torch.zeros(int(clusters), width, dtype=torch.int64)
    counts.index_put_((assignment, lab), torch.ones_like(lab), accumulate=True)
    return float(counts.max(1).values.sum().item()) / n


def _check_labels(labels: torch.Tensor, n: Optional[int], what: str) -> torch.Tensor:
    if labels.dim() != 1 or (n is not None and labels.shape[0] != n):
        raise ValueError(f"{what} must be (N,){f' with N={n}' if n is not None else ''}, got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{what} must be integer class indices, got {labels.dtype}")
    labels = labels.detach().long()
    if n and int(labels.min()) < 0:
        raise ValueError(f"{what} must be non-negative class indices")
    return labels


class _Group:
    """The parameters of one modality on one device with one dtype, laid out back to back in a
    flat buffer (:class:`~mmgrad.buffers.SegmentTable`: one segment per parameter)."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        locals_ = [local_tensor(p) for p in params]
        numels = [t.numel() for t in locals_]
        offsets, total = [], 0
        for n in numels:
            offsets.append(total)
            total += n
        self.segments = SegmentTable(offsets, numels, total, locals_[0].device)
        with torch.no_grad():
            self.init = torch.cat([t.detach().reshape(-1) for t in locals_])  # a copy

    def flat_view(self) -> Optional[torch.Tensor]:
        """A 1-D view of the parameters' storage when they already lie back to back in one
        contiguous block (then the op works in place with no copy), else None."""
        ts = [local_tensor(p).detach() for p in self.params]
        first = ts[0]
        ptr = first.untyped_storage().data_ptr()
        expected = first.storage_offset()
        for t in ts:
            if not t.is_contiguous() or t.untyped_storage().data_ptr() != ptr or t.storage_offset() != expected:
                return None
            expected += t.numel()
        return first.as_strided((self.segments.total,), (1,), first.storage_offset())

    def lerp_(self, alpha: float) -> None:
        """theta <- alpha * theta_init + (1 - alpha) * theta, in place."""
        moved = [p for p in self.params if (p.dtype, p.device) != (self.init.dtype, self.init.device)]
        if moved:
            raise RuntimeError(
                f"Relearning kept the initial weights as {self.init.dtype} on {self.init.device}, but a "
                f"parameter is now {moved[0].dtype} on {moved[0].device} (model.to(...) after Relearning "
                "was built); build Relearning after moving or casting the model"
            )
        seg = self.segments
        # A float64 tensor: a Python float would become a float32 tensor (rounded) on its way in.
        weight = torch.full((len(seg),), alpha, dtype=torch.float64, device=seg.device)
        with torch.no_grad():
            flat = self.flat_view()
            if flat is not None:
                ops.segment_lerp_(flat, self.init, seg.offsets, seg.numels, weight)
                return
            flat = torch.cat([local_tensor(p).detach().reshape(-1) for p in self.params])
            ops.segment_lerp_(flat, self.init, seg.offsets, seg.numels, weight)
            for p, chunk in zip(self.params, flat.split(seg.host_numels)):
                t = local_tensor(p).detach()
                t.copy_(chunk.view(t.shape))


class Relearning:
    """Diagnosing & Re-learning: soft re-initialisation of each modality encoder by how much its
    feature separability differs between the training split and a held-out validation split.

    Args:
        modalities: a :class:`~mmgrad.BalancedOptimizer` or its modality declaration
            ``{name: nn.Module or parameters}``. The initial parameters ``theta_init`` are
            snapshot (cloned) here, so build it before training starts.
        lam: ``lambda`` in ``alpha_m = tanh(lam * gap_m)`` (3, ``move_lambda``).
        every: diagnose after every ``every``-th epoch (20, ``reinit_epoch``).
        max_times: at most this many re-initialisations (3, ``reinit_num``): epochs 20, 40, 60.
        clusters: k-means clusters; None uses the number of classes (max label + 1 over both splits).
        seed: k-means ``random_state`` (0, as the reference code).

    Usage, after each epoch's training::

        relearn = Relearning(opt)                       # or Relearning({"audio": ..., "visual": ...})
        for epoch in range(epochs):
            train_one_epoch(...)
            relearn.step(epoch, lambda: (train_feats, train_labels, val_feats, val_labels))

    where the features are each encoder's pooled outputs (``{name: (N, d_m)}``) extracted in eval
    mode. The held-out split must be a real validation split carved out of the training data:
    passing the test set (as BalanceMM does when a dataset has no validation split) lets the test
    labels steer training and makes the reported test accuracy optimistic.
    """

    def __init__(
        self,
        modalities,
        lam: float = 3.0,
        every: int = 20,
        max_times: int = 3,
        clusters: Optional[int] = None,
        seed: int = 0,
    ):
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam > 0):
            raise ValueError(f"lam must be a finite number > 0, got {lam!r}")
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be an int >= 1 (epochs between diagnoses), got {every!r}")
        if not (isinstance(max_times, int) and max_times >= 0):
            raise ValueError(f"max_times must be an int >= 0, got {max_times!r}")
        if clusters is not None and not (isinstance(clusters, int) and clusters >= 2):
            raise ValueError(f"clusters must be None (number of classes) or an int >= 2, got {clusters!r}")
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.lam = float(lam)
        self.every = every
        self.max_times = max_times
        self.clusters = clusters
        self.seed = seed
        declared = declared_parameters(modalities)
        self.names = list(declared)
        self._groups: dict[str, list[_Group]] = {}
        for name, params in declared.items():
            by_kind: dict[tuple, list[torch.Tensor]] = {}
            for p in params:
                if p.is_sparse or p.layout != torch.strided:
                    raise ValueError(f"modality {name!r} has a sparse parameter; only dense parameters are supported")
                if not p.dtype.is_floating_point:
                    raise ValueError(f"modality {name!r} has a {p.dtype} parameter; only floating-point ones are supported")
                if local_tensor(p).numel():
                    by_kind.setdefault((local_tensor(p).device, p.dtype), []).append(p)
            self._groups[name] = [_Group(ps) for ps in by_kind.values()]
        #: Re-initialisations done so far.
        self.count = 0
        #: One entry per re-initialisation: ``{"epoch": int or None, "alpha": {name: float}}``.
        self.history: list[dict] = []
        #: ``{name: (P_train, P_val)}`` of the last :meth:`diagnose`.
        self.last_purity: dict[str, tuple[float, float]] = {}

    # --- diagnosing -------------------------------------------------------------------------------

    def diagnose(
        self,
        train: Mapping[str, torch.Tensor],
        train_labels: torch.Tensor,
        val: Mapping[str, torch.Tensor],
        val_labels: torch.Tensor,
    ) -> dict[str, float]:
        """``{name: alpha_m}`` with ``alpha_m = tanh(lam * |P_train,m - P_val,m|)`` for every
        modality in ``train`` (``val`` must have the same ones), ``P`` the
        :func:`clustering_purity` of the features ``(N, d_m)``. ``val`` must be a held-out
        validation split, not the test set."""
        if set(train) != set(val):
            raise ValueError(f"train and val must hold the same modalities, got {sorted(train)} and {sorted(val)}")
        unknown = [m for m in train if m not in self._groups]
        if unknown:
            raise KeyError(f"modalities {unknown} are not in the declaration {self.names}")
        if not train:
            raise ValueError("no features to diagnose")
        train_labels = _check_labels(train_labels, None, "train_labels")
        val_labels = _check_labels(val_labels, None, "val_labels")
        if not (train_labels.numel() and val_labels.numel()):
            raise ValueError("the train and val splits must each hold at least one sample")
        for split, feats, labels in (("train", train, train_labels), ("val", val, val_labels)):
            for m, z in feats.items():
                if z.dim() != 2 or z.shape[0] != labels.shape[0]:
                    raise ValueError(
                        f"{split}[{m!r}] must be (N, d) with N={labels.shape[0]} (its labels), got {tuple(z.shape)}"
                    )
        k = self.clusters
        if k is None:
            k = int(max(int(train_labels.max()), int(val_labels.max()))) + 1
        alpha, purity = {}, {}
        for m in self.names:
            if m not in train:
                continue
            p_train = clustering_purity(train[m], train_labels, k, self.seed)
            p_val = clustering_purity(val[m], val_labels, k, self.seed)
            purity[m] = (p_train, p_val)
            alpha[m] = math.tanh(self.lam * abs(p_train - p_val))
        self.last_purity = purity
        return alpha

    # --- re-learning ------------------------------------------------------------------------------

    def relearn(self, alpha: Mapping[str, float], epoch: Optional[int] = None) -> None:
        """``theta <- alpha_m * theta_init + (1 - alpha_m) * theta`` for every parameter of each
        modality in ``alpha`` (modalities left out are not touched), in place under ``no_grad``.
        Counts as one re-initialisation (recorded in :attr:`history` with ``epoch``)."""
        unknown = [m for m in alpha if m not in self._groups]
        if unknown:
            raise KeyError(f"modalities {unknown} are not in the declaration {self.names}")
        values = {}
        for m, a in alpha.items():
            a = float(a)
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"alpha[{m!r}] must be in [0, 1], got {a}")
            values[m] = a
        for m in self.names:
            if values.get(m, 0.0) != 0.0:  # alpha = 0 leaves the weights as they are
                for group in self._groups[m]:
                    group.lerp_(values[m])
        self.count += 1
        self.history.append({"epoch": epoch, "alpha": {m: values[m] for m in self.names if m in values}})

    def due(self, epoch: int) -> bool:
        """True after epochs ``every, 2 * every, ...`` until ``max_times`` re-initialisations, and
        never again for an epoch at or before the last re-initialisation :meth:`step` recorded (a
        run resumed from a checkpoint taken right after one does not repeat it)."""
        done = [h["epoch"] for h in self.history if h["epoch"] is not None]
        if done and epoch <= max(done):
            return False
        return epoch > 0 and epoch % self.every == 0 and self.count < self.max_times

    def step(self, epoch: int, features_fn: Callable[[], Sequence]) -> Optional[dict[str, float]]:
        """Call after each epoch's training. When :meth:`due`, ``features_fn()`` returns
        ``(train_feats, train_labels, val_feats, val_labels)`` (see :meth:`diagnose`); the
        modalities are diagnosed and re-learnt and the alphas returned. Otherwise returns None
        without calling ``features_fn``."""
        if not self.due(epoch):
            return None
        train, train_labels, val, val_labels = features_fn()
        alpha = self.diagnose(train, train_labels, val, val_labels)
        self.relearn(alpha, epoch=epoch)
        return alpha

    # --- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """``theta_init`` (one flat tensor per modality, device and dtype), the re-initialisation
        count and the history of alphas."""
        return {
            "init": {m: [g.init.clone() for g in groups] for m, groups in self._groups.items()},
            "count": self.count,
            "history": copy.deepcopy(self.history),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict` into a Relearning built over the same declaration (a resumed
        run then re-initialises towards the original ``theta_init``)."""
        init = state["init"]
        if list(init) != self.names:
            raise ValueError(f"state holds modalities {list(init)}, this Relearning has {self.names}")
        for m, groups in self._groups.items():
            saved = init[m]
            if len(saved) != len(groups) or any(
                s.shape != g.init.shape or s.dtype != g.init.dtype for s, g in zip(saved, groups)
            ):
                raise ValueError(f"the saved theta_init of modality {m!r} does not match its parameters")
        for m, groups in self._groups.items():
            for s, g in zip(init[m], groups):
                g.init.copy_(s)
        self.count = int(state["count"])
        self.history = copy.deepcopy(list(state["history"]))

    def __repr__(self) -> str:
        return (
            f"Relearning(lam={self.lam}, every={self.every}, max_times={self.max_times}, "
            f"modalities={self.names}, done={self.count})"
        )
