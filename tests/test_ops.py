"""Every op on every CPU backend against the float64 reference.

Tolerances per dtype (inputs are compared against the reference run on the same values cast to
float64, so only accumulation and output rounding count):
* gram: |G - G64| <= tol * sqrt(G64_ii * G64_jj) (+ a tiny absolute floor), tol = 1e-5 for
  fp32 / fp16 / bf16 inputs (fp32 accumulation), 1e-12 for fp64;
* combine and the in-place segment ops: |out - ref| <= tol * (|w| @ |J|) + floor, tol = the output
  dtype's rounding: fp64 1e-12, fp32 1e-5, fp16 2e-3, bf16 1.6e-2;
* noise: within 1e-5 (absolute, per unit std) of the float64 Philox reference.
"""

import pytest
import torch

from conftest import REQUIRE_CPP, backend_cases
from mmgrad import ops, reference

CASES = backend_cases()
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
OUT_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ACC_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
SHAPES = [(1, 1), (1, 1000), (2, 7), (3, 4099), (8, 1), (8, 2500), (17, 333), (64, 1031), (5, 0)]


def run_on(device, op, *args, **kwargs):
    """``op`` with every tensor argument moved to ``device``; a tensor result comes back on the CPU."""
    moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    out = op(*moved, **kwargs)
    return out.cpu() if isinstance(out, torch.Tensor) else out


