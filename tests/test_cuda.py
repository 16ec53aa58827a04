"""CUDA-only guarantees of the default (Triton) backend: no host synchronisation, CUDA-graph
capture with fresh noise per replay, and agreement with the C++/reference results. The numerical
comparisons on CUDA tensors live in test_ops.py (cases cuda-*)."""

import pytest
import torch

from mmgrad import ops

from conftest import host_sync_raises

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _inputs():
    torch.manual_seed(0)
    J = torch.randn(8, 1_000_003, device="cuda")
    w = torch.randn(8, device="cuda")
    offsets, numels = ops.table([5000, 0, 1, 300_000, 694_997], "cuda")
    x = torch.randn(1_000_003, device="cuda")
    y = torch.randn(1_000_003, device="cuda")
    scale = torch.rand(5, device="cuda")
    seed = torch.tensor([11], device="cuda")
    return J, w, offsets, numels, x, y, scale, seed


def _all_ops(J, w, offsets, numels, x, y, scale, seed):
    G = ops.gram(J)
    out = ops.combine(J, w)
    m = ops.segment_moments(x, offsets, numels)
    std = ops.segment_std(m, numels)
    ops.segment_scale_(x, offsets, numels, scale, std, seed)
    ops.segment_lerp_(x, y, offsets, numels, scale)
    return G, out, m


def test_default_backend_on_cuda_is_triton():
    assert ops.resolve_backend(torch.device("cuda")) == "triton"


def test_every_op_is_sync_free():
    args = _inputs()
    _all_ops(*args)  # compile the kernels first: compilation may synchronise
    with host_sync_raises():
        _all_ops(*args)
    torch.cuda.synchronize()


def test_every_op_is_capturable_in_a_cuda_graph_with_fresh_noise_per_replay():
    args = _inputs()
    J, w, offsets, numels, x, y, scale, seed = args
    _all_ops(*args)
    torch.cuda.synchronize()
    x0 = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        G, out, m = _all_ops(*args)
        seed.add_(1)  # next replay draws new noise
    results = []
    for _ in range(2):
        x.copy_(x0)
        graph.replay()
        torch.cuda.synchronize()
        results.append(x.clone())
        assert torch.equal(G, ops.gram(J)) and torch.equal(out, ops.combine(J, w))
    assert not torch.equal(results[0], results[1])


def test_bitwise_deterministic_on_cuda():
    J, w, offsets, numels, x, *_ = _inputs()
    assert torch.equal(ops.gram(J), ops.gram(J))
    assert torch.equal(ops.combine(J, w), ops.combine(J, w))
    assert torch.equal(ops.segment_moments(x, offsets, numels), ops.segment_moments(x, offsets, numels))


def test_cuda_matches_cpu_reference_on_large_rows():
    J, w, offsets, numels, x, *_ = _inputs()
    G64 = J.double().cpu() @ J.double().cpu().T
    d = G64.diagonal().sqrt()
    assert ((ops.gram(J).double().cpu() - G64).abs() <= 1e-5 * torch.outer(d, d)).all()


@pytest.mark.parametrize("method", ["ogmge", "mmpareto", "upgrad", "agm"])
def test_a_balanced_training_step_is_sync_free_with_a_fused_optimizer(method):
    import torch.nn.functional as F
    from torch import nn

    import mmgrad

    torch.manual_seed(0)
    enc = nn.ModuleDict({m: nn.Sequential(nn.Conv2d(c, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
                         for m, c in (("a", 1), ("v", 3))}).cuda()
    head, uni = nn.Linear(16, 5).cuda(), nn.ModuleDict({m: nn.Linear(8, 5) for m in ("a", "v")}).cuda()
    params = [*enc.parameters(), *head.parameters(), *uni.parameters()]
    inner = torch.optim.SGD(params, lr=0.01, momentum=0.9, fused=True)
    chosen = {"ogmge": mmgrad.OGMGE(alpha=0.8), "mmpareto": mmgrad.MMPareto(), "agm": mmgrad.AGM(), "upgrad": "upgrad"}[method]
    kwargs = {"shared": list(enc.parameters())} if method == "upgrad" else {"modalities": dict(enc.items())}
    opt = mmgrad.BalancedOptimizer(inner, method=chosen, **kwargs)
    xs = {"a": torch.randn(8, 1, 9, 9, device="cuda"), "v": torch.randn(8, 3, 9, 9, device="cuda")}
    y = torch.randint(0, 5, (8,), device="cuda")

    def step():
        z = {m: enc[m](x) for m, x in xs.items()}
        out = head(torch.cat([z["a"], z["v"]], 1))
        opt.zero_grad()
        if method in ("ogmge", "agm"):
            opt.backward(F.cross_entropy(out, y), logits=mmgrad.nn.split_concat_logits(head, z), targets=y)
        elif method == "mmpareto":
            opt.backward({"fusion": F.cross_entropy(out, y), **{m: F.cross_entropy(uni[m](z[m]), y) for m in z}})
        else:
            opt.backward([F.cross_entropy(out, y)] + [F.cross_entropy(uni[m](z[m]), y) for m in z])
        opt.step()

    step()  # warm-up: kernel compilation and lazy state may synchronise
    with host_sync_raises():
        step()
    assert all(torch.isfinite(p).all() for p in params)
