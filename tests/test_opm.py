"""OPM (METHODS.md §3.2): the fused feature_drop op on every backend against a loop-by-loop float64
re-implementation written here, its torch.library / autograd / compile contract, and the OPM
module (12.6 values, drop statistics, rescale, survivor loss, state, end-to-end training)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmgrad
from conftest import backend_cases, host_sync_raises
from mmgrad import ops
from mmgrad.methods.opm import OPM, OPMOutput, opm_drop_probabilities, others_sum_ratio
from mmgrad.reference import philox4x32

CASES = backend_cases("feature_drop")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Relative error of out = round(round_acc(z * scale)) against z * scale in float64.
RTOL = {torch.float64: 1e-15, torch.float32: 2.5e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SHAPES = [(1, [1, 1]), (37, [5, 0, 11]), (19, [300, 2]), (0, [3, 4]), (6, [0, 0]), (40, [2, 3, 1, 4])]


def loop_feature_drop(z, widths, drop_prob, seed, counter):
    """The op written out sample by sample and modality by modality, in float64."""
    N, M = z.shape[0], len(widths)
    D = sum(widths)
    p = [float(v) for v in drop_prob]
    theta = sum(w * p[m] for m, w in enumerate(widths)) / D if D else 0.0
    scale = 1.0 / (1.0 - theta) if theta < 1 else 0.0
    index = torch.tensor([counter + i * M + m for i in range(N) for m in range(M)], dtype=torch.int64)
    r0 = philox4x32(index, torch.tensor(seed))[0].tolist()
    keep = torch.zeros(N, M, dtype=torch.bool)
    out = torch.zeros(N, D, dtype=torch.float64)
    z64 = z.double()
    for i in range(N):
        col = 0
        for m, w in enumerate(widths):
            u = (r0[i * M + m] >> 8) / 2**24
            keep[i, m] = u >= p[m]
            if keep[i, m]:
                out[i, col : col + w] = z64[i, col : col + w] * scale
            col += w
    return out, keep, scale


def run(case, z, widths, p, seed, counter):
    device, backend = case
    out, keep = ops.feature_drop(
        z.to(device), widths, p.to(device), torch.tensor(seed, device=device), torch.tensor(counter, device=device),
        backend=backend,
    )
    return out.cpu(), keep.cpu()


def test_philox_known_answer():
    # Random123's known-answer vector for philox4x32-10, counter 0 and key 0.
    words = [int(w) for w in philox4x32(torch.tensor([0]), torch.tensor(0))]
    assert words == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


# --- the op against the loop reference ------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,widths", SHAPES)
def test_feature_drop_matches_loop_reference(case, dtype, N, widths):
    z = torch.randn(N, sum(widths), dtype=torch.float64).to(dtype)
    p = torch.rand(len(widths), dtype=torch.float64) * 0.9
    seed, counter = int(torch.randint(0, 2**62, ())), int(torch.randint(0, 2**40, ()))
    out, keep = run(case, z, widths, p, seed, counter)
    ref, ref_keep, scale = loop_feature_drop(z, widths, p, seed, counter)
    assert out.dtype == dtype and out.shape == (N, sum(widths))
    assert keep.dtype == torch.bool and keep.shape == (N, len(widths))
    assert torch.equal(keep, ref_keep)
    err = (out.double() - ref).abs()
    assert (err <= RTOL[dtype] * ref.abs() + 1e-7 * (dtype == torch.float16)).all(), err.max()
    assert (out.double()[ref == 0] == 0).all()  # dropped entries are exactly 0


def test_keep_mask_and_output_are_identical_across_backends():
    usable = [c.values[0] for c in CASES if not c.marks]
    assert len(usable) >= 2, "at least the reference and one compiled backend"
    widths = [7, 1, 0, 12]
    p = torch.tensor([0.2, 0.9, 0.5, 0.45], dtype=torch.float64)
    for dtype in DTYPES:
        z = torch.randn(53, 20, dtype=dtype)
        results = [run(case, z, widths, p, 2**33 + 7, 2**32 - 60) for case in usable]
        for out, keep in results[1:]:
            assert torch.equal(keep, results[0][1])
            assert torch.equal(out.view(torch.uint8), results[0][0].view(torch.uint8))  # bit for bit


@pytest.mark.parametrize("case", CASES)
def test_stream_positions_are_counter_plus_row_times_m_plus_m(case):
    # A sub-batch starting at row k with counter c + k*M draws the same bits as rows k.. of the batch.
    widths = [3, 2, 4]
    z = torch.randn(20, 9)
    p = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)
    _, keep = run(case, z, widths, p, 11, 1000)
    _, tail = run(case, z[7:], widths, p, 11, 1000 + 7 * 3)
    assert torch.equal(keep[7:], tail)
    _, other_seed = run(case, z, widths, p, 12, 1000)
    assert not torch.equal(keep, other_seed)


@pytest.mark.parametrize("case", CASES)
def test_zero_drop_probability_is_the_identity(case):
    z = torch.randn(25, 9)
    out, keep = run(case, z, [4, 5], torch.zeros(2, dtype=torch.float64), 1, 0)
    assert keep.all() and torch.equal(out, z)


# The interpreter's numpy reports the inf * 0 it computes before masking the dropped entries.
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("case", CASES)
def test_drop_everything_gives_zeros_without_nan(case):
    z = torch.randn(25, 9)
    z[0, 0], z[1, 5], z[2, 2] = math.inf, -math.inf, math.nan
    out, keep = run(case, z, [4, 5], torch.ones(2, dtype=torch.float64), 1, 0)
    assert not keep.any()
    assert torch.equal(out, torch.zeros_like(z))


@pytest.mark.parametrize("case", CASES)
def test_non_contiguous_inputs(case):
    widths = [6, 5]
    p = torch.tensor([0.3, 0.6], dtype=torch.float64)
    base = torch.randn(31, 20)
    expected = run(case, base[:, 3:14].contiguous(), widths, p, 5, 9)
    row_strided = base[:, 3:14]  # unit column stride, row stride 20: used as it is
    transposed = base[:, 3:14].t().contiguous().t()  # column stride 31: copied first
    for z in (row_strided, transposed):
        out, keep = run(case, z, widths, p, 5, 9)
        assert torch.equal(out, expected[0]) and torch.equal(keep, expected[1])


def test_argument_errors():
    z = torch.randn(4, 5)
    p = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="add up to"):
        ops.feature_drop(z, [2, 2], p, 0, 0)
    with pytest.raises(ValueError, match="non-negative"):
        ops.feature_drop(z, [6, -1], p, 0, 0)
    with pytest.raises(ValueError, match="drop_prob"):
        ops.feature_drop(z, [2, 3], torch.zeros(3), 0, 0)
    with pytest.raises(ValueError, match="2-D"):
        ops.feature_drop(torch.randn(5), [2, 3], p, 0, 0)
    with pytest.raises(TypeError, match="float"):
        ops.feature_drop(torch.ones(4, 5, dtype=torch.int32), [2, 3], p, 0, 0)
    with pytest.raises(ValueError, match="int64"):
        ops.feature_drop(z, [2, 3], p, torch.tensor(0.0), 0)


# --- torch.library, autograd, compile ---------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_opcheck(case):
    device, backend = case
    z = torch.randn(9, 7, device=device, requires_grad=True)
    p = torch.tensor([0.5, 0.25], dtype=torch.float64, device=device)
    seed, counter = torch.tensor(3, device=device), torch.tensor(40, device=device)
    torch.library.opcheck(torch.ops.mmgrad.feature_drop.default, (z, [3, 4], p, seed, counter, backend))


@pytest.mark.parametrize("case", CASES)
def test_gradcheck_float64(case):
    device, backend = case
    z = torch.randn(6, 5, dtype=torch.float64, device=device, requires_grad=True)
    p = torch.tensor([0.4, 0.3], dtype=torch.float64, device=device)
    seed, counter = torch.tensor(8, device=device), torch.tensor(0, device=device)

    def f(z):
        return ops.feature_drop(z, [2, 3], p, seed, counter, backend=backend)[0]

    assert torch.autograd.gradcheck(f, (z,))
    assert torch.autograd.gradgradcheck(f, (z,))
    # The gradient is the same mask and scale: d out / d z = diag(keep * scale).
    out, keep = ops.feature_drop(z, [2, 3], p, seed, counter, backend=backend)
    g = torch.randn_like(out)
    (gz,) = torch.autograd.grad(out, z, g)
    cols = keep.repeat_interleave(torch.tensor([2, 3], device=device), dim=1)
    scale = 1 / (1 - (2 * 0.4 + 3 * 0.3) / 5)
    assert torch.allclose(gz, torch.where(cols, g * scale, 0.0), rtol=1e-15, atol=0)


def test_torch_compile_fullgraph_traces_the_op():
    p = torch.tensor([0.5, 0.2], dtype=torch.float64)
    seed, counter = torch.tensor(4), torch.tensor(17)

    def f(z):
        out, keep = ops.feature_drop(z, [3, 5], p, seed, counter)
        return (out * out).sum() + keep.sum()

    z = torch.randn(11, 8, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    value = compiled(z)
    (grad,) = torch.autograd.grad(value, z)
    z2 = z.detach().clone().requires_grad_()
    expected = f(z2)
    expected.backward()
    assert torch.allclose(value, expected) and torch.allclose(grad, z2.grad)


# --- OPM: drop probabilities ----------------------------------------------------------------------


def test_drop_probability_values_of_methods_12_6():
    q = opm_drop_probabilities(torch.tensor([1e12, 1.0, 0.5, 1.5], dtype=torch.float64), q_base=0.4, lam=0.5)
    assert torch.allclose(q, torch.tensor([0.6, 0.0, 0.0, 0.4 * (1 + 0.5 * math.tanh(0.5))], dtype=torch.float64))
    assert torch.equal(opm_drop_probabilities(torch.tensor([3.0]), q_base=0.9, lam=1.0), torch.tensor([1.0]))  # clipped


def test_ratio_is_score_over_the_sum_of_the_others():
    s = torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)
    assert torch.allclose(others_sum_ratio(s), torch.tensor([1.0, 0.2, 2 / 4], dtype=torch.float64))
    s2 = torch.tensor([0.7, 0.3], dtype=torch.float64)
    assert torch.equal(others_sum_ratio(s2), torch.stack([s2[0] / s2[1], s2[1] / s2[0]]))


def confident_logits(y, classes, right):
    """Logits putting (almost) all mass on the target (``right``) or on another class."""
    target = y if right else (y + 1) % classes
    return F.one_hot(target, classes).double() * 40.0


def test_module_drop_probability_dominant_and_balanced():
    y = torch.randint(0, 4, (16,))
    feats = {"a": torch.randn(16, 3), "v": torch.randn(16, 5)}
    opm = OPM(["a", "v"], p_exe=1.0)
    out = opm(feats, {"a": confident_logits(y, 4, True), "v": confident_logits(y, 4, False)}, y)
    assert bool(out.executed)
    assert torch.allclose(out.drop_prob, torch.tensor([0.6, 0.0], dtype=torch.float64))  # rho -> inf
    same = torch.randn(16, 4)
    out = opm(feats, {"a": same, "v": same.clone()}, y)
    assert torch.equal(out.drop_prob, torch.zeros(2, dtype=torch.float64))  # rho = 1
    assert out.keep.all()


def test_module_uses_the_op_at_its_documented_stream_positions():
    N, widths = 12, [3, 5]
    y = torch.randint(0, 4, (N,))
    feats = {"a": torch.randn(N, 3), "v": torch.randn(N, 5)}
    logits = {"a": confident_logits(y, 4, True), "v": confident_logits(y, 4, False)}
    opm = OPM(["a", "v"], p_exe=1.0, seed=77)
    opm.counter.fill_(1234)
    out = opm(feats, logits, y)
    assert int(opm.counter) == 1234 + N * 2 + 1
    ref_out, ref_keep = ops.feature_drop(
        torch.cat([feats["a"], feats["v"]], 1), widths, out.drop_prob, torch.tensor(77), torch.tensor(1235), backend="reference"
    )
    assert torch.equal(out.keep, ref_keep)
    assert torch.equal(torch.cat([out.features["a"], out.features["v"]], 1), ref_out)
    assert torch.equal(out.alive, ref_keep.any(1))
    # executed iff the uniform at position `counter` is below p_exe
    u0 = (int(philox4x32(torch.tensor([1234]), torch.tensor(77))[0]) >> 8) / 2**24
    opm2 = OPM(["a", "v"], p_exe=u0 + 1e-9, seed=77)
    opm2.counter.fill_(1234)
    assert bool(opm2(feats, logits, y).executed)
    opm3 = OPM(["a", "v"], p_exe=u0, seed=77)
    opm3.counter.fill_(1234)
    out3 = opm3(feats, logits, y)
    assert not bool(out3.executed) and out3.keep.all() and torch.equal(out3.drop_prob, torch.zeros(2, dtype=torch.float64))


def test_rescale_is_one_over_one_minus_dimension_weighted_drop_rate():
    N = 64
    y = torch.randint(0, 4, (N,))
    feats = {"a": torch.randn(N, 3, dtype=torch.float64), "v": torch.randn(N, 5, dtype=torch.float64)}
    logits = {"a": confident_logits(y, 4, True), "v": confident_logits(y, 4, False)}
    out = OPM(["a", "v"], p_exe=1.0)(feats, logits, y)
    scale = 1 / (1 - (3 * 0.6 + 5 * 0.0) / 8)
    ka = out.keep[:, 0:1]
    assert 0 < ka.sum() < N
    assert torch.allclose(out.features["a"], torch.where(ka, feats["a"] * scale, 0.0), rtol=1e-14, atol=0)
    assert torch.allclose(out.features["v"], feats["v"] * scale, rtol=1e-14, atol=0)  # never dropped, still rescaled


def test_drop_and_execution_frequencies():
    N, batches, p_exe = 32, 1200, 0.7
    opm = OPM(["a", "v"], p_exe=p_exe, seed=5)
    feats = {"a": torch.randn(N, 2), "v": torch.randn(N, 2)}
    y = torch.randint(0, 3, (N,))
    logits = {"a": confident_logits(y, 3, True), "v": confident_logits(y, 3, False)}
    executed, dropped_a, dropped_v = 0, 0, 0
    for _ in range(batches):
        out = opm(feats, logits, y)
        executed += int(out.executed)
        if out.executed:
            dropped_a += int((~out.keep[:, 0]).sum())
            dropped_v += int((~out.keep[:, 1]).sum())
        else:
            assert out.keep.all()
    sd_exe = math.sqrt(p_exe * (1 - p_exe) / batches)
    assert abs(executed / batches - p_exe) < 5 * sd_exe
    draws = executed * N
    sd_a = math.sqrt(0.6 * 0.4 / draws)
    assert abs(dropped_a / draws - 0.6) < 5 * sd_a
    assert dropped_v == 0


def test_three_modalities_drop_only_the_dominant_one():
    N = 400
    y = torch.randint(0, 3, (N,))
    feats = {m: torch.randn(N, 2) for m in "abc"}
    logits = {"a": confident_logits(y, 3, False), "b": confident_logits(y, 3, True), "c": confident_logits(y, 3, False)}
    out = OPM(["a", "b", "c"], p_exe=1.0)(feats, logits, y)
    assert torch.allclose(out.drop_prob, torch.tensor([0.0, 0.6, 0.0], dtype=torch.float64))
    assert out.keep[:, [0, 2]].all() and not out.keep[:, 1].all()


# --- OPM: loss over the survivors -----------------------------------------------------------------


def test_survivor_loss_equals_cross_entropy_of_the_selected_samples():
    N, C = 40, 5
    z = torch.randn(N, 6, dtype=torch.float64)
    _, keep = ops.feature_drop(z, [2, 4], torch.tensor([0.6, 0.6], dtype=torch.float64), 3, 0)
    alive = keep.any(1)
    assert 0 < alive.sum() < N
    out = OPMOutput({}, keep, alive, torch.zeros(2, dtype=torch.float64), torch.tensor(True))
    y = torch.randint(0, C, (N,))
    logits = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
    loss = OPM.loss(logits, y, out)
    (g1,) = torch.autograd.grad(loss, logits)
    sel_logits, sel_y = out.select(logits, y)
    assert sel_logits.shape[0] == int(alive.sum())
    literal = F.cross_entropy(sel_logits, sel_y)
    (g2,) = torch.autograd.grad(literal, logits)
    assert torch.allclose(loss, literal, rtol=1e-14, atol=0)
    assert torch.allclose(g1, g2, rtol=1e-14, atol=1e-300)
    assert (g1[~alive] == 0).all()


def test_survivor_loss_is_zero_with_zero_gradient_when_nothing_survives():
    N = 6
    out = OPMOutput({}, torch.zeros(N, 2, dtype=torch.bool), torch.zeros(N, dtype=torch.bool),
                    torch.ones(2, dtype=torch.float64), torch.tensor(True))
    logits = torch.randn(N, 3, requires_grad=True)
    loss = OPM.loss(logits, torch.zeros(N, dtype=torch.int64), out)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# --- OPM: modes, state, construction ----------------------------------------------------------------


def test_eval_mode_and_before_start_epoch_are_the_identity():
    y = torch.randint(0, 4, (10,))
    feats = {"a": torch.randn(10, 3), "v": torch.randn(10, 5)}
    logits = {"a": confident_logits(y, 4, True), "v": confident_logits(y, 4, False)}
    opm = OPM(["a", "v"], p_exe=1.0, start_epoch=5)
    for setup in ("before_start", "eval"):
        if setup == "eval":
            opm.set_epoch(5)
            opm.eval()
        out = opm(feats, logits, y)
        assert out.features["a"] is feats["a"] and out.features["v"] is feats["v"]
        assert out.keep.all() and out.alive.all() and not bool(out.executed)
        assert torch.equal(out.drop_prob, torch.zeros(2, dtype=torch.float64))
        assert int(opm.counter) == 0
    opm.train()
    assert bool(opm(feats, logits, y).executed) and int(opm.counter) == 10 * 2 + 1


def test_state_dict_round_trip_reproduces_the_next_masks():
    N = 30
    y = torch.randint(0, 4, (N,))
    feats = {"a": torch.randn(N, 3), "v": torch.randn(N, 5)}
    logits = {"a": confident_logits(y, 4, True), "v": torch.randn(N, 4)}
    opm = OPM(["a", "v"], seed=123)
    opm.set_epoch(3)
    for _ in range(3):
        opm(feats, logits, y)
    state = copy.deepcopy(opm.state_dict())  # state_dict() shares the live buffers
    assert set(state) == {"seed", "counter", "_extra_state"}
    expected = [opm(feats, logits, y) for _ in range(4)]
    resumed = OPM(["a", "v"], seed=999)
    resumed.load_state_dict(state)
    assert resumed.epoch == 3
    for e in expected:
        got = resumed(feats, logits, y)
        assert torch.equal(got.keep, e.keep) and torch.equal(got.executed, e.executed)
        assert torch.equal(got.features["a"], e.features["a"])
    assert any(not bool(e.keep.all()) for e in expected)  # the comparison saw real masks


def test_construction_errors_and_modality_sources():
    for kwargs, msg in [
        (dict(q_base=1.5), "q_base"),
        (dict(q_base=-0.1), "q_base"),
        (dict(lam=-1.0), "lam"),
        (dict(p_exe=1.01), "p_exe"),
        (dict(eps=-1.0), "eps"),
        (dict(seed=-3), "seed"),
    ]:
        with pytest.raises(ValueError, match=msg):
            OPM(["a", "v"], **kwargs)
    with pytest.raises(ValueError, match="at least 2"):
        OPM(["a"])
    with pytest.raises(ValueError, match="distinct"):
        OPM(["a", "a"])
    with pytest.raises(TypeError, match="sequence of modality names"):
        OPM("av")
    enc = {"audio": nn.Linear(2, 3), "visual": nn.Linear(2, 3)}
    assert OPM(enc).names == ["audio", "visual"]
    head = nn.Linear(6, 2)
    params = [p for m in enc.values() for p in m.parameters()] + list(head.parameters())
    opt = mmgrad.BalancedOptimizer(torch.optim.SGD(params, lr=0.1), modalities=enc, method="sum")
    opm = OPM(opt)
    assert opm.names == ["audio", "visual"]
    assert "q_base=0.4" in repr(opm) and "modalities=['audio', 'visual']" in repr(opm)
    with pytest.raises(KeyError, match="visual"):
        opm({"audio": torch.randn(2, 3)}, {}, torch.zeros(2, dtype=torch.int64))


def test_opm_step_compiles_fullgraph_and_matches_eager():
    N = 16
    opm = OPM(["a", "v"], p_exe=1.0, seed=5)
    head = nn.Linear(7, 3)
    feats = {"a": torch.randn(N, 3), "v": torch.randn(N, 4)}
    y = torch.randint(0, 3, (N,))
    logits = {"a": confident_logits(y, 3, True), "v": torch.randn(N, 3)}

    def step(feats, logits, y):
        out = opm(feats, logits, y)
        return OPM.loss(head(torch.cat(list(out.features.values()), 1)), y, out), out.keep

    loss_c, keep_c = torch.compile(step, fullgraph=True, backend="aot_eager")(feats, logits, y)
    assert int(opm.counter) == N * 2 + 1  # the in-place advance survives compilation
    opm.counter.zero_()
    loss_e, keep_e = step(feats, logits, y)
    assert torch.equal(keep_c, keep_e) and not keep_e.all()
    assert torch.allclose(loss_c, loss_e)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="sync detection needs a CUDA device")
def test_training_forward_and_loss_are_sync_free_on_cuda():
    N = 64
    y = torch.randint(0, 4, (N,), device="cuda")
    feats = {"a": torch.randn(N, 3, device="cuda", requires_grad=True), "v": torch.randn(N, 5, device="cuda")}
    logits = {"a": torch.randn(N, 4, device="cuda"), "v": torch.randn(N, 4, device="cuda")}
    opm = OPM(["a", "v"]).cuda()
    head = nn.Linear(8, 4).cuda()

    def step():
        out = opm(feats, logits, y)
        OPM.loss(head(torch.cat(list(out.features.values()), 1)), y, out).backward()

    step()  # compile / warm up
    with host_sync_raises():
        step()


# --- end to end -------------------------------------------------------------------------------------


class ToyAV(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.ModuleDict({"audio": nn.Linear(6, 4), "visual": nn.Linear(10, 4)})
        self.head = nn.Linear(8, 3)

    def forward(self, xs, y, opm):
        z = {m: torch.relu(self.enc[m](xs[m])) for m in ("audio", "visual")}
        uni = mmgrad.nn.split_concat_logits(self.head, z)
        out = opm(z, uni, y)
        logits = self.head(torch.cat(list(out.features.values()), 1))
        return OPM.loss(logits, y, out), out


def toy_batch(gen):
    y = torch.randint(0, 3, (24,), generator=gen)
    audio = F.one_hot(y, 3).double().repeat(1, 2) * 2 + 0.1 * torch.randn(24, 6, generator=gen, dtype=torch.float64)
    visual = torch.randn(24, 10, generator=gen, dtype=torch.float64)
    visual[:, 0] += 0.3 * y.double()  # weak modality
    return {"audio": audio, "visual": visual}, y


def test_end_to_end_training_with_balanced_optimizer_matches_a_plain_sgd_loop():
    torch.manual_seed(1)
    model_a = ToyAV().double()
    model_b = ToyAV().double()
    model_b.load_state_dict(model_a.state_dict())
    opt_a = mmgrad.BalancedOptimizer(
        torch.optim.SGD(model_a.parameters(), lr=0.2, momentum=0.9), modalities=dict(model_a.enc.items()), method="sum"
    )
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.2, momentum=0.9)
    opm_a, opm_b = OPM(opt_a, p_exe=0.7, seed=3), OPM(["audio", "visual"], p_exe=0.7, seed=3)
    gen = torch.Generator().manual_seed(0)
    losses, executed, dropped = [], 0, 0
    for _ in range(25):
        xs, y = toy_batch(gen)
        opt_a.zero_grad()
        loss_a, out = model_a(xs, y, opm_a)
        opt_a.backward(loss_a)
        opt_a.step()
        opt_b.zero_grad()
        loss_b, _ = model_b(xs, y, opm_b)
        loss_b.backward()
        opt_b.step()
        assert torch.isfinite(loss_a) and torch.allclose(loss_a, loss_b, rtol=1e-12)
        losses.append(loss_a.item())
        executed += int(out.executed)
        dropped += int((~out.keep).sum())
    assert executed > 0 and dropped > 0  # OPM acted during training
    assert losses[-1] < losses[0]
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.allclose(pa, pb, rtol=1e-10, atol=1e-12)


def test_a_backend_without_the_kernel_runs_the_reference_unless_named(monkeypatch):
    # ops._kernel: where the policy or MMGRAD_BACKEND picks a backend with no feature_drop kernel
    # (the CUDA C++ one), the reference runs; naming that backend in the call raises.
    from mmgrad import reference

    z = torch.randn(9, 7, dtype=torch.float64)
    p = torch.tensor([0.5, 0.25], dtype=torch.float64)
    seed, counter = torch.tensor(3), torch.tensor(40)
    expected = reference.feature_drop(z, [3, 4], p, seed, counter)
    monkeypatch.setattr(ops, "resolve_backend", lambda device, backend=None: "cuda")
    out, keep = ops.feature_drop(z, [3, 4], p, seed, counter)
    assert torch.equal(out, expected[0]) and torch.equal(keep, expected[1])
    with pytest.raises(NotImplementedError, match="no feature_drop kernel"):
        ops.feature_drop(z, [3, 4], p, seed, counter, backend="cuda")