def random_matrix(K, P, dtype, scale=1.0, device="cpu"):
    return (torch.randn(K, P, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def assert_gram_close(G, J, dtype):
    G, J = G.cpu(), J.cpu()
    ref = reference.gram(J.to(torch.float64))
    assert G.dtype == reference.accumulation_dtype(dtype)
    assert G.shape == ref.shape
    d = ref.diagonal().sqrt()
    bound = ACC_TOL[dtype] * torch.outer(d, d) + 1e-300
    err = (G.to(torch.float64) - ref).abs()
    assert (err <= bound).all(), f"max err {err.max().item():.3g}, bound {bound.min().item():.3g}"


def assert_combine_close(out, J, w, dtype):
    out, J, w = out.cpu(), J.cpu(), w.cpu()
    J64, w64 = J.to(torch.float64), w.to(torch.float64)
    ref = w64 @ J64
    assert out.dtype == dtype and out.shape == ref.shape
    bound = OUT_TOL[dtype] * (w64.abs() @ J64.abs()) + 1e-300
    err = (out.to(torch.float64) - ref).abs()
    assert (err <= bound).all(), f"max err {err.max().item():.3g}"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K,P", SHAPES)
def test_gram_matches_float64_reference(case, dtype, K, P):
    device, backend = case
    J = random_matrix(K, P, dtype, device=device)
    assert_gram_close(ops.gram(J, backend=backend), J, dtype)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K,P", SHAPES)
def test_combine_matches_float64_reference(case, dtype, K, P):
    device, backend = case
    J = random_matrix(K, P, dtype, device=device)
    w = torch.randn(K, device=device)
    assert_combine_close(ops.combine(J, w, backend=backend), J, w, dtype)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K,P", SHAPES)
def test_combine_into_out_equals_the_fresh_result(case, dtype, K, P):
    device, backend = case
    J = random_matrix(K, P, dtype, device=device)
    w = torch.randn(K, device=device)
    out = torch.full((P,), float("nan"), dtype=dtype, device=device)  # every entry must be written
    assert ops.combine(J, w, out=out, backend=backend) is out
    assert torch.equal(out, ops.combine(J, w, backend=backend))
    assert_combine_close(out, J, w, dtype)


@pytest.mark.parametrize("case", CASES)
def test_combine_out_misaligned_aliased_and_bad(case):
    device, backend = case
    J = random_matrix(3, 1000, torch.float32, device=device)
    w = torch.randn(3, device=device)
    expected = ops.combine(J, w, backend=backend)
    shifted = torch.zeros(1001, device=device)[1:]  # not 64-byte aligned
    torch.testing.assert_close(ops.combine(J, w, out=shifted, backend=backend), expected, rtol=0, atol=0)
    ops.combine(J, w, out=J[1], backend=backend)  # into a row of J itself
    torch.testing.assert_close(J[1], expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        ops.combine(J, w, out=torch.empty(999, device=device), backend=backend)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        ops.combine(J, w, out=torch.empty(1000, dtype=torch.float64, device=device), backend=backend)



@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shift", [0, 1], ids=["aligned", "misaligned"])
def test_combine_of_a_large_output_streaming_or_not(case, shift):
    # Outputs of 8 MiB and more are written with streaming stores on the CPU when 64-byte aligned,
    # with plain stores otherwise: both must give the fresh result's bits.
    device, backend = case
    P = (8 << 20) // 4 + 37
    J = random_matrix(2, P, torch.float32, device=device)
    w = torch.randn(2, device=device)
    expected = J.double().T @ w.double()
    out = torch.full((P + shift,), float("nan"), device=device)[shift:]
    ops.combine(J, w, out=out, backend=backend)
    assert torch.equal(out, ops.combine(J, w, backend=backend))
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_zero_rows_give_zero_gram_entries_and_no_nan(case):
    device, backend = case
    J = random_matrix(4, 999, torch.float32, device=device)
    J[1] = 0
    J[3] = 0
    G = ops.gram(J, backend=backend)
    assert torch.isfinite(G).all()
    assert (G[1] == 0).all() and (G[:, 3] == 0).all()
    assert_gram_close(G, J, torch.float32)
    out = ops.combine(J, torch.tensor([0.0, 2.0, 1.0, -1.0], device=device), backend=backend)
    assert torch.equal(out, J[2])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_extreme_scales_follow_the_reference(case, dtype, scale):
    device, backend = case
    J = random_matrix(3, 513, dtype, scale, device=device)
    G = ops.gram(J, backend=backend).cpu()
    # In fp32 the squares of 1e-30 flush to 0, as the float64 result does when cast to fp32. The
    # squares of 1e30 overflow: where the cast result is infinite, the fp32 accumulation is
    # non-finite too (inf, or NaN where +inf and -inf products meet), never a finite wrong value.
    expected = reference.gram(J.cpu().to(torch.float64)).to(G.dtype)
    if dtype == torch.float32:
        assert torch.equal(torch.isfinite(G), torch.isfinite(expected))
        finite = torch.isfinite(expected)
        assert torch.allclose(G[finite], expected[finite], rtol=1e-5, atol=0)
    else:
        assert_gram_close(G, J, dtype)
    w = torch.tensor([0.5, -1.0, 2.0], device=device)
    assert_combine_close(ops.combine(J, w, backend=backend), J, w, dtype)


@pytest.mark.parametrize("case", CASES)
def test_strided_rows_and_non_contiguous_input(case):
    device, backend = case
    wide = random_matrix(6, 3000, torch.float32, device=device)
    J = wide[::2, 100:2100]  # row stride 6000, unit column stride: read in place
    assert J.stride() == (6000, 1)
    assert_gram_close(ops.gram(J, backend=backend), J, torch.float32)
    w = torch.randn(3, device=device)
    assert_combine_close(ops.combine(J, w, backend=backend), J, w, torch.float32)
    Jt = random_matrix(700, 4, torch.float32, device=device).T  # column stride 4: copied, still correct
    assert_gram_close(ops.gram(Jt, backend=backend), Jt, torch.float32)


@pytest.mark.parametrize("case", CASES)
def test_gram_and_combine_are_bitwise_deterministic(case):
    device, backend = case
    J = random_matrix(8, 70_001, torch.float32, device=device)
    w = torch.randn(8, device=device)
    assert torch.equal(ops.gram(J, backend=backend), ops.gram(J, backend=backend))
    assert torch.equal(ops.combine(J, w, backend=backend), ops.combine(J, w, backend=backend))


def test_bad_input_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="2-D"):
        ops.gram(torch.randn(5))
    with pytest.raises(TypeError, match="float"):
        ops.gram(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"w must have shape \(3,\)"):
        ops.combine(torch.randn(3, 10), torch.randn(2))
    with pytest.raises(RuntimeError, match="unknown backend"):
        ops.gram(torch.randn(2, 3), backend="fortran")
    with pytest.raises(ValueError, match="contiguous 1-D"):
        ops.segment_moments(torch.randn(4, 4), *ops.table([4]))
    with pytest.raises(ValueError, match="one value per segment"):
        ops.segment_scale_(torch.randn(10), *ops.table([4, 6]), torch.ones(3))
    with pytest.raises(ValueError, match="needs a seed"):
        ops.segment_scale_(torch.randn(10), *ops.table([10]), 1.0, noise_std=1.0)


# --- segment ops ------------------------------------------------------------------------------


def random_layout(total_segments=12, gap=True, generator=None):
    """Offsets / numels with empty segments, gaps between segments and a shuffled order."""
    g = generator or torch.Generator().manual_seed(1)
    sizes = torch.randint(0, 3000, (total_segments,), generator=g).tolist()
    sizes[0], sizes[3] = 0, 1  # an empty and a single-element segment
    offsets, pos = [], 0
    for n in sizes:
        pos += int(torch.randint(0, 50, (1,), generator=g)) if gap else 0
        offsets.append(pos)
        pos += n
    order = torch.randperm(len(sizes), generator=g).tolist()
    offsets = torch.tensor([offsets[i] for i in order], dtype=torch.int64)
    numels = torch.tensor([sizes[i] for i in order], dtype=torch.int64)
    return offsets, numels, pos + 7


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_segment_moments_match_float64_reference(case, dtype):
    device, backend = case
    offsets, numels, total = random_layout()
    x = (torch.randn(total, dtype=torch.float64) * 3 + 0.5).to(dtype)
    m = run_on(device, ops.segment_moments, x, offsets, numels, backend=backend)
    ref = reference.segment_moments(x.to(torch.float64), offsets, numels)
    assert m.dtype == reference.accumulation_dtype(dtype) and m.shape == (len(offsets), 2)
    abs_sum = torch.stack([x.to(torch.float64)[o : o + n].abs().sum() for o, n in zip(offsets.tolist(), numels.tolist())])
    assert ((m[:, 0].double() - ref[:, 0]).abs() <= ACC_TOL[dtype] * abs_sum + 1e-300).all()
    assert ((m[:, 1].double() - ref[:, 1]).abs() <= ACC_TOL[dtype] * ref[:, 1] + 1e-300).all()
    assert torch.equal(m, run_on(device, ops.segment_moments, x, offsets, numels, backend=backend))


def test_segment_std_matches_tensor_std():
    offsets, numels = ops.table([5, 1, 0, 300])
    x = torch.randn(306, dtype=torch.float64) * 2 + 1
    std = ops.segment_std(ops.segment_moments(x, offsets, numels, backend="reference"), numels)
    assert torch.allclose(std[0], x[:5].std()) and torch.allclose(std[3], x[6:].std())
    assert std[1] == 0 and std[2] == 0  # defined (0), where Tensor.std() would give NaN


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_segment_scale_without_noise(case, dtype):
    device, backend = case
    offsets, numels, total = random_layout()
    x = torch.randn(total, dtype=torch.float64).to(dtype)
    scale = torch.randn(len(offsets), dtype=torch.float64)
    expected = reference.segment_scale_(x.clone().to(torch.float64), offsets, numels, scale)
    out = run_on(device, ops.segment_scale_, x.clone(), offsets, numels, scale, backend=backend)
    bound = OUT_TOL[dtype] * expected.abs() + 1e-300
    assert ((out.double() - expected).abs() <= bound).all()
    # Elements outside every segment are untouched.
    inside = torch.zeros(total, dtype=torch.bool)
    for o, n in zip(offsets.tolist(), numels.tolist()):
        inside[o : o + n] = True
    assert torch.equal(out[~inside], x[~inside])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 12345, 2**40 + 7])
