"""GradDrop (Chen et al., NeurIPS 2020): gradient sign dropout (elementwise, no weights)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from mmgrad import ops
from mmgrad._custom_op import custom_op
from mmgrad.reference import accumulation_dtype

from .base import Aggregator, SeededMixin, _advance, check_matrix, check_option, triton_selected

#: Elements of J (K x columns) per block by default on CPU: the block and its one scratch buffer
#: stay in cache across the block's passes, so J is read from memory once.
GRADDROP_BLOCK_ELEMS = 1 << 18
#: Columns per block by default on other devices (where launches, not caches, set the size).
GRADDROP_BLOCK = 1 << 15


def _block_columns(K: int, device: torch.device) -> int:
    """Default columns per block. On CPU a power of two (at least 64) near GRADDROP_BLOCK_ELEMS / K:
    torch's CPU column sums round each column the same way for any block width that is a
    multiple of its vector chunk, so every such width gives the bits the earlier fixed 32768
    columns gave (tests/test_philox_uniform.py checks it)."""
    if device.type != "cpu":
        return GRADDROP_BLOCK
    return 1 << max(6, (GRADDROP_BLOCK_ELEMS // K).bit_length() - 1)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _drop_blocks(J: torch.Tensor, draws: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor],
                 leak: Optional[tuple[torch.Tensor, torch.Tensor]], block: Optional[int]) -> torch.Tensor:
    """The torch path: GradDrop of ``J`` (K, P) with the uniforms ``draws`` (P,), blocked over the
    columns (no Python loop over rows, no host sync). ``leak``: (leak, 1 - leak) as (K, 1) columns
    in the accumulation dtype, or None."""
    K, P = J.shape
    acc = accumulation_dtype(J.dtype)
    out = torch.empty(P, dtype=J.dtype, device=J.device)
    if P == 0:
        return out
    block = _block_columns(K, J.device) if block is None else block
    # One scratch buffer for the K x block temporaries, written with out= / in place (fresh
    # allocations of this size would page-fault on every block). The keep mask is float 0/1:
    # torch's float compares and multiplies are several times faster than bool ones, and
    # J * 1.0 / J * 0.0 are the values J * True / J * False give.
    scratch = torch.empty(K * min(block, P), dtype=acc, device=J.device)
    for start in range(0, P, block):
        Jb = J[:, start:start + block].to(acc)
        b = Jb.shape[1]
        t = scratch[:K * b].view(K, b)  # contiguous for the tail block too
        s = Jb.sum(0)
        a = torch.abs(Jb, out=t).sum(0)
        purity = 0.5 * (1.0 + s / torch.where(a > 0, a, torch.ones_like(a)))
        # +1 keeps the positive entries (f(P) > U), -1 the negative ones (f(P) < U), 0 and NaN
        # none: keep_i = J_i * c > 0 is exactly ((f(P) > U) & (J_i > 0)) | ((f(P) < U) & (J_i < 0)).
        c = torch.sign(f(purity) - draws[start:start + b]).to(acc)
        torch.mul(Jb, c, out=t).gt_(0)
        if leak is not None:
            leak_column, one_minus_leak = leak
            t.mul_(one_minus_leak).add_(leak_column)
        out[start:start + b] = torch.mul(Jb, t, out=t).sum(0)
    return out


#: J dtypes the fused C++ kernel reads.
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fused_triton(J: torch.Tensor) -> bool:
    """Whether the Triton GradDrop kernel serves ``J``: the Triton backend selected for its device
    (:func:`triton_selected`)."""
    if J.dtype not in _FUSED_DTYPES or not triton_selected(J):
        return False
    from mmgrad.triton import graddrop as triton_graddrop
    return triton_graddrop.serves(J)


@custom_op("mmgrad::graddrop", mutates_args=())
def graddrop_identity(J: torch.Tensor, seed: torch.Tensor, counter: torch.Tensor,
                      leak: Optional[torch.Tensor], index: Optional[torch.Tensor],
                      block: Optional[int] = None) -> torch.Tensor:
    """GradDrop with ``f = identity`` of ``J`` (K, P), the uniforms those of
    ``ops.philox_uniform(seed, counter, P, packed=True)`` (at ``index`` for a shard); ``leak``: (K,) in J's
    accumulation dtype, or None. The caller advances ``counter``.

    With the C++ backend (``ops.resolve_backend`` says ``"cpp"``) one fused kernel
    (``csrc/cpu/graddrop.cpp``) reads J once and computes the uniforms inline. Its column sums add
    the rows in the order of torch's CPU column sum, so it returns the torch path's bits except in
    the columns torch's own sum orders differently (the last < 64 columns of a block, or of a
    thread's share of one): there the sums may differ by rounding, and a keep decision with them
    only where purity and U agree to rounding. Where the Triton backend serves J one Triton kernel
    does the same (``mmgrad/triton/graddrop.py``: one pass for K <= 64, rows in chunks beyond; its
    sums in tile order). Otherwise the torch block loop runs (``block`` columns per block)."""
    if J.dtype in _FUSED_DTYPES and ops.resolve_backend(J.device) == "cpp":
        return torch.ops.mmgrad_C.graddrop(J, seed, counter, leak, index)
    if _fused_triton(J):
        from mmgrad.triton import graddrop as triton_graddrop
        return triton_graddrop.graddrop(J, seed, counter, leak, index)
    acc = accumulation_dtype(J.dtype)
    n = J.shape[1] if index is None else None
    draws = ops.philox_uniform(seed, counter, n, index=index, dtype=acc, packed=True)
    leak_column = None if leak is None else leak.unsqueeze(1)
    return _drop_blocks(J, draws, _identity, None if leak is None else (leak_column, 1 - leak_column), block)


@graddrop_identity.register_fake
def _(J, seed, counter, leak, index, block=None):
    return J.new_empty(J.shape[1])


class GradDrop(SeededMixin, Aggregator):
    """GradDrop as in torchjd 0.18 ``GradDrop(f=identity, leak=None)`` (lines 10-15 of Algorithm 1).

    Per coordinate: purity ``P = (1 + sum_i J_i / sum_i |J_i|) / 2``, ``U ~ Uniform(0, 1)``; row i is
    kept where ``f(P) > U and J_i > 0`` or ``f(P) < U and J_i < 0``; output
    ``sum_i (leak_i + (1 - leak_i) M_i) J_i``. Vectorised over K and blocked over P (no Python loop
    over rows, no host sync). Coordinates where every row is zero give 0 (torchjd: 0 too, via NaN
    comparisons). Difference: ``U`` comes from this object's seeded generator (state in
    ``state_dict``), not the global RNG: the packed stream of :func:`mmgrad.ops.philox_uniform`
    (one Philox block per four columns; a call advances it by P rounded up to a multiple of 4).
    Elementwise, so there is no ``weights(G)``.

    With the default ``f`` the work is one custom op (:func:`graddrop_identity`): a fused kernel
    that reads J once with the C++ backend on CPU and with the Triton backend (CUDA);
    other ``f``, other devices and ``MMGRAD_BACKEND=reference`` run the torch block loop.

    ``block``: columns per block of the torch loop (default: on CPU about 2**18 / K, a power of
    two; else 32768).
    """

    name = "graddrop"
    gramian_based = False

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor] = _identity,
                 leak: Optional[Sequence[float] | torch.Tensor] = None, seed: int = 0,
                 block: Optional[int] = None) -> None:
        if not callable(f):
            raise TypeError(f"f must be a callable (purity -> purity), got {f!r}")
        self.f = f
        if leak is not None:
            leak = torch.as_tensor(leak, dtype=torch.float64)
            if leak.dim() != 1:
                raise ValueError("leak must be a 1-D tensor")
            if not ((leak >= 0) & (leak <= 1)).all():
                raise ValueError("leak must lie in [0, 1]")
        self.leak = leak
        self.block = check_option("block", block, 1, integer=True)
        self._leak_cache: dict = {}
        self._init_gen(seed)

    def weights(self, G: torch.Tensor) -> torch.Tensor:
        raise TypeError("GradDrop is elementwise: it has no Gram-based weights; call it on J")

    def __call__(self, J: torch.Tensor, columns: Optional[torch.Tensor] = None, total: Optional[int] = None) -> torch.Tensor:
        """``columns`` / ``total``: ``J`` holds the columns ``columns`` (int64, (P,)) of a (K, total)
        matrix (a shard of it): the random draws are those of the whole matrix at these columns."""
        check_matrix(J)
        K, P = J.shape
        acc = accumulation_dtype(J.dtype)
        leak = self._leak_for(K, J.device, acc)
        index = None if columns is None else columns.to(J.device)
        if self.f is _identity and (J.device.type == "cpu" or _fused_triton(J)):
            counter, key = self._stream(J.device)
            out = graddrop_identity(J, key, counter, None if leak is None else leak[0], index, self.block)
            counter.add_(_advance(P if index is None or total is None else int(total), packed=True))
            return out
        if index is not None:  # drawn (and the stream advanced) even for an empty shard
            draws = self._uniform_at(index, P if total is None else total, acc, packed=True)
        else:  # all P draws up front, in one fused op
            draws = self._uniform(P, J.device, acc, packed=True)
        return _drop_blocks(J, draws, self.f, None if leak is None else leak[1:], self.block)

    def _leak_for(self, K: int, device: torch.device, acc: torch.dtype):
        """None without leak, else (leak as (K,), leak as a (K, 1) column, 1 - that column) on
        ``device`` in ``acc`` (one host-to-device copy per device, at the first call)."""
        if self.leak is None:
            return None
        if self.leak.shape[0] != K:
            raise ValueError(f"leak has {self.leak.shape[0]} entries but J has {K} rows")
        key = (device, acc)
        cached = self._leak_cache.get(key)
        if cached is None:
            lk = self.leak.to(device=device, dtype=acc)
            column = lk.unsqueeze(1)
            cached = self._leak_cache[key] = (lk, column, 1 - column)
        return cached
