"""Late-fusion models for the recipes: one encoder per modality, a concat or sum fusion head, and
optional unimodal heads (METHODS.md §1).

Any ``nn.Module`` that maps a modality's (N, d) features to (N, F) and exposes ``out_features``
can be an encoder: :class:`MLPEncoder` is the default, :class:`ConvEncoder` shows a convolutional
one (it views the flat features as an image of the data set's ``shapes[m]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

import mmgrad.nn

__all__ = ["MLPEncoder", "ConvEncoder", "MultimodalNet", "ModelOutput", "build_model"]


class MLPEncoder(nn.Module):
    """``in_features -> hidden... -> out_features`` with ReLU after every layer (the last one too,
    so the features are non-negative like a ResNet's pooled features)."""

    def __init__(self, in_features: int, hidden: Sequence[int] = (64,), out_features: int = 32):
        super().__init__()
        dims = [in_features, *hidden, out_features]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers)
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvEncoder(nn.Module):
    """A small CNN over flat features viewed as ``shape`` (C, H, W): two blocks of 3x3 conv, ReLU
    and 2x2 max-pooling, then a linear layer to ``out_features`` and ReLU. The flattened map keeps
    where strokes are (global pooling would not: a digit's identity is in its layout). Its conv
    kernels are what OGM's default ``params="conv"`` modulates."""

    def __init__(self, shape: Sequence[int], channels: int = 16, out_features: int = 32):
        super().__init__()
        if len(shape) != 3:
            raise ValueError(f"ConvEncoder needs an image shape (C, H, W), got {tuple(shape)}")
        self.shape = tuple(int(s) for s in shape)
        c, h, w = self.shape
        self.net = nn.Sequential(
            nn.Conv2d(c, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Flatten(),
            nn.Linear(2 * channels * (-(-h // 4)) * (-(-w // 4)), out_features), nn.ReLU(),
        )
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.view(x.shape[0], *self.shape))


@dataclass
class ModelOutput:
    """``fused`` (N, C) logits; ``features[m]`` (N, F_m) encoder outputs; ``unimodal[m]`` logits of
    the unimodal heads (empty when the model has none)."""

    fused: torch.Tensor
    features: dict[str, torch.Tensor]
    unimodal: dict[str, torch.Tensor]


class MultimodalNet(nn.Module):
    """Encoders + late fusion head (+ unimodal heads).

    Args:
        encoders: ``{modality: encoder}`` (order = concatenation order); each has ``out_features``.
        classes: number of classes.
        fusion: ``"concat"`` (``W [z_1; ...; z_M] + b``), ``"sum"`` (``sum_m W_m z_m + b_m``) or
            ``"crmt"`` (:class:`mmgrad.methods.crmt.CRMTHead`: orthogonal-normalised split head with
            per-class integration weights).
        unimodal_heads: add a linear classifier per modality (for methods with unimodal losses).

    The fusion head and the unimodal heads are created after the encoders, so the encoders'
    initialisation under a given seed does not depend on ``unimodal_heads``.
    """

    def __init__(self, encoders: Mapping[str, nn.Module], classes: int, fusion: str = "concat", unimodal_heads: bool = False):
        super().__init__()
        if fusion not in ("concat", "sum", "crmt"):
            raise ValueError(f"fusion must be 'concat', 'sum' or 'crmt', got {fusion!r}")
        self.modalities = list(encoders)
        self.fusion_type = fusion
        self.encoders = nn.ModuleDict(encoders)
        widths = {m: e.out_features for m, e in encoders.items()}
        if fusion == "concat":
            self.fusion = nn.Linear(sum(widths.values()), classes)
        elif fusion == "crmt":
            from mmgrad.methods.crmt import CRMTHead

            self.fusion = CRMTHead(widths, classes)
        else:
            self.fusion = nn.ModuleDict({m: nn.Linear(w, classes) for m, w in widths.items()})
        self.unimodal = None
        if unimodal_heads:
            self.unimodal = nn.ModuleDict({m: nn.Linear(w, classes) for m, w in widths.items()})

    def head(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Fused logits from encoder features (zero a modality's features to drop it)."""
        if self.fusion_type == "concat":
            return self.fusion(torch.cat([features[m] for m in self.modalities], dim=1))
        if self.fusion_type == "crmt":
            return self.fusion(features).fused
        return sum(self.fusion[m](features[m]) for m in self.modalities)

    def head_parts(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each modality's part of the fusion head (the OGM convention): the concat head's columns
        of m plus bias/M, for sum fusion m's own linear layer with its full bias, for the CRMT head
        ``a_m * h_m + bias/M``."""
        if self.fusion_type == "concat":
            return mmgrad.nn.split_concat_logits(self.fusion, {m: features[m] for m in self.modalities})
        if self.fusion_type == "crmt":
            out = self.fusion(features)
            a = self.fusion.integration_matrix()
            bias = self.fusion.bias / len(self.modalities) if self.fusion.bias is not None else 0.0
            return {m: a[k] * out.unimodal[m] + bias for k, m in enumerate(self.modalities)}
        return {m: self.fusion[m](features[m]) for m in self.modalities}

    def encode(self, xs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each modality's encoder features."""
        return {m: self.encoders[m](xs[m]) for m in self.modalities}

    def outputs(self, z: Mapping[str, torch.Tensor]) -> ModelOutput:
        """Fused (and unimodal-head) logits from encoder features ``z`` (forward-level methods such
        as OPM edit the features between :meth:`encode` and this)."""
        uni = {m: self.unimodal[m](z[m]) for m in self.modalities} if self.unimodal is not None else {}
        return ModelOutput(self.head(z), dict(z), uni)

    def forward(self, xs: Mapping[str, torch.Tensor]) -> ModelOutput:
        return self.outputs(self.encode(xs))


def build_model(
    shapes: Mapping[str, Sequence[int]],
    classes: int,
    *,
    encoder: str | Mapping[str, str] = "mlp",
    hidden: Sequence[int] = (64,),
    features: int = 32,
    fusion: str = "concat",
    unimodal_heads: bool = False,
    conv_channels: int = 16,
) -> MultimodalNet:
    """A :class:`MultimodalNet` for modalities of the given input ``shapes``.

    ``encoder`` is ``"mlp"``, ``"conv"`` (modalities with an image shape get a
    :class:`ConvEncoder`, the others an MLP) or a ``{modality: kind}`` mapping.
    """
    encoders = {}
    for m, shape in shapes.items():
        kind = encoder.get(m, "mlp") if isinstance(encoder, Mapping) else encoder
        if kind not in ("mlp", "conv"):
            raise ValueError(f"encoder kind must be 'mlp' or 'conv', got {kind!r}")
        if kind == "conv" and len(shape) == 3:
            encoders[m] = ConvEncoder(shape, conv_channels, features)
        else:
            d = 1
            for s in shape:
                d *= int(s)
            encoders[m] = MLPEncoder(d, hidden, features)
    return MultimodalNet(encoders, classes, fusion=fusion, unimodal_heads=unimodal_heads)