def test_segment_scale_noise_matches_philox_reference(case, seed):
    device, backend = case
    offsets, numels, total = random_layout()
    x = torch.randn(total, dtype=torch.float32)
    scale = torch.rand(len(offsets))
    std = torch.rand(len(offsets)) * 2
    out = run_on(device, ops.segment_scale_, x.clone(), offsets, numels, scale, std, seed, backend=backend)
    expected = reference.segment_scale_(
        x.double(), offsets, numels, scale.double(), std.double(), torch.tensor([seed])
    )
    assert ((out.double() - expected).abs() <= 1e-5 * (1 + expected.abs())).all()
    again = run_on(device, ops.segment_scale_, x.clone(), offsets, numels, scale, std, seed, backend=backend)
    assert torch.equal(out, again)
    other_seed = run_on(device, ops.segment_scale_, x.clone(), offsets, numels, scale, std, seed + 1, backend=backend)
    assert not torch.equal(out, other_seed)


def test_philox_noise_is_standard_normal():
    z = reference.philox_normal(torch.tensor(7), torch.arange(400_000) + 2**33)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert abs((z.abs() > 2).double().mean().item() - 0.0455) < 0.003


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_segment_lerp(case, dtype):
    device, backend = case
    offsets, numels, total = random_layout()
    x = torch.randn(total, dtype=torch.float64).to(dtype)
    y = torch.randn(total, dtype=torch.float64).to(dtype)
    weight = torch.rand(len(offsets), dtype=torch.float64)
    expected = reference.segment_lerp_(x.to(torch.float64, copy=True), y.double(), offsets, numels, weight)
    out = run_on(device, ops.segment_lerp_, x.clone(), y, offsets, numels, weight, backend=backend)
    bound = OUT_TOL[dtype] * (x.double().abs() + y.double().abs()) + 1e-300
    assert ((out.double() - expected).abs() <= bound).all()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [1, 2, 3, 8])
