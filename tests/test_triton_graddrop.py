"""The Triton GradDrop kernel (mmgrad/triton/graddrop.py: one pass over J, the packed Philox
uniforms drawn inline) against the torch block loop it replaces
(mmgrad.aggregators.graddrop._drop_blocks with ``ops.philox_uniform(..., packed=True)``).

On integer-valued J every sum is exact in any order, so the two agree bit for bit; on random J
the kernel's column sums (tile order) may differ by rounding, and a keep decision with them only
where purity and the uniform agree to rounding. Without CUDA the kernel runs in Triton's
interpreter on CPU tensors.
"""

import pytest
import torch
from conftest import host_sync_raises, triton_device

DEV = triton_device()  # skips the module without triton

import mmgrad  # noqa: E402
from mmgrad import ops  # noqa: E402
from mmgrad.aggregators import graddrop as gd  # noqa: E402
from mmgrad.triton import graddrop as tgd  # noqa: E402

# NaN / inf columns make numpy (inside the interpreter) warn; that is expected.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _torch_path(J, seed, counter, leak, index):
    acc = _acc(J.dtype)
    n = J.shape[1] if index is None else None
    draws = ops.philox_uniform(seed, counter, n, index=index, dtype=acc, packed=True)
    column = None if leak is None else leak.unsqueeze(1)
    return gd._drop_blocks(J, draws, gd._identity, None if leak is None else (column, 1 - column), None)


def _stream(gen):
    seed = torch.randint(-2**62, 2**62, (), generator=gen, dtype=torch.int64)
    counter = torch.randint(0, 2**40, (), generator=gen, dtype=torch.int64) * 4
    return seed.to(DEV), counter.to(DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,P", [(1, 37), (2, 5000), (5, 2049), (8, 4099), (64, 700), (65, 131),
                                 (130, 67)])
def test_matches_the_torch_path_bitwise_on_exact_sums(K, P, dtype, gen):
    J = torch.randint(-3, 4, (K, P), generator=gen).to(dtype).to(DEV)
    J[:, 3] = 0  # a column of zeros: purity 1/2 from the where, output 0
    seed, counter = _stream(gen)
    # a counter on a Philox block boundary (four columns per Philox call) and one off it
    for c in (counter, counter + 1):
        got = tgd.graddrop(J, seed, c, None, None)
        assert got.dtype == dtype and got.shape == (P,)
        assert torch.equal(got.cpu(), _torch_path(J, seed, c, None, None).cpu())
    index = torch.randperm(3 * P, generator=gen)[:P].to(DEV)  # a shard of a wider matrix
    assert torch.equal(tgd.graddrop(J, seed, counter, None, index).cpu(),
                       _torch_path(J, seed, counter, None, index).cpu())


@pytest.mark.parametrize("dtype", DTYPES)
def test_leak_and_random_values_agree_to_rounding(dtype, gen):
    """With a leak (non-integer factors) and random J only the sums' order differs: values within
    a few units of the output dtype's resolution of sum |J_i| (the keep decisions agree: none of
    these columns has purity within rounding of its uniform)."""
    K, P = 6, 3000
    J = torch.randn(K, P, generator=gen).to(dtype).to(DEV)
    leak = torch.rand(K, generator=gen, dtype=_acc(dtype)).to(DEV)
    seed, counter = _stream(gen)
    for lk in (None, leak):
        got = tgd.graddrop(J, seed, counter, lk, None).cpu().double()
        want = _torch_path(J, seed, counter, lk, None).cpu().double()
        scale = J.abs().double().sum(0).cpu()
        assert ((got - want).abs() <= 4 * torch.finfo(dtype).eps * scale + 1e-300).all()


def test_non_finite_columns_as_the_torch_path(gen):
    J = torch.randint(-3, 4, (4, 50), generator=gen).float()
    J[1, 7] = float("nan")
    J[2, 9] = float("inf")
    J = J.to(DEV)
    seed, counter = _stream(gen)
    got, want = tgd.graddrop(J, seed, counter, None, None).cpu(), _torch_path(J, seed, counter, None, None).cpu()
    assert torch.equal(got.isnan(), want.isnan())
    fin = ~want.isnan()
    assert torch.equal(got[fin], want[fin])


def test_graddrop_aggregator_runs_the_kernel_where_triton_serves(monkeypatch, gen):
    """Under the Triton backend GradDrop (default f) is the kernel (counted), with the stream and
    its advance of the torch path: two calls in a row give the reference backend's two results,
    also for K > MAX_ROWS (rows in chunks); another f keeps the torch loop."""
    calls = []
    real = tgd.graddrop
    monkeypatch.setattr(tgd, "graddrop", lambda *a: calls.append(1) or real(*a))
    for K in (5, tgd.MAX_ROWS + 3):
        J = torch.randint(-3, 4, (K, 999), generator=gen).float()
        monkeypatch.setenv("MMGRAD_BACKEND", "reference")
        ref = mmgrad.aggregators.get("graddrop", seed=7)
        want = [ref(J), ref(J)]
        monkeypatch.setenv("MMGRAD_BACKEND", "triton")
        agg = mmgrad.aggregators.get("graddrop", seed=7)
        calls.clear()
        got = [agg(J.to(DEV)).cpu(), agg(J.to(DEV)).cpu()]
        assert len(calls) == 2
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    calls.clear()
    mmgrad.aggregators.get("graddrop", f=lambda p: p * p)(J.to(DEV))
    assert not calls


@pytest.mark.skipif(DEV != "cuda", reason="needs a CUDA GPU (sync debug mode, graph capture)")
def test_kernel_is_sync_free_and_graph_capturable(gen):
    J = torch.randn(8, 1 << 20, generator=gen).cuda()
    seed, counter = _stream(gen)
    eager = tgd.graddrop(J, seed, counter, None, None)
    torch.cuda.synchronize()
    with host_sync_raises():
        tgd.graddrop(J, seed, counter, None, None)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = tgd.graddrop(J, seed, counter, None, None)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(eager, captured)
