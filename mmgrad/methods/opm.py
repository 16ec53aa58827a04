"""OPM: on-the-fly prediction modulation (Wei et al., BML / TPAMI 2024), METHODS.md §3.2.

A forward-pass method: it sits between the encoders and the fusion head and drops the dominant
modality's features. Per training batch:

1. confidence scores ``s_m = sum_i softmax(o_m.detach())[i, y_i]`` from the unimodal logits
   (the split fusion head, :func:`mmgrad.nn.split_concat_logits`);
2. ``rho_m = s_m / sum_{j != m} s_j`` (``s_m / s_other`` for two modalities; BalanceMM's rule for
   more) and ``q_m = clip(q_base (1 + lam tanh(relu(rho_m - 1))), 0, 1)`` where
   ``tanh(relu(rho_m - 1)) > 0``, else 0: only a dominant modality is dropped;
3. with probability ``p_exe`` the batch is modulated: each sample's modality m is dropped with
   probability ``q_m`` and every feature is rescaled by ``1 / (1 - theta)``, ``theta`` the
   dimension-weighted mean of ``q`` (one fused pass, :func:`mmgrad.ops.feature_drop`);
4. the loss is taken over the samples that kept at least one modality (:meth:`OPM.loss`).

Everything stays on the device: the execution draw and the masks come from one counter-based
Philox stream whose counter is a buffer advanced in place, so a training step never synchronises
with the host, replays in a CUDA graph, and a run resumed from ``state_dict`` draws the same masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mmgrad import ops
from mmgrad.methods.base import modality_names
from mmgrad.methods.ogm import confidence_scores

__all__ = ["OPM", "OPMOutput", "opm_drop_probabilities", "others_sum_ratio"]


def others_sum_ratio(scores: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """``rho_m = s_m / (sum_{j != m} s_j + eps)`` for the scores (M,): ``s_m / s_other`` for two
    modalities, BalanceMM's OPM rule for more. The masked sum keeps the M = 2 case exact."""
    M = scores.numel()
    off = ~torch.eye(M, dtype=torch.bool, device=scores.device)
    others = (scores[None, :] * off).sum(1)
    return scores / (others + eps)


def opm_drop_probabilities(ratio: torch.Tensor, q_base: float, lam: float) -> torch.Tensor:
    """``q = clip(q_base (1 + lam tanh(relu(rho - 1))), 0, 1)`` where ``tanh(relu(rho - 1)) > 0``,
    else 0 (METHODS.md §3.2: the ramp uses ``rho - 1``, so ``rho <= 1`` never drops)."""
    t = torch.tanh(torch.relu(ratio - 1))
    q = (q_base * (1 + lam * t)).clamp(0, 1)
    return torch.where(t > 0, q, torch.zeros_like(q))


