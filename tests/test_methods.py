"""Balancing methods against straightforward per-parameter float64 re-implementations of the
published algorithms (written here, following the reference code's steps), and METHODS.md 12.6."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmgrad
from mmgrad.methods import discrepancy_ratio, mgda_two, ogm_coefficients


class AVNet(nn.Module):
    """Two conv encoders, a concat head, unimodal heads (for MMPareto)."""

    def __init__(self, modalities=("audio", "visual"), channels=(1, 3), feat=4, classes=5):
        super().__init__()
        self.names = list(modalities)
        self.encoders = nn.ModuleDict(
            {
                m: nn.Sequential(
                    nn.Conv2d(c, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, feat, 3),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(feat, feat),
                )
                for m, c in zip(modalities, channels)
            }
        )
        self.feat = feat
        self.head = nn.Linear(feat * len(modalities), classes)
        self.unimodal = nn.ModuleDict({m: nn.Linear(feat, classes) for m in modalities})

    def forward(self, xs):
        z = {m: self.encoders[m](xs[m]) for m in self.names}
        out = self.head(torch.cat([z[m] for m in self.names], 1))
        M = len(self.names)
        W, b = self.head.weight, self.head.bias
        split = {m: z[m] @ W[:, i * self.feat : (i + 1) * self.feat].T + b / M for i, m in enumerate(self.names)}
        uni = {m: self.unimodal[m](z[m]) for m in self.names}
        return out, split, uni


def make(modalities=("audio", "visual"), channels=(1, 3), seed=0):
    torch.manual_seed(seed)
    model = AVNet(modalities, channels).double()
    xs = {m: torch.randn(8, c, 7, 7, dtype=torch.float64) for m, c in zip(modalities, channels)}
    y = torch.randint(0, 5, (8,))
    return model, xs, y


# --- METHODS.md 12.6 test values ---------------------------------------------------------------


def test_ogm_coefficient_value():
    k = ogm_coefficients(torch.tensor([1.5, 1 / 1.5]), alpha=0.1)
    assert torch.allclose(k, torch.tensor([1 - math.tanh(0.15), 1.0]))
    assert abs(k[0].item() - 0.85112) < 1e-5
    assert abs(ogm_coefficients(torch.tensor([1.5]), alpha=0.8).item() - 0.166) < 1e-3


def test_mgda_two_values():
    def G(g1, g2):
        J = torch.tensor([g1, g2], dtype=torch.float64)
        return J @ J.T

    assert mgda_two(G([1.0, 0.0], [0.0, 1.0])).item() == pytest.approx(0.5)
    assert mgda_two(G([1.0, 0.0], [-1.0, 1.0])).item() == pytest.approx(0.6)
    assert mgda_two(G([1.0, 0.0], [2.0, 0.0])).item() == pytest.approx(0.999)  # v12 >= v11
    assert mgda_two(G([2.0, 0.0], [1.0, 0.0])).item() == pytest.approx(0.001)  # v12 >= v22


def test_discrepancy_ratio_modes():
    s = torch.tensor([2.0, 1.0, 4.0])
    assert torch.allclose(discrepancy_ratio(s[:2]), torch.tensor([2.0, 0.5]))
    assert torch.allclose(discrepancy_ratio(s, "pairwise"), torch.tensor([(2 + 0.5) / 2, (0.5 + 0.25) / 2, (4 + 2) / 2]))
    assert torch.allclose(discrepancy_ratio(s, "others_mean"), torch.tensor([2 / 2.5, 1 / 3.0, 4 / 1.5]))
    assert torch.allclose(discrepancy_ratio(s, "min"), torch.tensor([2.0, 1.0, 4.0]))


# --- OGM / OGM-GE ----------------------------------------------------------------------------


def reference_ogm_edit(model, split_logits, y, alpha, noise_fn=None):
    """The reference code's edit: scores, ratio, coefficient, then per conv tensor
    ``g = k * g (+ noise with std(g_original) + 1e-8)``."""
    names = model.names
    scores = {m: torch.softmax(split_logits[m].detach(), 1).gather(1, y[:, None]).sum() for m in names}
    a, v = names
    ratio = {a: scores[a] / scores[v], v: scores[v] / scores[a]}
    k = {m: 1 - math.tanh(alpha * ratio[m].item()) if ratio[m] > 1 else 1.0 for m in names}
    for m in names:
        for p in model.encoders[m].parameters():
            if p.grad is not None and p.grad.dim() == 4:
                std = p.grad.std().item() + 1e-8
                p.grad = p.grad * k[m]
                if noise_fn is not None:
                    p.grad = p.grad + noise_fn(p, std)
    return k


@pytest.mark.parametrize("alpha", [0.1, 0.8])
def test_ogm_matches_per_parameter_reference(alpha):
    model, xs, y = make()
    ref = copy.deepcopy(model)
    opt = mmgrad.BalancedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), modalities=dict(model.encoders.items()), method=mmgrad.OGM(alpha=alpha)
    )
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        out, split, _ = model(xs)
        opt.backward(F.cross_entropy(out, y), logits=split, targets=y)
        opt.step()
        ref_opt.zero_grad()
        out, split, _ = ref(xs)
        F.cross_entropy(out, y).backward()
        k = reference_ogm_edit(ref, split, y, alpha)
        ref_opt.step()
        assert torch.allclose(opt.diagnostics["coeff"].double(), torch.tensor([k[m] for m in model.names], dtype=torch.float64), atol=1e-6)
        for p, q in zip(model.parameters(), ref.parameters()):
            if q.grad is None:  # unused unimodal heads: no gradient in either
                assert p.grad is None
                continue
            assert torch.allclose(p.grad, q.grad, atol=1e-12, rtol=1e-10)
            assert torch.allclose(p, q, atol=1e-12, rtol=1e-10)


def test_ogm_ge_noise_has_the_per_tensor_std_of_the_unscaled_gradient():
    model, xs, y = make()
    method = mmgrad.OGMGE(alpha=0.8, seed=5)
    opt = mmgrad.BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), modalities=dict(model.encoders.items()), method=method)
    opt.zero_grad()
    out, split, _ = model(xs)
    opt.backward(F.cross_entropy(out, y), logits=split, targets=y)
    unscaled = {id(p): p.grad.clone() for p in opt._layout.buffer.params}
    seed = method.state_dict()["seed"].clone()
    opt.step()
    coeff = dict(zip(model.names, opt.diagnostics["coeff"].tolist()))
    # The noise is exactly the counter-based Philox stream of the flat buffer, times std + 1e-8.
    layout = opt._layout
    for i, p in enumerate(layout.buffer.params):
        g0 = unscaled[id(p)]
        m = layout.names[layout.segment_modality_host[i]]
        if p.dim() != 4:
            assert torch.equal(p.grad, g0)  # not modulated: untouched
            continue
        offset = layout.segments.host_offsets[i]
        idx = torch.arange(offset, offset + p.numel())
        z = mmgrad.reference.philox_normal(seed, idx).view_as(p)
        sigma = g0.std() + 1e-8
        expected = coeff[m] * g0 + sigma * z
        # Kernels evaluate Box-Muller in float32: the noise matches to ~1e-6 of its std.
        assert torch.allclose(p.grad, expected, atol=2e-6 * sigma.item())
    assert not torch.equal(method.state_dict()["seed"], seed)  # fresh noise next step


def test_ogm_ge_noise_statistics_on_a_large_tensor():
    torch.manual_seed(0)
    w = nn.Parameter(torch.zeros(64, 32, 3, 3, dtype=torch.float64))
    other = nn.Parameter(torch.zeros(16, 8, 3, 3, dtype=torch.float64))
    opt = mmgrad.BalancedOptimizer(torch.optim.SGD([w, other], lr=0.0), modalities={"a": [w], "b": [other]}, method=mmgrad.OGMGE(alpha=0.5))
    grad = torch.randn_like(w) * 3.0
    opt.zero_grad()
    opt.backward((w * grad).sum() + (other * 0.5).sum(), logits={"a": torch.tensor([[2.0, 0.0]]), "b": torch.tensor([[0.0, 0.0]])}, targets=torch.tensor([0]))
    opt.step()
    k = opt.diagnostics["coeff"][0].item()
    assert k < 1
    noise = w.grad - k * grad
    assert abs(noise.std().item() / grad.std().item() - 1) < 0.03
    assert abs(noise.mean().item()) < 0.05 * grad.std().item()


def test_ogm_window_and_filters():
    model, xs, y = make()
    opt = mmgrad.BalancedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), modalities=dict(model.encoders.items()),
        method=mmgrad.OGM(alpha=0.8, modulation_starts=2, modulation_ends=3),
    )
    opt.set_epoch(0)
    opt.zero_grad()
    out, split, _ = model(xs)
    opt.backward(F.cross_entropy(out, y), logits=split, targets=y)
    grads = [p.grad.clone() for p in opt._layout.buffer.params]
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(opt._layout.buffer.params, grads))  # outside the window
    assert (opt.diagnostics["coeff"] < 1).any()  # coefficients are still computed
    with pytest.raises(ValueError, match="no parameter tensor of modalities .* matches"):
        lin, lin2 = nn.Linear(3, 3), nn.Linear(3, 3)
        mmgrad.BalancedOptimizer(torch.optim.SGD([*lin.parameters(), *lin2.parameters()], lr=1),
                                 modalities={"a": lin, "b": lin2}, method=mmgrad.OGM(alpha=1))


def test_ogm_three_modalities_runs_and_damps_only_the_dominant():
    model, xs, y = make(("audio", "visual", "text"), (1, 3, 2))
    opt = mmgrad.BalancedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05), modalities=dict(model.encoders.items()), method=mmgrad.OGMGE(alpha=0.5)
    )
    for _ in range(3):
        opt.zero_grad()
        out, split, _ = model(xs)
        opt.backward(F.cross_entropy(out, y), logits=split, targets=y)
        opt.step()
    ratio, coeff = opt.diagnostics["ratio"], opt.diagnostics["coeff"]
    assert torch.equal(coeff < 1, ratio > 1)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --- MMPareto --------------------------------------------------------------------------------


def reference_mmpareto_grads(model, xs, y, gamma=1.5):
    """The reference code's procedure: four backward passes, per-encoder cosine and 2-task
    min-norm weights, per-tensor magnitude rule (with the same zero-norm guard)."""
    def grads_of(loss_fn):
        model.zero_grad()
        loss_fn().backward()
        return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}

    def losses():
        out, _, uni = model(xs)
        return F.cross_entropy(out, y), {m: F.cross_entropy(uni[m], y) for m in model.names}

    g_mm = grads_of(lambda: losses()[0])
    g_u = grads_of(lambda: sum(losses()[1].values()))
    g_sum = grads_of(lambda: losses()[0] + sum(losses()[1].values()))
    result = dict(g_sum)
    for m in model.names:
        names = [n for n, _ in model.named_parameters() if n.startswith(f"encoders.{m}.")]
        a = torch.cat([g_mm[n].reshape(-1) for n in names])
        b = torch.cat([g_u[n].reshape(-1) for n in names])
        cos = (a @ b) / (a.norm() * b.norm())
        if cos > 0:
            c = 0.5
        else:
            v11, v12, v22 = a @ a, a @ b, b @ b
            c = 0.999 if v12 >= v11 else 0.001 if v12 >= v22 else ((v22 - v12) / (v11 + v22 - 2 * v12)).item()
        for n in names:
            new = 2 * c * g_mm[n] + 2 * (1 - c) * g_u[n]
            if new.norm() == 0:
                result[n] = torch.zeros_like(new)
                continue
            ratio = g_sum[n].norm() / new.norm()
            result[n] = gamma * ratio * new if ratio > 1 else gamma * new
    return result


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mmpareto_matches_per_parameter_reference(seed):
    model, xs, y = make(seed=seed)
    expected = reference_mmpareto_grads(copy.deepcopy(model), xs, y)
    opt = mmgrad.BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), modalities=dict(model.encoders.items()), method=mmgrad.MMPareto())
    opt.zero_grad()
    out, _, uni = model(xs)
    opt.backward({"fusion": F.cross_entropy(out, y), **{m: F.cross_entropy(uni[m], y) for m in model.names}})
    opt.step()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[n], atol=1e-12, rtol=1e-9), n


def test_mmpareto_with_agreeing_objectives_is_gamma_times_the_sum():
    # cos > 0 -> c = 0.5 -> g_new = g_mm + g_u = g_sum -> p.grad = 1.5 (g_mm + g_u)  (METHODS 12.6)
    w = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    head = nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    opt = mmgrad.BalancedOptimizer(torch.optim.SGD([w, head], lr=0.0), modalities={"a": [w]}, method=mmgrad.MMPareto())
    opt.zero_grad()
    opt.backward({"fusion": (w * torch.tensor([1.0, 1.0])).sum() * head.sum(), "a": (w * torch.tensor([2.0, 1.0])).sum()})
    opt.step()
    assert torch.allclose(w.grad, 1.5 * torch.tensor([0.5 + 2.0, 0.5 + 1.0], dtype=torch.float64))
    assert torch.allclose(head.grad, torch.tensor([3.0], dtype=torch.float64))  # heads: plain sum
    assert opt.diagnostics["c"].item() == 0.5


def test_mmpareto_zero_gradients_give_zero_not_nan():
    w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = mmgrad.BalancedOptimizer(torch.optim.SGD([w], lr=0.1), modalities={"a": [w]}, method=mmgrad.MMPareto())
    opt.zero_grad()
    opt.backward({"fusion": (w * 0).sum(), "a": (w * 0).sum()})
    opt.step()
    assert torch.equal(w.grad, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(w, torch.ones(3, dtype=torch.float64))


def test_mmpareto_three_modalities():
    model, xs, y = make(("audio", "visual", "text"), (1, 3, 2))
    opt = mmgrad.BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), modalities=dict(model.encoders.items()), method=mmgrad.MMPareto())
    opt.zero_grad()
    out, _, uni = model(xs)
    opt.backward({"fusion": F.cross_entropy(out, y), **{m: F.cross_entropy(uni[m], y) for m in model.names}})
    opt.step()
    assert opt.diagnostics["c"].shape == (3,)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(ValueError, match="missing"):
        opt.backward({"fusion": F.cross_entropy(out, y), "audio": F.cross_entropy(uni["audio"], y)})


# --- multi-objective mode ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mean", "mgda", "upgrad", "pcgrad", "cagrad"])
def test_multi_objective_mode_equals_the_aggregator_on_the_jacobian(name):
    model, xs, y = make()
    shared = [p for m in model.names for p in model.encoders[m].parameters()]
    opt = mmgrad.BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), shared=shared, method=name)

    def losses():
        out, _, uni = model(xs)
        return [F.cross_entropy(out, y)] + [F.cross_entropy(uni[m], y) for m in model.names]

    rows = []
    for loss in losses():
        grads = torch.autograd.grad(loss, shared, allow_unused=True, retain_graph=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, shared)]))
    J = torch.stack(rows)
    expected = mmgrad.aggregators.get(name)(J)
    opt.zero_grad()
    opt.backward(losses())
    opt.step()
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    assert torch.allclose(got, expected, atol=1e-10, rtol=1e-7)


# --- AGM --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["original", "balancemm"])
def test_agm_matches_per_parameter_reference(variant):
    model, xs, y = make()
    ref = copy.deepcopy(model)
    alpha = 0.1
    opt = mmgrad.BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), modalities=dict(model.encoders.items()),
                                   method=mmgrad.AGM(alpha=alpha, variant=variant))
    sign = 1.0 if variant == "balancemm" else -1.0
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    history = []
    for step in range(4):
        opt.zero_grad()
        out, split, _ = model(xs)
        response = mmgrad.nn.shapley_logits(lambda f: model.head(torch.cat([f[m] for m in model.names], 1)),
                                            {m: model.encoders[m](xs[m]) for m in model.names})
        opt.backward(F.cross_entropy(out, y), logits=response, targets=y)
        opt.step()
        # Reference: plain per-parameter loop, running average over the steps so far.
        ref_opt.zero_grad()
        out, _, _ = ref(xs)
        F.cross_entropy(out, y).backward()
        with torch.no_grad():
            z = {m: ref.encoders[m](xs[m]) for m in ref.names}
            W = ref.head.weight
            # For a linear concat head the Shapley response is z_m W_m^T (the bias cancels).
            resp = {m: z[m] @ W[:, i * ref.feat : (i + 1) * ref.feat].T for i, m in enumerate(ref.names)}
        s = torch.stack([F.cross_entropy(resp[m], y) for m in ref.names])
        history.append(s)
        run = torch.stack(history).mean(0)
        ratio = torch.exp(2 * sign * (s - s.mean()))
        target = torch.exp(2 * sign * (run - run.mean()))
        coeff = torch.exp(alpha * torch.clamp(target - ratio, max=7.0))
        for i, m in enumerate(ref.names):
            for p in ref.encoders[m].parameters():
                if p.dim() > 1:
                    p.grad *= coeff[i]
        ref_opt.step()
        assert torch.allclose(opt.diagnostics["coeff"], coeff, atol=1e-12)
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.allclose(p, q, atol=1e-12, rtol=1e-10)
    assert not torch.allclose(opt.diagnostics["coeff"], torch.ones(2, dtype=torch.float64))


def test_shapley_logits_of_a_linear_head_are_the_split_columns():
    head = nn.Linear(6, 4).double()
    feats = {"a": torch.randn(5, 2, dtype=torch.float64), "b": torch.randn(5, 4, dtype=torch.float64)}
    phi = mmgrad.nn.shapley_logits(lambda f: head(torch.cat([f["a"], f["b"]], 1)), feats)
    split = mmgrad.nn.split_concat_logits(head, feats, bias_share=0.0)
    for m in feats:
        assert torch.allclose(phi[m], split[m])
    # Efficiency: the responses add up to f(all) - f(none).
    total = head(torch.cat([feats["a"], feats["b"]], 1)) - head(torch.zeros(5, 6, dtype=torch.float64))
    assert torch.allclose(phi["a"] + phi["b"], total)


# --- InfoReg ----------------------------------------------------------------------------------


def test_inforeg_proximal_term_on_the_dominant_encoder():
    model, xs, y = make()
    method = mmgrad.InfoReg()
    opt = mmgrad.BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), modalities=dict(model.encoders.items()), method=method)
    opt.set_epoch(0)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(3):
        opt.zero_grad()
        out, split, _ = model(xs)
        loss = F.cross_entropy(out, y)
        opt.backward(loss, logits=split, targets=y)
        plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        s = torch.stack([torch.softmax(split[m].detach(), 1).gather(1, y[:, None]).sum() for m in model.names])
        dominant = int(s.argmax())
        beta = (0.95, 0.1)[dominant] * math.exp(math.tanh((s[dominant] - s[1 - dominant]).item()))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        for n, p in model.named_parameters():
            if n not in plain:
                continue
            expected = plain[n]
            if n.startswith(f"encoders.{model.names[dominant]}."):
                expected = expected + beta * (before[n] - snapshot[n])
            assert torch.allclose(p.grad, expected, atol=1e-12), n
    assert opt.diagnostics["window_open"].item()


def test_inforeg_window_closes_when_the_fisher_trace_stops_growing():
    model, xs, y = make()
    method = mmgrad.InfoReg(window=2)
    opt = mmgrad.BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), modalities=dict(model.encoders.items()), method=method)
    opens = []
    for epoch in range(6):
        opt.set_epoch(epoch)
        opens.append(bool(method._open))
        opt.zero_grad()
        out, split, _ = model(xs)
        opt.backward(F.cross_entropy(out, y) * (1.0 if epoch < 1 else 0.0), logits=split, targets=y)
        opt.step()
    # Epoch 0 trains, later epochs have zero gradients: the trace's moving average stops growing.
    assert opens[0] and opens[1] and not opens[-1]


# --- impartiality blocks -------------------------------------------------------------------------


def _branch_jacobian(z_shape, heads, loss_fns, z):
    rows = []
    for head, lf in zip(heads, loss_fns):
        zz = z.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(lf(head(zz)), zz)
        rows.append(g.reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("name,rescale", [("mean", False), ("upgrad", True), ("mgda", False)])
def test_impartial_branch_aggregates_the_branch_gradients(name, rescale):
    torch.manual_seed(0)
    enc = nn.Linear(5, 4).double()
    heads = [nn.Linear(4, 3).double() for _ in range(3)]
    x = torch.randn(6, 5, dtype=torch.float64)
    ys = [torch.randint(0, 3, (6,)) for _ in range(3)]
    block = mmgrad.nn.ImpartialBranch(3, aggregator=name, rescale=rescale)
    z = enc(x)
    loss = sum(F.cross_entropy(h(zk), yk) for h, zk, yk in zip(heads, block(z), ys))
    J = _branch_jacobian(z.shape, heads, [lambda o, yk=yk: F.cross_entropy(o, yk) for yk in ys], z)
    d = mmgrad.aggregators.get(name)(J)
    if rescale:
        d = d * (J.sum(0).norm() / d.norm())
    z.retain_grad()
    loss.backward()
    assert torch.allclose(z.grad.reshape(-1), d, atol=1e-12)


def test_nn_helpers_refuse_what_they_cannot_use():
    with pytest.raises(ValueError, match="features is empty"):
        mmgrad.nn.split_concat_logits(nn.Linear(4, 2), {})
    block = mmgrad.nn.ImpartialModule(nn.ReLU(), branches=2, aggregator="mean")
    with pytest.raises(ValueError, match="ReLU has no trainable parameter"):
        block.expand()


def test_impartial_module_aggregates_per_branch_parameter_gradients():
    torch.manual_seed(0)
    dec = nn.Linear(4, 2).double()
    twin = copy.deepcopy(dec)
    block = mmgrad.nn.ImpartialModule(dec, branches=2, aggregator="mean", rescale=False)
    xs = [torch.randn(3, 4, dtype=torch.float64) for _ in range(2)]
    block.expand()
    (block(xs[0], branch=0).pow(2).sum() + 3 * block(xs[1], branch=1).sum()).backward()
    # Plain: the mean of the two branches' gradients.
    (0.5 * (twin(xs[0]).pow(2).sum() + 3 * twin(xs[1]).sum())).backward()
    for p, q in zip(dec.parameters(), twin.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-12)


def test_ogm_update_scaling_scales_the_adam_update():
    model, xs, y = make()
    twin = copy.deepcopy(model)
    opt = mmgrad.BalancedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), modalities=dict(model.encoders.items()),
                                   method=mmgrad.OGM(alpha=0.8, scale="update"))
    plain = torch.optim.Adam(twin.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    out, split, _ = model(xs)
    opt.backward(F.cross_entropy(out, y), logits=split, targets=y)
    opt.step()
    plain.zero_grad()
    out, _, _ = twin(xs)
    F.cross_entropy(out, y).backward()
    plain.step()
    k = dict(zip(model.names, opt.diagnostics["coeff"].tolist()))
    assert min(k.values()) < 1
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        m = n.split(".")[1] if n.startswith("encoders.") else None
        factor = k[m] if m is not None and p.dim() == 4 else 1.0
        assert torch.allclose(p - before[n], factor * (q.detach() - before[n]), atol=1e-12), n
