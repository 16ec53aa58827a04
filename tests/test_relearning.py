"""Diagnosing & Re-learning (METHODS.md §5) against straightforward references written here:
hand-counted purities, a per-parameter float64 loop for the soft re-initialisation, and the 12.6
test value alpha = tanh(3 * 0.1) = 0.2913."""

import copy
import io
import math
import sys

import pytest
import torch
from torch import nn

import mmgrad
from mmgrad.methods import relearning as relearning_module
from mmgrad.methods.relearning import Relearning, clustering_purity, minmax_scale


class Net(nn.Module):
    """Two small encoders (one with BatchNorm) and a concat head, float64."""

    def __init__(self):
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 4))
        self.visual = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 4))
        self.head = nn.Linear(8, 3)

    def forward(self, xa, xv):
        return self.head(torch.cat([self.audio(xa), self.visual(xv)], 1))


def make_net(seed=0):
    torch.manual_seed(seed)
    return Net().double()


def perturb_(model, scale=0.5):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def reference_relearn(current, initial, alpha):
    """theta <- alpha * theta_init + (1 - alpha) * theta, parameter by parameter, in float64."""
    return [alpha * i.double() + (1 - alpha) * c.double() for c, i in zip(current, initial)]


def blobs(centers, per, spread=0.05, dim=2, seed=0):
    """Tight Gaussian blobs around well-separated centres, (len(centers) * per, dim)."""
    g = torch.Generator().manual_seed(seed)
    pts = [torch.tensor(c, dtype=torch.float64) + spread * torch.randn(per, dim, generator=g, dtype=torch.float64) for c in centers]
    return torch.cat(pts)


# --- MinMax scaling and purity -------------------------------------------------------------------


def test_minmax_scale_matches_loop_and_constant_columns_are_zero():
    x = torch.randn(9, 4, dtype=torch.float64) * torch.tensor([1.0, 1e6, 1e-6, 3.0], dtype=torch.float64)
    x[:, 3] = 2.5  # constant column
    got = minmax_scale(x)
    for j in range(4):
        col = [float(v) for v in x[:, j]]
        lo, hi = min(col), max(col)
        for i, v in enumerate(col):
            want = 0.0 if hi == lo else 2 * (v - lo) / (hi - lo) - 1
            assert got[i, j].item() == pytest.approx(want, abs=1e-12)
    assert got[:, :3].min(0).values.tolist() == [-1.0, -1.0, -1.0]
    assert got[:, :3].max(0).values.tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert torch.equal(got[:, 3], torch.zeros(9, dtype=torch.float64))


def test_purity_of_separated_clusters_is_one():
    x = blobs([(0, 0), (5, 5), (-5, 5)], per=6)
    y = torch.arange(3).repeat_interleave(6)
    assert clustering_purity(x, y, 3) == 1.0
    # The labels' names do not matter, only the partition.
    assert clustering_purity(x, torch.tensor([2, 0, 1]).repeat_interleave(6), 3) == 1.0


def test_purity_counts_cluster_majorities():
    # Three tight, far-apart blobs; within each blob the labels are mixed, so the purity is the sum
    # of the blobs' majority counts over N: (3 + 2 + 3) / 13.
    x = blobs([(0, 0), (10, 0), (0, 10)], per=1, spread=0.0)
    sizes = [4, 4, 5]
    x = torch.cat([x[i].expand(n, 2) + 0.01 * torch.randn(n, 2, dtype=torch.float64) for i, n in enumerate(sizes)])
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 0, 1])
    assert clustering_purity(x, y, 3) == pytest.approx(8 / 13)


def test_purity_scales_columns_before_clustering():
    # Column 0 separates the classes (values -1 / +1), column 1 is noise a million times wider.
    # Unscaled, k-means would split along the noise (purity near 0.5); scaled to [-1, 1] both
    # columns are comparable and the class split has the smaller inertia.
    n = 40
    g = torch.Generator().manual_seed(1)
    y = torch.arange(2).repeat_interleave(n // 2)
    x = torch.stack([2.0 * y.double() - 1, 1e6 * torch.rand(n, generator=g, dtype=torch.float64)], 1)
    assert clustering_purity(x, y, 2) == 1.0
    # A constant column changes nothing.
    x3 = torch.cat([x, torch.full((n, 1), 7.0, dtype=torch.float64)], 1)
    assert clustering_purity(x3, y, 2) == 1.0


def test_purity_is_deterministic_and_within_bounds():
    x = torch.randn(30, 4)
    y = torch.randint(0, 3, (30,))
    a = clustering_purity(x, y, 3, seed=5)
    assert a == clustering_purity(x.clone(), y.clone(), 3, seed=5)
    counts = torch.bincount(y)
    assert counts.max().item() / 30 <= a <= 1.0  # never below the single-cluster majority
    assert clustering_purity(x, y, 30) == 1.0  # one point per cluster


def test_purity_input_errors(monkeypatch):
    x, y = torch.randn(6, 2), torch.randint(0, 2, (6,))
    with pytest.raises(ValueError, match="clusters"):
        clustering_purity(x, y, 7)
    with pytest.raises(ValueError, match="integer"):
        clustering_purity(x, y.double(), 2)
    with pytest.raises(ValueError, match=r"\(N,\)"):
        clustering_purity(x, y[:5], 2)
    with pytest.raises(ValueError, match="NaN"):
        clustering_purity(torch.tensor([[0.0], [float("nan")]]), torch.tensor([0, 1]), 2)
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)  # import now fails
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        clustering_purity(x, y, 2)


