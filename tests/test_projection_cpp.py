"""The C++ CPU solvers of PCGrad, GradVac (csrc/cpu/projection.cpp) and Nash-MTL's damped Newton
(csrc/cpu/nash.cpp) against the torch solvers they replace on CPU tensors.

Both sides run the same algorithm with the same budget; only the order of K-term sums (and, for
Nash, Cholesky instead of LU) differs, so results agree to rounding: 1e-12 relative to the largest
entry of each row, except where the problem itself amplifies rounding (Nash's Newton systems, whose
forward error is condition number x machine epsilon; see ``_nash_tol``).
"""

import time

import pytest
import torch

import mmgrad.aggregators as A
from mmgrad import ops
from mmgrad.aggregators import nash, projection

from conftest import REQUIRE_CPP, random_gram

F64 = torch.float64
EPS = torch.finfo(F64).eps
SIZES = (1, 2, 3, 8, 16, 64)
KINDS = ("full", "low_rank", "zero_rows", "duplicates", "near_parallel", "float32_gram")
SCALES = (1e-10, 1.0, 1e10)

_cpp_missing = ops.available_backends("cpu")["cpp"]
if _cpp_missing is not None and REQUIRE_CPP:
    raise RuntimeError(f"MMGRAD_REQUIRE_CPP=1 but the C++ backend is unavailable: {_cpp_missing}")
pytestmark = pytest.mark.skipif(_cpp_missing is not None, reason=f"no C++ backend: {_cpp_missing}")


@pytest.fixture(autouse=True)
def _auto_policy(monkeypatch):
    """The auto policy (C++ on CPU tensors) even where the suite runs under a forced MMGRAD_BACKEND:
    otherwise the comparisons below would compare the torch solvers with themselves."""
    monkeypatch.delenv("MMGRAD_BACKEND", raising=False)


