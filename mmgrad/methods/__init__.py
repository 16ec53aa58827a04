"""Balancing methods. Gradient edits for :class:`mmgrad.BalancedOptimizer` (OGM / OGM-GE, MMPareto,
AGM, InfoReg, multi-objective aggregation), and the methods that act elsewhere on the same modality
declaration: OPM in the forward pass, Diagnosing & Re-learning between epochs, modality valuation
on the data, CRMT on the head and the loss."""

from mmgrad.methods.agm import AGM
from mmgrad.methods.crmt import CRMTHead, CRMTOutput, certified_accuracy, crmt_loss, crmt_margin_loss, lipschitz_estimate
from mmgrad.methods.base import BalancingMethod, ModalityLayout, StepContext
from mmgrad.methods.inforeg import InfoReg
from mmgrad.methods.mmpareto import MMPareto, mgda_two
from mmgrad.methods.multi_objective import MultiObjective
from mmgrad.methods.ogm import OGM, OGMGE, confidence_scores, discrepancy_ratio, ogm_coefficients
from mmgrad.methods.opm import OPM, OPMOutput
from mmgrad.methods.relearning import Relearning, clustering_purity
from mmgrad.methods.valuation import ResampledDataset, ValuationResampler, epoch_rows, modality_shapley

__all__ = [
    "BalancingMethod",
    "ModalityLayout",
    "StepContext",
    "OGM",
    "OGMGE",
    "MMPareto",
    "AGM",
    "InfoReg",
    "MultiObjective",
    "confidence_scores",
    "discrepancy_ratio",
    "ogm_coefficients",
    "mgda_two",
    "OPM",
    "OPMOutput",
    "Relearning",
    "clustering_purity",
    "ValuationResampler",
    "ResampledDataset",
    "epoch_rows",
    "modality_shapley",
    "CRMTHead",
    "CRMTOutput",
    "crmt_loss",
    "crmt_margin_loss",
    "lipschitz_estimate",
    "certified_accuracy",
]
