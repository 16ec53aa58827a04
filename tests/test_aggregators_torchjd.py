"""Agreement of mmgrad.aggregators with torchjd 0.18 on random matrices.

Tolerances (relative error of the aggregated vector, float64 inputs):

* exact same algorithm, closed form or same finite steps: mean, sum, imtl_g, aligned_mtl (3 scale
  modes), config, mgda(solver="frank_wolfe"), pcgrad and gradvac (same visiting orders injected
  into both): 1e-7 (observed <= 5e-9; gradvac's eps is applied to normalised norms here);
* both solve the same QP to optimality, different solvers: upgrad, dualproj (quadprog): 1e-6
  (observed 2e-12);
* mgda exact vs torchjd's Frank-Wolfe run to epsilon=1e-12: 1e-4 (FW converges sublinearly;
  observed 8e-6). With torchjd's defaults (epsilon=1e-3) FW stops early, so the default exact
  solver differs from torchjd's MGDA by up to ~1e-2: only the objective is compared
  (ours <= theirs);
* cagrad (cvxpy + Clarabel): 1e-3 (observed 7e-5, Clarabel's tolerance);
* nash_mtl (cvxpy + ECOS, stops at |G a - 1/a| < 1e-3): 1e-4 (observed 3e-8);
* graddrop: exact, with an ``f`` that makes the random draw irrelevant.
"""

from __future__ import annotations

import warnings

import pytest
import torch

torchjd = pytest.importorskip("torchjd", reason="torchjd 0.18 not installed (pip install torchjd[full]==0.18.0)")
T = pytest.importorskip("torchjd.aggregation")

import mmgrad.aggregators as A  # noqa: E402

F64 = torch.float64
KS = (2, 3, 5, 8)


def matrices(n=12, P=40, K=None):
    g = torch.Generator().manual_seed(1234)
    out = []
    for t in range(n):
        K = KS[t % len(KS)] if K is None else K
        J = torch.randn(K, P, generator=g, dtype=F64)
        if t % 3 == 0:  # correlated rows: few conflicts
            J = J + 2 * torch.randn(1, P, generator=g, dtype=F64)
        if t % 3 == 1:  # strong conflicts
            J[1] = -0.7 * J[0] + 0.3 * J[1]
        out.append(J)
    return out


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


def _optional(ctor):
    try:
        return ctor()
    except ImportError as e:  # a torchjd extra is missing
        pytest.skip(f"torchjd optional dependency missing: {e}")


CASES = [
    ("mean", lambda K: T.Mean(), {}, 1e-12),
    ("sum", lambda K: T.Sum(), {}, 1e-12),
    ("upgrad", lambda K: T.UPGrad(), {}, 1e-6),
    ("upgrad", lambda K: T.UPGrad(pref_vector=torch.arange(1.0, K + 1, dtype=F64)),
     "pref", 1e-6),
    ("dualproj", lambda K: T.DualProj(), {}, 1e-6),
    ("mgda", lambda K: T.MGDA(), {"solver": "frank_wolfe"}, 1e-7),
    ("mgda", lambda K: T.MGDA(epsilon=1e-12, max_iters=100000), {}, 1e-4),
    ("cagrad", lambda K: T.CAGrad(c=0.5), {"c": 0.5}, 1e-3),
    ("cagrad", lambda K: T.CAGrad(c=0.1), {"c": 0.1}, 1e-3),
    ("imtl_g", lambda K: T.IMTLG(), {}, 1e-7),
    ("aligned_mtl", lambda K: T.AlignedMTL(), {}, 1e-7),
    ("aligned_mtl", lambda K: T.AlignedMTL(scale_mode="median"), {"scale_mode": "median"}, 1e-7),
    ("aligned_mtl", lambda K: T.AlignedMTL(scale_mode="rmse"), {"scale_mode": "rmse"}, 1e-7),
    ("config", lambda K: T.ConFIG(), {}, 1e-7),
    ("nash_mtl", lambda K: T.NashMTL(n_tasks=K), {}, 1e-4),
    ("nash_mtl", lambda K: T.NashMTL(n_tasks=K, max_norm=0.0), {"max_norm": 0.0}, 1e-4),
]


@pytest.mark.parametrize("name,ctor,opts,tol", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_agreement(name, ctor, opts, tol):
    for J in matrices():
        K = J.shape[0]
        theirs = _optional(lambda: ctor(K))
        if opts == "pref":
            opts_ = {"pref_vector": torch.arange(1.0, K + 1, dtype=F64)}
        else:
            opts_ = opts
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = theirs(J)
        out = A.get(name, **opts_)(J)
        assert rel(out, ref) <= tol, (name, opts, K, rel(out, ref))


def test_mgda_default_is_at_least_as_good_as_torchjd():
    for J in matrices():
        G = J @ J.T
        ours = A.weights(G, "mgda")
        theirs = T.MGDA()(J)
        assert (ours @ G @ ours) <= theirs @ theirs + 1e-12 * G.trace()


def _fake_randperm(perms):
    it = iter(perms)

    def randperm(n, *args, **kwargs):
        p = next(it)
        assert len(p) == n
        return p.clone()
    return randperm


@pytest.mark.parametrize("K", [2, 3, 5, 8])
def test_pcgrad_same_orders(K, monkeypatch):
    g = torch.Generator().manual_seed(K)
    for J in matrices(6, K=K):
        order = torch.stack([torch.randperm(K, generator=g) for _ in range(K)])
        monkeypatch.setattr(torch, "randperm", _fake_randperm(list(order)))
        ref = T.PCGrad()(J)
        monkeypatch.undo()
        out = A.get("pcgrad").weights(J @ J.T, order=order) @ J
        assert rel(out, ref) <= 1e-7


@pytest.mark.parametrize("K", [2, 3, 5])
def test_gradvac_same_orders_over_steps(K, monkeypatch):
    g = torch.Generator().manual_seed(K)
    theirs, ours = T.GradVac(), A.get("gradvac")
    for J in matrices(6, K=K):
        perms, order = [], []
        for i in range(K):
            p = torch.randperm(K - 1, generator=g)
            others = [j for j in range(K) if j != i]
            perms.append(p)
            order.append(torch.tensor([i] + [others[k] for k in p.tolist()]))
        monkeypatch.setattr(torch, "randperm", _fake_randperm(perms))
        ref = theirs(J)
        monkeypatch.undo()
        out = ours.weights(J @ J.T, order=torch.stack(order)) @ J
        assert rel(out, ref) <= 1e-7


def test_graddrop_deterministic_f():
    # f(P) in {-0.5, 1.5}: the comparison with U ~ [0, 1) never depends on the draw
    f = lambda P: torch.where(P > 0.5, 1.5, -0.5).to(P.dtype)  # noqa: E731
    for J in matrices(8, P=500):
        K = J.shape[0]
        leak = torch.linspace(0, 0.5, K, dtype=F64)
        for lk in (None, leak):
            ref = T.GradDrop(f=f, leak=lk)(J)
            out = A.get("graddrop", f=f, leak=lk)(J)
            assert torch.allclose(out, ref, atol=1e-12)
