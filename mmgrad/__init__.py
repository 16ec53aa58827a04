"""mmgrad: fused, sync-free gradient editing for balanced multimodal learning.

Importing mmgrad never initialises CUDA and never needs a compiler: the C++ extension and Triton
are used when present, and the pure-PyTorch reference serves otherwise (``python -m mmgrad.env``
says which backends are available and why the others are not).
"""

from mmgrad import ops, reference
from mmgrad.buffers import FlatGradBuffer, SegmentTable, flat_grad_buffers

__version__ = "0.1.0"

__all__ = ["ops", "reference", "FlatGradBuffer", "SegmentTable", "flat_grad_buffers", "__version__"]
