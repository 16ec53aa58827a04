"""Base class and shared helpers of the multi-objective aggregators.

Every aggregator follows "Gram, solve, combine" (see DESIGN.md): ``__call__(J)`` computes
``G = ops.gram(J)``, asks the method for weights ``w = self.weights(G)`` and returns
``ops.combine(J, w)``. Only the elementwise GradDrop overrides ``__call__``.

Solver rules shared by every method (tested in ``tests/test_aggregators.py``):

* the solve runs in torch on ``G``'s own device, in float64 (float32 on devices without float64);
* fixed iteration budgets: no ``.item()``, no Python branch on a tensor value, no host copy; data
  dependent choices are ``torch.where`` / masks / ``clamp``;
* ``G`` is normalised by its trace before any iterative solver, so that the weights do not depend
  on the scale of the gradients (1e-10 .. 1e10 behave the same); a zero ``G`` or zero rows give
  finite weights;
* weights are returned in ``G``'s dtype.
"""

from __future__ import annotations

import math
import operator
import os
from typing import Any, Optional, Sequence

import torch

from mmgrad import ops
from mmgrad._custom_op import plain_eager

__all__ = ["Aggregator", "GramianAggregator"]


def gram(J: torch.Tensor) -> torch.Tensor:
    return ops.gram(J)


def combine(J: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return ops.combine(J, w)


def solve_dtype(device: torch.device) -> torch.dtype:
    """float64 for the K x K solves, except on devices that have no float64 (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def to_solve(G: torch.Tensor) -> torch.Tensor:
    return G.detach().to(solve_dtype(G.device))


def _cpp_serves(t: torch.Tensor) -> bool:
    """Whether ``t`` is a CPU tensor and the C++ backend is the one selected for the CPU."""
    return t.device.type == "cpu" and ops.resolve_backend(t.device) == "cpp"


def use_cpp_solver(*tensors: torch.Tensor) -> bool:
    """Whether a solver's C++ kernel serves these tensors: float64 on the CPU (what ``to_solve``
    gives there) with the C++ backend selected; otherwise the solver's torch code runs."""
    return all(t.dtype == torch.float64 and t.device.type == "cpu" for t in tensors) and _cpp_serves(tensors[0])


def triton_selected(t: torch.Tensor) -> bool:
    """Whether the Triton kernels of the K x K solvers and GradDrop serve ``t``'s device: CUDA
    tensors when the backend selected there is ``triton`` (the default) or ``cuda`` (the CUDA C++
    backend has kernels for the P-sized ops only, and Triton's solver kernels beat the torch
    loops), as long as Triton works; CPU tensors only under TRITON_INTERPRET=1 with
    ``MMGRAD_BACKEND=triton`` (the tests)."""
    if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    selected = ops.resolve_backend(t.device)
    if selected == "cuda" and t.device.type == "cuda":
        return ops._backend_error("triton", t.device) is None
    return selected == "triton"


def _triton_serves(G: torch.Tensor) -> bool:
    """:func:`triton_selected` and K <= the solver kernels' ``MAX_K`` (checked before importing
    the kernels, which need triton)."""
    if not triton_selected(G):
        return False
    from mmgrad.triton import solvers
    return 1 <= G.shape[-1] <= solvers.MAX_K


def use_triton_solver(G: torch.Tensor) -> bool:
    """Whether a solver's Triton kernel (:mod:`mmgrad.triton.solvers`) serves ``G`` inside its
    custom op: float64 (what ``to_solve`` gives on CUDA) and :func:`_triton_serves`."""
    return G.dtype == torch.float64 and _triton_serves(G)


def use_triton_eager(G: torch.Tensor) -> bool:
    """Whether an eager-only Triton kernel of :mod:`mmgrad.triton.solvers` (one that is not a
    custom op: the trace normalisation, the whole solve of Nash-MTL, IMTL-G, Aligned-MTL and
    ConFIG) serves ``G`` (any float dtype): plain eager mode, float64 solves on its device and
    :func:`_triton_serves`. Under ``torch.compile`` the torch code runs instead."""
    return (plain_eager((G,)) and G.is_floating_point()
            and solve_dtype(G.device) == torch.float64 and _triton_serves(G))


