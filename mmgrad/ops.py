"""Public functional ops and the backend policy.

Each op is a ``torch.library`` custom op ``mmgrad::<name>`` (schemas defined once, here, with fake
kernels so ``torch.compile`` and ``torch.library.opcheck`` work). The dispatcher routes by device;
within a device the backend policy picks the implementation:

* CUDA tensors: Triton, else CUDA C++, else the reference;
* CPU tensors: C++ (``mmgrad._C``), else the reference;
* anything else: the reference.

``MMGRAD_BACKEND=reference|cpp|triton|cuda`` or a ``backend=`` argument forces one; a forced backend
that cannot serve the tensor's device raises with the reason. The semantics of every op are those of
:mod:`mmgrad.reference`.
"""

from __future__ import annotations

import functools
import importlib
import operator
import os
from typing import Optional, Sequence

import torch

from mmgrad import reference
from mmgrad._custom_op import custom_op
from mmgrad._extension import build_info, cpp_error

__all__ = [
    "BACKENDS",
    "available_backends",
    "resolve_backend",
    "gram",
    "combine",
    "segment_moments",
    "segment_sumsq",
    "segment_std",
    "segment_gram",
    "segment_combine_",
    "segment_scale_",
    "segment_lerp_",
    "feature_drop",
    "philox_uniform",
]

BACKENDS = ("reference", "cpp", "triton", "cuda")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --- backend policy ---------------------------------------------------------------------------


def _triton_error() -> Optional[str]:
    if os.environ.get("MMGRAD_TRITON") == "0":  # opt-out: no Triton kernel runs, not even as
        return "disabled by MMGRAD_TRITON=0"     # the CUDA C++ backend's solvers
    return _triton_import_error()


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    try:
        importlib.import_module("triton")
    except ImportError:
        return "triton is not installed (`pip install triton`)"
    try:
        importlib.import_module("mmgrad.triton")
    except ImportError as exc:  # pragma: no cover - only on a broken triton install
        return f"mmgrad.triton failed to import: {exc}"
    return None


