"""Sample- and modality-level modality valuation (METHODS.md §6) against references written here:
the two-player closed form, Shapley values as average marginal contributions over all orderings,
the copies table of §6.2 as an if-chain, and the modality-level count int(p * N)."""

import itertools
import math

import pytest
import torch
from torch import nn

import mmgrad
from mmgrad.methods.valuation import (
    Resampled,
    ResampledDataset,
    ValuationResampler,
    epoch_rows,
    mask_features,
    modality_shapley,
    resample_copies,
)


class ConcatHead(nn.Module):
    """A linear concat head over {name: (N, d_m)} features."""

    def __init__(self, dims, classes):
        super().__init__()
        self.names = list(dims)
        self.fc = nn.Linear(sum(dims.values()), classes).double()

    def forward(self, feats):
        return self.fc(torch.cat([feats[m] for m in self.names], 1))


def random_problem(dims, n=200, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = ConcatHead(dims, classes)
    feats = {m: torch.randn(n, d, generator=g, dtype=torch.float64) for m, d in dims.items()}
    labels = torch.randint(0, classes, (n,), generator=g)
    return head, feats, labels


def correct_with(head, feats, labels, coalition):
    """1[argmax head(features outside the coalition zeroed) = y] per sample, by hand."""
    masked = {m: (z if m in coalition else torch.zeros_like(z)) for m, z in feats.items()}
    with torch.no_grad():
        logits = head(masked)
    return [float(int(logits[i].argmax()) == int(labels[i])) for i in range(len(labels))]


def shapley_by_permutations(players, value):
    """phi_m = mean over all orderings of m's marginal contribution to the players before it."""
    phi = {m: 0.0 for m in players}
    orders = list(itertools.permutations(players))
    for order in orders:
        before = frozenset()
        for m in order:
            phi[m] += value(before | {m}) - value(before)
            before = before | {m}
    return {m: v / len(orders) for m, v in phi.items()}


# --- Shapley values ------------------------------------------------------------------------------


@pytest.mark.parametrize("size_weighted", [True, False])
def test_two_modalities_closed_form(size_weighted):
    head, feats, labels = random_problem({"audio": 3, "visual": 4})
    phi = modality_shapley(head, feats, labels, size_weighted=size_weighted)
    assert phi.shape == (200, 2) and phi.dtype == torch.float64
    c_a = correct_with(head, feats, labels, {"audio"})
    c_v = correct_with(head, feats, labels, {"visual"})
    c_av = correct_with(head, feats, labels, {"audio", "visual"})
    w = 2.0 if size_weighted else 1.0
    for i in range(200):
        v_a, v_v, v_av = c_a[i], c_v[i], w * c_av[i]
        assert phi[i, 0].item() == (v_a + v_av - v_v) / 2
        assert phi[i, 1].item() == (v_v + v_av - v_a) / 2
    allowed = {-0.5, 0.0, 0.5, 1.0, 1.5} if size_weighted else {-0.5, 0.0, 0.5, 1.0}
    assert set(phi.flatten().tolist()) <= allowed
    assert len(set(phi.flatten().tolist())) >= 3  # the random head really exercises the cases


@pytest.mark.parametrize("size_weighted", [True, False])
def test_three_modalities_against_permutations_and_efficiency(size_weighted):
    dims = {"a": 2, "b": 3, "c": 2}
    for seed in range(3):
        head, feats, labels = random_problem(dims, n=40, classes=3, seed=seed)
        phi = modality_shapley(head, feats, labels, size_weighted=size_weighted)
        cache = {
            frozenset(S): correct_with(head, feats, labels, set(S))
            for r in range(1, 4)
            for S in itertools.combinations(dims, r)
        }
        for i in range(40):
            value = {
                S: (len(S) if size_weighted else 1) * correct[i] for S, correct in cache.items()
            }
            value[frozenset()] = 0.0
            want = shapley_by_permutations(list(dims), value.__getitem__)
            for j, m in enumerate(dims):
                assert phi[i, j].item() == pytest.approx(want[m], abs=1e-12)
            # Efficiency: the values add up to v(all modalities) - v(empty).
            assert phi[i].sum().item() == pytest.approx(value[frozenset(dims)], abs=1e-12)


def test_head_sees_zeroed_features_without_grad():
    head, feats, labels = random_problem({"audio": 3, "visual": 2}, n=10)
    seen = []

    def recording_head(f):
        seen.append(({m: z.clone() for m, z in f.items()}, torch.is_grad_enabled()))
        return head(f)

    feats = {m: z.requires_grad_() for m, z in feats.items()}
    phi = modality_shapley(recording_head, feats, labels)
    assert not phi.requires_grad
    assert len(seen) == 3  # 2^M - 1: the empty coalition is worth 0 without a head call
    patterns = []
    for f, grad in seen:
        assert not grad
        kept = tuple(m for m in ("audio", "visual") if not torch.equal(f[m], torch.zeros_like(f[m])))
        for m in ("audio", "visual"):
            assert torch.equal(f[m], feats[m].detach()) if m in kept else torch.equal(f[m], torch.zeros_like(f[m]))
        patterns.append(kept)
    assert sorted(patterns) == sorted([("audio",), ("visual",), ("audio", "visual")])


def test_shapley_input_errors():
    head, feats, labels = random_problem({"a": 2, "b": 2}, n=5)
    with pytest.raises(ValueError, match="N=4"):
        modality_shapley(head, feats, labels[:4])
    with pytest.raises(ValueError, match="logits"):
        modality_shapley(lambda f: f["a"].sum(1), feats, labels)
    with pytest.raises(ValueError, match="empty"):
        modality_shapley(head, {}, labels)


# --- sample level ----------------------------------------------------------------------------------


def copies_reference(phi):
    if phi >= 1:
        return 0
    if phi > 0.4:
        return 1
    if phi > -0.1:
        return 2
    return 3


def test_copies_table_buckets_and_boundaries():
    values = [2.0, 1.5, 1.0, 0.99, 0.9, 0.5, 0.41, 0.4, 0.39, 0.0, -0.05, -0.0999, -0.1, -0.5, -3.0]
    expected = [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3]
    phi = torch.tensor(values, dtype=torch.float64)
    got = resample_copies(phi)
    assert got.dtype == torch.int64
    assert got.tolist() == expected == [copies_reference(v) for v in values]
    # The two-modality values of §6.2: -0.5 -> 3, 0 -> 2, 0.5 -> 1, 1 and 1.5 -> 0.
    assert resample_copies(torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.5])).tolist() == [3, 2, 1, 0, 0]
    assert resample_copies(torch.rand(4, 3) * 4 - 2).shape == (4, 3)


