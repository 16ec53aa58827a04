"""The Triton K x K solvers (mmgrad/triton/solvers.py: dual-cone projection, min-norm point of the
simplex, CAGrad dual, Jacobi eigen-decomposition, PCGrad / GradVac coefficients, Nash-MTL's Newton
solve; one launch each) against the torch solvers of mmgrad.aggregators and LAPACK.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (slow: K <= 16 for the
exhaustive cases, one K = 33 / 64 case each). Both sides run the same iteration with the same
budget; the kernels solve each face by LU with partial pivoting on the padded tile and stop at a
fixed point, so results agree to rounding, with the tolerances of the C++ solvers
(``conftest.solver_tol``).
"""

import types

import pytest
import torch
from conftest import (assert_rows_close, cagrad_inputs, host_sync_raises, random_gram, solver_tol,
                      triton_device)

DEV = triton_device()  # skips the module without triton

import mmgrad  # noqa: E402
from mmgrad import ops  # noqa: E402
from mmgrad.aggregators import _linalg, _qp, base, cagrad, nash, projection  # noqa: E402
from mmgrad.triton import solvers  # noqa: E402

# The non-finite Gram makes numpy (inside the interpreter) warn; that is expected.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

F64 = torch.float64
KINDS = ("full", "low_rank", "zero_rows", "duplicates", "near_parallel", "float32_gram")
CASES = [(K, kind) for K in (1, 2, 3, 5, 8, 16) for kind in KINDS] + [(33, "low_rank"), (64, "full")]
CASE_IDS = [f"K{K}-{kind}" for K, kind in CASES]
ARGS = (_qp.RIDGE, _qp.TOL, _qp.BACKUP)
MN_ARGS = (_qp.RIDGE, _qp.TOL)  # Wolfe's method has no exchange rule


def _gram(K, kind, gen, scale=1.0):
    return base.normalize_trace(random_gram(K, kind, scale, gen))[0]