def test_segment_gram_matches_float64_reference(case, dtype, K):
    device, backend = case
    offsets, numels, total = random_layout()
    J = random_matrix(K, total, dtype)
    G = run_on(device, ops.segment_gram, J, offsets, numels, backend=backend)
    ref = reference.segment_gram(J.double(), offsets, numels)
    assert G.dtype == reference.accumulation_dtype(dtype) and G.shape == (len(offsets), K, K)
    d = ref.diagonal(dim1=1, dim2=2).sqrt()
    bound = ACC_TOL[dtype] * d[:, :, None] * d[:, None, :] + 1e-300
    assert ((G.double() - ref).abs() <= bound).all()
    assert torch.equal(G, run_on(device, ops.segment_gram, J, offsets, numels, backend=backend))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [1, 2, 5])
@pytest.mark.parametrize("into_row", [False, True], ids=["separate_out", "out_is_row_0"])
def test_segment_combine_matches_float64_reference(case, dtype, K, into_row):
    device, backend = case
    offsets, numels, total = random_layout()
    J = random_matrix(K, total, dtype, device=device)
    W = torch.randn(len(offsets), K, dtype=torch.float64)
    J_before = J.cpu().double().clone()
    out = J[0] if into_row else torch.full((total,), 7.0, dtype=dtype, device=device)
    out_before = out.cpu().double().clone()
    ops.segment_combine_(out, J, offsets.to(device), numels.to(device), W.to(device), backend=backend)
    expected = reference.segment_combine_(out_before.clone(), J_before, offsets, numels, W)
    bound = torch.zeros(total, dtype=torch.float64)
    for s, (o, n) in enumerate(zip(offsets.tolist(), numels.tolist())):
        bound[o : o + n] = W[s].abs() @ J_before[:, o : o + n].abs()
    assert ((out.cpu().double() - expected).abs() <= OUT_TOL[dtype] * bound + 1e-300).all()