@pytest.mark.parametrize("M", [2, 3])
def test_sample_level_plan_matches_loop(M):
    names = [f"m{k}" for k in range(M)]
    g = torch.Generator().manual_seed(M)
    n = 60
    phi = torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.5, -1 / 3, 2 / 3])[torch.randint(0, 7, (n, M), generator=g)]
    r = ValuationResampler(names, level="sample")
    plan = r.plan(phi, epoch=4)
    assert isinstance(plan, Resampled) and plan.names == tuple(names)
    assert plan.index.dtype == torch.int64 and plan.keep.dtype == torch.bool
    want = []
    for i in range(n):
        for m in range(M):
            for _ in range(copies_reference(float(phi[i, m]))):
                want.append((i, tuple(k == m for k in range(M))))  # only m kept
    got = [(int(i), tuple(k.tolist())) for i, k in zip(plan.index, plan.keep)]
    assert sorted(got) == sorted(want)
    assert len(plan) == len(want) > 0
    assert (plan.keep.sum(1) == 1).all()


def test_plan_before_start_epoch_is_empty():
    phi = torch.full((10, 2), -0.5)
    r = ValuationResampler(["a", "v"], start_epoch=4)
    for epoch in range(4):
        plan = r.plan(phi, epoch)
        assert len(plan) == 0 and plan.keep.shape == (0, 2)
    assert len(r.plan(phi, 4)) == 60  # 3 copies per sample and modality
    assert len(r.plan(phi)) == 60  # no epoch: always plans


# --- modality level ------------------------------------------------------------------------------


@pytest.mark.parametrize("func", ["linear", "tanh", "pow"])
@pytest.mark.parametrize("alpha", [1.0, 0.8])
def test_modality_level_count_and_dropped_modality(func, alpha):
    # Every sample has the same values, so the mean over any random part is exact:
    # gap_a = 1 - 1.0 = 0, gap_v = 1 - 0.25 = 0.75, d = 0.75 * 2 / 3 = 0.5.
    n = 101
    phi = torch.tensor([[1.0, 0.25]]).expand(n, 2)
    r = ValuationResampler({"audio": [], "visual": []}, level="modality", func=func, alpha=alpha)
    plan = r.plan(phi, epoch=7)
    p = {"linear": alpha * 0.5, "tanh": math.tanh(alpha * 0.5), "pow": alpha * 0.5**1.5}[func]
    assert r.last_ratio == pytest.approx(p, abs=1e-12)
    assert r.last_gaps.tolist() == pytest.approx([0.0, 0.75])
    assert len(plan) == int(p * n)
    assert ((plan.index >= 0) & (plan.index < n)).all()
    # The stronger modality (audio: smaller gap) is zeroed, the weaker (visual) kept.
    assert plan.keep.tolist() == [[False, True]] * int(p * n)
    # Reversed roles: audio is now the weaker one and is kept.
    plan = r.plan(phi.flip(1), epoch=7)
    assert plan.keep.tolist() == [[True, False]] * int(p * n)