def normalize_trace(G: torch.Tensor, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``G / trace(G)`` (zero matrix when ``trace <= eps`` or not finite), and the trace.

    Sync-free: the branch is a ``torch.where``. ``eps = 0`` normalises any non-zero ``G`` whatever
    its scale (torchjd uses an absolute ``eps = 1e-4``, see the per-method docstrings).
    """
    t = G.diagonal().sum()
    ok = (t > eps) & torch.isfinite(t)
    safe = torch.where(ok, t, torch.ones_like(t))
    return torch.where(ok, G / safe, torch.zeros_like(G)), t


def normalized(G: torch.Tensor, eps: float = 0.0, reg: float = 0.0) -> torch.Tensor:
    """The solvers' input: ``G`` in the solve dtype divided by its trace (:func:`normalize_trace`),
    plus ``reg`` on the diagonal. In plain eager mode, one op where a backend has it: on CPU
    tensors served by the C++ backend ``csrc/cpu/trace_normalized.cpp`` (the six to eight small
    torch ops cost more than most K x K solves), where the Triton backend serves ``G`` (float64
    solves) one Triton kernel (the torch ops would be as many launches); the torch ops otherwise."""
    if plain_eager((G,)) and _cpp_serves(G):
        return torch.ops.mmgrad_C.trace_normalized(G, eps, reg)
    if use_triton_eager(G):
        from mmgrad.triton import solvers
        return solvers.trace_normalized(G, eps, reg)
    Gn, _ = normalize_trace(to_solve(G), eps)
    if reg:
        Gn = Gn + reg * torch.eye(G.shape[0], dtype=Gn.dtype, device=Gn.device)
    return Gn


def rounding_ridge(G: torch.Tensor) -> float:
    """A ridge for the trace-normalised ``G`` at the level of its dtype's rounding (``K * eps``)
    when that is coarser than float64's: a float32 / half Gram of rank-deficient rows has
    eigenvalues of either sign at about that level, and an unregularised QP (MGDA's min-norm
    point, CAGrad's dual) steps along that spurious negative curvature. Zero for float64."""
    if G.dtype == torch.float64:
        return 0.0
    return G.shape[0] * torch.finfo(G.dtype).eps


def check_option(name: str, value, minimum: float | None = None, maximum: float | None = None,
                 integer: bool = False):
    """``value`` as a Python number (an int with ``integer``: integral values only) if it is a
    finite real number within [minimum, maximum], else a ValueError that names the option; None
    passes. numpy scalars and one-element tensors count as numbers."""
    if value is None:
        return value
    if isinstance(value, (bool, str, bytes, complex)):
        raise ValueError(f"{name} must be {'an int' if integer else 'a finite number'}, got {value!r}")
    number = None
    if integer:
        try:
            number = operator.index(value)  # ints, numpy integers, integer tensors of one element
        except TypeError:
            pass
    if number is None:
        try:
            number = float(value)
        except (TypeError, ValueError, RuntimeError):
            number = None
        if integer and number is not None:  # 5.0, np.float32(5)
            number = int(number) if number.is_integer() else None
    if number is None:
        raise ValueError(f"{name} must be {'an int' if integer else 'a finite number'}, got {value!r}")
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bounds}, got {value!r}")
    return number if integer or not isinstance(value, int) else value


def check_gram(G: torch.Tensor) -> None:
    if G.dim() != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"G must be a square (K, K) matrix, got shape {tuple(G.shape)}")
    if not G.is_floating_point():
        raise TypeError(f"G must be a floating-point matrix, got {G.dtype}")
    if G.shape[0] == 0:
        raise ValueError("G must have at least one row (K >= 1)")


def check_matrix(J: torch.Tensor) -> None:
    if J.dim() != 2:
        raise ValueError(f"J must be a (K, P) matrix, got shape {tuple(J.shape)}")
    if J.shape[0] == 0:
        raise ValueError("J must have at least one row (K >= 1)")
    if not J.is_floating_point():
        raise TypeError(f"J must be a floating-point matrix, got {J.dtype}")
    if J.requires_grad and torch.is_grad_enabled():
        raise ValueError("the aggregators are not differentiable (their solvers are not): pass "
                         "J.detach(), or call under torch.no_grad()")


