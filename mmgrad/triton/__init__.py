"""Triton backend of mmgrad: GPU kernels for every op of :mod:`mmgrad.reference`.

Importing this package needs ``triton``; the dispatcher imports it lazily. The launchers take
CUDA tensors (or CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was imported),
never synchronise with the host and are CUDA-graph capturable.
"""

import triton  # noqa: F401  (fail early, with an ImportError, when triton is missing)

from .feature_drop import feature_drop
from .kernels import combine, gram
from .philox_uniform import philox_uniform
from .segments import (segment_combine_, segment_gram, segment_lerp_, segment_moments,
                       segment_scale_)

__all__ = ["gram", "combine", "segment_moments", "segment_gram", "segment_combine_",
           "segment_scale_", "segment_lerp_", "feature_drop", "philox_uniform"]
