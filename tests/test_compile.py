"""torch.compile: mmgrad's ops and solvers trace into one graph (no graph break) and do not
recompile step after step."""

import pytest
import torch

import mmgrad
from mmgrad import ops


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_fused_ops_compile_without_graph_breaks_or_recompiles():
    offsets, numels = ops.table([300, 0, 700])
    seed = torch.tensor([5])

    def edit(J, x):
        G = ops.gram(J)
        d = ops.combine(J, G.diagonal())
        m = ops.segment_moments(x, offsets, numels)
        ops.segment_scale_(x, offsets, numels, torch.rand(3), ops.segment_std(m, numels), seed)
        ops.segment_combine_(x, J, offsets, numels, torch.ones(3, J.shape[0]))
        return d, ops.segment_gram(J, offsets, numels)

    compiled = torch.compile(edit, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(4):
            J, x = torch.randn(3, 1000), torch.randn(1000)
            d, sg = compiled(J, x.clone())
            ref_d, ref_sg = edit(J, x.clone())
            assert torch.allclose(d, ref_d) and torch.allclose(sg, ref_sg)


@pytest.mark.parametrize("name", mmgrad.aggregators.GRAM_NAMES)
def test_aggregators_trace_into_one_graph(name):
    agg = mmgrad.aggregators.get(name)

    def aggregate(J):
        return ops.combine(J, agg.weights(ops.gram(J)))

    compiled = torch.compile(aggregate, fullgraph=True, backend="aot_eager")
    J = torch.randn(4, 500)
    out = compiled(J)
    assert out.shape == (500,) and torch.isfinite(out).all()


def test_inductor_compiles_gram_and_combine():
    compiled = torch.compile(lambda J, w: ops.combine(J, w) + ops.gram(J).sum(), fullgraph=True)
    J, w = torch.randn(3, 257), torch.randn(3)
    assert torch.allclose(compiled(J, w), ops.combine(J, w) + ops.gram(J).sum())