class _PrefMixin:
    """Holds an optional preference vector and serves it on the solver's device and dtype."""

    _pref: Optional[torch.Tensor]
    _pref_cache: dict

    def _init_pref(self, pref_vector: Optional[Sequence[float] | torch.Tensor]) -> None:
        if pref_vector is not None:
            # a copy: a later change to the caller's tensor must not change this aggregator
            pref_vector = torch.as_tensor(pref_vector, dtype=torch.float64).detach().clone()
            if pref_vector.dim() != 1:
                raise ValueError("pref_vector must be a 1-D tensor")
            if not torch.isfinite(pref_vector).all():
                raise ValueError("pref_vector must be finite")
        self._pref = pref_vector
        self._pref_cache = {}

    def _pref_for(self, K: int, ref: torch.Tensor, default: float | None = None,
                  diagonal: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Preference vector (K,) on ``ref``'s device, in ``dtype`` (default ``ref``'s), as a
        (K, K) diagonal matrix with ``diagonal``; ``default`` fills it when unset (``None`` means
        1/K). Cached per device, dtype and K: callers must not modify it."""
        if self._pref is not None and self._pref.shape[0] != K:
            raise ValueError(f"pref_vector has {self._pref.shape[0]} entries but there are {K} rows")
        dtype = ref.dtype if dtype is None else dtype
        key = (ref.device, dtype, K, default, diagonal)
        p = self._pref_cache.get(key)
        if p is None:  # one host-to-device copy (or fill) per device, at the first call
            if self._pref is None:
                fill = (1.0 / K) if default is None else default
                p = torch.full((K,), fill, dtype=dtype, device=ref.device)
            else:
                p = self._pref.to(device=ref.device, dtype=dtype)
            p = torch.diag(p) if diagonal else p
            self._pref_cache[key] = p
        return p


class Aggregator:
    """A multi-objective aggregator: ``__call__(J) -> (P,)`` for a (K, P) matrix ``J``."""

    name: str = ""
    gramian_based: bool = True

    def weights(self, G: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """The (K,) weights ``w`` of the rows from their (K, K) Gram matrix ``G = J J^T`` (any
        float dtype; the result in ``G``'s dtype), on ``G``'s device, with no host sync."""
        raise NotImplementedError(f"{type(self).__name__} has no Gram-based weights")

    def __call__(self, J: torch.Tensor) -> torch.Tensor:
        """The aggregated (P,) vector of the K rows of ``J`` (K, P): ``w @ J`` with
        ``w = weights(J J^T)`` (a fused Gram pass, the solve, a fused combine pass)."""
        check_matrix(J)
        return combine(J, self.weights(gram(J)))

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unexpected = set(state) - set(self.state_dict())
        if unexpected:
            raise KeyError(f"unexpected keys in state_dict of {self.name}: {sorted(unexpected)}")

    def reset(self) -> None:
        """Forget all state (EMA targets, warm starts, random generators)."""

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({opts})"

    def _options(self) -> dict[str, Any]:
        return {}


GramianAggregator = Aggregator


def _draw_dtype(dtype: torch.dtype) -> torch.dtype:
    """The op draws float32 or float64 (both exact); narrower types are rounded from float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _advance(n: int, packed: bool) -> int:
    """Stream positions a draw of ``n`` takes: packed draws keep the counter on a Philox block
    boundary (the fused kernels' fast path draws four positions per block from there)."""
    return (n + 3) // 4 * 4 if packed else n


class SeededMixin:
    """A counter-based random stream: Philox4x32-10 keyed by ``seed`` (the same generator as the
    fused ops' noise, :func:`mmgrad.reference.philox4x32`), with one int64 counter per device.

    Drawing is one fused op (:func:`mmgrad.ops.philox_uniform`) that reads the counter on the
    device, then an in-place add: it never synchronises, replays in CUDA graphs and traces under
    ``torch.compile``. The seed and the counters are in ``state_dict``, so a resumed run draws the
    same numbers, on another device too (the first device that draws continues a counter saved
    under another one).
    """

    seed: int
    _counters: dict
    _loaded_counters: dict

    def _init_gen(self, seed: int) -> None:
        self.seed = check_option("seed", int(seed), -2**63, 2**63 - 1, integer=True)
        self._counters: dict[str, torch.Tensor] = {}
        self._loaded_counters: dict[str, torch.Tensor] = {}  # filed under a device not drawn on yet

    def _uniform(self, n: int, device: torch.device, dtype: torch.dtype = torch.float32,
                 packed: bool = False) -> torch.Tensor:
        """``n`` uniform numbers in [0, 1) (24 random bits each), advancing the stream by ``n``
        (``packed``: the op's packed stream, advancing by ``n`` rounded up to a multiple of 4,
        so that every call starts on a Philox block)."""
        counter, key = self._stream(device)
        u = ops.philox_uniform(key, counter, n, dtype=_draw_dtype(dtype), packed=packed)
        counter.add_(_advance(n, packed))
        return u.to(dtype)

    def _skip(self, n: int, device: torch.device, packed: bool = False) -> None:
        """Advance ``device``'s stream as ``_uniform(n, device, packed=packed)`` would, drawing
        nothing (a draw whose numbers do not matter, such as PCGrad's order at K = 2)."""
        self._counter(device).add_(_advance(n, packed))

    def _uniform_at(self, index: torch.Tensor, total: int, dtype: torch.dtype = torch.float32,
                    packed: bool = False) -> torch.Tensor:
        """The numbers a ``_uniform(total, ...)`` call would give at positions ``index`` (int64),
        advancing the stream as it would: a shard of a draw over ``total`` elements."""
        counter, key = self._stream(index.device)
        u = ops.philox_uniform(key, counter, index=index, dtype=_draw_dtype(dtype), packed=packed)
        counter.add_(_advance(int(total), packed))
        return u.to(dtype)

    def _stream(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The counter and the Philox key of ``device``, made with fill kernels (a host-to-device
        copy of the seed would synchronise)."""
        return self._counter(device), torch.full((), self.seed, dtype=torch.int64, device=device)

    def _counter(self, device: torch.device) -> torch.Tensor:
        """``device``'s counter (made by :meth:`settle_stream` at the first use)."""
        self.settle_stream(device)
        return self._counters[str(device)]

    def settle_stream(self, device: torch.device) -> None:
        """Make ``device``'s counter exist now (taking over one loaded under another device), so
        that a state saved before a draw already holds it: a skipped step that restores that
        state then also restores the counter."""
        name = str(device)
        if name not in self._counters:
            self._counters[name] = self._take_loaded_counter(name, device)

    def _take_loaded_counter(self, name: str, device: torch.device) -> torch.Tensor:
        """The counter a loaded state filed under another device (a checkpoint loaded with
        ``map_location``, or rank 0's checkpoint on another rank) continues on the first device
        that draws, that device's own name first; a fresh stream starts at 0."""
        pending = self._loaded_counters
        if not pending:
            return torch.zeros((), dtype=torch.int64, device=device)
        saved = pending.pop(name if name in pending else next(iter(pending)))
        if saved.device.type == "cpu":  # a fill kernel: a host-to-device copy would synchronise
            return torch.full((), int(saved), dtype=torch.int64, device=device)
        return saved.to(device, copy=True)

    # The seed and the stream's counters are the aggregator's state ("seed", "generators"), so a
    # run resumed with another seed argument still continues the saved stream; subclasses with more
    # state extend these through super().
    def state_dict(self) -> dict[str, Any]:
        counters = {**self._loaded_counters, **self._counters}
        return {**super().state_dict(), "seed": self.seed,
                "generators": {k: c.clone() for k, c in counters.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "seed" in state:  # absent from older checkpoints
            self.seed = check_option("seed", int(state["seed"]), -2**63, 2**63 - 1, integer=True)
        self._counters, self._loaded_counters = {}, {}
        for name, counter in state.get("generators", {}).items():
            if str(counter.device) == name:
                self._counters[name] = counter.clone()
            else:
                self._loaded_counters[name] = counter.clone()

    def reset(self) -> None:
        super().reset()
        self._counters, self._loaded_counters = {}, {}