def test_modality_level_three_modalities_keeps_the_weakest():
    n = 90
    phi = torch.tensor([[1.0, 0.25, 0.7]]).expand(n, 3)  # gaps 0, 0.75, 0.3: d = 0.75 * 2 / 3
    r = ValuationResampler(["a", "b", "c"], level="modality")
    plan = r.plan(phi, epoch=5)
    assert len(plan) == int(0.5 * n)
    assert plan.keep.tolist() == [[False, True, False]] * int(0.5 * n)


def test_modality_level_gaps_come_from_a_random_part():
    # phi_a in {0, 1} per sample and phi_v = 1 - phi_a: the gaps are 1 - (hits / part) for some
    # count of drawn rows, so gap_a + gap_v = 1 and part * gap_a is an integer.
    n = 50
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 2, (n,), generator=g).double()
    phi = torch.stack([a, 1 - a], 1)
    r = ValuationResampler(["a", "v"], level="modality", part_ratio=0.2)
    seen = set()
    for epoch in range(4, 12):
        plan = r.plan(phi, epoch)
        ga, gv = r.last_gaps.tolist()
        assert ga + gv == pytest.approx(1.0)
        assert ga * 10 == pytest.approx(round(ga * 10))  # part = int(0.2 * 50) = 10 rows
        assert len(plan) == int(abs(ga - gv) * 2 / 3 * n)
        seen.add(round(ga, 6))
    assert len(seen) > 1  # different epochs draw different parts


def test_modality_level_reproducible_and_resumable():
    n = 80
    g = torch.Generator().manual_seed(3)
    phi = torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.5])[torch.randint(0, 5, (n, 2), generator=g)]
    phi[:, 1] -= 0.5  # make visual clearly weaker so plans are not empty

    def run(r, epochs, use_epoch=True):
        return [r.plan(phi, e if use_epoch else None) for e in epochs]

    for use_epoch in (True, False):
        a = run(ValuationResampler(["a", "v"], level="modality", seed=11), range(4, 10), use_epoch)
        b = run(ValuationResampler(["a", "v"], level="modality", seed=11), range(4, 10), use_epoch)
        for x, y in zip(a, b):
            assert torch.equal(x.index, y.index) and torch.equal(x.keep, y.keep)
        assert len(a[0]) > 0
        assert not torch.equal(a[0].index, a[1].index)  # a fresh draw each epoch
        c = run(ValuationResampler(["a", "v"], level="modality", seed=12), range(4, 10), use_epoch)
        assert any(not torch.equal(x.index, y.index) for x, y in zip(a, c))

        # Resume after three epochs from the state dict: the rest is identical.
        first = ValuationResampler(["a", "v"], level="modality", seed=11)
        run(first, range(4, 7), use_epoch)
        state = first.state_dict()
        resumed = ValuationResampler(["a", "v"], level="modality", seed=0)
        resumed.load_state_dict(state)
        assert torch.equal(resumed.last_gaps, first.last_gaps) and resumed.last_ratio == first.last_ratio
        for x, y in zip(run(resumed, range(7, 10), use_epoch), a[3:]):
            assert torch.equal(x.index, y.index) and torch.equal(x.keep, y.keep)