@pytest.mark.parametrize("case", CASES)
def test_segment_combine_into_an_out_that_overlaps_J_other_than_as_a_row(case):
    device, backend = case
    base = torch.randn(2 * 500 + 1, dtype=torch.float64).to(device)
    J = base[:1000].view(2, 500)
    out = base[1:501]  # shares J's memory, shifted by one element: not a row
    offsets, numels = ops.table([200, 300], device)
    W = torch.randn(2, 2, dtype=torch.float64).to(device)
    expected = reference.segment_combine_(out.cpu().clone(), J.cpu().clone(), offsets.cpu(), numels.cpu(), W.cpu())
    ops.segment_combine_(out, J, offsets, numels, W, backend=backend)
    torch.testing.assert_close(out.cpu(), expected)


def test_segment_tables_are_checked_on_every_backend():
    x = torch.arange(10.0)
    for backend in ("reference", "cpp"):
        with pytest.raises((ValueError, RuntimeError), match="outside|negative"):
            ops.segment_scale_(x.clone(), torch.tensor([-3]), torch.tensor([2]), torch.zeros(1), backend=backend)
        with pytest.raises((ValueError, RuntimeError), match="outside|past the end"):
            ops.segment_moments(x, torch.tensor([8]), torch.tensor([5]), backend=backend)
    with pytest.raises(ValueError, match="integer tensor"):
        ops.segment_moments(x, torch.tensor([0.9]), torch.tensor([4.5]))


