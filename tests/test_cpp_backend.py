"""Tests specific to the C++ CPU backend (``torch.ops.mmgrad_C``, built from ``csrc/``).

The oracle is :mod:`mmgrad.reference` run in float64 on the same (already rounded) inputs, so the
tolerances below only cover the backend's own arithmetic:

* gram: fp32 accumulation (fp64 for fp64 input) -> |G - G_ref| <= tol * sqrt(G_ii G_jj) with
  tol 2e-5 for the 16/32-bit dtypes and 1e-12 for float64.
* combine: fp32 accumulation then rounding to J's dtype -> |out - ref| <= tol * (|w| @ |J|) with
  tol 1e-5 (fp32), 1e-3 (fp16: 2^-11 output rounding), 8e-3 (bf16: 2^-8), 1e-12 (fp64).
* segment_moments: |m - m_ref| <= tol * (sum |x| or sum x^2), tol 1e-5 / 1e-12.
* segment_scale_ without noise is bitwise equal to the reference (same fp32/fp64 product, same
  round-to-nearest-even conversion); with noise, and segment_lerp_, within the dtype's rounding.
* noise: |z - reference.philox_normal| <= 1e-5 for every element (kernels evaluate Box-Muller in
  float32 with their own log / sin / cos approximations).

Plus what only this backend promises: bitwise identical results for 1 and 2 threads and across
runs, every ISA variant (MMGRAD_CPU_ISA=avx512|avx2|default, run in subprocesses) agreeing with the
reference, and precondition errors that name the problem.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mmgrad import reference

try:
    from mmgrad._extension import cpp_error

    _C_ERROR = cpp_error()
except ImportError as exc:  # pragma: no cover - broken package
    _C_ERROR = f"mmgrad._extension failed to import: {exc}"

pytestmark = pytest.mark.skipif(_C_ERROR is not None, reason=f"C++ backend unavailable: {_C_ERROR}")

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
GRAM_TOL = {torch.float16: 2e-5, torch.bfloat16: 2e-5, torch.float32: 2e-5, torch.float64: 1e-12}
COMBINE_TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5, torch.float64: 1e-12}
MOMENT_TOL = {torch.float16: 1e-5, torch.bfloat16: 1e-5, torch.float32: 1e-5, torch.float64: 1e-12}
NOISE_TOL = 1e-5
BLOCK = 1 << 16  # gram / combine work block (columns); shapes below straddle it


def ops():
    return torch.ops.mmgrad_C


def acc_dtype(dtype):
    return reference.accumulation_dtype(dtype)


def rand(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def threads():
    """Restores torch's thread count after a test changes it."""
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


# --- gram / combine ---------------------------------------------------------------------------


def check_gram(J):
    G = ops().gram(J)
    K = J.shape[0]
    assert G.shape == (K, K) and G.dtype == acc_dtype(J.dtype)
    assert torch.equal(G, G.T), "gram must be exactly symmetric"
    ref = reference.gram(J.to(torch.float64))
    d = ref.diagonal().clamp_min(0).sqrt()
    bound = GRAM_TOL[J.dtype] * torch.outer(d, d) + 1e-300
    err = (G.to(torch.float64) - ref).abs()
    assert (err <= bound).all(), f"max err / bound {(err / bound).max().item():.3g}"