def test_construction_and_plan_errors():
    for kwargs, match in [
        ({"level": "batch"}, "level"),
        ({"func": "square"}, "func"),
        ({"part_ratio": 0.0}, "part_ratio"),
        ({"part_ratio": 1.5}, "part_ratio"),
        ({"part_ratio": -0.2}, "part_ratio"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": float("inf")}, "alpha"),
        ({"start_epoch": -1}, "start_epoch"),
        ({"start_epoch": 1.5}, "start_epoch"),
        ({"seed": "x"}, "seed"),
    ]:
        with pytest.raises(ValueError, match=match):
            ValuationResampler(["a", "v"], **kwargs)
    with pytest.raises(ValueError, match="at least 2 modalities"):
        ValuationResampler(["a"])
    with pytest.raises(ValueError, match="repeat"):
        ValuationResampler(["a", "a"])
    with pytest.raises(TypeError, match="modalities"):
        ValuationResampler(3)
    ValuationResampler(["a", "v"], part_ratio=1.0)  # the closed end is allowed
    r = ValuationResampler(["a", "v"])
    with pytest.raises(ValueError, match="M=2"):
        r.plan(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="NaN"):
        r.plan(torch.tensor([[0.0, float("nan")]]))


def test_names_from_balanced_optimizer_and_mapping():
    torch.manual_seed(0)
    enc = nn.ModuleDict({"visual": nn.Linear(2, 2), "audio": nn.Linear(3, 2)})
    opt = mmgrad.BalancedOptimizer(
        torch.optim.SGD(enc.parameters(), lr=0.1),
        modalities={"visual": enc["visual"], "audio": enc["audio"]},
        method=mmgrad.OGM(alpha=0.5, params="all"),
    )
    assert ValuationResampler(opt).names == ("visual", "audio")
    assert ValuationResampler({"visual": enc["visual"], "audio": enc["audio"]}).names == ("visual", "audio")


# --- the epoch's rows ------------------------------------------------------------------------------


def test_epoch_rows_and_dataset():
    extra = Resampled(torch.tensor([2, 0, 2]), torch.tensor([[True, False], [False, True], [False, True]]), ("a", "v"))
    index, keep = epoch_rows(4, extra)
    assert index.tolist() == [0, 1, 2, 3, 2, 0, 2]
    assert keep.tolist() == [[True, True]] * 4 + [[True, False], [False, True], [False, True]]
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        epoch_rows(2, extra)

    base = [(f"x{i}", i) for i in range(4)]
    ds = ResampledDataset(base, extra)
    assert len(ds) == 7
    items = [ds[i] for i in range(7)]
    assert [item[0] for item in items] == [base[j] for j in [0, 1, 2, 3, 2, 0, 2]]
    assert [item[1].tolist() for item in items] == keep.tolist()
    # A DataLoader batches (item, keep) pairs.
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=7)))
    assert batch[1].shape == (7, 2) and batch[1].dtype == torch.bool

    empty = ValuationResampler(["a", "v"]).plan(torch.ones(4, 2), epoch=9)  # phi = 1: no copies
    index, keep = epoch_rows(4, empty)
    assert index.tolist() == [0, 1, 2, 3] and keep.all()


def test_mask_features_zeroes_dropped_modalities():
    feats = {"a": torch.randn(3, 2), "v": torch.randn(3, 2, 2)}
    feats["v"][1, 0, 0] = float("inf")
    keep = torch.tensor([[True, True], [True, False], [False, True]])
    out = mask_features(feats, keep)
    for m, col in (("a", 0), ("v", 1)):
        for i in range(3):
            if keep[i, col]:
                assert torch.equal(out[m][i], feats[m][i])
            else:
                assert torch.equal(out[m][i], torch.zeros_like(feats[m][i]))
    with pytest.raises(ValueError, match="M=2"):
        mask_features(feats, keep[:, :1])
    with pytest.raises(ValueError, match="keep has 1 rows but features\\['a'\\] has 3"):
        mask_features(feats, keep[:1])  # would broadcast row 0's mask over the batch


def test_names_fix_the_column_order_whatever_the_dict_order():
    """Features given in another order than the resampler's names: with ``names=`` the Shapley
    columns and the masks follow the names (without it they follow the dict, as documented)."""
    head, feats, labels = random_problem({"audio": 3, "visual": 4})
    swapped = {"visual": feats["visual"], "audio": feats["audio"]}
    want = modality_shapley(head, feats, labels)
    assert torch.equal(modality_shapley(head, swapped, labels, names=["audio", "visual"]), want)
    assert torch.equal(modality_shapley(head, swapped, labels), want.flip(1))
    keep = torch.tensor([[True, False], [False, True]])
    two = {m: z[:2] for m, z in swapped.items()}
    out = mask_features(two, keep, names=("audio", "visual"))
    assert torch.equal(out["audio"][1], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(out["visual"][0], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(out["audio"][0], two["audio"][0]) and torch.equal(out["visual"][1], two["visual"][1])
    with pytest.raises(ValueError, match="must list exactly the modalities"):
        modality_shapley(head, feats, labels, names=["audio", "text"])
    with pytest.raises(ValueError, match="must list exactly the modalities"):
        mask_features(two, keep, names=["audio"])
