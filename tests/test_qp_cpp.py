"""The C++ CPU active-set solvers (csrc/cpu/qp.cpp) against the torch solvers they replace on CPU
tensors: the dual-cone projection (UPGrad, DualProj), the min-norm point of the simplex (MGDA) and
the CAGrad dual.

Both sides run the same iteration with the same budget; the C++ side factors only the free block
(Cholesky for an exactly symmetric G, LU, as the torch solve, for the rest and for faces that are
indefinite by rounding) and stops at a fixed point, so results agree to rounding: 1e-12 relative
where the face systems are well conditioned, and condition number x machine epsilon where they are
singular up to the 1e-12 ridge (see ``conftest.solver_tol``).
"""


import pytest
import torch
from conftest import REQUIRE_CPP, assert_rows_close, cagrad_inputs, random_gram, solver_tol

import mmgrad
from mmgrad import ops
from mmgrad.aggregators import _qp, cagrad

F64 = torch.float64
SIZES = (1, 2, 3, 8, 16, 64)
KINDS = ("full", "low_rank", "zero_rows", "duplicates", "near_parallel", "float32_gram")
SCALES = (1e-10, 1.0, 1e10)
CASES = [(K, kind, s) for K in SIZES for kind in KINDS for s in SCALES]
CASE_IDS = [f"K{K}-{kind}-{s:g}" for K, kind, s in CASES]

_cpp_missing = ops.available_backends("cpu")["cpp"]
if _cpp_missing is not None and REQUIRE_CPP:
    raise RuntimeError(f"MMGRAD_REQUIRE_CPP=1 but the C++ backend is unavailable: {_cpp_missing}")
pytestmark = [pytest.mark.skipif(_cpp_missing is not None, reason=f"no C++ backend: {_cpp_missing}"),
              pytest.mark.usefixtures("one_thread")]  # the torch solvers' tiny ops: one thread

C = torch.ops.mmgrad_C if _cpp_missing is None else None


def _normalized(G: torch.Tensor) -> torch.Tensor:
    return mmgrad.aggregators.base.normalize_trace(G)[0]


@pytest.mark.parametrize("K,kind,scale", CASES, ids=CASE_IDS)
def test_dual_cone_matches_torch(K, kind, scale, gen):
    Gn = _normalized(random_gram(K, kind, scale, gen))
    pref = torch.rand(K, generator=gen, dtype=F64) + 0.1
    U = torch.cat([torch.diag(pref), pref.unsqueeze(0), torch.rand(2, K, generator=gen, dtype=F64) - 0.3])
    for reg in (1e-4, 0.0):
        Gr = Gn + reg * torch.eye(K, dtype=F64)
        iters = _qp.default_iters(K)
        want = _qp.project_dual_cone_torch(Gr, U, iters)
        got = C.project_dual_cone(Gr, U, iters, _qp.RIDGE, _qp.TOL, _qp.BACKUP)
        assert_rows_close(got, want, solver_tol(kind, reg > 0))


@pytest.mark.parametrize("K,kind,scale", CASES, ids=CASE_IDS)
def test_min_norm_simplex_matches_torch(K, kind, scale, gen):
    Gn = _normalized(random_gram(K, kind, scale, gen))
    iters = _qp.min_norm_default_iters(K)
    want = _qp.min_norm_simplex_torch(Gn, iters)
    got = C.min_norm_simplex(Gn, iters, _qp.RIDGE, _qp.TOL)
    assert_rows_close(got, want, solver_tol(kind, False))
    # The min-norm point itself (Gram coordinates, trace-1 scale) is well conditioned even where
    # the weights are not.
    assert (Gn @ got - Gn @ want).abs().max() <= 1e-14


@pytest.mark.parametrize("K,kind,scale", CASES, ids=CASE_IDS)
def test_cagrad_dual_matches_torch(K, kind, scale, gen):
    Gn = _normalized(random_gram(K, kind, scale, gen))
    iters = _qp.default_iters(K)
    for c in (0.1, 0.5, 2.0):
        b, s = cagrad_inputs(Gn, c)
        want = cagrad.cagrad_dual_torch(Gn, b, s, iters)
        got = C.cagrad_dual(Gn, b, s, iters, _qp.RIDGE, _qp.TOL, _qp.BACKUP, cagrad._KAPPA_MAX)
        assert_rows_close(got, want, solver_tol(kind, False))