def _rows(K, gen):
    """A few dual-cone problems: UPGrad's rows pref_i e_i (first, middle, last), DualProj's pref
    and a row with negative entries; fewer for K = 64 (the interpreter is slow)."""
    pref = torch.rand(K, generator=gen, dtype=F64) + 0.1
    picks = sorted({0, K // 2, K - 1})
    U = torch.cat([torch.diag(pref)[picks], pref[None], torch.rand(1, K, generator=gen, dtype=F64) - 0.3])
    return U[:2] if K > 32 else U


@pytest.mark.parametrize("K,kind", CASES, ids=CASE_IDS)
def test_dual_cone_matches_torch(K, kind, gen):
    Gn = _gram(K, kind, gen)
    U = _rows(K, gen)
    iters = _qp.default_iters(K)
    for reg in (1e-4, 0.0):
        Gr = Gn + reg * torch.eye(K, dtype=F64)
        want = _qp.project_dual_cone_torch(Gr, U, iters)
        got = solvers.project_dual_cone(Gr.to(DEV), U.to(DEV), iters, *ARGS).cpu()
        assert_rows_close(got, want, solver_tol(kind, reg > 0))


@pytest.mark.parametrize("K,kind", CASES, ids=CASE_IDS)
def test_min_norm_simplex_matches_torch(K, kind, gen):
    Gn = _gram(K, kind, gen)
    iters = _qp.min_norm_default_iters(K)
    want = _qp.min_norm_simplex_torch(Gn, iters)
    got = solvers.min_norm_simplex(Gn.to(DEV), iters, *MN_ARGS).cpu()
    assert_rows_close(got, want, solver_tol(kind, False))
    assert (Gn @ got - Gn @ want).abs().max() <= 1e-14  # the min-norm point itself


@pytest.mark.parametrize("K,kind", CASES, ids=CASE_IDS)
def test_cagrad_dual_matches_torch(K, kind, gen):
    Gn = _gram(K, kind, gen)
    iters = _qp.default_iters(K)
    for c in (0.1, 0.5, 2.0):
        b, s = cagrad_inputs(Gn, c)
        want = cagrad.cagrad_dual_torch(Gn, b, s, iters)
        got = solvers.cagrad_dual(Gn.to(DEV), b.to(DEV), s.to(DEV), iters, *ARGS,
                                  cagrad._KAPPA_MAX).cpu()
        assert_rows_close(got, want, solver_tol(kind, False))


@pytest.mark.parametrize("scale", [1e-10, 1e10])
def test_scales(scale, gen):
    """The solvers see trace-normalised Grams, so extreme gradient scales change nothing."""
    K = 8
    Gn = _gram(K, "full", gen, scale) + 1e-4 * torch.eye(K, dtype=F64)
    U = _rows(K, gen)
    assert_rows_close(solvers.project_dual_cone(Gn.to(DEV), U.to(DEV), 10, *ARGS).cpu(),
                      _qp.project_dual_cone_torch(Gn, U, 10), 1e-12)


@pytest.mark.parametrize("iters", [0, 1, 2, 3])
def test_small_budgets_agree_before_convergence(iters, gen):
    """With a budget too small to identify the active set both sides return the same unconverged
    iterate (the kernels' early exit only fires at a fixed point)."""
    K = 8
    Gr = _gram(K, "low_rank", gen) + 1e-4 * torch.eye(K, dtype=F64)
    U = torch.eye(K, dtype=F64)[:3] / K
    assert_rows_close(solvers.project_dual_cone(Gr.to(DEV), U.to(DEV), iters, *ARGS).cpu(),
                      _qp.project_dual_cone_torch(Gr, U, iters), 1e-12)
    assert_rows_close(solvers.min_norm_simplex(Gr.to(DEV), iters, *MN_ARGS).cpu(),
                      _qp.min_norm_simplex_torch(Gr, iters), 1e-12)
    b, s = cagrad_inputs(Gr, 0.5)
    assert_rows_close(
        solvers.cagrad_dual(Gr.to(DEV), b.to(DEV), s.to(DEV), iters, *ARGS, cagrad._KAPPA_MAX).cpu(),
        cagrad.cagrad_dual_torch(Gr, b, s, iters), 1e-12)


def test_asymmetric_and_indefinite_grams(gen):
    """Multipliers read G as the torch solvers do (``V @ G``, ``G @ a``: an asymmetry large enough
    to change the exchanges tells the two apart), and pivoting carries faces that rounding made
    indefinite (here much exaggerated: one negative eigenvalue)."""
    K = 6
    G = _gram(K, "full", gen) + 0.3 * torch.triu(torch.rand(K, K, generator=gen, dtype=F64) - 0.5, 1)
    Q, _ = torch.linalg.qr(torch.randn(K, K, generator=gen, dtype=F64))
    lam = torch.rand(K, generator=gen, dtype=F64) + 0.5
    lam[0] = -0.05
    H = base.normalize_trace(Q @ torch.diag(lam) @ Q.T)[0]
    H = (H + H.T) / 2
    for M in (G, H):
        U = torch.eye(K, dtype=F64) / K
        assert_rows_close(solvers.project_dual_cone(M.to(DEV), U.to(DEV), 8, *ARGS).cpu(),
                          _qp.project_dual_cone_torch(M, U, 8), 1e-12)
        assert_rows_close(solvers.min_norm_simplex(M.to(DEV), 8, *MN_ARGS).cpu(),
                          _qp.min_norm_simplex_torch(M, 8), 1e-12)
        b, s = cagrad_inputs(M, 0.5)
        assert_rows_close(
            solvers.cagrad_dual(M.to(DEV), b.to(DEV), s.to(DEV), 8, *ARGS, cagrad._KAPPA_MAX).cpu(),
            cagrad.cagrad_dual_torch(M, b, s, 8), 1e-12)


def test_non_finite_gram_gives_nan_weights():
    """As the C++ solvers: a NaN multiplier would compare false and end the iteration with finite,
    meaningless weights."""
    K = 5
    G = torch.eye(K, dtype=F64) / K
    G[0, 2] = G[2, 0] = float("inf")
    G, U = G.to(DEV), torch.eye(K, dtype=F64, device=DEV) / K
    assert solvers.project_dual_cone(G, U, 7, *ARGS).isnan().all()
    assert torch.equal(solvers.project_dual_cone(G, U, 0, *ARGS), U)
    assert solvers.min_norm_simplex(G, 7, *MN_ARGS).isnan().all()
    b = torch.ones(K, dtype=F64, device=DEV)
    s = torch.tensor(0.5, dtype=F64, device=DEV)
    assert solvers.cagrad_dual(G, b, s, 7, *ARGS, cagrad._KAPPA_MAX).isnan().all()


@pytest.mark.parametrize("K,kind", [(1, "full"), (2, "full"), (3, "zero_rows"), (8, "low_rank"),
                                    (8, "duplicates"), (17, "near_parallel"), (64, "full")])
def test_projection_and_nash_match_torch(K, kind, gen):
    """PCGrad's and GradVac's coefficient loops (same visiting orders, GradVac's EMA targets in and
    out) and Nash-MTL's damped Newton, against their torch versions."""
    G = _gram(K, kind, gen)
    order = torch.rand(K, K, generator=gen).argsort(1)
    phi = torch.rand(K, K, generator=gen, dtype=F64) * 0.4 - 0.2
    d = lambda t: t.to(DEV)  # noqa: E731
    torch.testing.assert_close(solvers.pcgrad_coefficients(d(G), d(order)).cpu(),
                               projection.pcgrad_coefficients_torch(G, order), rtol=0, atol=1e-13)
    C, phi_new = solvers.gradvac_coefficients(d(G), d(order), d(phi), 0.5, 1e-8)
    C_want, phi_want = projection.gradvac_coefficients_torch(G, order, phi, 0.5, 1e-8)
    torch.testing.assert_close(C.cpu(), C_want, rtol=0, atol=1e-13)
    torch.testing.assert_close(phi_new.cpu(), phi_want, rtol=0, atol=1e-13)
    Gr = G / torch.linalg.matrix_norm(G) + nash.NASH_RIDGE * torch.eye(K, dtype=F64)
    a0 = torch.rsqrt(Gr.diagonal())
    a0 = a0 * (K / (a0 @ Gr @ a0)).sqrt()
    assert_rows_close(solvers.nash_newton(d(Gr), d(a0), 20).cpu(), nash.nash_newton_torch(Gr, a0, 20),
                      1e-11)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
@pytest.mark.parametrize("K", [1, 5, 64])
def test_trace_normalized_matches_the_torch_ops(dtype, K, gen):
    """The solvers' input in one kernel (base.normalized) == normalize_trace(to_solve(G)) + reg I,
    for any float dtype and strides; a trace <= eps or not finite gives reg I."""
    G = random_gram(K, "full", 1e3, gen).to(dtype)
    for eps, reg in ((0.0, 0.0), (0.0, 1e-4), (1e30, 1e-4)):
        expected = base.normalize_trace(G.to(F64), eps)[0] + reg * torch.eye(K, dtype=F64)
        got = solvers.trace_normalized(G.to(DEV).t(), eps, reg).cpu()  # G symmetric: .t() strides
        assert got.dtype == F64 and got.is_contiguous()
        torch.testing.assert_close(got, expected.t(), rtol=4e-16 * K, atol=0)
    for bad in (float("nan"), float("inf")):
        Gb = G.clone()
        Gb[0, 0] = bad
        assert torch.equal(solvers.trace_normalized(Gb.to(DEV), 0.0, 0.5).cpu(),
                           0.5 * torch.eye(K, dtype=F64))


@pytest.mark.parametrize("K,kind", [(1, "full"), (2, "duplicates"), (3, "full"), (8, "low_rank"),
                                    (8, "zero_rows"), (17, "near_parallel"), (64, "low_rank")])
def test_eigen_methods_in_one_kernel_match_torch(K, kind, gen):
    """IMTL-G's, ConFIG's and Aligned-MTL's whole weights(G) (normalisation, Jacobi, pinv or
    inverse square root, scaling) in one kernel == the torch code with the torch Jacobi solver
    (eig="jacobi": the same rotations), every option that reaches the kernel. A float32 G, as
    training gives: the default cut-offs (K x float32 epsilon) bound the pinv's condition number
    by ~1e6, so the two agree to the output's rounding."""
    G = random_gram(K, kind, 1.0, gen).float()
    pref = torch.rand(K, generator=gen, dtype=F64) + 0.1
    sweeps = _linalg.JACOBI_SWEEPS
    rtol = K * torch.finfo(torch.float32).eps
    cases = [("imtl_g", {}, lambda: solvers.pinv_weights(G.to(DEV), None, rtol, sweeps)),
             ("config", {"pref_vector": pref},
              lambda: solvers.pinv_weights(G.to(DEV), pref.to(DEV), max(rtol, 1e-14), sweeps))]
    for mode, scale_mode in enumerate(("min", "median", "rmse")):
        cases.append(("aligned_mtl", {"pref_vector": pref, "scale_mode": scale_mode},
                      lambda mode=mode: solvers.aligned_weights(G.to(DEV), pref.to(DEV), rtol,
                                                                mode, sweeps)))
    for name, opts, kernel in cases:
        want = mmgrad.aggregators.get(name, eig="jacobi", **opts).weights(G)
        assert_rows_close(kernel().cpu().float(), want, 1e-6)


@pytest.mark.parametrize("K", [1, 2, 5, 17])
def test_nash_mtl_solve_in_one_kernel_matches_torch(K, monkeypatch, gen):
    """Nash-MTL's solving calls in one kernel (Frobenius normalisation, cold or warm start, Newton,
    rescale, max-norm) and the calls between two solves (max-norm only) give the reference
    backend's weights and warm-start state, call after call, for max_norm 0 / tiny / default and
    a solve every third call (the last G is large enough for the max-norm scaling)."""
    for opts in ({"max_norm": 0.0}, {"max_norm": 1e-3}, {"update_weights_every": 3}):
        monkeypatch.setenv("MMGRAD_BACKEND", "reference")
        ref = mmgrad.aggregators.get("nash_mtl", **opts)
        Gs = [random_gram(K, "full", 10.0 ** e, gen).float() for e in (-3, 0, 2)]
        want = [ref.weights(G) for G in Gs]
        monkeypatch.setenv("MMGRAD_BACKEND", "triton")
        agg = mmgrad.aggregators.get("nash_mtl", **opts)
        for G, w in zip(Gs, want):
            assert_rows_close(agg.weights(G.to(DEV)).cpu(), w, 1e-6)
        assert_rows_close(agg.alpha.cpu().float(), ref.alpha.float(), 1e-6)
    # a call between two solves with no solution to reuse (a state saved so, or K changed) solves;
    # a zero or non-finite G keeps the previous solution (ones before the first)
    G = random_gram(K, "full", 1e2, gen).float()
    bad = G.clone()
    bad[0, -1] = float("nan")
    got = {}
    for backend, dev in (("reference", "cpu"), ("triton", DEV)):
        monkeypatch.setenv("MMGRAD_BACKEND", backend)
        agg = mmgrad.aggregators.get("nash_mtl", update_weights_every=2, max_norm=0.0)
        agg.load_state_dict({"alpha": None, "step": 1})
        w = agg.weights(G.to(dev)).cpu()
        agg.update_weights_every = 1  # the next calls solve, on G without a solution
        got[backend] = (w, agg.weights(torch.zeros_like(G).to(dev)).cpu(), agg.weights(bad.to(dev)).cpu())
        assert torch.equal(got[backend][1], w) and torch.equal(got[backend][2], w)
        fresh = mmgrad.aggregators.get("nash_mtl", max_norm=0.0)
        assert_rows_close(fresh.weights(torch.zeros_like(G).to(dev)).cpu(), torch.ones(K), 0.0)
    assert_rows_close(got["triton"][0], got["reference"][0], 1e-6)
    monkeypatch.delenv("MMGRAD_BACKEND")  # the CPU default (C++, or the reference without _C)
    assert_rows_close(got["triton"][0], mmgrad.aggregators.get("nash_mtl", max_norm=0.0).weights(G), 1e-6)


def test_empty_batch():
    G = torch.eye(3, dtype=F64, device=DEV)
    assert solvers.project_dual_cone(G, G[:0], 5, *ARGS).shape == (0, 3)


INF, NAN = float("inf"), float("nan")
K2_OPTIONS = [("mgda", {}), ("pcgrad", {}), ("pcgrad", {"reduction": "mean"}), ("upgrad", {}), ("upgrad", {"pref_vector": [0.3, 2.0], "norm_eps": 1e-4}),
              ("upgrad", {"pref_vector": [0.0, 1.0], "reg_eps": 0.0}), ("dualproj", {}),
              ("dualproj", {"pref_vector": [2.0, 0.5], "norm_eps": 1e-4, "reg_eps": 1e-2})]


@pytest.mark.parametrize("name,options", K2_OPTIONS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(K2_OPTIONS)])
def test_k2_closed_forms_in_one_launch_match_the_torch_path(name, options, monkeypatch, gen):
    """MGDA, PCGrad, UPGrad and DualProj at K = 2 where Triton serves G: the normalisation and the
    closed form in one scalar kernel, equal to the torch path (``normalized`` and
    ``_qp.min_norm_k2`` / ``pcgrad_coefficients_torch`` / ``_qp.dual_cone_k2``, reference backend) on every kind of Gram, float32 and float64, strided,
    zero, indefinite, asymmetric and non-finite; a strided preference vector."""
    calls = []
    for fn in ("min_norm_k2", "dual_cone_k2", "pcgrad_k2"):
        real = getattr(solvers, fn)
        monkeypatch.setattr(solvers, fn, lambda *a, _real=real: calls.append(1) or _real(*a))
    grams = [random_gram(2, kind, scale, gen) for kind in KINDS for scale in (1e-10, 1.0, 1e10)]
    grams += [torch.zeros(2, 2, dtype=F64), torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=F64),
              torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=F64),  # the origin on the segment
              torch.tensor([[4.0, 1.0], [1.0, 0.0]], dtype=F64),  # a zero row
              torch.tensor([[1.0, -3.0], [-3.0, 1.0]], dtype=F64),  # indefinite
              torch.tensor([[NAN, 0.0], [0.0, 1.0]], dtype=F64), torch.tensor([[1.0, NAN], [NAN, 1.0]], dtype=F64),
              torch.tensor([[INF, 0.0], [0.0, 1.0]], dtype=F64), torch.tensor([[1.0, INF], [INF, 1.0]], dtype=F64),
              torch.tensor([[1.0, -INF], [-INF, 1.0]], dtype=F64),  # MGDA: inf / inf (NaN, kept)
              torch.tensor([[1.0, 0.0], [INF, 1.0]], dtype=F64),  # asymmetric
              torch.tensor([[-0.0, 1e300], [-3.0, 0.3]], dtype=F64)]
    for G in grams:
        for dtype in (F64, torch.float32):
            for Gx in (G.to(dtype), G.to(dtype).t().contiguous().t(), torch.stack([G, G], 2).to(dtype)[..., 1]):
                monkeypatch.setenv("MMGRAD_BACKEND", "reference")
                ref = mmgrad.aggregators.get(name, **options)
                want = ref.weights(Gx)
                monkeypatch.setenv("MMGRAD_BACKEND", "triton")
                agg = mmgrad.aggregators.get(name, **options)
                n = len(calls)
                got = agg.weights(Gx.to(DEV)).cpu()
                assert len(calls) == n + 1 and got.dtype == want.dtype
                # (the interpreter computes as torch; a GPU may fuse a multiply-add)
                tol = 1e-15 if DEV == "cpu" else 1e-12
                assert torch.allclose(got, want, rtol=tol, atol=tol, equal_nan=True), (G, got, want)
                if name == "pcgrad":  # the stream advanced as the drawn order would advance it
                    counters = [[int(c) for c in a.state_dict()["generators"].values()] for a in (agg, ref)]
                    assert counters[0] == counters[1] == [4]
    if name in ("upgrad", "dualproj"):
        strided = torch.tensor([[0.3, 9.0], [2.0, 9.0]], dtype=F64).to(DEV)[:, 0]
        monkeypatch.setenv("MMGRAD_BACKEND", "reference")
        want = mmgrad.weights(grams[0], name, pref_vector=strided.cpu())
        monkeypatch.setenv("MMGRAD_BACKEND", "triton")
        assert torch.allclose(mmgrad.weights(grams[0].to(DEV), name, pref_vector=strided).cpu(), want,
                              rtol=1e-12, atol=1e-12)
        # a negative preference has no closed form: the general solver runs
        n = len(calls)
        mmgrad.weights(grams[0].to(DEV), name, pref_vector=[-1.0, 1.0])
        assert len(calls) == n