@dataclass
class OPMOutput:
    """What :meth:`OPM.forward` returns.

    Attributes:
        features: ``{modality: (N, d_m)}`` dropped and rescaled, in modality order (views of one
            (N, D) tensor); the input tensors themselves when OPM is inactive.
        keep: (N, M) bool, ``keep[i, m]`` is False where sample i's modality m was dropped.
        alive: (N,) bool, the samples that kept at least one modality.
        drop_prob: (M,) float64, the drop probabilities applied this batch (0 when not executed).
        executed: 0-dim bool, whether dropping ran on this batch.
    """

    features: dict[str, torch.Tensor]
    keep: torch.Tensor
    alive: torch.Tensor
    drop_prob: torch.Tensor
    executed: torch.Tensor

    def select(self, fused_logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The surviving samples' logits and targets, literally removed as in the reference code.
        The shape depends on the data, so this synchronises with the host; :meth:`OPM.loss` gives
        the same loss and gradient without it."""
        index = self.alive.nonzero().squeeze(1)
        return fused_logits.index_select(0, index), targets.index_select(0, index)


class OPM(nn.Module):
    """On-the-fly prediction modulation: drops the dominant modality's features in the forward pass.

    Args:
        modalities: the modality names in fusion (concatenation) order, or a
            :class:`~mmgrad.BalancedOptimizer` / ``{name: params}`` mapping (its keys).
        q_base: base drop probability of the dominant modality (0.4 in the reference config, 0.5
            in its training script).
        lam: how much the drop probability grows with the discrepancy (``alpha`` in BalanceMM).
        p_exe: probability that a batch is modulated.
        start_epoch: first epoch (see :meth:`set_epoch`) in which OPM is active; before it, and in
            eval mode, OPM is the identity. The reference code starts after a warm-up of 5 epochs.
        seed: key of the Philox stream of the masks and execution draws.
        eps: added to the denominator of the discrepancy ratio.

    Usage::

        opm = OPM(["audio", "visual"])
        z = {"audio": enc_a(xa), "visual": enc_v(xv)}
        uni = mmgrad.nn.split_concat_logits(head, z)          # measurement only (detached inside)
        out = opm(z, uni, y)
        logits = head(torch.cat(list(out.features.values()), 1))
        loss = OPM.loss(logits, y, out)

    State (``state_dict``): the seed and the stream counter (buffers) and the epoch.
    """

    def __init__(
        self,
        modalities,
        q_base: float = 0.4,
        lam: float = 0.5,
        p_exe: float = 0.7,
        start_epoch: int = 0,
        seed: int = 0,
        eps: float = 1e-8,
    ):
        super().__init__()
        self.names = modality_names(modalities, at_least=2, method="OPM")
        if not 0 <= q_base <= 1:
            raise ValueError(f"q_base must be in [0, 1], got {q_base}")
        if not 0 <= lam < float("inf"):
            raise ValueError(f"lam must be a finite number >= 0, got {lam}")
        if start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
        if not 0 <= p_exe <= 1:
            raise ValueError(f"p_exe must be in [0, 1], got {p_exe}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not 0 <= int(seed) < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        self.q_base = float(q_base)
        self.lam = float(lam)
        self.p_exe = float(p_exe)
        self.start_epoch = int(start_epoch)
        self.eps = float(eps)
        self.epoch = 0
        self.register_buffer("seed", torch.tensor(int(seed), dtype=torch.int64))
        self.register_buffer("counter", torch.zeros((), dtype=torch.int64))

    def set_epoch(self, epoch: int) -> None:
        """Tell OPM which epoch runs now (it is active from ``start_epoch`` on)."""
        self.epoch = int(epoch)

    @property
    def active(self) -> bool:
        """Whether the next forward pass may drop features (training mode, from ``start_epoch``)."""
        return self.training and self.epoch >= self.start_epoch

    def forward(
        self, features: Mapping[str, torch.Tensor], logits: Mapping[str, torch.Tensor], targets: torch.Tensor
    ) -> OPMOutput:
        """Modulate one batch: ``features`` ``{modality: (N, d_m)}``, ``logits`` the unimodal
        logits ``{modality: (N, C)}`` (only measured: detached), ``targets`` (N,) class indices.

        Draws from the stream: position ``counter`` decides execution, positions ``counter + 1 +
        i*M + m`` the masks; the counter then advances by ``N*M + 1``, whether or not dropping ran.
        """
        zs = []
        for name in self.names:
            if name not in features:
                raise KeyError(f"features has no entry for modality {name!r}; got {sorted(features)}")
            z = features[name]
            if z.dim() != 2:
                raise ValueError(f"features[{name!r}] must be (N, d), got shape {tuple(z.shape)}")
            zs.append(z)
        N, device = zs[0].shape[0], zs[0].device
        if any(z.shape[0] != N or z.device != device for z in zs):
            raise ValueError("every modality's features must have the same number of samples and device")
        if targets.shape[:1] != (N,):
            raise ValueError(f"targets has shape {tuple(targets.shape)} but the features have N={N} samples: "
                             "features, logits and targets must come from the same batch")
        M = len(self.names)
        if not self.active:
            return OPMOutput(
                features={name: z for name, z in zip(self.names, zs)},
                keep=torch.ones(N, M, dtype=torch.bool, device=device),
                alive=torch.ones(N, dtype=torch.bool, device=device),
                drop_prob=torch.zeros(M, dtype=torch.float64, device=device),
                executed=torch.zeros((), dtype=torch.bool, device=device),
            )
        self._to_device(device)
        scores = confidence_scores(logits, targets, self.names)
        q = opm_drop_probabilities(others_sum_ratio(scores, self.eps), self.q_base, self.lam)
        # The execution draw u = philox_uniform(seed, counter) through the fused op: a zero-width
        # "modality" with drop probability p_exe is kept iff u >= p_exe (one launch instead of the
        # reference Philox's ~100 small kernels).
        p_exe = torch.full((1,), self.p_exe, dtype=torch.float64, device=device)
        _, not_executed = ops.feature_drop(zs[0].new_empty(1, 0), [0], p_exe, self.seed, self.counter)
        executed = ~not_executed.reshape(())
        q = torch.where(executed, q, torch.zeros_like(q))
        widths = [z.shape[1] for z in zs]
        z = torch.cat(zs, dim=1)
        out, keep = ops.feature_drop(z, widths, q, self.seed, self.counter + 1)
        self.counter.add_(N * M + 1)
        return OPMOutput(
            features=dict(zip(self.names, out.split(widths, dim=1))),
            keep=keep,
            alive=keep.any(1),
            drop_prob=q,
            executed=executed,
        )

    @staticmethod
    def loss(fused_logits: torch.Tensor, targets: torch.Tensor, output: OPMOutput) -> torch.Tensor:
        """Cross-entropy averaged over the surviving samples: ``sum_i alive_i ce_i / max(sum_i
        alive_i, 1)``. The same value and gradient as the cross-entropy of
        :meth:`OPMOutput.select`'s samples, without a data-dependent shape; 0 (zero gradient) when
        no sample survives."""
        ce = F.cross_entropy(fused_logits, targets, reduction="none")
        alive = output.alive
        total = torch.where(alive, ce, torch.zeros_like(ce)).sum()
        return total / alive.sum().clamp_min(1).to(ce.dtype)

    def _to_device(self, device: torch.device) -> None:
        # OPM has no parameters, so model.to(device) may not have reached it: move the stream once.
        if self.counter.device != device:
            self.seed = self.seed.to(device)
            self.counter = self.counter.to(device)

    def get_extra_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])

    def extra_repr(self) -> str:
        return (
            f"modalities={self.names}, q_base={self.q_base}, lam={self.lam}, p_exe={self.p_exe}, "
            f"start_epoch={self.start_epoch}, eps={self.eps}"
        )
