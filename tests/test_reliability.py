"""Reliability: property-based fuzzing of every op and aggregator, long runs with flat memory and
step time, and buffers beyond 2**31 elements.

Long and large tests are marked ``slow`` (``make test-slow``); a short form of each runs by default.
"""

import math
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
    # Into an existing buffer (garbage in it beforehand): the same values, NaN where the fresh has it.
    into = ops.combine(J, w, out=torch.full_like(out, float("nan")), backend=backend)
    torch.testing.assert_close(into, out, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("case", CPU_CASES)
@FUZZ
@given(seed=st.integers(0, 2**63 - 1), counter=st.integers(0, 2**62), n=st.integers(0, 3000),
       indexed=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]), packed=st.booleans())
def test_fuzz_philox_uniform(case, seed, counter, n, indexed, dtype, packed):
    _, backend = case
    g = torch.Generator().manual_seed(seed % 2**31)
    index = torch.randint(0, 2**62, (n,), generator=g) if indexed else None
    s, c = torch.tensor(seed), torch.tensor(counter)
    u = ops.philox_uniform(s, c, n, index=index, dtype=dtype, packed=packed, backend=backend)
    positions = c + (index if indexed else torch.arange(n))
    if packed:  # word p % 4 of the block p // 4 (positions stay below 2**63 here)
        words = torch.stack(reference.philox4x32(positions >> 2, s), -1)
        r = words.gather(-1, (positions & 3)[:, None])[:, 0]
    else:
        r = reference.philox4x32(positions, s)[0]
    expected = (r >> 8).to(torch.float64) * 2.0**-24
    assert u.dtype == dtype and u.shape == (n,)
    assert torch.equal(u.double(), expected)  # 24-bit values: exact in both dtypes, on every backend
    assert ((u >= 0) & (u < 1)).all()


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


@st.composite
def feature_drop_inputs(draw):
    """Arguments of ``ops.feature_drop``: features (N, D) in any float dtype and memory layout with
    non-finite entries here and there, per-modality widths (some 0) and drop probabilities in
    [0, 1] (exact 0 and 1 often), and a full-range seed and counter; sometimes one argument broken."""
    M = draw(st.integers(1, 5))
    widths = draw(st.lists(st.integers(0, 40), min_size=M, max_size=M))
    N, D = draw(st.one_of(st.integers(0, 40), st.integers(0, 300))), sum(widths)  # half the time <= 40
    dtype = draw(st.sampled_from(DTYPES))
    prob = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))
    p = torch.tensor(draw(st.lists(prob, min_size=M, max_size=M)), dtype=torch.float64)
    p = p.to(draw(st.sampled_from([torch.float64, torch.float32])))
    seed, counter = draw(st.integers(0, 2**63 - 1)), draw(st.integers(0, 2**40))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    z = torch.randn(N, D, generator=g, dtype=torch.float64) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    for _ in range(draw(st.integers(0, 3)) if N * D else 0):
        i, j = draw(st.integers(0, N - 1)), draw(st.integers(0, D - 1))
        z[i, j] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    layout = draw(st.sampled_from(["contiguous", "row-strided", "column-strided", "broadcast-rows"]))
    if layout == "broadcast-rows" and N:
        z = z[:1].expand(N, D)  # row stride 0: every row reads the same memory
    zd = z.to(dtype)
    if layout == "row-strided":
        wide = torch.zeros(N, D + 7, dtype=dtype)
        wide[:, 3 : 3 + D] = zd
        zd = wide[:, 3 : 3 + D]
    elif layout == "column-strided":
        zd = zd.t().contiguous().t()
    elif layout == "broadcast-rows" and N:
        zd = zd[:1].expand(N, D)
    broken = draw(st.sampled_from([None] * 6 + ["widths", "drop_prob", "seed", "counter", "z"]))
    return zd, widths, p, seed, counter, broken