def _backend_error(backend: str, device: torch.device) -> Optional[str]:
    """None if ``backend`` can run on ``device``, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"the C++ backend runs on CPU tensors, not {device.type}"
        return cpp_error()
    if backend == "triton":
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1)"
        if device.type not in ("cpu", "cuda"):
            return f"Triton does not run on {device.type} tensors"
        return _triton_error()
    if backend == "cuda":
        return _cuda_error(device)
    return f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"


def _cuda_build_error() -> Optional[str]:
    """None if mmgrad._C is loaded with its CUDA kernels, else why not (from the build record)."""
    error = cpp_error()
    if error is not None:
        return error
    info = build_info()
    if getattr(info, "CUDA_VERSION", None) is None:
        why = getattr(info, "CUDA_SKIPPED", None)
        if why is None:  # a record written before setup.py built CUDA kernels
            why = (f"torch {torch.__version__} is a CPU build" if torch.version.cuda is None
                   else "it predates the CUDA kernels; rebuild it")
        return f"mmgrad._C was built without CUDA kernels: {why}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("mmgrad_C::gram", "CUDA"):
        return f"mmgrad._C was built for CUDA {info.CUDA_VERSION} but registered no CUDA kernels"
    return None


def _cuda_error(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        why = f"the CUDA C++ backend runs on CUDA tensors, not {device.type}"
        build = _cuda_build_error()
        return why if build is None else f"{why} (and {build})"
    return _cuda_build_error()


def available_backends(device: torch.device | str = "cpu") -> dict[str, Optional[str]]:
    """Each backend mapped to None (usable on ``device``) or the reason it is not."""
    device = torch.device(device)
    return {b: _backend_error(b, device) for b in BACKENDS}


def resolve_backend(device: torch.device, backend: Optional[str] = None) -> str:
    """The backend that serves ``device``: the forced one (argument, then ``MMGRAD_BACKEND``) or
    the first usable one of the auto policy."""
    forced = backend or os.environ.get("MMGRAD_BACKEND") or None
    if forced is not None:
        error = _backend_error(forced, device)
        if error is not None:
            raise RuntimeError(f"mmgrad backend {forced!r} cannot serve {device.type} tensors: {error}")
        return forced
    if device.type == "cuda":
        order = ("triton", "cuda", "reference")
    elif device.type == "cpu":
        order = ("cpp", "reference")
    else:
        order = ("reference",)
    for candidate in order:
        if _backend_error(candidate, device) is None:
            return candidate
    return "reference"  # unreachable: the reference always serves


class _CppBackend:
    """The C++ kernels registered by ``mmgrad._C`` under the ``mmgrad_C`` namespace."""

    @staticmethod
    def gram(J):
        return torch.ops.mmgrad_C.gram(J)

    @staticmethod
    def combine(J, w):
        return torch.ops.mmgrad_C.combine(J, w)

    @staticmethod
    def combine_out(J, w, out):
        torch.ops.mmgrad_C.combine_out(J, w, out)

    @staticmethod
    def segment_moments(x, offsets, numels):
        return torch.ops.mmgrad_C.segment_moments(x, offsets, numels)

    @staticmethod
    def segment_gram(J, offsets, numels):
        return torch.ops.mmgrad_C.segment_gram(J, offsets, numels)

    @staticmethod
    def segment_combine_(out, J, offsets, numels, weights):
        torch.ops.mmgrad_C.segment_combine_(out, J, offsets, numels, weights)

    @staticmethod
    def segment_scale_(x, offsets, numels, scale, noise_std=None, seed=None):
        torch.ops.mmgrad_C.segment_scale_(x, offsets, numels, scale, noise_std, seed)

    @staticmethod
    def segment_lerp_(x, y, offsets, numels, weight):
        torch.ops.mmgrad_C.segment_lerp_(x, y, offsets, numels, weight)

    @staticmethod
    def feature_drop(z, widths, drop_prob, seed, counter):
        return torch.ops.mmgrad_C.feature_drop(z, widths, drop_prob, seed, counter)

    @staticmethod
    def philox_uniform(seed, counter, n, index, dtype, packed):
        return torch.ops.mmgrad_C.philox_uniform(seed, counter, n, index, dtype, packed)


class _CudaBackend:
    """The CUDA C++ kernels of ``mmgrad._C`` (``kernels/``, launched from ``csrc/cuda/``): the same
    ``torch.ops.mmgrad_C`` ops as :class:`_CppBackend`, which the dispatcher routes to them for CUDA
    tensors. No feature_drop or philox_uniform kernel (:func:`_kernel` falls back to Triton's, or
    to the reference without Triton)."""

    gram = _CppBackend.gram
    combine = _CppBackend.combine
    segment_moments = _CppBackend.segment_moments
    segment_gram = _CppBackend.segment_gram
    segment_combine_ = _CppBackend.segment_combine_
    segment_scale_ = _CppBackend.segment_scale_
    segment_lerp_ = _CppBackend.segment_lerp_


def _implementation(device: torch.device, backend: Optional[str]):
    name = resolve_backend(device, backend)
    if name == "reference":
        return reference
    if name == "cpp":
        return _CppBackend
    if name == "triton":
        return importlib.import_module("mmgrad.triton")
    if name == "cuda":
        return _CudaBackend
    raise AssertionError(name)  # pragma: no cover - resolve_backend returns a known name


def _reference_philox_uniform(seed, counter, n, index, dtype, packed):
    pos = torch.arange(n, dtype=torch.int64, device=seed.device) if index is None else index
    return reference.philox_uniform(seed, counter + pos, dtype, packed)


#: The reference of the ops that not every backend has a kernel for, in the kernels' signature.
_REFERENCE_KERNELS = {"feature_drop": reference.feature_drop, "philox_uniform": _reference_philox_uniform}


def _kernel(op: str, device: torch.device, backend: Optional[str]):
    """The function that runs ``op`` (one of ``_REFERENCE_KERNELS``) on ``device``: the kernel of
    the resolved backend, or where that backend has none Triton's (CUDA C++ backend, Triton
    working) or the reference (sync-free device code), so a run whose policy or
    ``MMGRAD_BACKEND`` picked that backend keeps working. Naming such a backend in the call's
    ``backend=`` raises: the caller asked for a kernel that does not exist."""
    name = resolve_backend(device, backend)
    impl = _implementation(device, name)
    if name != "reference" and hasattr(impl, op):
        return getattr(impl, op)
    if backend is not None and name != "reference":
        raise NotImplementedError(f"mmgrad backend {name!r} has no {op} kernel; use 'triton' or 'reference'")
    if name == "cuda" and device.type == "cuda" and _backend_error("triton", device) is None:
        # the Triton kernel rather than the reference's tens of small launches (on the H100, ~3 ms
        # per draw of PCGrad's visiting orders)
        return getattr(importlib.import_module("mmgrad.triton"), op)
    return _REFERENCE_KERNELS[op]


# --- custom ops (schemas and fake kernels) ----------------------------------------------------


@custom_op("mmgrad::gram", mutates_args=())
def _gram_op(J: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    return _implementation(J.device, backend).gram(J)


@_gram_op.register_fake
def _(J, backend=None):
    return J.new_empty((J.shape[0], J.shape[0]), dtype=reference.accumulation_dtype(J.dtype))


@custom_op("mmgrad::combine", mutates_args=())
def _combine_op(J: torch.Tensor, w: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    return _implementation(J.device, backend).combine(J, w)


@_combine_op.register_fake
def _(J, w, backend=None):
    return J.new_empty((J.shape[1],))


@custom_op("mmgrad::combine_out", mutates_args=("out",))
def _combine_out_op(J: torch.Tensor, w: torch.Tensor, out: torch.Tensor, backend: Optional[str] = None) -> None:
    impl = _implementation(J.device, backend)
    if hasattr(impl, "combine_out"):
        impl.combine_out(J, w, out)
    else:  # backends without an in-place kernel: the fresh result, copied
        out.copy_(impl.combine(J, w))


@custom_op("mmgrad::segment_moments", mutates_args=())
def _segment_moments_op(
    x: torch.Tensor, offsets: torch.Tensor, numels: torch.Tensor, backend: Optional[str] = None
) -> torch.Tensor:
    return _implementation(x.device, backend).segment_moments(x, offsets, numels)


@_segment_moments_op.register_fake
def _(x, offsets, numels, backend=None):
    return x.new_empty((offsets.shape[0], 2), dtype=reference.accumulation_dtype(x.dtype))


@custom_op("mmgrad::segment_gram", mutates_args=())
def _segment_gram_op(
    J: torch.Tensor, offsets: torch.Tensor, numels: torch.Tensor, backend: Optional[str] = None
) -> torch.Tensor:
    return _implementation(J.device, backend).segment_gram(J, offsets, numels)


@_segment_gram_op.register_fake
def _(J, offsets, numels, backend=None):
    K = J.shape[0]
    return J.new_empty((offsets.shape[0], K, K), dtype=reference.accumulation_dtype(J.dtype))


@custom_op("mmgrad::segment_combine_", mutates_args=("out",))
def _segment_combine_op(
    out: torch.Tensor,
    J: torch.Tensor,
    offsets: torch.Tensor,
    numels: torch.Tensor,
    weights: torch.Tensor,
    backend: Optional[str] = None,
) -> None:
    _implementation(J.device, backend).segment_combine_(out, J, offsets, numels, weights)


@custom_op("mmgrad::segment_scale_", mutates_args=("x",))
def _segment_scale_op(
    x: torch.Tensor,
    offsets: torch.Tensor,
    numels: torch.Tensor,
    scale: torch.Tensor,
    noise_std: Optional[torch.Tensor] = None,
    seed: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> None:
    _implementation(x.device, backend).segment_scale_(x, offsets, numels, scale, noise_std, seed)


@custom_op("mmgrad::segment_lerp_", mutates_args=("x",))
def _segment_lerp_op(
    x: torch.Tensor,
    y: torch.Tensor,
    offsets: torch.Tensor,
    numels: torch.Tensor,
    weight: torch.Tensor,
    backend: Optional[str] = None,
) -> None:
    _implementation(x.device, backend).segment_lerp_(x, y, offsets, numels, weight)


@custom_op("mmgrad::feature_drop", mutates_args=())
def _feature_drop_op(
    z: torch.Tensor,
    widths: list[int],
    drop_prob: torch.Tensor,
    seed: torch.Tensor,
    counter: torch.Tensor,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernel("feature_drop", z.device, backend)(z, widths, drop_prob, seed, counter)


@_feature_drop_op.register_fake
def _(z, widths, drop_prob, seed, counter, backend=None):
    return z.new_empty((z.shape[0], z.shape[1])), z.new_empty((z.shape[0], len(widths)), dtype=torch.bool)


def _feature_drop_setup_context(ctx, inputs, output):
    _, widths, drop_prob, _, _, _ = inputs
    ctx.widths = list(widths)
    ctx.save_for_backward(output[1], drop_prob)


def _feature_drop_backward(ctx, grad_out, grad_keep):
    # d out / d z is the same mask and scale: dropped entries get exactly 0.
    keep, drop_prob = ctx.saved_tensors
    scale = reference.feature_drop_scale(ctx.widths, drop_prob)
    return reference.feature_drop_apply(grad_out, ctx.widths, keep, scale), None, None, None, None, None


torch.library.register_autograd(
    "mmgrad::feature_drop", _feature_drop_backward, setup_context=_feature_drop_setup_context
)


@custom_op("mmgrad::philox_uniform", mutates_args=())
def _philox_uniform_op(
    seed: torch.Tensor,
    counter: torch.Tensor,
    n: int,
    index: Optional[torch.Tensor],
    dtype: torch.dtype,
    packed: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    return _kernel("philox_uniform", seed.device, backend)(seed, counter, n, index, dtype, packed)


@_philox_uniform_op.register_fake
def _(seed, counter, n, index, dtype, packed=False, backend=None):
    return seed.new_empty((n,), dtype=dtype)


# --- public functions (argument checks and normalisation, then the op) -------------------------


def _check_float(t: torch.Tensor, what: str) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{what} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_matrix(J: torch.Tensor) -> torch.Tensor:
    if J.dim() != 2:
        raise ValueError(f"J must be 2-D (K objectives x P parameters), got shape {tuple(J.shape)}")
    _check_float(J, "J")
    # Rows may be strided (a slice of a wider buffer); columns must be unit-stride for the kernels.
    if J.shape[1] > 1 and J.stride(1) != 1:
        J = J.contiguous()
    return J


def gram(J: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """Gram matrix ``J @ J.T`` of the K rows of ``J`` (K, P) in one pass over ``J``.

    Accumulates in float32 (float64 for float64 input) and returns that dtype. Deterministic and
    free of host synchronisation on every backend but the reference.
    """
    return _gram_op(_check_matrix(J), backend)


def combine(
    J: torch.Tensor, w: torch.Tensor, *, out: Optional[torch.Tensor] = None, backend: Optional[str] = None
) -> torch.Tensor:
    """``w @ J`` (shape (P,), ``J``'s dtype) in one pass over ``J``, accumulated in float32
    (float64 for float64 input). ``out``: a contiguous (P,) tensor of ``J``'s dtype to write into
    and return (a fresh output's page faults cost more than the arithmetic at small K on a CPU);
    it may share memory with ``J`` (then the result goes through a temporary)."""
    J = _check_matrix(J)
    if w.shape != (J.shape[0],):
        raise ValueError(f"w must have shape ({J.shape[0]},) to combine {J.shape[0]} rows, got {tuple(w.shape)}")
    if w.device != J.device:
        raise ValueError(f"w is on {w.device} but J is on {J.device}")
    w = w.to(reference.accumulation_dtype(J.dtype)).contiguous()
    if out is None:
        return _combine_op(J, w, backend)
    if out.shape != (J.shape[1],) or out.dtype != J.dtype or out.device != J.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({J.shape[1]},) {J.dtype} tensor on {J.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    _check_not_recorded("combine(out=)", out, J, w)
    if _shares_memory(out, J):
        out.copy_(_combine_op(J, w, backend))
    else:
        _combine_out_op(J, w, out, backend)
    return out


def _int64_tensor(value, name: str, device: torch.device) -> torch.Tensor:
    """``value`` if it is a tensor, else the int64 scalar tensor of a Python int (a float would be
    truncated, an int outside int64 fail deep inside torch)."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        value = operator.index(value)  # ints, numpy integers; not floats
    except TypeError:
        raise ValueError(f"{name} must be an int or an int64 tensor, got {value!r}") from None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or an int64 tensor, got {value!r}")
    if not -2**63 <= value < 2**63:
        raise ValueError(f"{name} must fit in int64 ([-2**63, 2**63)), got {value}")
    return torch.tensor(value, dtype=torch.int64, device=device)


def _check_not_recorded(op: str, *tensors: Optional[torch.Tensor]) -> None:
    """The in-place ops have no autograd formula, and autograd does not see a custom op write into
    its inputs: under grad mode a tensor that requires grad would get silently wrong gradients."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(f"{op} writes in place and is not differentiable: call it under torch.no_grad() "
                           "or on detached tensors")


def _check_table(offsets: torch.Tensor, numels: torch.Tensor, device: torch.device):
    if offsets.shape != numels.shape or offsets.dim() != 1:
        raise ValueError("offsets and numels must be 1-D tensors of equal length")
    if offsets.device != device or numels.device != device:
        raise ValueError(f"the segment table must be on {device}, like the data")
    for t, name in ((offsets, "offsets"), (numels, "numels")):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    return offsets.to(torch.int64).contiguous(), numels.to(torch.int64).contiguous()


def _check_segments(x: torch.Tensor, offsets: torch.Tensor, numels: torch.Tensor, what: str = "x"):
    if x.dim() != 1 or not x.is_contiguous():
        raise ValueError(f"{what} must be a contiguous 1-D buffer, got shape {tuple(x.shape)}")
    _check_float(x, what)
    return _check_table(offsets, numels, x.device)


def _per_segment(v: torch.Tensor, x: torch.Tensor, n: int, what: str) -> torch.Tensor:
    acc = reference.accumulation_dtype(x.dtype)
    # A Python number becomes a tensor of the accumulation dtype directly (via float32 it would
    # lose bits for float64 buffers).
    v = torch.as_tensor(v, device=x.device, dtype=acc if isinstance(v, (int, float)) else None)
    if v.is_complex():
        raise ValueError(f"{what} must be real, got {v.dtype}")
    if v.dim() == 0:
        v = v.expand(n)
    if v.shape != (n,):
        raise ValueError(f"{what} must have one value per segment ({n}), got shape {tuple(v.shape)}")
    return v.to(acc).contiguous()


def segment_moments(
    x: torch.Tensor, offsets: torch.Tensor, numels: torch.Tensor, *, backend: Optional[str] = None
) -> torch.Tensor:
    """Per-segment ``[sum, sum of squares]`` of the flat buffer ``x``, shape (S, 2), in one pass."""
    offsets, numels = _check_segments(x, offsets, numels)
    return _segment_moments_op(x, offsets, numels, backend)


def segment_sumsq(
    x: torch.Tensor, offsets: torch.Tensor, numels: torch.Tensor, *, backend: Optional[str] = None
) -> torch.Tensor:
    """Per-segment sum of squares (squared L2 norm), shape (S,)."""
    return segment_moments(x, offsets, numels, backend=backend)[:, 1]


def segment_std(moments: torch.Tensor, numels: torch.Tensor) -> torch.Tensor:
    """Unbiased per-segment standard deviation (as ``Tensor.std()``) from :func:`segment_moments`.

    A segment with fewer than two elements has std 0 (``Tensor.std()`` would give NaN). The
    variance is clamped at 0 against rounding when the mean dominates.
    """
    n = numels.to(moments.dtype)
    centred = moments[:, 1] - moments[:, 0] * moments[:, 0] / n.clamp_min(1)
    var = centred.clamp_min(0) / (n - 1).clamp_min(1)
    return torch.where(n > 1, var.sqrt(), torch.zeros_like(var))


def segment_gram(
    J: torch.Tensor, offsets: torch.Tensor, numels: torch.Tensor, *, backend: Optional[str] = None
) -> torch.Tensor:
    """Per-segment Gram matrices ``J[:, seg] @ J[:, seg].T`` of the column segments of ``J``,
    shape (S, K, K), in one pass over ``J``; the per-tensor norms of any combination ``a @ J`` are
    ``a @ G[s] @ a``."""
    J = _check_matrix(J)
    offsets, numels = _check_table(offsets, numels, J.device)
    return _segment_gram_op(J, offsets, numels, backend)


def segment_combine_(
    out: torch.Tensor,
    J: torch.Tensor,
    offsets: torch.Tensor,
    numels: torch.Tensor,
    weights: torch.Tensor,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """In place ``out[seg s] = weights[s] @ J[:, seg s]`` (per-segment weights, shape (S, K)) in one
    pass; ``out`` may be a row of ``J``. Returns ``out``."""
    J = _check_matrix(J)
    offsets, numels = _check_segments(out, offsets, numels, "out")
    if out.dtype != J.dtype or out.shape != (J.shape[1],):
        raise ValueError(f"out must be a ({J.shape[1]},) buffer of J's dtype {J.dtype}")
    if weights.shape != (offsets.shape[0], J.shape[0]):
        raise ValueError(f"weights must have shape ({offsets.shape[0]}, {J.shape[0]}), got {tuple(weights.shape)}")
    _check_not_recorded("segment_combine_", out, J, weights)
    weights = weights.to(device=J.device, dtype=reference.accumulation_dtype(J.dtype)).contiguous()
    if _overlaps_but_is_not_a_row(out, J):  # the kernels read each column before writing only a row
        result = out.clone()
        _segment_combine_op(result, J, offsets, numels, weights, backend)
        out.copy_(result)
    else:
        _segment_combine_op(out, J, offsets, numels, weights, backend)
    return out


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` (non-empty) lies in ``b``'s storage. (Not checked inside a ``torch.compile``
    trace, which cannot read storage pointers: there the tensors must be apart, or ``a`` a row of
    ``b`` where the op allows it, as the edits' own calls are.)"""
    if torch.compiler.is_compiling() or not a.numel():
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _overlaps_but_is_not_a_row(out: torch.Tensor, J: torch.Tensor) -> bool:
    """Whether ``out`` shares memory with ``J`` other than as exactly one of its rows."""
    if not _shares_memory(out, J):
        return False
    step = J.stride(0) * J.element_size()
    shift = out.data_ptr() - J.data_ptr()
    return not (J.stride(1) == 1 and step > 0 and shift % step == 0 and 0 <= shift // step < J.shape[0])


def segment_scale_(
    x: torch.Tensor,
    offsets: torch.Tensor,
    numels: torch.Tensor,
    scale: torch.Tensor | float,
    noise_std: torch.Tensor | float | None = None,
    seed: torch.Tensor | int | None = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """In place ``x[seg s] = scale[s] * x[seg s] + noise_std[s] * N(0, 1)``; returns ``x``.

    The noise is counter-based (Philox4x32-10 keyed by ``seed``, counter = element index), so the
    same seed gives the same random bits on every backend, block size and thread count: bitwise
    the same noise across block sizes and threads, and across backends to rounding (their
    Box-Muller transforms round differently, ~1 ulp). Pass ``seed`` as
    an int64 device tensor to keep CUDA graphs replayable with fresh noise (increment it in place).
    """
    offsets, numels = _check_segments(x, offsets, numels)
    _check_not_recorded("segment_scale_", x, *(t for t in (scale, noise_std) if isinstance(t, torch.Tensor)))
    n = offsets.shape[0]
    scale = _per_segment(scale, x, n, "scale")
    if noise_std is not None:
        noise_std = _per_segment(noise_std, x, n, "noise_std")
        if seed is None:
            raise ValueError("noise_std needs a seed")
        seed = torch.as_tensor(_int64_tensor(seed, "seed", x.device), dtype=torch.int64, device=x.device).reshape(1)
    _segment_scale_op(x, offsets, numels, scale, noise_std, seed, backend)
    return x


def segment_lerp_(
    x: torch.Tensor,
    y: torch.Tensor,
    offsets: torch.Tensor,
    numels: torch.Tensor,
    weight: torch.Tensor | float,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """In place ``x[seg s] = weight[s] * y[seg s] + (1 - weight[s]) * x[seg s]``; returns ``x``."""
    offsets, numels = _check_segments(x, offsets, numels)
    if y.shape != x.shape or y.dtype != x.dtype or y.device != x.device or not y.is_contiguous():
        raise ValueError("y must be a contiguous buffer of x's shape, dtype and device")
    _check_not_recorded("segment_lerp_", x, y, weight if isinstance(weight, torch.Tensor) else None)
    weight = _per_segment(weight, x, offsets.shape[0], "weight")
    if _shares_memory(y, x) and y.data_ptr() != x.data_ptr():  # the kernels write x as they read y
        y = y.clone()
    _segment_lerp_op(x, y, offsets, numels, weight, backend)
    return x


def feature_drop(
    z: torch.Tensor,
    widths: Sequence[int],
    drop_prob: torch.Tensor,
    seed: torch.Tensor | int,
    counter: torch.Tensor | int,
    *,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OPM's feature dropping in one pass: returns ``(out, keep)``.

    ``z`` (N, D) holds the M modalities' features side by side, modality m in ``widths[m]``
    columns. ``keep[i, m] = u(seed, counter + i*M + m) >= drop_prob[m]`` (bool, (N, M)) with ``u``
    the counter-based Philox uniform of :func:`mmgrad.reference.philox_uniform`, so every backend
    draws the same mask; ``out[i, cols of m] = z[i, cols of m] * scale`` where kept, exactly 0
    where dropped, ``scale = 1 / (1 - theta)`` with ``theta = sum_m widths[m] drop_prob[m] / D``
    (0 when ``theta >= 1``). Differentiable in ``z`` (the gradient gets the same mask and scale).

    ``counter`` is read, not advanced: add ``N * M`` to it in place before the next call for
    fresh masks. Pass ``seed`` and ``counter`` as int64 tensors on ``z``'s device to stay free of
    host synchronisation (and CUDA-graph replayable); Python ints are converted (a copy to the
    device). A ``z`` whose columns are not unit-stride is copied first.
    """
    if z.dim() != 2:
        raise ValueError(f"z must be 2-D (N samples x D features), got shape {tuple(z.shape)}")
    _check_float(z, "z")
    widths = [int(w) for w in widths]
    if not widths or any(w < 0 for w in widths):
        raise ValueError(f"widths must list one non-negative width per modality, got {widths}")
    if sum(widths) != z.shape[1]:
        raise ValueError(f"widths {widths} add up to {sum(widths)}, not z's {z.shape[1]} columns")
    if z.shape[1] > 1 and z.stride(1) != 1:
        z = z.contiguous()
    if not isinstance(drop_prob, torch.Tensor) or drop_prob.shape != (len(widths),) or not drop_prob.is_floating_point():
        raise ValueError(f"drop_prob must be a float tensor of shape ({len(widths)},), one probability per modality")
    seed, counter = _int64_tensor(seed, "seed", z.device), _int64_tensor(counter, "counter", z.device)
    for name, t in (("drop_prob", drop_prob), ("seed", seed), ("counter", counter)):
        if t.device != z.device:
            raise ValueError(f"{name} is on {t.device} but z is on {z.device}")
    for name, t in (("seed", seed), ("counter", counter)):
        if t.dtype != torch.int64 or t.numel() != 1:
            raise ValueError(f"{name} must be an int64 tensor holding one value, got {t.dtype} of shape {tuple(t.shape)}")
    return _feature_drop_op(
        z, widths, drop_prob.to(torch.float64).contiguous(), seed.reshape(()), counter.reshape(()), backend
    )


def philox_uniform(
    seed: torch.Tensor | int,
    counter: torch.Tensor | int,
    n: Optional[int] = None,
    index: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
    *,
    packed: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Counter-based uniform numbers in [0, 1), one fused op.

    Position ``j`` of the stream gives ``(r0 >> 8) * 2**-24`` with ``r0`` the first output word of
    Philox4x32-10 on the counter ``(lo32(j), hi32(j), 0, 0)`` and key ``(lo32(seed), hi32(seed))``
    (:func:`mmgrad.reference.philox_uniform`): 24 random bits, exact in float32 and float64
    (``dtype``). Without ``index`` the positions are ``counter + arange(n)`` (shape (n,)); with an
    integer tensor ``index`` they are ``counter + index`` (modulo 2**64; ``index``'s shape; ``n``,
    if given, must equal ``index.numel()``).

    ``packed=True``: position ``j`` gives word ``j % 4`` of the Philox block at counter ``j // 4``
    (``j`` read as unsigned) instead: one block per four draws, 4x cheaper (GradDrop's draws). The
    two streams are different numbers; a stream of ``n`` packed draws still spans ``n`` positions.

    ``counter`` is read, not advanced: add the number of draws to it in place for the next ones.
    Pass ``seed`` and ``counter`` as int64 tensors on the output's device to stay free of host
    synchronisation (and CUDA-graph replayable); the GPU kernels read them on the device. Python
    ints are converted (a copy to the device). The CUDA C++ backend has no kernel for this op:
    ``MMGRAD_BACKEND=cuda`` runs Triton's (the sync-free reference without Triton),
    ``backend="cuda"`` raises.
    """
    tensors = [t for t in (seed, counter, index) if isinstance(t, torch.Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")
    seed, counter = _int64_tensor(seed, "seed", device), _int64_tensor(counter, "counter", device)
    for name, t in (("seed", seed), ("counter", counter)):
        if t.dtype != torch.int64 or t.numel() != 1:
            raise ValueError(f"{name} must be an int64 tensor holding one value, got {t.dtype} of shape {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the other arguments are on {device}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    shape = None
    if index is not None:
        if not isinstance(index, torch.Tensor) or index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise ValueError("index must be an integer tensor")
        if index.device != device:
            raise ValueError(f"index is on {index.device} but seed is on {device}")
        if n is not None and n != index.numel():
            raise ValueError(f"n = {n} but index has {index.numel()} elements")
        shape, n = index.shape, index.numel()
        index = index.reshape(-1).to(torch.int64).contiguous()
    elif n is None or n < 0:
        raise ValueError(f"n must be a non-negative number of draws (or pass index), got {n}")
    out = _philox_uniform_op(seed.reshape(()), counter.reshape(()), int(n), index, dtype, bool(packed), backend)
    return out if shape is None else out.reshape(shape)


def table(sizes: Sequence[int], device: torch.device | str = "cpu"):
    """Offsets and numels of consecutive segments of the given sizes (a convenience for tests and
    for buffers laid out back to back)."""
    numels = torch.tensor(list(sizes), dtype=torch.int64)
    offsets = torch.cumsum(numels, 0) - numels
    return offsets.to(device), numels.to(device)