# --- diagnosing ----------------------------------------------------------------------------------


def test_alpha_value_from_methods_12_6():
    assert math.tanh(3 * 0.1) == pytest.approx(0.2913, abs=5e-5)
    model = make_net()
    r = Relearning({"audio": model.audio, "visual": model.visual}, lam=3.0)
    # Train split: two separated blobs, labels follow them (purity 1.0). Validation split: the same
    # geometry with one of ten labels flipped (purity 0.9). gap = 0.1 -> alpha = tanh(0.3).
    x_train = blobs([(0, 0), (4, 4)], per=5, seed=1)
    y_train = torch.arange(2).repeat_interleave(5)
    x_val = blobs([(0, 0), (4, 4)], per=5, seed=2)
    y_val = y_train.clone()
    y_val[0] = 1
    alpha = r.diagnose({"audio": x_train}, y_train, {"audio": x_val}, y_val)
    assert list(alpha) == ["audio"]  # only the modalities given
    assert r.last_purity["audio"] == (1.0, pytest.approx(0.9))
    assert alpha["audio"] == pytest.approx(math.tanh(0.3), abs=1e-12)
    assert alpha["audio"] == pytest.approx(0.2913, abs=5e-5)


def test_diagnose_uses_purity_per_modality_and_class_count(monkeypatch):
    calls = []
    real = relearning_module.clustering_purity

    def spy(features, labels, clusters, seed=0):
        calls.append((features.shape[1], clusters, seed))
        return real(features, labels, clusters, seed)

    monkeypatch.setattr(relearning_module, "clustering_purity", spy)
    model = make_net()
    r = Relearning({"audio": model.audio, "visual": model.visual}, lam=2.0, seed=3)
    train = {"audio": torch.randn(12, 3), "visual": torch.randn(12, 5)}
    val = {"audio": torch.randn(8, 3), "visual": torch.randn(8, 5)}
    y_train = torch.randint(0, 2, (12,))
    y_val = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])  # class 2 only in val: 3 clusters
    alpha = r.diagnose(train, y_train, val, y_val)
    assert calls == [(3, 3, 3), (3, 3, 3), (5, 3, 3), (5, 3, 3)]
    for m in ("audio", "visual"):
        p_train = real(train[m], y_train, 3, 3)
        p_val = real(val[m], y_val, 3, 3)
        assert alpha[m] == pytest.approx(math.tanh(2.0 * abs(p_train - p_val)), abs=1e-15)
    # An explicit cluster count overrides the class count.
    calls.clear()
    Relearning({"audio": model.audio}, clusters=4).diagnose({"audio": train["audio"]}, y_train, {"audio": val["audio"]}, y_val)
    assert [c[1] for c in calls] == [4, 4]


def test_diagnose_input_errors():
    model = make_net()
    r = Relearning({"audio": model.audio, "visual": model.visual})
    y = torch.randint(0, 2, (6,))
    z = torch.randn(6, 3)
    with pytest.raises(ValueError, match="same modalities"):
        r.diagnose({"audio": z}, y, {"visual": z}, y)
    with pytest.raises(KeyError, match="head"):
        r.diagnose({"head": z}, y, {"head": z}, y)
    with pytest.raises(ValueError, match="N=5"):
        r.diagnose({"audio": z}, y[:5], {"audio": z}, y)


# --- re-learning ---------------------------------------------------------------------------------