# Relative error of round(round_acc(z) * round_acc(scale)) against z * scale in float64, and the
# fp16 subnormal spacing (an absolute error there).
FD_RTOL = {torch.float64: 1e-15, torch.float32: 2.5e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3}
FD_ATOL = {torch.float64: 0.0, torch.float32: 0.0, torch.float16: 2.0**-24, torch.bfloat16: 0.0}


# The Triton interpreter's numpy reports the inf * 0 it computes before masking dropped entries.
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("case", CPU_CASES)
def test_fuzz_feature_drop(case):
    _, backend = case
    # The Triton interpreter runs each 16-row program in numpy (~20 ms): fewer examples there.
    examples = 16 if backend == "triton" else FUZZ.max_examples

    @settings(FUZZ, max_examples=examples)
    @given(args=feature_drop_inputs())
    def check(args):
        _check_feature_drop(backend, *args)

    check()


def _check_feature_drop(backend, z, widths, p, seed, counter, broken):
    seed_t, counter_t = torch.tensor(seed), torch.tensor(counter)
    if broken is not None:
        bad = {
            "widths": (z, widths[:-1] + [widths[-1] + 1], p, seed_t, counter_t),
            "drop_prob": (z, widths, torch.cat([p, p[:1]]), seed_t, counter_t),
            "seed": (z, widths, p, seed_t.to(torch.int32), counter_t),
            "counter": (z, widths, p, seed_t, torch.tensor([counter, counter])),
            "z": (z.unsqueeze(0), widths, p, seed_t, counter_t),
        }[broken]
        with pytest.raises(ValueError):
            ops.feature_drop(*bad, backend=backend)
        return
    out, keep = ops.feature_drop(z, widths, p, seed_t, counter_t, backend=backend)
    N, D, M = z.shape[0], z.shape[1], len(widths)
    assert out.shape == (N, D) and out.dtype == z.dtype and keep.shape == (N, M) and keep.dtype == torch.bool
    ref_out, ref_keep = reference.feature_drop(z, widths, p, seed_t, counter_t)
    assert torch.equal(keep, ref_keep)
    tol = {"rtol": FD_RTOL[z.dtype], "atol": FD_ATOL[z.dtype]}
    torch.testing.assert_close(out, ref_out, equal_nan=True, **tol)
    # Independently of the reference's arithmetic: float64 z * scale where kept, exactly 0 elsewhere.
    p64 = [float(v) for v in p.double()]
    theta = sum(w * q for w, q in zip(widths, p64)) / D if D else 0.0
    scale = 1.0 / (1.0 - theta) if theta < 1 else 0.0
    cols = torch.cat([keep[:, m : m + 1].expand(N, w) for m, w in enumerate(widths)], 1)
    assert (out[~cols] == 0).all()  # dropped: 0, also where z is inf or NaN
    expected = z.double()[cols] * scale
    got = out[cols].double()
    assert torch.equal(got.isnan(), expected.isnan())  # NaN only where z had one, and not dropped
    big = expected.abs() > torch.finfo(z.dtype).max * (1 + 2 * tol["rtol"])  # overflows z's dtype
    assert torch.equal(got[big], expected[big].sign() * math.inf)
    fine = torch.isfinite(expected) & (expected.abs() <= torch.finfo(z.dtype).max)
    assert ((got[fine] - expected[fine]).abs() <= tol["rtol"] * expected[fine].abs() + tol["atol"]).all()


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


# --- resume of the forward-, data- and schedule-level methods, through the recipe's hooks ---------

# Each method's schedule is shortened so that its events fall on both sides of the checkpoint taken
# before epoch RESUME_AT of EPOCHS: OPM drops from epoch 2 on (its stream counter has advanced at
# the checkpoint); re-learning re-initialises after epochs 1 and 3 and then stops (times=2, so a lost
# count would add a third after epoch 5, a lost theta_init would move towards other weights); the
# valuation methods plan re-sampled rows after every epoch from 2 on (epoch 3 trains on rows planned
# before the checkpoint); CRMT trains its head with the margin loss, then runs stage 2.
RESUME_SPECS = {
    "opm": "opm:start=2:q_base=0.5",
    "relearn": "relearn:every=2:times=2",
    "sample": "sample:start=2",
    "modality": "modality:start=2:part_ratio=0.5",
    "crmt": "crmt:stage2=2",
}
EPOCHS, RESUME_AT = 6, 3