def check_combine(J, w):
    out = ops().combine(J, w)
    assert out.shape == (J.shape[1],) and out.dtype == J.dtype and out.is_contiguous()
    Jd, wd = J.to(torch.float64), w.to(torch.float64)
    ref = wd @ Jd
    bound = COMBINE_TOL[J.dtype] * (wd.abs() @ Jd.abs()) + 1e-300
    err = (out.to(torch.float64) - ref).abs()
    assert (err <= bound).all(), f"max err / bound {(err / bound).max().item():.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "K,P", [(1, 1), (1, 1001), (2, 1), (2, 7), (3, 1001), (4, 4099), (5, BLOCK + 3), (8, 2 * BLOCK + 37),
            (13, 5003), (16, 3 * BLOCK - 1), (17, 777), (64, 2053), (70, 300)],
)
def test_gram_combine_match_reference(dtype, K, P, gen):
    J = rand((K, P), dtype, gen)
    check_gram(J)
    check_combine(J, rand((K,), acc_dtype(dtype), gen))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gram_combine_strided_rows(dtype, gen):
    # Row stride larger than P (a column slice of a wider matrix), also with an odd offset.
    base = rand((6, 5000), dtype, gen)
    for J in (base[:, :4097], base[:, 3:4100], base[::2, 1:]):
        assert J.stride(1) == 1 and J.stride(0) > J.shape[1]
        check_gram(J)
        check_combine(J, rand((J.shape[0],), acc_dtype(dtype), gen))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gram_combine_empty(dtype):
    for K, P in [(0, 0), (0, 5), (3, 0)]:
        J = torch.zeros(K, P, dtype=dtype)
        assert torch.equal(ops().gram(J), torch.zeros(K, K, dtype=acc_dtype(dtype)))
        out = ops().combine(J, torch.ones(K, dtype=acc_dtype(dtype)))
        assert out.shape == (P,) and out.dtype == dtype and not out.any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_gram_zero_rows_and_extreme_scales(dtype, gen):
    J = rand((5, 3001), dtype, gen)
    J[1] = 0
    J[3] = 0
    G = ops().gram(J)
    assert not G[1].any() and not G[:, 3].any()
    check_gram(J)
    big = 1e15 if dtype in (torch.float32, torch.bfloat16, torch.float64) else 200.0
    check_gram(rand((4, 3001), dtype, gen, scale=big))
    small = 1e-15 if dtype != torch.float16 else 1e-2
    check_gram(rand((4, 3001), dtype, gen, scale=small))


def test_gram_combine_errors():
    C = ops()
    with pytest.raises(RuntimeError, match="2-D"):
        C.gram(torch.zeros(3))
    with pytest.raises(RuntimeError, match="float16, bfloat16, float32 or float64"):
        C.gram(torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="stride"):
        C.gram(torch.zeros(3, 2).T)
    J = torch.zeros(3, 10)
    with pytest.raises(RuntimeError, match=r"shape \(K,\)"):
        C.combine(J, torch.zeros(4))
    with pytest.raises(RuntimeError, match="accumulation dtype"):
        C.combine(J, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="accumulation dtype"):
        C.combine(J.half(), torch.zeros(3, dtype=torch.float16))


# --- segment ops --------------------------------------------------------------------------------