def _orders(K: int, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(K, K, generator=gen).argsort(dim=1)


def _assert_rows_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-12) -> None:
    """Every row of ``got`` within ``rtol`` x (largest entry of that row of ``want``)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    want2, got2 = want.reshape(-1, want.shape[-1]), got.reshape(-1, got.shape[-1])
    scale = want2.abs().amax(dim=1, keepdim=True)
    err = (got2 - want2).abs()
    assert torch.isfinite(got2).all() and (err <= rtol * scale).all(), (err / scale).max()


# --------------------------------------------------------------------------------- PCGrad


@pytest.mark.parametrize("K", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_pcgrad_coefficients_match_torch(K, kind, gen):
    for scale in SCALES:
        G, order = random_gram(K, kind, scale, gen), _orders(K, gen)
        C = projection.pcgrad_coefficients(G, order)
        _assert_rows_close(C, projection.pcgrad_coefficients_torch(G, order))
    if K >= 8 and kind == "full":  # some of the K (K - 1) / 2 random pairs conflicted
        assert not torch.equal(C, torch.eye(K, dtype=F64))


# --------------------------------------------------------------------------------- GradVac


@pytest.mark.parametrize("K", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_gradvac_coefficients_match_torch(K, kind, gen):
    for scale in SCALES:
        G, order = random_gram(K, kind, scale, gen), _orders(K, gen)
        # Fresh state (zero targets) and targets from earlier steps, anywhere in (-1, 1).
        for phi_t in (torch.zeros(K, K, dtype=F64), torch.rand(K, K, generator=gen, dtype=F64) * 2 - 1):
            for beta, eps in ((0.5, 1e-8), (0.0, 1e-8), (1.0, 1e-3)):
                C, phi = projection.gradvac_coefficients(G, order, phi_t, beta, eps)
                C_ref, phi_ref = projection.gradvac_coefficients_torch(G, order, phi_t, beta, eps)
                _assert_rows_close(C, C_ref)
                assert torch.allclose(phi, phi_ref, rtol=0, atol=1e-12)
    assert not phi_t.equal(phi) or K == 1 or beta == 0  # the input state is not modified in place


def test_gradvac_without_eps_propagates_nan_like_torch(gen):
    """eps = 0 and a zero row: cos = 0 / 0 is NaN on both sides, in the same entries."""
    G = random_gram(6, "zero_rows", 1.0, gen)
    order, phi_t = _orders(6, gen), torch.zeros(6, 6, dtype=F64)
    C, phi = projection.gradvac_coefficients(G, order, phi_t, 0.5, 0.0)
    C_ref, phi_ref = projection.gradvac_coefficients_torch(G, order, phi_t, 0.5, 0.0)
    assert phi.isnan().any() and torch.equal(phi.isnan(), phi_ref.isnan())
    assert torch.allclose(C, C_ref, rtol=1e-12, atol=0, equal_nan=True)


@pytest.mark.parametrize("kind", ["full", "zero_rows", "near_parallel", "float32_gram"])
def test_gradvac_aggregator_state_matches_reference(kind, gen, monkeypatch):
    """Five calls of GradVac.weights (EMA targets carried over): the C++ and reference backends give
    the same weights and the same phi_t (the orders come from the same Philox stream)."""
    Gs = [random_gram(16, kind, s, gen) for s in (1.0, 1e-10, 1e10, 3.0, 1.0)]
    cpp, ref = A.get("gradvac"), A.get("gradvac")
    for G in Gs:
        w = cpp.weights(G)
        with monkeypatch.context() as m:
            m.setenv("MMGRAD_BACKEND", "reference")
            w_ref = ref.weights(G)
        _assert_rows_close(w, w_ref)
        assert torch.allclose(cpp.phi_t, ref.phi_t, rtol=0, atol=1e-12)
    assert cpp.phi_t.abs().sum() > 0


def test_pcgrad_aggregator_matches_reference(gen, monkeypatch):
    for K in SIZES:
        G = random_gram(K, "full", 1.0, gen)
        w = A.get("pcgrad", seed=3).weights(G)
        monkeypatch.setenv("MMGRAD_BACKEND", "reference")
        w_ref = A.get("pcgrad", seed=3).weights(G)
        monkeypatch.delenv("MMGRAD_BACKEND")
        _assert_rows_close(w, w_ref)


# --------------------------------------------------------------------------------- Nash-MTL


def _nash_problem(G: torch.Tensor) -> torch.Tensor:
    """The matrix NashMTL hands to the Newton solver: G / |G|_F plus the ridge."""
    norm = torch.linalg.matrix_norm(G)
    Gn = G / norm if norm > 0 else G
    return Gn + nash.NASH_RIDGE * torch.eye(G.shape[0], dtype=F64)


def _nash_tol(G: torch.Tensor, a: torch.Tensor) -> float:
    """Relative tolerance for Newton iterates near ``a``: 1e-12, or the forward error of the K x K
    solves (cond(H) x eps, H = G + diag(1/a^2)) where the problem is that ill-conditioned (a ridge
    of 1e-8 on a rank-deficient G gives cond(H) ~ 1e7; measured errors stay below 0.5 cond eps)."""
    cond = torch.linalg.cond(G + torch.diag(1.0 / (a * a))).item()
    return max(1e-12, 8 * EPS * cond)


@pytest.mark.parametrize("K", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_nash_newton_matches_torch(K, kind, gen):
    for scale in SCALES:
        G = _nash_problem(random_gram(K, kind, scale, gen))
        starts = (torch.rsqrt(G.diagonal()),  # cold start (roughly)
                  torch.exp(torch.randn(K, generator=gen, dtype=F64) * 2))  # far from the solution
        for a0 in starts:
            for iters in (1, 2, 20):  # 1 and 2 stop well before convergence: the iterates agree too
                a = nash.nash_newton(G, a0, iters)
                a_ref = nash.nash_newton_torch(G, a0, iters)
                _assert_rows_close(a, a_ref, _nash_tol(G, a_ref))


def test_nash_newton_stops_at_a_fixed_point():
    """Once an iteration returns its input bit for bit the C++ loop stops: a budget of 10^9
    iterations (over a minute without the exit) returns at once, with the converged solution."""
    for G in (torch.tensor([[0.3]], dtype=F64), torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=F64)):
        a0 = torch.full((G.shape[0],), 5.0, dtype=F64)
        start = time.perf_counter()
        a = nash.nash_newton(G, a0, 10**9)
        assert time.perf_counter() - start < 1.0
        a_ref = nash.nash_newton_torch(G, a0, 60)
        assert torch.allclose(a, a_ref, rtol=1e-15, atol=0)
        assert torch.allclose(G @ a, 1 / a, rtol=1e-14, atol=0)  # G a = 1 / a


def test_nash_newton_indefinite_system_is_solved_like_torch():
    """H = G + diag(1/a^2) with an indefinite G ([[1, 2], [2, 1]] here) has no Cholesky factor: the
    C++ solver then solves it by LU, as torch does, instead of failing or returning NaN."""
    G = torch.tensor([[0.0, 2.0], [2.0, 0.0]], dtype=F64)
    a0 = torch.ones(2, dtype=F64)
    for iters in (1, 3):
        a = nash.nash_newton(G, a0, iters)
        assert torch.isfinite(a).all()
        _assert_rows_close(a, nash.nash_newton_torch(G, a0, iters))


def test_nash_newton_zero_budget_returns_a_copy():
    G, a0 = torch.eye(3, dtype=F64), torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    a = nash.nash_newton(G, a0, 0)
    assert torch.equal(a, a0) and a.data_ptr() != a0.data_ptr()


@pytest.mark.parametrize("kind", KINDS)
def test_nash_aggregator_matches_reference(kind, gen, monkeypatch):
    """NashMTL.weights, clipped and not, over calls that warm-start from the previous solution.
    Each call starts both sides from the reference's state: the budget of 20 iterations does not
    converge on rank-deficient G, so differences would otherwise carry from call to call."""
    for max_norm in (1.0, 0.0):
        cpp, ref = A.get("nash_mtl", max_norm=max_norm), A.get("nash_mtl", max_norm=max_norm)
        for scale in (1.0, 1e-10, 1e10, 1.0):
            G = random_gram(8, kind, scale, gen)
            cpp.load_state_dict(ref.state_dict())
            w = cpp.weights(G)
            with monkeypatch.context() as m:
                m.setenv("MMGRAD_BACKEND", "reference")
                w_ref = ref.weights(G)
            tol = _nash_tol(_nash_problem(G), ref.alpha * torch.linalg.matrix_norm(G).sqrt())
            _assert_rows_close(w, w_ref, tol)
            _assert_rows_close(cpp.alpha, ref.alpha, tol)
        assert cpp.step == 4


# --------------------------------------------------------------------------------- routing, errors


def _boom(*args):
    raise AssertionError("the torch solver ran on a CPU tensor with the C++ backend available")


def test_cpu_tensors_run_the_cpp_solvers_and_the_reference_backend_the_torch_ones(gen, monkeypatch):
    G = random_gram(5, "full", 1.0, gen)
    monkeypatch.setattr(projection, "pcgrad_coefficients_torch", _boom)
    monkeypatch.setattr(projection, "gradvac_coefficients_torch", _boom)
    monkeypatch.setattr(nash, "nash_newton_torch", _boom)
    for name in ("pcgrad", "gradvac", "nash_mtl"):
        assert torch.isfinite(A.weights(G, name)).all()
    monkeypatch.undo()

    calls = []

    def counting(fn):
        def wrapped(*args):
            calls.append(fn.__name__)
            return fn(*args)
        return wrapped

    for module, fn in ((projection, projection.pcgrad_coefficients_torch),
                       (projection, projection.gradvac_coefficients_torch),
                       (nash, nash.nash_newton_torch)):
        monkeypatch.setattr(module, fn.__name__, counting(fn))
    monkeypatch.setenv("MMGRAD_BACKEND", "reference")
    for name in ("pcgrad", "gradvac", "nash_mtl"):
        A.weights(G, name)
    # float32 matrices (not what to_solve makes on CPU) take the torch solvers on any backend
    monkeypatch.delenv("MMGRAD_BACKEND")
    projection.pcgrad_coefficients(G.float(), _orders(5, gen))
    assert calls == ["pcgrad_coefficients_torch", "gradvac_coefficients_torch", "nash_newton_torch",
                     "pcgrad_coefficients_torch"]


def test_bad_arguments_get_clear_errors():
    G, order = torch.eye(3, dtype=F64), torch.zeros(3, 3, dtype=torch.int64)
    cpp = torch.ops.mmgrad_C
    with pytest.raises(RuntimeError, match="G must be float64"):
        cpp.pcgrad_coefficients(G.float(), order)
    with pytest.raises(RuntimeError, match="square"):
        cpp.pcgrad_coefficients(G[:2], order)
    with pytest.raises(RuntimeError, match="order must be int64"):
        cpp.pcgrad_coefficients(G, order.int())
    with pytest.raises(RuntimeError, match=r"order entries must be in \[0, 3\), got 3"):
        cpp.pcgrad_coefficients(G, torch.full((3, 3), 3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="order must have G's shape"):
        cpp.gradvac_coefficients(G, order[:2], G, 0.5, 1e-8)
    with pytest.raises(RuntimeError, match="phi_t must have G's shape"):
        cpp.gradvac_coefficients(G, order, G[:2], 0.5, 1e-8)
    with pytest.raises(RuntimeError, match="alpha0 must have shape"):
        cpp.nash_newton(G, torch.ones(2, dtype=F64), 3)
    with pytest.raises(RuntimeError, match="iters must be non-negative"):
        cpp.nash_newton(G, torch.ones(3, dtype=F64), -1)


def test_custom_ops_pass_opcheck(gen):
    G = random_gram(4, "full", 1.0, gen)
    order = _orders(4, gen)
    torch.library.opcheck(projection.pcgrad_coefficients.op, (G, order))
    torch.library.opcheck(projection.gradvac_coefficients.op,
                          (G, order, torch.zeros(4, 4, dtype=F64), 0.5, 1e-8))
    torch.library.opcheck(nash.nash_newton.op, (G + torch.eye(4, dtype=F64), torch.ones(4, dtype=F64), 5))