@pytest.mark.parametrize("iters", [0, 1, 2, 3])
@pytest.mark.parametrize("K", [3, 8, 16, 64])
def test_small_budgets_agree_before_convergence(K, iters, gen):
    """With a budget too small to identify the active set both sides return the same unconverged
    iterate (the C++ early exit only fires at a fixed point)."""
    Gn = _normalized(random_gram(K, "low_rank", 1.0, gen))
    Gr = Gn + 1e-4 * torch.eye(K, dtype=F64)
    U = torch.eye(K, dtype=F64) / K
    assert_rows_close(C.project_dual_cone(Gr, U, iters, _qp.RIDGE, _qp.TOL, _qp.BACKUP),
                  _qp.project_dual_cone_torch(Gr, U, iters), 1e-12)
    assert_rows_close(C.min_norm_simplex(Gr, iters, _qp.RIDGE, _qp.TOL),
                  _qp.min_norm_simplex_torch(Gr, iters), 1e-12)
    b, s = cagrad_inputs(Gr, 0.5)
    assert_rows_close(C.cagrad_dual(Gr, b, s, iters, _qp.RIDGE, _qp.TOL, _qp.BACKUP, cagrad._KAPPA_MAX),
                  cagrad.cagrad_dual_torch(Gr, b, s, iters), 1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("K", [3, 8, 16, 64])
def test_asymmetric_gram_takes_the_lu_path(K, kind, gen):
    """A G that is symmetric only to rounding (as a float64 ``J @ J.T``) is factored by LU, as the
    torch solve does, and agrees as well as the exactly symmetric one."""
    G = _normalized(random_gram(K, kind, 1.0, gen))
    G = G + 1e-16 * torch.triu(torch.rand(K, K, generator=gen, dtype=F64), 1)
    assert not torch.equal(G, G.T)
    Gr = G + 1e-4 * torch.eye(K, dtype=F64)
    U = torch.eye(K, dtype=F64) / K
    iters = _qp.default_iters(K)
    assert_rows_close(C.project_dual_cone(Gr, U, iters, _qp.RIDGE, _qp.TOL, _qp.BACKUP),
                  _qp.project_dual_cone_torch(Gr, U, iters), 1e-12)
    assert_rows_close(C.min_norm_simplex(G, iters, _qp.RIDGE, _qp.TOL),
                  _qp.min_norm_simplex_torch(G, iters), solver_tol(kind, False))
    b, s = cagrad_inputs(G, 0.5)
    assert_rows_close(C.cagrad_dual(G, b, s, iters, _qp.RIDGE, _qp.TOL, _qp.BACKUP, cagrad._KAPPA_MAX),
                  cagrad.cagrad_dual_torch(G, b, s, iters), solver_tol(kind, False))


@pytest.mark.parametrize("K", [3, 8, 16])
def test_indefinite_faces_fall_back_to_lu(K, gen):
    """A symmetric G with a negative eigenvalue (a Gram that rounding made indefinite, much
    exaggerated): Cholesky meets a non-positive pivot, the LU fallback gives the torch answer."""
    Q, _ = torch.linalg.qr(torch.randn(K, K, generator=gen, dtype=F64))
    lam = torch.rand(K, generator=gen, dtype=F64) + 0.5
    lam[0] = -0.05
    G = Q @ torch.diag(lam) @ Q.T
    G = _normalized((G + G.T) / 2)
    iters = _qp.default_iters(K)
    assert_rows_close(C.min_norm_simplex(G, iters, _qp.RIDGE, _qp.TOL),
                  _qp.min_norm_simplex_torch(G, iters), 1e-12)
    U = torch.eye(K, dtype=F64) / K
    assert_rows_close(C.project_dual_cone(G, U, iters, _qp.RIDGE, _qp.TOL, _qp.BACKUP),
                  _qp.project_dual_cone_torch(G, U, iters), 1e-12)
    b, s = cagrad_inputs(G, 0.5)
    assert_rows_close(C.cagrad_dual(G, b, s, iters, _qp.RIDGE, _qp.TOL, _qp.BACKUP, cagrad._KAPPA_MAX),
                  cagrad.cagrad_dual_torch(G, b, s, iters), 1e-12)


def test_non_finite_gram_gives_nan_dual_cone_weights():
    K = 5
    G = torch.eye(K, dtype=F64) / K
    G[0, 2] = G[2, 0] = float("inf")
    U = torch.eye(K, dtype=F64) / K
    got = C.project_dual_cone(G, U, 7, _qp.RIDGE, _qp.TOL, _qp.BACKUP)
    assert got.isnan().all()
    assert _qp.project_dual_cone_torch(G, U, 7).isnan().any()
    assert torch.equal(C.project_dual_cone(G, U, 0, _qp.RIDGE, _qp.TOL, _qp.BACKUP), U)


def test_functions_route_by_backend(monkeypatch, gen):
    """project_dual_cone / min_norm_simplex / cagrad_dual run the C++ kernel on float64 CPU tensors,
    the torch solver under MMGRAD_BACKEND=reference and for other dtypes."""
    K = 16
    G = _normalized(random_gram(K, "low_rank", 1.0, gen)) + 1e-4 * torch.eye(K, dtype=F64)
    U = torch.eye(K, dtype=F64) / K
    b, s = cagrad_inputs(G, 0.5)
    it = _qp.default_iters(K)
    runs = {
        "dual_cone": (lambda G, U, b, s: _qp.project_dual_cone(G, U),
                      lambda: C.project_dual_cone(G, U, it, _qp.RIDGE, _qp.TOL, _qp.BACKUP),
                      lambda G, U, b, s: _qp.project_dual_cone_torch(G, U)),
        "min_norm": (lambda G, U, b, s: _qp.min_norm_simplex(G),
                     lambda: C.min_norm_simplex(G, _qp.min_norm_default_iters(K), _qp.RIDGE, _qp.TOL),
                     lambda G, U, b, s: _qp.min_norm_simplex_torch(G)),
        "cagrad": (lambda G, U, b, s: cagrad.cagrad_dual(G, b, s),
                   lambda: C.cagrad_dual(G, b, s, it, _qp.RIDGE, _qp.TOL, _qp.BACKUP, cagrad._KAPPA_MAX),
                   lambda G, U, b, s: cagrad.cagrad_dual_torch(G, b, s)),
    }
    for name, (routed, kernel, torch_solver) in runs.items():
        assert torch.equal(routed(G, U, b, s), kernel()), name
        f32 = [t.float() for t in (G, U, b, s)]
        assert torch.equal(routed(*f32), torch_solver(*f32)), name
        with monkeypatch.context() as m:
            m.setenv("MMGRAD_BACKEND", "reference")
            assert torch.equal(routed(G, U, b, s), torch_solver(G, U, b, s)), name
    # the two paths are not bitwise equal, so the equalities above tell them apart
    assert not torch.equal(_qp.project_dual_cone_torch(G, U), C.project_dual_cone(
        G, U, it, _qp.RIDGE, _qp.TOL, _qp.BACKUP))


@pytest.mark.parametrize("name", ["upgrad", "dualproj", "mgda", "cagrad"])
@pytest.mark.parametrize("K", [3, 8, 64])
def test_aggregator_weights_match_reference_backend(name, K, monkeypatch, gen):
    J = torch.randn(K, 3 * K, generator=gen)
    G = ops.gram(J)
    got = mmgrad.weights(G, name)
    monkeypatch.setenv("MMGRAD_BACKEND", "reference")
    want = mmgrad.weights(ops.gram(J), name)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_bad_inputs_raise_clear_errors():
    G = torch.eye(3, dtype=F64)
    U = torch.eye(3, dtype=F64)
    args = (_qp.RIDGE, _qp.TOL, _qp.BACKUP)
    with pytest.raises(RuntimeError, match="G must be float64"):
        C.project_dual_cone(G.float(), U, 5, *args)
    with pytest.raises(RuntimeError, match="square"):
        C.min_norm_simplex(torch.ones(3, 2, dtype=F64), 5, *args[:2])
    with pytest.raises(RuntimeError, match=r"U must have shape \(B, 3\)"):
        C.project_dual_cone(G, torch.ones(2, 4, dtype=F64), 5, *args)
    with pytest.raises(RuntimeError, match="iters must be non-negative"):
        C.min_norm_simplex(G, -1, *args[:2])
    with pytest.raises(RuntimeError, match=r"b must have shape \(3,\)"):
        C.cagrad_dual(G, torch.ones(2, dtype=F64), torch.tensor(0.5, dtype=F64), 5, *args, 1e8)
    with pytest.raises(RuntimeError, match="s must be a float64 CPU tensor with one element"):
        C.cagrad_dual(G, torch.ones(3, dtype=F64), torch.ones(2, dtype=F64), 5, *args, 1e8)


def test_custom_ops_pass_opcheck(gen):
    K = 8
    G = _normalized(random_gram(K, "full", 1.0, gen))
    b, s = cagrad_inputs(G, 0.5)
    torch.library.opcheck(_qp._project_dual_cone_op.op, (G, torch.eye(K, dtype=F64) / K, 10, _qp.RIDGE, _qp.TOL))
    torch.library.opcheck(_qp._min_norm_simplex_op.op, (G, 10, _qp.RIDGE, _qp.TOL))
    torch.library.opcheck(cagrad._cagrad_dual_op.op, (G, b, s, 10, _qp.RIDGE, _qp.TOL))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("K", SIZES)
def test_trace_normalized_matches_the_torch_ops(gen, dtype, K):
    """The solvers' input in one C++ op (base.normalized) == normalize_trace(to_solve(G)) + reg I."""
    from mmgrad.aggregators import base

    G = random_gram(K, "full", 1e3, gen).to(dtype)
    for eps, reg in ((0.0, 0.0), (0.0, 1e-4), (1e30, 1e-4)):  # eps above the trace: the zero matrix + reg I
        expected = base.normalize_trace(base.to_solve(G), eps)[0] + reg * torch.eye(K, dtype=F64)
        got = C.trace_normalized(G, eps, reg)
        assert got.dtype == F64 and got.is_contiguous()
        torch.testing.assert_close(got, expected, rtol=4e-16 * K, atol=0)
    assert C.trace_normalized(G, 0.0, 0.0).data_ptr() != G.data_ptr()  # a copy, G untouched
    for bad in (float("nan"), float("inf")):
        Gb = G.clone()
        Gb[0, 0] = bad
        assert torch.equal(C.trace_normalized(Gb, 0.0, 0.5), 0.5 * torch.eye(K, dtype=F64))
    with pytest.raises(RuntimeError, match="square"):
        C.trace_normalized(torch.zeros(2, 3), 0.0, 0.0)


def test_normalized_uses_the_torch_ops_where_it_must(monkeypatch):
    from mmgrad.aggregators import base

    G = random_gram(4, "full", 1.0, torch.Generator().manual_seed(0)).float()
    calls = []
    monkeypatch.setattr(base, "normalize_trace", lambda *a: calls.append(1) or (a[0], None))
    base.normalized(G)
    assert calls == []  # plain eager CPU tensor, C++ backend: the op
    base.normalized(G.requires_grad_())  # autograd must see the torch ops
    monkeypatch.setenv("MMGRAD_BACKEND", "reference")
    base.normalized(G.detach())
    assert calls == [1, 1]


def test_dual_cone_batches_are_the_same_on_any_thread_count():
    """Costly batches (rank-deficient Grams: ~10 active-set iterations per problem) are split over
    threads after the first problem; every problem's result must not depend on it."""
    g = torch.Generator().manual_seed(5)
    J = torch.randn(64, 24, generator=g, dtype=F64) @ torch.randn(24, 2000, generator=g, dtype=F64)
    G = _normalized(J @ J.T) + 1e-4 * torch.eye(64, dtype=F64)
    U = torch.eye(64, dtype=F64) / 64
    threads = torch.get_num_threads()
    try:
        results = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append(C.project_dual_cone(G, U, 20, _qp.RIDGE, _qp.TOL, _qp.BACKUP))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results[1:])
    empty = C.project_dual_cone(G, U[:0], 20, _qp.RIDGE, _qp.TOL, _qp.BACKUP)  # no problem at all
    assert empty.shape == (0, 64)
    torch.testing.assert_close(results[0], _qp.project_dual_cone_torch(G, U, 20), rtol=1e-9, atol=1e-12)