def segment_table(N, gen, max_len=5000):
    """Unordered, gapped segments of [0, N) including empty ones; returns offsets, numels, mask of
    covered elements."""
    cuts = torch.randperm(N, generator=gen)[: max(1, N // max_len)].sort().values.tolist()
    bounds = [0] + cuts + [N]
    offs, nums = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b - a > 4:
            offs.append(a + 2)  # leave gaps between segments
            nums.append(b - a - 4)
        offs.append(a)
        nums.append(0)  # an empty segment
    offs += [N, 0]
    nums += [0, 0]
    perm = torch.randperm(len(offs), generator=gen)
    offsets = torch.tensor(offs, dtype=torch.int64)[perm]
    numels = torch.tensor(nums, dtype=torch.int64)[perm]
    covered = torch.zeros(N, dtype=torch.bool)
    for o, n in zip(offsets.tolist(), numels.tolist()):
        covered[o : o + n] = True
    return offsets, numels, covered


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [0, 1, 37, 100_003])
def test_segment_moments(dtype, N, gen):
    x = rand((N,), dtype, gen)
    offsets, numels, _ = segment_table(N, gen) if N > 0 else (torch.tensor([0, 0]), torch.tensor([0, 0]), None)
    tables = [(offsets, numels)]
    if N > 0:  # one segment longer than the 32K-element work chunk
        tables.append((torch.tensor([0]), torch.tensor([N])))
    xd = x.to(torch.float64)
    for offsets, numels in tables:
        m = ops().segment_moments(x, offsets, numels)
        assert m.shape == (offsets.numel(), 2) and m.dtype == acc_dtype(dtype)
        ref = reference.segment_moments(xd, offsets, numels)
        scale = torch.stack(
            [torch.tensor([xd[o : o + n].abs().sum(), (xd[o : o + n] ** 2).sum()]) for o, n in zip(offsets.tolist(), numels.tolist())]
        ) if offsets.numel() else torch.zeros(0, 2)
        err = (m.to(torch.float64) - ref).abs()
        assert (err <= MOMENT_TOL[dtype] * scale + 1e-300).all()
        assert not m[numels == 0].any()


def test_segment_moments_no_segments():
    m = ops().segment_moments(torch.ones(5), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    assert m.shape == (0, 2)


def special_values(dtype, n):
    """Subnormals, infinities, NaN, zeros of both signs and the largest finite value."""
    fi = torch.finfo(dtype)
    specials = torch.tensor(
        [0.0, -0.0, float("inf"), -float("inf"), float("nan"), fi.max, -fi.max, fi.tiny, fi.tiny / 4, -fi.tiny / 8],
        dtype=torch.float64,
    ).to(dtype)
    return specials[:n]


def assert_same_values(a, b):
    assert a.dtype == b.dtype
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b)
    assert torch.equal(a[~nan_a], b[~nan_b])
    # also the signs of zeros
    assert torch.equal(torch.signbit(a[~nan_a]), torch.signbit(b[~nan_b]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_scale_plain_is_bitwise_reference(dtype, gen):
    N = 70_001
    x = rand((N,), dtype, gen)
    offsets, numels, covered = segment_table(N, gen)
    # Put subnormals, infinities, NaN, signed zeros and the largest finite into a segment.
    s_big = int(numels.argmax())
    o = int(offsets[s_big])
    specials = special_values(dtype, 10)
    x[o : o + 10] = specials
    S = offsets.numel()
    choices = torch.tensor([1.0, 0.0, -2.5, 1e-30, 1e30, 0.37, 3.0], dtype=torch.float64)
    for s_fixed in choices.tolist():
        scale = choices[torch.randint(0, choices.numel(), (S,), generator=gen)].to(acc_dtype(dtype))
        scale[s_big] = s_fixed
        ours, ref = x.clone(), x.clone()
        ops().segment_scale_(ours, offsets, numels, scale, None, None)
        reference.segment_scale_(ref, offsets, numels, scale)
        assert_same_values(ours, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_scale_noise(dtype, gen):
    N = 50_003
    x = rand((N,), dtype, gen)
    offsets, numels, covered = segment_table(N, gen, max_len=3000)
    S = offsets.numel()
    scale = (torch.rand(S, generator=gen, dtype=torch.float64) * 2 - 0.5).to(acc_dtype(dtype))
    std = (torch.rand(S, generator=gen, dtype=torch.float64) * 0.1).to(acc_dtype(dtype))
    seed = torch.tensor([2**40 + 77])
    ours = x.clone()
    ops().segment_scale_(ours, offsets, numels, scale, std, seed)
    ref = reference.segment_scale_(x.to(torch.float64), offsets, numels, scale.double(), std.double(), seed)
    assert torch.equal(ours[~covered], x[~covered]), "elements outside every segment must not change"
    eps = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float32: 2**-23, torch.float64: 2**-52}[dtype]
    err = (ours.to(torch.float64) - ref).abs()
    assert (err <= eps * ref.abs() + NOISE_TOL * 0.1 + 1e-300).all()


@pytest.mark.parametrize(
    "seed", [0, 1, 12345, 2**32 - 1, 2**32, 2**32 + 5, 0x7FFF_FFFF_FFFF_FFFF, -1, -(2**40) - 3]
)
def test_noise_matches_reference(seed):
    # Segments start at every position within a Philox block of 4 and straddle chunk boundaries.
    N = 3_000_017 if seed == 2**32 + 5 else 200_003
    x = torch.full((N,), 7.0)
    offs = [0, 5, 6, 40_000, 70_001, 170_003]
    nums = [5, 1, 39_994, 30_001, 100_002, N - 170_003]
    ops().segment_scale_(
        x, torch.tensor(offs), torch.tensor(nums), torch.zeros(len(offs)), torch.ones(len(offs)), torch.tensor([seed])
    )
    ref = reference.philox_normal(torch.tensor(seed), torch.arange(N))
    err = (x.double() - ref).abs().max().item()
    assert err <= NOISE_TOL, err
    # Sanity of the distribution on the big buffer.
    if N > 1_000_000:
        assert abs(x.double().mean().item()) < 5e-3 and abs(x.double().std().item() - 1) < 5e-3


def test_noise_depends_on_seed_and_index():
    x1, x2, x3 = torch.zeros(1000), torch.zeros(1000), torch.zeros(1000)
    args = lambda seed: (torch.tensor([0]), torch.tensor([1000]), torch.zeros(1), torch.ones(1), torch.tensor([seed]))
    ops().segment_scale_(x1, *args(1))
    ops().segment_scale_(x2, *args(2**32 + 1))  # differs only in the key's high word
    ops().segment_scale_(x3, *args(1))
    assert torch.equal(x1, x3)
    assert (x1 != x2).float().mean() > 0.99


@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_lerp(dtype, gen):
    N = 80_001
    x = rand((N,), dtype, gen)
    y = rand((N,), dtype, gen)
    offsets, numels, covered = segment_table(N, gen)
    S = offsets.numel()
    choices = torch.tensor([0.0, 1.0, 0.3, 1e-30, 0.999], dtype=torch.float64)
    weight = choices[torch.randint(0, choices.numel(), (S,), generator=gen)].to(acc_dtype(dtype))
    ours = x.clone()
    ops().segment_lerp_(ours, y, offsets, numels, weight)
    ref = reference.segment_lerp_(x.to(torch.float64), y.to(torch.float64), offsets, numels, weight.double())
    assert torch.equal(ours[~covered], x[~covered])
    eps = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float32: 2**-22, torch.float64: 2**-51}[dtype]
    err = (ours.to(torch.float64) - ref).abs()
    tol = eps * (ref.abs() + x.double().abs() + y.double().abs())
    assert (err <= tol + 1e-300).all()
    # weight 0 keeps x, weight 1 copies y, bit for bit
    for w, expect in ((0.0, x), (1.0, y)):
        z = x.clone()
        ops().segment_lerp_(z, y, torch.tensor([0]), torch.tensor([N]), torch.tensor([w], dtype=acc_dtype(dtype)))
        assert torch.equal(z, expect)


def test_segment_errors():
    C = ops()
    x = torch.zeros(100)
    o, n = torch.tensor([0, 50]), torch.tensor([10, 10])
    one = torch.ones(2)
    with pytest.raises(RuntimeError, match="1-D"):
        C.segment_moments(x.view(10, 10), o, n)
    with pytest.raises(RuntimeError, match="contiguous"):
        C.segment_moments(torch.zeros(200)[::2], o, n)
    with pytest.raises(RuntimeError, match="int64"):
        C.segment_moments(x, o.int(), n)
    with pytest.raises(RuntimeError, match="same length"):
        C.segment_moments(x, o, torch.tensor([1]))
    with pytest.raises(RuntimeError, match="past the end"):
        C.segment_moments(x, torch.tensor([95]), torch.tensor([6]))
    with pytest.raises(RuntimeError, match="negative"):
        C.segment_moments(x, torch.tensor([-1]), torch.tensor([1]))
    with pytest.raises(RuntimeError, match="negative"):
        C.segment_moments(x, torch.tensor([1]), torch.tensor([-1]))
    with pytest.raises(RuntimeError, match="overlap"):
        C.segment_scale_(x, torch.tensor([0, 5]), torch.tensor([10, 10]), one, None, None)
    with pytest.raises(RuntimeError, match="overlap"):
        C.segment_lerp_(x, x.clone(), torch.tensor([5, 0]), torch.tensor([10, 10]), one)
    # the column ops: overlapping written segments, and an offset whose sum with numel overflows
    J2 = torch.randn(2, 40000)
    with pytest.raises(RuntimeError, match="overlap"):
        C.segment_combine_(torch.zeros(40000), J2, torch.tensor([0, 0]), torch.tensor([40000, 40000]),
                           torch.ones(2, 2))
    huge = torch.tensor([2**63 - 1])
    with pytest.raises(RuntimeError, match="lies outside"):
        C.segment_gram(J2, huge, torch.tensor([1]))
    with pytest.raises(RuntimeError, match="lies outside"):
        C.segment_combine_(torch.zeros(40000), J2, huge, torch.tensor([1]), torch.ones(1, 2))
    with pytest.raises(RuntimeError, match="scale must have shape"):
        C.segment_scale_(x, o, n, torch.ones(3), None, None)
    with pytest.raises(RuntimeError, match="accumulation dtype"):
        C.segment_scale_(x, o, n, one.double(), None, None)
    with pytest.raises(RuntimeError, match="seed is required"):
        C.segment_scale_(x, o, n, one, one, None)
    with pytest.raises(RuntimeError, match="seed must be an int64"):
        C.segment_scale_(x, o, n, one, one, torch.tensor([1.0]))
    with pytest.raises(RuntimeError, match="seed must be an int64"):
        C.segment_scale_(x, o, n, one, one, torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match="y must have x's dtype"):
        C.segment_lerp_(x, x.double(), o, n, one)
    with pytest.raises(RuntimeError, match="as many elements"):
        C.segment_lerp_(x, torch.zeros(99), o, n, one)
    with pytest.raises(RuntimeError, match="weight must be"):
        C.segment_lerp_(x, x.clone(), o, n, one.half())
    # Empty segments may sit anywhere in [0, N], also at the very end.
    C.segment_scale_(x, torch.tensor([100, 0]), torch.tensor([0, 0]), one, None, None)


# --- determinism --------------------------------------------------------------------------------


def run_all(J, w, x, offsets, numels, scale, std, seed):
    C = ops()
    y = x.clone()
    C.segment_scale_(y, offsets, numels, scale, std, seed)
    z = x.clone()
    C.segment_lerp_(z, y, offsets, numels, scale.clamp(0, 1))
    return [C.gram(J), C.combine(J, w), C.segment_moments(x, offsets, numels), y, z]


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitwise_deterministic_across_threads(dtype, gen, threads):
    J = rand((7, 5 * BLOCK + 17), dtype, gen)
    w = rand((7,), acc_dtype(dtype), gen)
    N = 300_007
    x = rand((N,), dtype, gen)
    offsets = torch.tensor([0, 100_000, 100_003, 250_000])
    numels = torch.tensor([99_999, 0, 140_000, 50_007])
    scale, std = torch.rand(4, generator=gen).to(acc_dtype(dtype)), torch.ones(4, dtype=acc_dtype(dtype))
    seed = torch.tensor([99])
    results = []
    for n in (1, 2, 1, 3):
        torch.set_num_threads(n)
        results.append(run_all(J, w, x, offsets, numels, scale, std, seed))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# --- every ISA variant --------------------------------------------------------------------------

_ISA_SCRIPT = textwrap.dedent(
    """
    import torch, mmgrad._C
    from mmgrad import reference as R
    C = torch.ops.mmgrad_C
    g = torch.Generator().manual_seed(0)
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        acc = R.accumulation_dtype(dt)
        for K, P in ((1, 9), (5, 70_001), (9, 1003)):
            J = torch.randn(K, P, generator=g).to(dt)
            Jd = J.double()
            ref = Jd @ Jd.T
            d = ref.diagonal().sqrt()
            assert ((C.gram(J).double() - ref).abs() <= 2e-5 * torch.outer(d, d)).all(), (dt, K, P)
            w = torch.randn(K, generator=g).to(acc)
            out = C.combine(J, w).double()
            tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(dt, 1e-5)
            assert ((out - w.double() @ Jd).abs() <= tol * (w.double().abs() @ Jd.abs())).all(), (dt, K, P)
        x = torch.randn(10_001, generator=g).to(dt)
        o, n = torch.tensor([3, 5000]), torch.tensor([4000, 5001])
        m = C.segment_moments(x, o, n).double()
        r = R.segment_moments(x.double(), o, n)
        assert ((m - r).abs() <= 1e-5 * r.abs().sum(1, keepdim=True)).all(), dt
    x = torch.zeros(100_003)
    C.segment_scale_(x, torch.tensor([1]), torch.tensor([100_002]), torch.zeros(1), torch.ones(1),
                     torch.tensor([2**33 + 1]))
    ref = R.philox_normal(torch.tensor(2**33 + 1), torch.arange(100_003))
    ref[0] = 0
    assert (x.double() - ref).abs().max() <= 1e-5
    print("ok")
    """
)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "default"])
def test_every_isa_variant_matches_reference(isa):
    env = dict(os.environ, MMGRAD_CPU_ISA=isa)
    proc = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_large_combine_outputs_reuse_freed_blocks_only():
    """combine's large outputs come from a pool of freed blocks (no page faults on reuse); a block
    goes back only when every tensor using it, views included, is gone."""
    P = 3_000_000  # 12 MB of float32: above the pool's 8 MiB threshold
    g = torch.Generator().manual_seed(0)
    J = torch.randn(2, P, generator=g)
    w1, w2 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    a = ops().combine(J, w1)
    ptr = a.data_ptr()
    assert ptr % 64 == 0
    b = ops().combine(J, w1)
    assert b.data_ptr() != ptr and torch.equal(a, b)
    view = a[10:]
    kept = view.clone()
    del a
    c = ops().combine(J, w2)  # a's block is still held by `view`
    assert c.data_ptr() != ptr and torch.equal(view, kept)
    torch.testing.assert_close(c, 3.0 * J[0] - J[1], rtol=1e-6, atol=1e-5)
    del view
    d = ops().combine(J, w2)  # now a's block is free: reused, fully overwritten
    assert d.data_ptr() == ptr and torch.equal(d, c)
    small = ops().combine(J[:, :1000], w1)  # small outputs: the ordinary allocator
    assert torch.equal(small, J[0, :1000] + 2.0 * J[1, :1000])