def _two_modality_data():
    """A small 3-class set: modality "a" separates the classes well, "v" barely (an imbalance for
    the methods to act on)."""
    from mmgrad.recipes.data import MultiViewSplit

    g = torch.Generator().manual_seed(5)
    centres = {"a": torch.randn(3, 6, generator=g) * 2.0, "v": torch.randn(3, 5, generator=g) * 0.4}

    def split(n):
        y = torch.arange(n) % 3
        return MultiViewSplit({m: c[y] + torch.randn(n, c.shape[1], generator=g) for m, c in centres.items()}, y)

    return split(96), split(48)


def _recipe_run(name, save=None, resume=None, restore_method=True):
    """``run_one``'s training loop for ``name`` with its hooks (``_EpochHooks``: OPM's feature edit,
    the re-sampled rows, the end-of-epoch diagnosis and plans, CRMT's loss and stage 2), with a
    checkpoint of everything a run depends on written to ``save`` before epoch RESUME_AT, or read
    from ``resume`` (into a model built from other initial weights, under another global RNG state)
    to continue from there. ``restore_method=False`` leaves the method's own state out of the
    restore (the control that shows it matters). Returns the final parameters and a log of the
    method's events per epoch."""
    from mmgrad.recipes.models import build_model
    from mmgrad.recipes.train import TrainConfig, _EpochHooks, parse_method

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reduction order in the test process and the fresh one
    try:
        spec = parse_method(RESUME_SPECS[name])
        train, val = _two_modality_data()
        config = TrainConfig(epochs=EPOCHS, batch_size=32, lr=0.05)
        torch.manual_seed(99 if resume else 0)
        model = build_model({"a": (6,), "v": (5,)}, 3, hidden=(16,), features=8,
                            fusion="crmt" if name == "crmt" else "concat")
        opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=1e-4)
        # A resumed OPM or resampler is built with another seed: theirs must come from the state.
        # Re-learning's seed (of k-means) is a setting its state does not hold, like lam and every.
        hooks = _EpochHooks(spec, model, train, val, 3, seed=8 if resume and name != "relearn" else 7)
        rows_rng = torch.Generator().manual_seed(7)
        log = []
        if hooks.opm is not None:
            hooks.opm.register_forward_hook(lambda mod, args, out: log.append(("opm", int((~out.keep).sum()))))
        first = 0
        if resume:
            saved = torch.load(resume)
            first = saved["epoch"]
            if restore_method or name != "crmt":
                model.load_state_dict(saved["model"])
            else:  # the CRMT head is the method's state: restore the encoders only
                encoders = {k: v for k, v in saved["model"].items() if not k.startswith("fusion.")}
                model.load_state_dict(encoders, strict=False)
            opt.load_state_dict(saved["opt"])
            rows_rng.set_state(saved["rows_rng"])
            if restore_method:
                if hooks.opm is not None:
                    hooks.opm.load_state_dict(saved["opm"])
                if hooks.relearn is not None:
                    hooks.relearn.load_state_dict(saved["relearn"])
                if hooks.resampler is not None:
                    from mmgrad.methods.valuation import Resampled

                    hooks.resampler.load_state_dict(saved["resampler"])
                    extra = saved["extra"]
                    hooks.extra = Resampled(extra["index"], extra["keep"], tuple(extra["names"]))
            torch.manual_seed(4321)
        for epoch in range(first, EPOCHS):
            if save and epoch == RESUME_AT:
                extra = hooks.extra
                torch.save({
                    "epoch": epoch, "model": model.state_dict(), "opt": opt.state_dict(),
                    "rows_rng": rows_rng.get_state(),
                    "opm": hooks.opm.state_dict() if hooks.opm is not None else None,
                    "relearn": hooks.relearn.state_dict() if hooks.relearn is not None else None,
                    "resampler": hooks.resampler.state_dict() if hooks.resampler is not None else None,
                    # The rows planned after the last epoch, which the next one trains on.
                    "extra": None if extra is None else
                    {"index": extra.index, "keep": extra.keep, "names": list(extra.names)},
                }, save)
            log.append(("epoch", epoch))
            model.train()
            hooks.set_epoch(epoch)
            rows, row_keep = hooks.rows(rows_rng)
            log.append(("rows", rows.numel()))
            for b in range(0, rows.numel(), config.batch_size):
                idx = rows[b : b + config.batch_size]
                keep = row_keep[b : b + config.batch_size] if row_keep is not None else None
                z = model.encode({m: train.views[m][idx] for m in ("a", "v")})
                loss, _ = hooks.loss(z, keep, train.labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            action = hooks.end_epoch(epoch)
            if action and "relearn_alpha" in action:
                log.append(("relearn", sorted(action["relearn_alpha"].items())))
        finish = hooks.finish(config, seed=7)
        if finish:
            log.append(("stage2", finish["stage2_loss"]))
        return [p.detach().clone() for p in model.parameters()], log
    finally:
        torch.set_num_threads(threads)


def _after(log, epoch):
    """The entries of ``log`` from the start of ``epoch`` on."""
    return log[log.index(("epoch", epoch)) :]


_RECIPE_RESUME_SCRIPT = r"""
import sys, torch
sys.path.insert(0, {tests!r})
from test_reliability import RESUME_SPECS, _recipe_run

folder = sys.argv[1]
for name in RESUME_SPECS:
    torch.save(_recipe_run(name, resume=f"{{folder}}/{{name}}.pt"), f"{{folder}}/{{name}}.out")
"""


@pytest.fixture(scope="module")
def recipe_resumes(tmp_path_factory):
    """Uninterrupted runs of every method (each writing its mid-run checkpoint), then one fresh
    process (one interpreter start for all) that resumes them all from their checkpoints;
    ``{name: (uninterrupted, resumed, checkpoint path)}``, runs as ``(parameters, log)``."""
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("recipe_resume")
    full = {name: _recipe_run(name, save=str(folder / f"{name}.pt")) for name in RESUME_SPECS}
    script = _RECIPE_RESUME_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", script, str(folder)], check=True, timeout=300)
    return {name: (full[name], torch.load(folder / f"{name}.out"), str(folder / f"{name}.pt")) for name in RESUME_SPECS}


@pytest.mark.parametrize("name", list(RESUME_SPECS))
def test_recipe_methods_resume_in_a_fresh_process_bitwise(name, recipe_resumes):
    (params, log), (resumed_params, resumed_log), checkpoint = recipe_resumes[name]
    # The method acted after the checkpoint (so the test would see a lost state) ...
    after = _after(log, RESUME_AT)
    if name == "opm":
        assert any(kind == "opm" and dropped > 0 for kind, dropped in after)
    elif name == "relearn":
        assert [k for k, _ in log].count("relearn") == 2 and any(k == "relearn" for k, _ in after)
    elif name in ("sample", "modality"):
        assert ("rows", 96) in log and all(k != "rows" or n > 96 for k, n in after)
    else:
        assert any(k == "stage2" for k, _ in after)
    # ... the fresh process did the same from there, and ended on the same bits.
    assert resumed_log == after
    assert len(params) == len(resumed_params)
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)
    # Control: without the method's state the continuation differs.
    lost, _ = _recipe_run(name, resume=checkpoint, restore_method=False)
    assert not all(torch.equal(p, q) for p, q in zip(params, lost))