def test_the_cuda_backend_routes_solvers_to_triton(monkeypatch):
    """CUDA tensors under the CUDA C++ backend (which has no solver kernels) use the Triton
    solvers while Triton works, and the torch solvers under the reference backend or without
    Triton; only ``.device`` is read, so a stand-in tensor checks the rule without a GPU."""
    on_cuda = types.SimpleNamespace(device=torch.device("cuda"))
    for selected, want in (("cuda", True), ("triton", True), ("reference", False)):
        monkeypatch.setattr(ops, "resolve_backend", lambda device, backend=None, _s=selected: _s)
        assert base.triton_selected(on_cuda) is want, selected
    monkeypatch.setattr(ops, "resolve_backend", lambda device, backend=None: "cuda")
    monkeypatch.setenv("MMGRAD_TRITON", "0")  # the opt-out
    assert base.triton_selected(on_cuda) is False


@pytest.mark.parametrize("name", ["upgrad", "dualproj", "mgda", "cagrad", "imtl_g", "aligned_mtl",
                                  "config", "pcgrad", "gradvac", "nash_mtl"])
def test_aggregators_run_the_kernels_where_triton_serves(name, monkeypatch, gen):
    """Under the Triton backend the aggregators' solves go to these kernels (counted), and the
    weights match the reference backend's; K > MAX_K keeps the torch solvers."""
    K = 6
    J = torch.randn(K, 40, generator=gen)
    monkeypatch.setenv("MMGRAD_BACKEND", "reference")
    want = mmgrad.weights(ops.gram(J), name)
    calls = []
    for fn in ("project_dual_cone", "min_norm_simplex", "cagrad_dual", "pinv_weights",
               "aligned_weights", "pcgrad_coefficients", "gradvac_coefficients", "nash_solve"):
        real = getattr(solvers, fn)
        monkeypatch.setattr(solvers, fn, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    normalized_calls = []
    real_normalized = solvers.trace_normalized
    monkeypatch.setattr(solvers, "trace_normalized",
                        lambda *a: normalized_calls.append(1) or real_normalized(*a))
    monkeypatch.setenv("MMGRAD_BACKEND", "triton")
    got = mmgrad.weights(ops.gram(J.to(DEV)), name).cpu()
    assert calls, f"{name} did not run a Triton solver"
    # (Nash-MTL divides G by its Frobenius norm; the eigen methods normalise inside their kernel)
    if name not in ("nash_mtl", "imtl_g", "aligned_mtl", "config"):
        assert normalized_calls, f"{name} did not normalise G in the Triton kernel"
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    big = torch.eye(solvers.MAX_K + 1, dtype=F64, device=DEV)
    assert not base.use_triton_solver(big) and base.use_triton_solver(big[1:, 1:])


@pytest.mark.skipif(DEV != "cuda", reason="needs a CUDA GPU (sync debug mode, graph capture)")
def test_kernels_are_sync_free_and_graph_capturable(gen):
    K = 12
    G = _gram(K, "low_rank", gen).cuda() + 1e-4 * torch.eye(K, dtype=F64, device="cuda")
    U = torch.eye(K, dtype=F64, device="cuda") / K
    b, s = cagrad_inputs(G, 0.5)
    order = torch.rand(K, K, device="cuda").argsort(1)
    run = lambda: (solvers.project_dual_cone(G, U, 14, *ARGS), solvers.min_norm_simplex(G, 14, *MN_ARGS),  # noqa: E731
                   solvers.cagrad_dual(G, b, s, 14, *ARGS, cagrad._KAPPA_MAX),
                   solvers.pinv_weights(G, None, 1e-14, _linalg.JACOBI_SWEEPS),
                   solvers.aligned_weights(G, U[0], 1e-14, 1, _linalg.JACOBI_SWEEPS),
                   solvers.pcgrad_coefficients(G, order),
                   *solvers.gradvac_coefficients(G, order, torch.zeros_like(G), 0.5, 1e-8),
                   solvers.nash_newton(G, torch.ones(K, dtype=F64, device="cuda"), 20))
    eager = run()
    torch.cuda.synchronize()
    with host_sync_raises():
        run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    graph.replay()
    torch.cuda.synchronize()
    for a, c in zip(eager, captured):
        assert torch.equal(a, c)
