"""Sync-free dense linear algebra on small (K x K) matrices.

``torch.linalg.solve`` / ``eigh`` / ``svd`` / ``pinv`` check LAPACK/cuSOLVER error codes on the
host and so synchronise a CUDA stream (measured with ``torch.cuda.set_sync_debug_mode("error")``
on torch 2.11/H100). The ``*_ex`` variants do not. This module therefore uses

* :func:`solve`: ``torch.linalg.solve_ex`` (no error check; callers regularise so the systems are
  non-singular);
* :func:`sym_eig`: LAPACK ``eigh`` on the CPU, and on other devices a vectorised cyclic Jacobi
  eigensolver (:func:`jacobi_eigh`) with a fixed number of sweeps.
"""

from __future__ import annotations

import torch

#: Sweeps of the parallel cyclic Jacobi method. Jacobi converges quadratically once the
#: off-diagonal mass is small; with 10 sweeps the eigenvalues match LAPACK to 1e-12 and
#: V diag(l) V^T reconstructs a trace-1 matrix to 1e-10 for every K <= 64 tested
#: (tests/test_aggregators.py::test_jacobi_eigh).
JACOBI_SWEEPS = 10

_rr_cache: dict = {}


def solve(M: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``M^{-1} B`` without the host-side error check of ``torch.linalg.solve``."""
    return torch.linalg.solve_ex(M, B, check_errors=False)[0]


def _round_robin(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Circle-method schedule for an even ``n``: n-1 rounds of n/2 disjoint pairs, built on
    ``device`` with arithmetic only (no host-to-device copy). Returns (top, bottom, rows, cols)
    index tensors; rows/cols are the scatter positions of the four entries of each rotation."""
    key = (n, str(device))
    hit = _rr_cache.get(key)
    if hit is not None:
        return hit
    r = torch.arange(n - 1, device=device).unsqueeze(1)
    k = torch.arange(n, device=device).unsqueeze(0)
    lst = torch.where(k == 0, torch.zeros_like(k + r), 1 + (k - 1 + r) % (n - 1))
    h = n // 2
    top = lst[:, :h]
    bot = lst[:, h:].flip(1)
    rows = torch.cat([top, bot, top, bot], dim=1)
    cols = torch.cat([top, bot, bot, top], dim=1)
    out = (top, bot, rows, cols)
    _rr_cache[key] = out
    return out


def jacobi_eigh(A: torch.Tensor, sweeps: int = JACOBI_SWEEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a symmetric matrix by the parallel cyclic Jacobi method.

    Same contract as ``torch.linalg.eigh`` (ascending eigenvalues, orthonormal eigenvector
    columns), with a fixed budget of ``sweeps`` x (n - 1) rounds of n/2 simultaneous rotations,
    so no host synchronisation. Cost per round: a handful of elementwise ops and three n x n
    matmuls.
    """
    K = A.shape[0]
    if K == 1:
        return A.diagonal().clone(), torch.ones_like(A)
    n = K + (K % 2)
    if n != K:  # pad with a decoupled zero row/column: its rotations are exactly the identity
        A = torch.nn.functional.pad(A, (0, 1, 0, 1))
    top, bot, rows, cols = _round_robin(n, A.device)
    V = torch.eye(n, dtype=A.dtype, device=A.device)
    one = torch.ones((), dtype=A.dtype, device=A.device)
    for _ in range(sweeps):
        A = 0.5 * (A + A.T)
        for r in range(n - 1):
            p, q = top[r], bot[r]
            app, aqq, apq = A[p, p], A[q, q], A[p, q]
            nz = apq != 0
            tau = (aqq - app) / (2 * torch.where(nz, apq, one))
            sgn = torch.where(tau >= 0, one, -one)
            t = torch.where(nz, sgn / (tau.abs() + torch.hypot(one, tau)), torch.zeros_like(tau))
            c = torch.rsqrt(1 + t * t)
            s = t * c
            R = torch.zeros_like(A)
            R[rows[r], cols[r]] = torch.cat([c, c, s, -s])
            A = R.T @ A @ R
            V = V @ R
    lam = A.diagonal()[:K]
    V = V[:K, :K]
    order = torch.argsort(lam)
    return lam[order], V[:, order]


def check_eig(eig: str) -> str:
    """``eig`` if it names an eigen method of :func:`sym_eig`, else a ValueError."""
    if eig not in ("auto", "lapack", "jacobi"):
        raise ValueError(f"eig must be 'auto', 'lapack' or 'jacobi', got {eig!r}")
    return eig


def sym_eig(A: torch.Tensor, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``eigh`` that never synchronises: LAPACK on the CPU, :func:`jacobi_eigh` elsewhere
    (``method`` = ``"auto"`` | ``"lapack"`` | ``"jacobi"``). (Where the Triton backend serves G,
    the methods that use it run whole in one kernel instead: ``base.use_triton_eager``.)"""
    check_eig(method)
    if method == "lapack" or (method == "auto" and A.device.type == "cpu"):
        return torch.linalg.eigh(A)
    return jacobi_eigh(A)


def pinv_apply(A: torch.Tensor, b: torch.Tensor, rtol: float, method: str = "auto") -> torch.Tensor:
    """``pinv(A) @ b`` for a symmetric ``A``, with ``torch.linalg.pinv``'s cut-off: eigenvalues with
    ``|lambda| <= rtol * max|lambda|`` are dropped."""
    lam, V = sym_eig(A, method)
    cutoff = rtol * lam.abs().max()
    keep = lam.abs() > cutoff
    inv = torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)), torch.zeros_like(lam))
    return V @ (inv.unsqueeze(-1) * (V.T @ b)) if b.dim() == 2 else V @ (inv * (V.T @ b))
