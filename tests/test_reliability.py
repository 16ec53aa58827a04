"""Reliability: property-based fuzzing of every op and aggregator, long runs with flat memory and
step time, and buffers beyond 2**31 elements.

Long and large tests are marked ``slow`` (``make test-slow``); a short form of each runs by default.
"""

import os
import time

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import mmgrad
from conftest import backend_cases
from mmgrad import ops, reference

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
CPU_CASES = [c for c in backend_cases() if c.values[0][0] == "cpu"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def matrices(draw):
    K = draw(st.integers(1, 6))
    P = draw(st.integers(0, 2500))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(K, P + 5, generator=g, dtype=torch.float64) * scale
    strided = draw(st.booleans())
    J = J[:, 3 : 3 + P] if strided else J[:, :P].contiguous()
    bad = draw(st.sampled_from(["none", "nan", "inf", "-inf"]))
    if bad != "none" and P > 0:
        r, c = draw(st.integers(0, K - 1)), draw(st.integers(0, P - 1))
        J[r, c] = float(bad)
    return J.to(dtype)


def _nonfinite_rows(J):
    return ~torch.isfinite(J.double()).all(1)


@pytest.mark.parametrize("case", CPU_CASES)
@FUZZ
@given(J=matrices())
def test_fuzz_gram_and_combine(case, J):
    _, backend = case
    G = ops.gram(J, backend=backend)
    bad = _nonfinite_rows(J)
    # Non-finite input rows give non-finite entries exactly where the reference has them; all
    # others agree with the float64 reference.
    expected_bad = bad[:, None] | bad[None, :]
    assert torch.equal(~torch.isfinite(G), expected_bad)
    ref = reference.gram(J.double())
    ok = ~expected_bad
    d = ref.diagonal().clamp_min(0).sqrt()
    assert ((G.double() - ref).abs()[ok] <= (1e-5 * torch.outer(d, d) + 1e-300)[ok]).all()
    w = torch.linspace(-1, 1, J.shape[0])
    out = ops.combine(J, w, backend=backend)
    col_bad = ~torch.isfinite(J.double()).all(0) if J.shape[1] else torch.zeros(0, dtype=torch.bool)
    # A column with a non-finite entry may only be finite if its weight is exactly 0 there.
    assert torch.isfinite(out[~col_bad]).all()


@st.composite
def layouts(draw):
    sizes = draw(st.lists(st.integers(0, 700), min_size=1, max_size=12))
    gaps = draw(st.lists(st.integers(0, 20), min_size=len(sizes), max_size=len(sizes)))
    offsets, pos = [], 0
    for n, gap in zip(sizes, gaps):
        pos += gap
        offsets.append(pos)
        pos += n
    perm = draw(st.permutations(list(range(len(sizes)))))
    return [offsets[i] for i in perm], [sizes[i] for i in perm], pos + draw(st.integers(0, 9))


@pytest.mark.parametrize("case", CPU_CASES)
@FUZZ
@given(layout=layouts(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**40), K=st.integers(1, 4))
def test_fuzz_segment_ops(case, layout, dtype, seed, K):
    _, backend = case
    offs, sizes, total = layout
    offsets, numels = torch.tensor(offs), torch.tensor(sizes)
    g = torch.Generator().manual_seed(seed % 2**31)
    x = torch.randn(total, generator=g, dtype=torch.float64).to(dtype)
    m = ops.segment_moments(x, offsets, numels, backend=backend)
    ref = reference.segment_moments(x.double(), offsets, numels)
    assert torch.allclose(m.double(), ref, rtol=1e-4, atol=1e-3)
    J = torch.randn(K, total, generator=g, dtype=torch.float64).to(dtype)
    sg = ops.segment_gram(J, offsets, numels, backend=backend)
    assert torch.allclose(sg.double(), reference.segment_gram(J.double(), offsets, numels), rtol=1e-4, atol=1e-3)
    scale, std = torch.rand(len(sizes), generator=g), torch.rand(len(sizes), generator=g)
    y = ops.segment_scale_(x.clone(), offsets, numels, scale, std, seed, backend=backend)
    y_ref = reference.segment_scale_(x.double(), offsets, numels, scale.double(), std.double(), torch.tensor([seed]))
    tol = {torch.float64: 1e-5, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert torch.allclose(y.double(), y_ref, rtol=tol, atol=tol * 4)


@st.composite
def jacobians(draw):
    K = draw(st.sampled_from([1, 2, 3, 5, 8]))
    P = draw(st.integers(1, 400))
    rank = draw(st.integers(1, K))
    scale = draw(st.sampled_from([1e-8, 1e-3, 1.0, 1e4, 1e8]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    J = torch.randn(K, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, P, generator=g, dtype=torch.float64)
    if draw(st.booleans()):
        J[draw(st.integers(0, K - 1))] = 0
    return J * scale


@pytest.mark.parametrize("name", mmgrad.aggregators.NAMES)
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(J=jacobians())
def test_fuzz_aggregators_give_finite_output_of_the_right_shape(name, J):
    out = mmgrad.aggregate(J, name)
    assert out.shape == (J.shape[1],) and torch.isfinite(out).all()


# --- long runs ----------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _long_run(method_name: str, steps: int):
    torch.manual_seed(0)
    enc = nn.ModuleDict({m: nn.Sequential(nn.Linear(12, 16), nn.ReLU()) for m in ("a", "b")})
    head, uni = nn.Linear(32, 4), nn.ModuleDict({m: nn.Linear(16, 4) for m in ("a", "b")})
    params = [*enc.parameters(), *head.parameters(), *uni.parameters()]
    method = {
        "ogmge": lambda: mmgrad.OGMGE(alpha=0.5, params="weights"),
        "mmpareto": lambda: mmgrad.MMPareto(),
        "agm": lambda: mmgrad.AGM(),
        "inforeg": lambda: mmgrad.InfoReg(),
        "upgrad": lambda: "upgrad",
    }[method_name]()
    kwargs = {"shared": list(enc.parameters())} if method_name == "upgrad" else {"modalities": dict(enc.items())}
    opt = mmgrad.BalancedOptimizer(torch.optim.SGD(params, lr=0.01, momentum=0.9), method=method, **kwargs)
    g = torch.Generator().manual_seed(1)
    times, rss = [], []
    for step in range(steps):
        # A fresh batch every step, as in training: the loss never reaches zero, so gradients do
        # not decay into subnormal floats (which every CPU kernel, torch's too, processes slowly).
        xs = {m: torch.randn(32, 12, generator=g) for m in ("a", "b")}
        y = torch.randint(0, 4, (32,), generator=g)
        if step % 100 == 0:
            opt.set_epoch(step // 100)
        t0 = time.perf_counter()
        z = {m: enc[m](xs[m]) for m in xs}
        out = head(torch.cat([z["a"], z["b"]], 1))
        opt.zero_grad()
        if method_name in ("ogmge", "agm", "inforeg"):
            opt.backward(F.cross_entropy(out, y), logits=mmgrad.nn.split_concat_logits(head, z), targets=y)
        elif method_name == "mmpareto":
            opt.backward({"fusion": F.cross_entropy(out, y), **{m: F.cross_entropy(uni[m](z[m]), y) for m in z}})
        else:
            opt.backward([F.cross_entropy(out, y)] + [F.cross_entropy(uni[m](z[m]), y) for m in z])
        opt.step()
        times.append(time.perf_counter() - t0)
        if step % 50 == 0:
            rss.append(_rss_bytes())
    return times, rss


@pytest.fixture
def one_thread():
    """Step time is compared across a run: one intra-op thread keeps other processes on a busy
    machine from stretching OpenMP barriers and deciding the comparison."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _assert_flat(times, rss, mem_bound=16 * 2**20):
    n = len(times)
    early = sorted(times[n // 10 : n // 5])
    late = sorted(times[-n // 10 :])
    # Medians, so that a busy moment of the machine does not decide.
    assert late[len(late) // 2] < 3.0 * early[len(early) // 2]
    warm = rss[len(rss) // 5]
    assert max(rss[len(rss) // 5 :]) - warm < mem_bound


@pytest.mark.parametrize("method_name", ["ogmge", "mmpareto", "agm", "inforeg", "upgrad"])
def test_short_run_keeps_memory_and_step_time_flat(method_name, one_thread):
    _assert_flat(*_long_run(method_name, 600))


@pytest.mark.slow
@pytest.mark.parametrize("method_name", ["ogmge", "mmpareto", "agm", "inforeg", "upgrad"])
def test_20000_steps_keep_memory_and_step_time_flat(method_name, one_thread):
    _assert_flat(*_long_run(method_name, 20_000))


# --- buffers beyond 2**31 elements --------------------------------------------------------------


def _large_buffer_check(device, backend):
    n = 2**31 + 1000
    x = torch.zeros(n, dtype=torch.float16, device=device)
    x[-5:] = 2.0
    x[2**31 - 3 : 2**31 + 2] = 1.0
    offsets = torch.tensor([0, 2**31 - 10, n - 5], device=device)
    numels = torch.tensor([100, 20, 5], device=device)
    m = ops.segment_moments(x, offsets, numels, backend=backend).cpu()
    assert m[1].tolist() == [5.0, 5.0] and m[2].tolist() == [10.0, 20.0]
    G = ops.gram(x.view(1, n), backend=backend).cpu()
    assert G.item() == 5 * 1.0 + 5 * 4.0
    out = ops.combine(x.view(1, n), torch.tensor([3.0], device=device), backend=backend)
    assert out[-1].item() == 6.0 and out[2**31].item() == 3.0
    del out
    seed = 99
    ops.segment_scale_(x, offsets[1:2], numels[1:2], 1.0, 1.0, seed, backend=backend)
    idx = torch.arange(2**31 - 10, 2**31 + 10)
    expected = (x.new_zeros(20, dtype=torch.float64).cpu() + torch.tensor([0.0] * 7 + [1.0] * 5 + [0.0] * 8, dtype=torch.float64)
                + reference.philox_normal(torch.tensor(seed), idx))
    got = x[2**31 - 10 : 2**31 + 10].double().cpu()
    assert torch.allclose(got, expected, atol=4e-3)  # fp16 storage


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CPU_CASES if c.values[0][1] == "cpp"])
def test_buffer_beyond_2_31_elements_cpu(case):
    _large_buffer_check("cpu", "cpp")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device with > 8 GB free")
def test_buffer_beyond_2_31_elements_cuda():
    _large_buffer_check("cuda", None)


# --- resume in a fresh process -------------------------------------------------------------------

_RESUME_SCRIPT = r"""
import sys, torch
sys.path.insert(0, {tests!r})
import mmgrad
from test_optim import METHODS, build, kind, train_step
from test_methods import make

name, path, start, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model, xs, y = make(seed=99)                      # different initial weights: all comes from the file
torch.manual_seed(4321)                           # and a different global RNG state
opt = build(model, METHODS[name]())
saved = torch.load(path)
model.load_state_dict(saved["model"])
opt.load_state_dict(saved["opt"])
_, xs, y = make()
for epoch in range(start, stop):
    opt.set_epoch(epoch)
    opt.zero_grad()
    train_step(opt, model, xs, y, kind(name))
    opt.step()
torch.save([p.detach() for p in model.parameters()], path + ".out")
"""


@pytest.mark.parametrize("name", ["ogmge", "mmpareto", "agm", "inforeg"])
def test_resume_in_a_fresh_process_is_bitwise(name, tmp_path):
    import subprocess
    import sys

    from test_methods import make
    from test_optim import METHODS, build, kind, train_step

    model, xs, y = make()
    opt = build(model, METHODS[name]())
    path = str(tmp_path / "ckpt.pt")
    for epoch in range(6):
        if epoch == 3:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
        opt.set_epoch(epoch)
        opt.zero_grad()
        train_step(opt, model, xs, y, kind(name))
        opt.step()
    script = _RESUME_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", script, name, path, "3", "6"], check=True, timeout=300)
    resumed = torch.load(path + ".out")
    for p, q in zip(model.parameters(), resumed):
        assert torch.equal(p.detach(), q)
