"""Triton kernel of ``philox_uniform`` (counter-based uniforms, :func:`mmgrad.ops.philox_uniform`).

One program per BLOCK outputs: position ``j = counter + i`` (or ``counter + index[i]``), value
``(r0 >> 8) * 2**-24`` with ``r0`` the first Philox4x32-10 word of the block at counter ``j`` (the
jit helper shared with ``feature_drop``), or with PACKED word ``j % 4`` of the block ``j // 4``. The seed and the counter are read on the device, so the launch never
synchronises and a captured CUDA graph sees a counter advanced in place between replays.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .kernels import INTERPRET
from .segments import packed_word, philox4x32, philox_key

# Outputs per program. The interpreter pays per program, not per element: it gets big blocks.
BLOCK = 1 << 16 if INTERPRET else 1024
NUM_WARPS = 4


@triton.jit
def _philox_uniform_kernel(out, seed, counter, index, n, HAS_INDEX: tl.constexpr,
                           PACKED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    k0, k1 = philox_key(seed)
    if HAS_INDEX:
        pos = tl.load(index + offs, mask=mask, other=0)
    else:
        pos = offs
    j = tl.load(counter) + pos
    if PACKED:
        r = packed_word(j, k0, k1)
    else:
        r, _r1, _r2, _r3 = philox4x32(j, k0, k1)
    u = (r >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24; exact, 24 bits
    tl.store(out + offs, u.to(out.dtype.element_ty), mask=mask)


def philox_uniform(seed: torch.Tensor, counter: torch.Tensor, n: int, index: Optional[torch.Tensor],
                   dtype: torch.dtype, packed: bool = False) -> torch.Tensor:
    """(n,) uniforms at positions ``counter + arange(n)`` (``index`` None) or ``counter + index``
    (int64, shape (n,)); ``seed`` and ``counter`` one-element int64 tensors on the output's
    device; ``dtype`` float32 or float64; ``packed`` as in :func:`mmgrad.ops.philox_uniform`."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    for name, t in (("seed", seed), ("counter", counter)):
        if t.dtype != torch.int64 or t.numel() != 1:
            raise ValueError(f"{name} must be an int64 tensor of one element")
    if index is not None:
        if index.dtype != torch.int64 or index.shape != (n,):
            raise ValueError(f"index must be an int64 tensor of shape ({n},)")
        if index.device != seed.device:
            raise ValueError(f"index must be on the seed's device {seed.device}")
        index = index.contiguous()
    if counter.device != seed.device:
        raise ValueError(f"counter must be on the seed's device {seed.device}")
    out = torch.empty(n, dtype=dtype, device=seed.device)
    if n == 0:
        return out
    grid = (triton.cdiv(n, BLOCK),)
    _philox_uniform_kernel[grid](out, seed, counter, counter if index is None else index, n,
                                 HAS_INDEX=index is not None, PACKED=bool(packed), BLOCK=BLOCK,
                                 num_warps=NUM_WARPS)
    return out