@pytest.mark.parametrize("alphas", [(0.37, 0.81), (0.0, 1.0), (1.0, 0.2913)])
def test_relearn_matches_per_parameter_float64_loop(alphas):
    model = make_net()
    init = {m: [p.detach().clone() for p in getattr(model, m).parameters()] for m in ("audio", "visual")}
    r = Relearning({"audio": model.audio, "visual": model.visual})
    perturb_(model)
    head_before = [p.detach().clone() for p in model.head.parameters()]
    current = {m: [p.detach().clone() for p in getattr(model, m).parameters()] for m in ("audio", "visual")}
    alpha = dict(zip(("audio", "visual"), alphas))
    r.relearn(alpha)
    for m in ("audio", "visual"):
        want = reference_relearn(current[m], init[m], alpha[m])
        for p, w, c, i in zip(getattr(model, m).parameters(), want, current[m], init[m]):
            if alpha[m] == 0.0:
                assert torch.equal(p, c)  # no change at all
            elif alpha[m] == 1.0:
                assert torch.equal(p, i)  # exactly the initial weights
            else:
                torch.testing.assert_close(p.detach(), w, rtol=1e-14, atol=1e-15)
    for p, h in zip(model.head.parameters(), head_before):  # the head is not declared: untouched
        assert torch.equal(p, h)
    assert r.count == 1 and r.history == [{"epoch": None, "alpha": alpha}]


def test_relearn_float32_and_noncontiguous_parameters():
    # A transposed (non-contiguous) weight and float32: copied through the flat buffer and back.
    torch.manual_seed(1)
    w = nn.Parameter(torch.randn(4, 3).t())
    b = nn.Parameter(torch.randn(4))
    init = [w.detach().clone(), b.detach().clone()]
    r = Relearning({"m": [w, b]})
    assert r._groups["m"][0].flat_view() is None  # separate tensors: gathered and copied back
    with torch.no_grad():
        w.mul_(-2.0)
        b.add_(1.0)
    current = [w.detach().clone(), b.detach().clone()]
    r.relearn({"m": 0.3})
    assert not w.is_contiguous()
    for p, want in zip([w, b], reference_relearn(current, init, 0.3)):
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-6, atol=1e-6)


