"""pytest-benchmark microbenchmarks of the fused ops and the aggregators (on demand, not in the
default test run): ``pytest benchmarks/test_microbench.py --benchmark-only``.

Each op runs on every backend available on this machine; compare rows with
``--benchmark-group-by=param:op``.
"""

import pytest
import torch

import mmgrad
from mmgrad import ops

BACKENDS = [b for b, why in ops.available_backends("cpu").items() if why is None and b != "triton"]
P = 4 * 2**20


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    J = torch.randn(8, P)
    offsets, numels = ops.table([P // 64] * 64)
    return J, offsets, numels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["gram", "combine", "segment_moments", "segment_scale_noise", "J.sum (floor)"])
def test_op(benchmark, data, backend, op):
    J, offsets, numels = data
    x = J[0].clone()
    w = torch.randn(8)
    scale, std = torch.full((64,), 0.9), torch.ones(64)
    fns = {
        "gram": lambda: ops.gram(J, backend=backend),
        "combine": lambda: ops.combine(J, w, backend=backend),
        "segment_moments": lambda: ops.segment_moments(x, offsets, numels, backend=backend),
        "segment_scale_noise": lambda: ops.segment_scale_(x, offsets, numels, scale, std, 1, backend=backend),
        "J.sum (floor)": lambda: J.sum(),
    }
    benchmark(fns[op])


@pytest.mark.parametrize("name", mmgrad.aggregators.GRAM_NAMES)
@pytest.mark.parametrize("K", [2, 8, 64])
def test_aggregator_weights(benchmark, name, K):
    J = torch.randn(K, 4096, dtype=torch.float64)
    G = J @ J.T
    agg = mmgrad.aggregators.get(name)
    benchmark(lambda: agg.weights(G))
