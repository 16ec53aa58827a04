"""mmgrad: fused, sync-free gradient editing for balanced multimodal learning.

Importing mmgrad never initialises CUDA and never needs a compiler: the C++ extension and Triton
are used when present, and the pure-PyTorch reference serves otherwise (``python -m mmgrad.env``
says which backends are available and why the others are not).
"""

from mmgrad import aggregators, methods, nn, ops, reference
from mmgrad.aggregators import aggregate, weights
from mmgrad.buffers import FlatGradBuffer, SegmentTable, flat_grad_buffers
from mmgrad.methods import AGM, OGM, OGMGE, OPM, CRMTHead, InfoReg, MMPareto, MultiObjective, Relearning, ValuationResampler
from mmgrad.optim import BalancedOptimizer, NonFiniteGradientError

__version__ = "0.1.0"

__all__ = [
    "ops",
    "reference",
    "aggregators",
    "methods",
    "aggregate",
    "weights",
    "BalancedOptimizer",
    "NonFiniteGradientError",
    "OGM",
    "OGMGE",
    "MMPareto",
    "AGM",
    "InfoReg",
    "OPM",
    "Relearning",
    "ValuationResampler",
    "CRMTHead",
    "nn",
    "MultiObjective",
    "FlatGradBuffer",
    "SegmentTable",
    "flat_grad_buffers",
    "__version__",
]