def test_relearn_in_place_on_parameters_sharing_one_flat_buffer():
    # Parameters that are views of one contiguous buffer are interpolated right there.
    flat = torch.randn(10, dtype=torch.float64)
    a = nn.Parameter(flat[:6].view(2, 3))
    b = nn.Parameter(flat[6:])
    assert a.data_ptr() == flat.data_ptr()
    init = [a.detach().clone(), b.detach().clone()]
    r = Relearning({"m": [a, b]})
    view = r._groups["m"][0].flat_view()  # no gather / scatter copy on this path
    assert view is not None and view.data_ptr() == flat.data_ptr() and view.shape == (10,)
    with torch.no_grad():
        flat.mul_(3.0).add_(1.0)
    current = [a.detach().clone(), b.detach().clone()]
    r.relearn({"m": 0.6})
    want = reference_relearn(current, init, 0.6)
    torch.testing.assert_close(a.detach(), want[0], rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(b.detach(), want[1], rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(flat, torch.cat([want[0].reshape(-1), want[1]]), rtol=1e-14, atol=1e-15)


def test_relearn_keeps_optimizer_state_and_batchnorm_statistics():
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    r = Relearning({"audio": model.audio, "visual": model.visual})
    for _ in range(3):  # momentum buffers and BN running statistics now hold real values
        opt.zero_grad()
        model(torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)).square().mean().backward()
        opt.step()
    params = list(model.parameters())
    momentum = {id(p): (opt.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"].clone()) for p in params}
    bn = model.audio[1]
    stats = {k: v.clone() for k, v in bn.state_dict().items() if "running" in k or "num_batches" in k}
    assert bn.num_batches_tracked.item() == 3
    r.relearn({"audio": 0.5, "visual": 0.25})
    assert list(model.parameters()) == params and all(a is b for a, b in zip(model.parameters(), params))
    for p in params:  # same parameter objects own the same, unchanged momentum tensors
        buf, before = momentum[id(p)]
        assert opt.state[p]["momentum_buffer"] is buf
        assert torch.equal(buf, before)
    for k, v in stats.items():
        assert torch.equal(bn.state_dict()[k], v)
    # The optimizer keeps working on the re-learnt parameters.
    opt.zero_grad()
    model(torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)).sum().backward()
    opt.step()


def test_relearn_argument_errors():
    model = make_net()
    r = Relearning({"audio": model.audio})
    with pytest.raises(KeyError, match="visual"):
        r.relearn({"visual": 0.5})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        r.relearn({"audio": 1.5})
    assert r.count == 0


def test_from_balanced_optimizer_equals_from_mapping():
    m1 = make_net()
    m2 = copy.deepcopy(m1)
    opt = mmgrad.BalancedOptimizer(
        torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.9),
        modalities={"audio": m1.audio, "visual": m1.visual},
        method=mmgrad.OGM(alpha=0.5, params="all"),
    )
    r1 = Relearning(opt)
    r2 = Relearning({"audio": m2.audio, "visual": list(m2.visual.parameters())})
    assert r1.names == r2.names == ["audio", "visual"]
    torch.manual_seed(7)
    perturb_(m1)
    torch.manual_seed(7)
    perturb_(m2)
    r1.relearn({"audio": 0.4, "visual": 0.9})
    r2.relearn({"audio": 0.4, "visual": 0.9})
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


# --- schedule and step ---------------------------------------------------------------------------


def features_fn_factory(counter):
    def features_fn():
        counter.append(1)
        y = torch.arange(3).repeat(4)
        train = {"audio": torch.randn(12, 3), "visual": torch.randn(12, 4)}
        val = {"audio": torch.randn(12, 3), "visual": torch.randn(12, 4)}
        return train, y, val, y

    return features_fn


@pytest.mark.parametrize("every,max_times,expected", [(20, 3, [20, 40, 60]), (15, 2, [15, 30]), (20, 0, [])])
def test_due_and_step_schedule(every, max_times, expected):
    model = make_net()
    r = Relearning({"audio": model.audio, "visual": model.visual}, every=every, max_times=max_times)
    assert not r.due(0)  # epoch 0 never
    called, fired = [], []
    for epoch in range(91):
        before = copy.deepcopy(model.state_dict())
        alpha = r.step(epoch, features_fn_factory(called))
        if alpha is None:
            for k, v in model.state_dict().items():
                assert torch.equal(v, before[k])
        else:
            fired.append(epoch)
            assert set(alpha) == {"audio", "visual"} and all(0 <= a < 1 for a in alpha.values())
    assert fired == expected
    assert len(called) == len(expected)  # features only extracted when due
    assert r.count == len(expected)
    assert [h["epoch"] for h in r.history] == expected


def test_construction_errors():
    model = make_net()
    mods = {"audio": model.audio}
    for kwargs, match in [
        ({"lam": 0}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"every": 0}, "every"),
        ({"every": 2.5}, "every"),
        ({"max_times": -1}, "max_times"),
        ({"clusters": 1}, "clusters"),
        ({"seed": 0.5}, "seed"),
    ]:
        with pytest.raises(ValueError, match=match):
            Relearning(mods, **kwargs)
    with pytest.raises(ValueError, match="empty"):
        Relearning({})
    with pytest.raises(ValueError, match="both modality"):
        Relearning({"a": model.audio, "b": list(model.audio.parameters())[:1]})
    with pytest.raises(TypeError, match="mapping"):
        Relearning(list(model.audio.parameters()))
    with pytest.raises(ValueError, match="no parameters"):
        Relearning({"a": []})


# --- state ---------------------------------------------------------------------------------------


def test_state_dict_round_trip_resumes_identically():
    model = make_net()
    r = Relearning({"audio": model.audio, "visual": model.visual})
    perturb_(model)
    r.relearn({"audio": 0.5, "visual": 0.1}, epoch=20)
    perturb_(model)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "relearn": r.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)

    resumed = make_net(seed=123)  # different initial weights: theta_init must come from the state
    resumed.load_state_dict(saved["model"])
    r2 = Relearning({"audio": resumed.audio, "visual": resumed.visual})
    r2.load_state_dict(saved["relearn"])
    assert r2.count == 1 and r2.history == r.history
    assert not r2.due(20) and r2.due(40)

    r.relearn({"audio": 0.7, "visual": 1.0}, epoch=40)
    r2.relearn({"audio": 0.7, "visual": 1.0}, epoch=40)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert r2.history == r.history and r2.count == r.count == 2

    # Mutating the saved state does not reach into the live object.
    sd = r.state_dict()
    sd["init"]["audio"][0].zero_()
    sd["history"].clear()
    assert len(r.history) == 2 and r.state_dict()["init"]["audio"][0].abs().sum() > 0


def test_load_state_dict_refuses_another_declaration():
    model = make_net()
    r = Relearning({"audio": model.audio, "visual": model.visual})
    with pytest.raises(ValueError, match="modalities"):
        Relearning({"audio": model.audio}).load_state_dict(r.state_dict())
    sd = r.state_dict()
    sd["init"]["visual"] = [t[:-1] for t in sd["init"]["visual"]]
    with pytest.raises(ValueError, match="visual"):
        Relearning({"audio": model.audio, "visual": model.visual}).load_state_dict(sd)
