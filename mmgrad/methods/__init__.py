"""Gradient-editing balancing methods for :class:`mmgrad.BalancedOptimizer`."""

from mmgrad.methods.agm import AGM
from mmgrad.methods.base import BalancingMethod, ModalityLayout, StepContext
from mmgrad.methods.inforeg import InfoReg
from mmgrad.methods.mmpareto import MMPareto, mgda_two
from mmgrad.methods.multi_objective import MultiObjective
from mmgrad.methods.ogm import OGM, OGMGE, confidence_scores, discrepancy_ratio, ogm_coefficients

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
]
