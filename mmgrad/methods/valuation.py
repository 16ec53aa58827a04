"""Sample-level and modality-level modality valuation (Wei et al., CVPR 2024), METHODS.md §6.

A data method, not gradient surgery. After an epoch's training every training sample is valued:
the exact Shapley value ``phi_m`` of each modality in a game whose coalitions are subsets of
modalities, played by the shared fusion head with the features of the modalities outside the
coalition zeroed (:func:`modality_shapley`). Modalities that contribute little get extra training
rows in which only they feed the head:

* sample level (:class:`ValuationResampler` with ``level="sample"``): per sample and modality, 0 to
  3 extra copies by the bucket of ``phi_m`` (:func:`resample_copies`);
* modality level (``level="modality"``): the mean ``phi`` over a random part of the training set
  gives each modality's gap ``1 - mean phi_m``; ``int(p * N)`` random rows keep only the modality
  with the largest gap, ``p`` growing with the spread of the gaps.

The plan (:class:`Resampled`: sample indices and per-row modality masks) is what the training loop
needs: :func:`epoch_rows` or :class:`ResampledDataset` append the extra rows to the originals, and
:func:`mask_features` zeroes the dropped modalities' features of a batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch.utils.data import Dataset

from mmgrad.methods.base import modality_names
from mmgrad.nn import shapley_values

__all__ = [
    "modality_shapley",
    "resample_copies",
    "Resampled",
    "ValuationResampler",
    "epoch_rows",
    "mask_features",
    "ResampledDataset",
]

_LEVELS = ("sample", "modality")
_FUNCS = ("linear", "tanh", "pow")


def _column_order(features: Mapping[str, torch.Tensor], names: Optional[Sequence[str]]) -> list[str]:
    """The modality of each column: ``names`` (which must name exactly the keys of ``features``)
    or the keys in their order."""
    if not features:
        raise ValueError("features is empty")
    if names is None:
        return list(features)
    names = list(names)
    if sorted(names) != sorted(features):
        raise ValueError(f"names {names} must list exactly the modalities of features {list(features)}")
    return names


def modality_shapley(
    head: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    features: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    size_weighted: bool = True,
    names: Optional[Sequence[str]] = None,
) -> torch.Tensor:
    """Exact per-sample Shapley values of the modalities, (N, M) float64, columns in ``names``
    order (pass ``names=resampler.names`` for :meth:`ValuationResampler.plan`; default: the
    order of ``features``, whose keys must then be listed in that order).

    ``head(features)`` maps ``{name: (N, d_m)}`` to logits (N, C). The value of a coalition S of
    modalities for sample i is ``v(S) = |S| * 1[argmax head(features with the modalities outside S
    zeroed)_i = y_i]`` (``size_weighted=True``, the paper's code: ``v({a, v}) = 2 * correct``) or
    ``1[correct]`` (``size_weighted=False``, BalanceMM), and ``v(empty) = 0`` (no head call). The
    head runs ``2^M - 1`` times under ``no_grad``; call it with the model in eval mode. For two
    modalities ``phi_a = (v_a + v_av - v_v) / 2`` takes values in {-0.5, 0, 0.5, 1, 1.5}.
    """
    names = _column_order(features, names)
    if labels.dim() != 1:
        raise ValueError(f"labels must be (N,), got shape {tuple(labels.shape)}")
    n = labels.shape[0]
    for m, z in features.items():
        if z.shape[:1] != (n,):
            raise ValueError(f"features[{m!r}] must have N={n} rows (as labels), got shape {tuple(z.shape)}")
    labels = labels.detach()

    def value(coalition: frozenset) -> torch.Tensor:
        if not coalition:
            return torch.zeros(n, dtype=torch.float64, device=labels.device)
        logits = head({m: (z if m in coalition else torch.zeros_like(z)) for m, z in features.items()})
        if logits.dim() != 2 or logits.shape[0] != n:
            raise ValueError(f"head must return logits (N={n}, C), got shape {tuple(logits.shape)}")
        correct = (logits.argmax(1) == labels.to(logits.device)).to(torch.float64).to(labels.device)
        return correct * len(coalition) if size_weighted else correct

    with torch.no_grad():
        phi = shapley_values(names, value)
    return torch.stack([phi[m] for m in names], dim=1)


def resample_copies(phi: torch.Tensor) -> torch.Tensor:
    """Extra copies per sample and modality for the sample-level method (METHODS.md §6.2), an
    int64 tensor shaped like ``phi``:

    ========================  ======
    ``phi``                   copies
    ========================  ======
    ``phi >= 1``              0
    ``0.4 < phi < 1``         1
    ``-0.1 < phi <= 0.4``     2
    ``phi <= -0.1``           3
    ========================  ======

    For two modalities (values in {-0.5, 0, 0.5, 1, 1.5}) this is the reference code's table; its
    strict inequalities leave the boundaries 0.4 and -0.1 out (no copies) and put the top bound at
    0.9. Those values only occur with more modalities, where the closed intervals chosen here keep
    the number of copies non-increasing in ``phi``.
    """
    copies = torch.zeros(phi.shape, dtype=torch.int64, device=phi.device)
    copies[(phi > 0.4) & (phi < 1)] = 1
    copies[(phi > -0.1) & (phi <= 0.4)] = 2
    copies[phi <= -0.1] = 3
    return copies


@dataclass
class Resampled:
    """The extra training rows of one epoch.

    Attributes:
        index: (R,) int64, the training-set index of each extra row's sample.
        keep: (R, M) bool, which modalities feed the head for that row (the others' features are
            zeroed), columns in ``names`` order.
        names: the modality names.
    """

    index: torch.Tensor
    keep: torch.Tensor
    names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return self.index.shape[0]


def _empty_plan(names: tuple[str, ...]) -> Resampled:
    return Resampled(torch.zeros(0, dtype=torch.int64), torch.zeros(0, len(names), dtype=torch.bool), names)


class ValuationResampler:
    """Plans each epoch's extra training rows from per-sample Shapley values.

    Args:
        modalities: a :class:`~mmgrad.BalancedOptimizer`, its declaration ``{name: module or
            parameters}`` or the modality names; fixes the column order of the Shapley values and
            masks. At least two modalities.
        level: ``"sample"`` (fine-grained, :func:`resample_copies` per sample and modality) or
            ``"modality"`` (coarse, one modality for the whole epoch).
        part_ratio: modality level: the fraction of the training set, drawn with replacement,
            whose mean Shapley values estimate the gaps (0.2), in (0, 1].
        alpha: modality level: strength of the re-sampling ratio (1.0), > 0.
        func: modality level: ``p`` from ``d = (max gap - min gap) * 2 / 3``: ``"linear"``
            ``alpha * d`` (default), ``"tanh"`` ``tanh(alpha * d)``, ``"pow"`` ``alpha * d ** 1.5``
            (the reference code's ``'square'`` variant, with alpha outside the power as there).
        start_epoch: :meth:`plan` given an earlier ``epoch`` plans nothing (4: warm-up of 5 epochs,
            re-sampling after the training of epoch ``warmup - 1`` on).
        seed: the modality level's random draws use a ``torch.Generator`` seeded with
            ``seed + epoch`` (``seed + calls so far`` when no epoch is given), so a resumed run
            draws the same rows.

    Modality level with two modalities is the paper's rule: ``gap_m = 1 - mean phi_m``, ``p`` from
    ``|gap_a - gap_v|``, and the extra rows keep the weaker modality (larger gap) and zero the
    stronger. With more modalities the same rule generalises as: keep only the modality with the
    largest gap, ``p`` from the largest minus the smallest gap.

    Usage, after each epoch's training (features from the model in eval mode)::

        phi = modality_shapley(model.head, feats, labels, names=resampler.names)
        extra = resampler.plan(phi, epoch)
        index, keep = epoch_rows(len(train_set), extra)     # shuffle the rows into batches
    """

    def __init__(
        self,
        modalities,
        level: str = "sample",
        part_ratio: float = 0.2,
        alpha: float = 1.0,
        func: str = "linear",
        start_epoch: int = 4,
        seed: int = 0,
    ):
        if level not in _LEVELS:
            raise ValueError(f"level must be one of {_LEVELS}, got {level!r}")
        if func not in _FUNCS:
            raise ValueError(f"func must be one of {_FUNCS}, got {func!r}")
        if not (isinstance(part_ratio, (int, float)) and 0 < part_ratio <= 1):
            raise ValueError(f"part_ratio must be in (0, 1], got {part_ratio!r}")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        if not (isinstance(start_epoch, int) and start_epoch >= 0):
            raise ValueError(f"start_epoch must be an int >= 0, got {start_epoch!r}")
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.names = tuple(modality_names(modalities, at_least=2, method="modality valuation"))
        self.level = level
        self.part_ratio = float(part_ratio)
        self.alpha = float(alpha)
        self.func = func
        self.start_epoch = start_epoch
        self.seed = seed
        #: Calls to :meth:`plan` that planned rows (the generator offset when no epoch is given).
        self.calls = 0
        #: Modality level: the gaps ``1 - mean phi_m`` (M,) and ratio ``p`` of the last plan.
        self.last_gaps: Optional[torch.Tensor] = None
        self.last_ratio: Optional[float] = None

    def ratio(self, gaps: torch.Tensor) -> float:
        """Modality level: the fraction ``p`` of N extra rows for the gaps (M,)."""
        d = float(gaps.max() - gaps.min()) * 2 / 3
        if self.func == "linear":
            return self.alpha * d
        if self.func == "tanh":
            return math.tanh(self.alpha * d)
        return self.alpha * d**1.5

    def plan(self, shapley: torch.Tensor, epoch: Optional[int] = None) -> Resampled:
        """The extra rows for the next epoch from the Shapley values (N, M) of the training set
        (:func:`modality_shapley`, columns in :attr:`names` order). Nothing before
        ``start_epoch``. Returned tensors live on the CPU (they index a dataset)."""
        if shapley.dim() != 2 or shapley.shape[1] != len(self.names):
            raise ValueError(
                f"shapley must be (N, M={len(self.names)}) for modalities {list(self.names)}, "
                f"got shape {tuple(shapley.shape)}"
            )
        phi = shapley.detach().to("cpu", torch.float64)
        if not torch.isfinite(phi).all():
            raise ValueError("shapley holds inf or NaN")
        if epoch is not None and epoch < self.start_epoch:
            return _empty_plan(self.names)
        draw = self.seed + (epoch if epoch is not None else self.calls)
        self.calls += 1
        if self.level == "sample":
            return self._sample_level(phi)
        return self._modality_level(phi, draw)

    def _sample_level(self, phi: torch.Tensor) -> Resampled:
        n, M = phi.shape
        copies = resample_copies(phi)
        samples = torch.arange(n)
        index = torch.cat([samples.repeat_interleave(copies[:, m]) for m in range(M)])
        owner = torch.cat([torch.full((int(copies[:, m].sum()),), m, dtype=torch.int64) for m in range(M)])
        keep = torch.nn.functional.one_hot(owner, M).bool()
        return Resampled(index, keep, self.names)

    def _modality_level(self, phi: torch.Tensor, draw: int) -> Resampled:
        n, M = phi.shape
        if n == 0:
            return _empty_plan(self.names)
        gen = torch.Generator().manual_seed(draw)
        part = max(1, int(n * self.part_ratio))
        subset = torch.randint(0, n, (part,), generator=gen)
        gaps = 1.0 - phi[subset].mean(0)
        p = self.ratio(gaps)
        self.last_gaps, self.last_ratio = gaps, p
        count = int(p * n)
        index = torch.randint(0, n, (count,), generator=gen)
        keep = torch.zeros(count, M, dtype=torch.bool)
        keep[:, int(gaps.argmax())] = True  # the weakest modality (largest gap) alone
        return Resampled(index, keep, self.names)

    def state_dict(self) -> dict:
        """The seed, the number of plans made (the draw offset when no epoch is given) and the last
        modality-level gaps and ratio; :meth:`load_state_dict` restores them, seed included, so a
        resumed run draws the same rows."""
        return {
            "seed": self.seed,
            "calls": self.calls,
            "last_gaps": None if self.last_gaps is None else self.last_gaps.clone(),
            "last_ratio": self.last_ratio,
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.seed = int(state["seed"])
        self.calls = int(state["calls"])
        self.last_gaps = None if state["last_gaps"] is None else state["last_gaps"].clone()
        self.last_ratio = state["last_ratio"]

    def __repr__(self) -> str:
        return (
            f"ValuationResampler(level={self.level!r}, modalities={list(self.names)}, part_ratio={self.part_ratio}, "
            f"alpha={self.alpha}, func={self.func!r}, start_epoch={self.start_epoch})"
        )


def epoch_rows(n_train: int, resampled: Resampled) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows of an epoch: the ``n_train`` originals (every modality kept) followed by the extra
    rows. Returns ``index`` (N + R,) int64 and ``keep`` (N + R, M) bool; shuffle them together
    into batches and multiply each modality's features by ``keep[:, m]``."""
    index, keep = resampled.index.cpu().long(), resampled.keep.cpu().bool()
    if keep.dim() != 2 or keep.shape[0] != index.shape[0]:
        raise ValueError(f"keep must be (R={index.shape[0]}, M), got shape {tuple(keep.shape)}")
    if index.numel() and not (0 <= int(index.min()) and int(index.max()) < n_train):
        raise ValueError(f"resampled indices must lie in [0, {n_train})")
    M = keep.shape[1]
    return (
        torch.cat([torch.arange(n_train), index]),
        torch.cat([torch.ones(n_train, M, dtype=torch.bool), keep]),
    )


def mask_features(features: Mapping[str, torch.Tensor], keep: torch.Tensor,
                  names: Optional[Sequence[str]] = None) -> dict[str, torch.Tensor]:
    """``{name: z * keep[:, m]}`` for a batch: zero each row's dropped modalities (columns of
    ``keep`` (B, M) in ``names`` order: pass :attr:`Resampled.names`; default: ``features``
    order)."""
    names = _column_order(features, names)
    if keep.dim() != 2 or keep.shape[1] != len(names):
        raise ValueError(f"keep must be (B, M={len(names)}), got shape {tuple(keep.shape)}")
    out = {}
    for m, name in enumerate(names):
        z = features[name]
        if z.shape[0] != keep.shape[0]:  # a (1, M) keep would broadcast row 0's mask over the batch
            raise ValueError(f"keep has {keep.shape[0]} rows but features[{name!r}] has {z.shape[0]}: "
                             "one keep row per sample")
        k = keep[:, m].to(device=z.device, dtype=torch.bool)
        # where, not a product: a dropped row is exactly zero even if its features are not finite
        out[name] = torch.where(k.view(-1, *([1] * (z.dim() - 1))), z, torch.zeros((), dtype=z.dtype, device=z.device))
    return out


class ResampledDataset(Dataset):
    """``base_dataset`` plus an epoch's extra rows: item ``i`` is ``(base_dataset[j], keep_row)``
    with ``j, keep_row`` row ``i`` of :func:`epoch_rows` (originals first, every modality kept)."""

    def __init__(self, base_dataset, resampled: Resampled):
        self.base = base_dataset
        self.index, self.keep = epoch_rows(len(base_dataset), resampled)

    def __len__(self) -> int:
        return self.index.shape[0]

    def __getitem__(self, i: int):
        return self.base[int(self.index[i])], self.keep[i]