# --- torch.library contract -------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_opcheck_every_op(case):
    device, backend = case
    J = torch.randn(3, 257, device=device)
    w = torch.randn(3, device=device)
    offsets, numels = ops.table([100, 0, 150], device)
    x = torch.randn(250, device=device)
    y = torch.randn(250, device=device)
    seed = torch.tensor([3], device=device)
    scale, std = torch.rand(3, device=device), torch.rand(3, device=device)
    cases = [
        (torch.ops.mmgrad.gram.default, (J, backend)),
        (torch.ops.mmgrad.combine.default, (J, w, backend)),
        (torch.ops.mmgrad.combine_out.default, (J, w, torch.empty(257, device=device), backend)),
        (torch.ops.mmgrad.segment_moments.default, (x, offsets, numels, backend)),
        (torch.ops.mmgrad.segment_gram.default, (J[:, :250], offsets, numels, backend)),
        (torch.ops.mmgrad.segment_combine_.default, (y, J[:, :250], offsets, numels, torch.randn(3, 3, device=device), backend)),
        (torch.ops.mmgrad.segment_scale_.default, (x, offsets, numels, scale, std, seed, backend)),
        (torch.ops.mmgrad.segment_lerp_.default, (x, y, offsets, numels, scale, backend)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_backend_policy(monkeypatch):
    monkeypatch.delenv("MMGRAD_BACKEND", raising=False)
    assert ops.resolve_backend(torch.device("cpu")) in ("cpp", "reference")
    monkeypatch.setenv("MMGRAD_BACKEND", "reference")
    assert ops.resolve_backend(torch.device("cpu")) == "reference"
    monkeypatch.setenv("MMGRAD_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cannot serve cpu tensors"):
        ops.gram(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="C\\+\\+ backend runs on CPU"):
        ops.resolve_backend(torch.device("meta"), "cpp")


@pytest.mark.skipif(not REQUIRE_CPP, reason="only under `make test` (MMGRAD_REQUIRE_CPP=1), which installs the extension")
def test_the_cpp_backend_is_built_and_serves_cpu_tensors_by_default(monkeypatch):
    monkeypatch.delenv("MMGRAD_BACKEND", raising=False)
    import mmgrad._C  # noqa: F401  (the compiled extension itself, not a fallback)

    assert ops.available_backends("cpu")["cpp"] is None
    assert ops.resolve_backend(torch.device("cpu")) == "cpp"


# --- contract checks of the segment ops ---------------------------------------------------------


def _segment_calls(x, J, offsets, numels, backend):
    """Every segment op on a 1-D x (and J (2, len(x)) for the column ops), one table."""
    S = offsets.numel()
    return {
        "segment_moments": lambda: ops.segment_moments(x, offsets, numels, backend=backend),
        "segment_scale_": lambda: ops.segment_scale_(x, offsets, numels, 2.0, backend=backend),
        "segment_lerp_": lambda: ops.segment_lerp_(x, x.flip(0).clone(), offsets, numels, 0.5, backend=backend),
        "segment_gram": lambda: ops.segment_gram(J, offsets, numels, backend=backend),
        "segment_combine_": lambda: ops.segment_combine_(x, J, offsets, numels, torch.ones(S, 2), backend=backend),
    }


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("table,match", [
    (([16], [8]), "outside|past the end"),
    (([-4], [4]), "outside|negative"),
    (([0, 10, 5], [8, 4, 8]), "overlap"),
], ids=["past_the_end", "negative_offset", "overlapping"])
def test_every_backend_refuses_a_bad_cpu_table(case, table, match):
    """Every segment op on every backend checks a CPU table: the Triton kernels size their grid by
    disjoint in-range segments (an overlapping or overlong table read or wrote outside them)."""
    device, backend = case
    if device != "cpu":
        pytest.skip("a GPU table is not checked (reading it would synchronise); its segments are clipped")
    x = torch.arange(20, dtype=torch.float32)
    J = torch.stack([x, x])
    offsets, numels = torch.tensor(table[0]), torch.tensor(table[1])
    for name, call in _segment_calls(x, J, offsets, numels, backend).items():
        before = x.clone()
        with pytest.raises((ValueError, RuntimeError), match=match):
            call()
        assert torch.equal(x, before), name


@pytest.mark.parametrize("case", CASES)
def test_in_place_ops_refuse_tensors_autograd_follows(case):
    device, backend = case
    x = torch.ones(8, device=device, requires_grad=True)
    z = x * 2
    offsets, numels = ops.table([8], device)
    with pytest.raises(RuntimeError, match="segment_scale_ writes in place and is not differentiable"):
        ops.segment_scale_(z, offsets, numels, 3.0, backend=backend)
    with pytest.raises(RuntimeError, match="segment_lerp_ writes in place"):
        ops.segment_lerp_(z, torch.zeros(8, device=device), offsets, numels, 0.5, backend=backend)
    J = torch.ones(2, 8, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"combine\(out=\) writes in place"):
        ops.combine(J, torch.ones(2, device=device), out=torch.empty(8, device=device), backend=backend)
    with torch.no_grad():  # as the optimizer calls them
        ops.segment_scale_(z, offsets, numels, 3.0, backend=backend)
    assert torch.equal(z.detach().cpu(), torch.full((8,), 6.0))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shift", [1, -1])
def test_segment_lerp_from_an_overlapping_y(case, shift):
    """y a shifted view of x's storage: the kernels write x while they read y, so y goes through a
    copy (6248 of 100000 elements were off on C++)."""
    device, backend = case
    buf = torch.randn(100_001, dtype=torch.float64, device=device)
    x, y = (buf[1:], buf[:-1]) if shift == 1 else (buf[:-1], buf[1:])
    want = y.clone()
    ops.segment_lerp_(x, y, *ops.table([100_000], device), 1.0, backend=backend)
    assert torch.equal(x.cpu(), want.cpu())


def test_seeds_and_counters_are_int64_or_refused():
    offsets, numels = ops.table([4])
    with pytest.raises(ValueError, match=r"seed must fit in int64"):
        ops.philox_uniform(2**63, 0, 4)
    with pytest.raises(ValueError, match="seed must be an int or an int64 tensor, got 1.5"):
        ops.segment_scale_(torch.ones(4), offsets, numels, 1.0, noise_std=1.0, seed=1.5)
    with pytest.raises(ValueError, match="counter must be an int"):
        ops.philox_uniform(1, 0.5, 4)
    with pytest.raises(ValueError, match="scale must be real"):
        ops.segment_scale_(torch.ones(4), offsets, numels, torch.tensor(2 + 1j))
    assert torch.equal(ops.philox_uniform(-2**63, 2**63 - 1, 4), ops.philox_uniform(-2**63, 2**63 - 1, 4))
