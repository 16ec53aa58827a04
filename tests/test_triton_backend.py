"""Tests of the Triton backend (mmgrad.triton) against mmgrad.reference.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1 before triton is first imported). Sizes are small because the interpreter is
slow.

Tolerances (the oracle is mmgrad.reference in float64 on the same input values):
* gram: |G - G_ref| <= tol * ||J_i|| ||J_j||, tol 1e-5 for fp16/bf16/fp32 (half values are exact
  in fp32, so only the fp32 accumulation errs), 1e-12 for fp64.
* combine: |c - c_ref| <= tol * (|w| @ |J|) + eps_out * |c_ref|, with eps_out the unit roundoff of
  the output dtype (2^-11 fp16, 2^-8 bf16, 2^-24 fp32, 2^-53 fp64).
* segment_moments: |m - m_ref| <= tol * (sum |x|, sum x^2) per segment.
* segment_scale_ without noise: bitwise equal to the reference run on the same dtype (one fp32
  multiply then one cast, in both), overflow to inf and underflow included.
* noise: |z - philox_normal| <= 1e-5.
* segment_gram: as gram, per segment (and exactly symmetric); segment_combine_: as combine, per
  segment, with elements outside every segment bitwise untouched.
"""

import pytest
import torch
from conftest import host_sync_raises, random_segments, triton_device

DEV = triton_device()  # skips the module without triton
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from mmgrad import reference as ref  # noqa: E402
import mmgrad.triton as mt  # noqa: E402
from mmgrad.triton import kernels as mt_kernels  # noqa: E402
from mmgrad.triton import segments as mt_segments  # noqa: E402

# The fp32 overflow / underflow cases make numpy (inside the interpreter) warn; that is expected.
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

HALF = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24,
                 torch.float64: 2.0**-53}


def acc_tol(dtype):
    return 1e-12 if dtype == torch.float64 else 1e-5


def randn(*shape, dtype, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEV)


# --- gram ----------------------------------------------------------------------------------------


def check_gram(J):
    G = mt.gram(J)
    assert G.dtype == ref.accumulation_dtype(J.dtype)
    assert G.shape == (J.shape[0], J.shape[0]) and G.device == J.device
    Jd = J.double().cpu()
    R = ref.gram(Jd)
    norms = Jd.norm(dim=1)
    bound = acc_tol(J.dtype) * norms[:, None] * norms[None, :] + 1e-300
    err = (G.double().cpu() - R).abs()
    assert torch.all(err <= bound), f"max err/bound {(err / bound).max().item():.3g}"
    assert torch.equal(G, G.T)  # symmetrised by construction
    return G


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("K,P", [(1, 1), (1, 37), (2, 1), (2, 513), (3, 1001), (8, 129),
                                 (9, 333), (16, 200), (17, 65), (40, 31), (70, 9)])
def test_gram(dtype, K, P, gen):
    check_gram(randn(K, P, dtype=dtype, gen=gen))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_gram_strided_rows_and_zero_rows(dtype, gen):
    big = randn(5, 300 + 13, dtype=dtype, gen=gen)
    J = big[:, 5:305]
    J[2].zero_()
    assert J.stride(0) == 313 and J.stride(1) == 1
    G = check_gram(J)
    assert torch.all(G[2] == 0) and torch.all(G[:, 2] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gram_many_chunks_deterministic(dtype, gen, monkeypatch):
    # Few chunk slots, so each program loops over several column tiles and phase 2 has partials
    # from several chunks to add (at full scale this happens beyond 128k columns).
    monkeypatch.setattr(mt_kernels, "_GRAM_MAX_CHUNKS", 3)
    J = randn(10, 1500, dtype=dtype, gen=gen, scale=3.0)
    G1 = check_gram(J)
    G2 = mt.gram(J)
    assert torch.equal(G1, G2)


@pytest.mark.skipif(DEV != "cuda", reason="large P: too slow for the interpreter")
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("K", [2, 16])
def test_gram_large_p_accuracy(dtype, K, gen):
    # Long accumulation chains (P = 8M: each program adds ~64k columns) catch a biased
    # accumulator: tensor-core fp32 accumulation (it truncates) chained across a chunk's tiles
    # measured 2.7x this bound on an H100; per-tile dots added in plain fp32 pass easily.
    check_gram(randn(K, 2**23, dtype=dtype, gen=gen))


def test_gram_empty():
    for K, P in [(0, 5), (3, 0), (0, 0)]:
        G = mt.gram(torch.empty(K, P, device=DEV))
        assert G.shape == (K, K) and torch.all(G == 0)


def test_gram_rejects_strided_columns():
    with pytest.raises(ValueError):
        mt.gram(torch.zeros(3, 8, device=DEV)[:, ::2])


# --- combine -------------------------------------------------------------------------------------


def check_combine(J, w):
    c = mt.combine(J, w)
    assert c.dtype == J.dtype and c.shape == (J.shape[1],) and c.is_contiguous()
    Jd, wd = J.double().cpu(), w.double().cpu()
    R = ref.combine(Jd, wd)
    bound = acc_tol(J.dtype) * (wd.abs() @ Jd.abs()) + UNIT_ROUNDOFF[J.dtype] * R.abs() + 1e-300
    err = (c.double().cpu() - R).abs()
    assert torch.all(err <= bound), f"max err/bound {(err / bound).max().item():.3g}"
    return c


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("K,P", [(1, 1), (1, 1025), (2, 7), (3, 2049), (5, 100), (16, 333),
                                 (17, 50)])
def test_combine(dtype, K, P, gen):
    acc = ref.accumulation_dtype(dtype)
    J = randn(K, P, dtype=dtype, gen=gen)
    w = randn(K, dtype=acc, gen=gen)
    c1 = check_combine(J, w)
    assert torch.equal(c1, mt.combine(J, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_strided_rows_and_edge_cases(dtype, gen):
    acc = ref.accumulation_dtype(dtype)
    big = randn(6, 1100, dtype=dtype, gen=gen)
    J = big[:, 3:1030]
    check_combine(J, randn(6, dtype=acc, gen=gen))
    assert mt.combine(J[:, :0], randn(6, dtype=acc, gen=gen)).shape == (0,)
    z = mt.combine(J[:0], torch.empty(0, dtype=acc, device=DEV))
    assert z.shape == (1027,) and torch.all(z == 0)
    with pytest.raises(TypeError):
        mt.combine(J, randn(6, dtype=torch.float64, gen=gen))


# --- segments ------------------------------------------------------------------------------------



def make_segments(N, sizes, gen, gap_max=40):
    return random_segments(N, sizes, gen, DEV, gap_max)


SIZES = [0, 1, 3, 17, 0, 1024, 1500, 20000, 5, 0]  # 20000 spans two 16384-element tiles


@pytest.fixture(params=["scan", "search"])
def table_path(request, monkeypatch):
    """Both ways a program finds its segment: its own scan of the table (S <= SMALL_S) and the
    binary search in a precomputed table (forced by SMALL_S = 0)."""
    if request.param == "search":
        monkeypatch.setattr(mt_segments, "SMALL_S", 0)
    return request.param


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_segment_moments(dtype, gen, table_path):
    x = randn(24000, dtype=dtype, gen=gen)
    offsets, numels = make_segments(x.numel(), SIZES, gen)
    m = mt.segment_moments(x, offsets, numels)
    assert m.shape == (len(SIZES), 2) and m.dtype == ref.accumulation_dtype(dtype)
    xd = x.double().cpu()
    R = ref.segment_moments(xd, offsets.cpu(), numels.cpu())
    scale = ref.segment_moments(xd.abs(), offsets.cpu(), numels.cpu())
    err = (m.double().cpu() - R).abs()
    assert torch.all(err <= acc_tol(dtype) * scale + 1e-300)
    assert torch.all(m[numels == 0] == 0)
    assert torch.equal(m, mt.segment_moments(x, offsets, numels))


def test_segment_moments_small_tiles_many_segments(gen, monkeypatch, table_path):
    # Smaller tiles: many tiles per segment, and a search over 300 segments.
    monkeypatch.setattr(mt_segments, "TILE", 1024)
    sizes = [int(s) for s in torch.randint(0, 300, (300,), generator=gen)] + [5000]
    x = randn(sum(sizes) + 301 * 8, dtype=torch.float32, gen=gen)
    offsets, numels = make_segments(x.numel(), sizes, gen, gap_max=8)
    m = mt.segment_moments(x, offsets, numels)
    R = ref.segment_moments(x.double().cpu(), offsets.cpu(), numels.cpu())
    scale = ref.segment_moments(x.double().abs().cpu(), offsets.cpu(), numels.cpu())
    assert torch.all((m.double().cpu() - R).abs() <= 1e-5 * scale)


def test_segment_ops_no_segments():
    x = torch.ones(10, device=DEV)
    e = torch.empty(0, dtype=torch.int64, device=DEV)
    assert mt.segment_moments(x, e, e).shape == (0, 2)
    mt.segment_scale_(x, e, e, torch.empty(0, device=DEV))
    mt.segment_lerp_(x, x.clone(), e, e, torch.empty(0, device=DEV))
    assert torch.all(x == 1)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_segment_scale_exact(dtype, gen, table_path):
    # Elementwise single multiply: bitwise equal to the reference on the same dtype, including
    # fp32 overflow (1e30) / underflow (1e-30) and their cast to half types. Elements outside the
    # segments stay untouched (checked by the whole-buffer equality).
    x = randn(24000, dtype=torch.float64, gen=gen)
    x[::7] *= 1e12
    x[3::7] *= 1e-12  # times 1e-30: subnormal in fp32, zero in half
    x = x.to(dtype)
    offsets, numels = make_segments(x.numel(), SIZES, gen)
    S = len(SIZES)
    scale = randn(S, dtype=ref.accumulation_dtype(dtype), gen=gen)
    scale[0::3] = 1e30
    scale[1::3] = 1e-30
    big = (numels >= 1000).nonzero().flatten().tolist()  # the 1024, 1500 and 20000 segments
    scale[big[0]], scale[big[1]] = 1e30, 1e-30
    expected = x.cpu().clone()
    ref.segment_scale_(expected, offsets.cpu(), numels.cpu(), scale.cpu())
    if dtype != torch.float64:
        assert torch.isinf(expected).any()  # the test does reach overflow
    got = x.clone()
    mt.segment_scale_(got, offsets, numels, scale)
    assert torch.equal(got.cpu(), expected)


def test_segment_scale_casts_float64_scale(gen):
    # A float64 scale for a float32 buffer is rounded to float32 first, as in the reference.
    x = randn(3000, dtype=torch.float32, gen=gen)
    offsets = torch.tensor([0, 1000, 2000], device=DEV)
    numels = torch.tensor([1000, 1000, 1000], device=DEV)
    scale = torch.tensor([1e-50, 1.0 + 2.0**-40, 1e40], dtype=torch.float64, device=DEV)
    expected = x.cpu().clone()
    ref.segment_scale_(expected, offsets.cpu(), numels.cpu(), scale.cpu())
    got = x.clone()
    mt.segment_scale_(got, offsets, numels, scale)
    assert torch.equal(got.cpu(), expected)
    assert torch.all(got[:1000] == 0) and torch.equal(got[1000:2000], x[1000:2000])


SEEDS = [0, 12345, 2**32 - 1, 2**32 + 7, 2**62 + 2**33 + 5, -3]


@pytest.mark.parametrize("seed", SEEDS)
def test_noise_matches_reference(seed, gen):
    # scale 0, std 1: the buffer becomes the noise itself.
    N = 6000
    x = randn(N, dtype=torch.float32, gen=gen)
    offsets = torch.tensor([3, 2100, 1200], device=DEV)
    numels = torch.tensor([1000, 3900, 0], device=DEV)
    s = torch.tensor([seed], dtype=torch.int64, device=DEV)
    got = x.clone()
    zeros, ones = torch.zeros(3, device=DEV), torch.ones(3, device=DEV)
    mt.segment_scale_(got, offsets, numels, zeros, ones, s)
    got = got.cpu().double()
    for o, n in [(3, 1000), (2100, 3900)]:
        idx = torch.arange(o, o + n)
        z = ref.philox_normal(s.cpu(), idx)
        assert (got[o:o + n] - z).abs().max() <= 1e-5
    assert torch.equal(got[1003:2100], x[1003:2100].cpu().double())
    assert torch.equal(got[:3], x[:3].cpu().double())


@triton.jit
def _noise_probe_kernel(out, q0, seed, BLOCK: tl.constexpr, PRECISE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    sv = tl.load(seed)
    k0 = (sv & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((sv >> 32) & 0xFFFFFFFF).to(tl.uint32)
    z = mt_segments._normal_block(q0 + pid * BLOCK, k0, k1, BLOCK, PRECISE)
    tl.store(out + pid * BLOCK + tl.arange(0, BLOCK), z)


@pytest.mark.parametrize("q0", [2**34 - 256, 2**36 + 2**34 - 128, 2**45 + 512])
def test_noise_large_element_indices(q0):
    # Element indices around 2**34, where the Philox block index (i >> 2) crosses 2**32 into the
    # counter's high word; no buffer of that size is needed to check the generator itself.
    BLOCK = 128
    s = torch.tensor([2**33 + 99], dtype=torch.int64, device=DEV)
    out = torch.empty(4 * BLOCK, device=DEV)
    _noise_probe_kernel[(4,)](out, q0, s, BLOCK=BLOCK, PRECISE=not mt_kernels.INTERPRET)
    z = ref.philox_normal(s.cpu(), torch.arange(q0, q0 + 4 * BLOCK))
    assert (out.cpu().double() - z).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_segment_scale_with_noise(dtype, gen, table_path):
    x = randn(24000, dtype=dtype, gen=gen)
    offsets, numels = make_segments(x.numel(), SIZES, gen)
    S = len(SIZES)
    acc = ref.accumulation_dtype(dtype)
    scale = randn(S, dtype=acc, gen=gen)
    std = torch.rand(S, generator=gen, dtype=torch.float64).to(acc).to(DEV)
    seed = torch.tensor([2**40 + 17], dtype=torch.int64, device=DEV)
    got = x.clone()
    mt.segment_scale_(got, offsets, numels, scale, std, seed)
    expected = x.double().cpu().clone()
    ref.segment_scale_(expected, offsets.cpu(), numels.cpu(), scale.double().cpu(),
                       std.double().cpu(), seed.cpu())
    # fp32 noise (1e-5 abs per unit std) + fp32 product + the output's own rounding
    tol = (1e-5 * std.double().cpu().abs().max() + 1e-6 * expected.abs()
           + UNIT_ROUNDOFF[dtype] * expected.abs())
    assert torch.all((got.double().cpu() - expected).abs() <= tol)
    again = x.clone()
    mt.segment_scale_(again, offsets, numels, scale, std, seed)
    assert torch.equal(got, again)
    other = x.clone()
    mt.segment_scale_(other, offsets, numels, scale, std, seed + 1)
    assert not torch.equal(got, other)  # the seed is read on the device


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_segment_lerp(dtype, gen, table_path):
    x = randn(24000, dtype=dtype, gen=gen)
    y = randn(24000, dtype=dtype, gen=gen)
    offsets, numels = make_segments(x.numel(), SIZES, gen)
    acc = ref.accumulation_dtype(dtype)
    w = torch.rand(len(SIZES), generator=gen, dtype=torch.float64).to(acc).to(DEV)
    w[0], w[1] = 0.0, 1.0
    got = x.clone()
    mt.segment_lerp_(got, y, offsets, numels, w)
    expected = x.double().cpu().clone()
    ref.segment_lerp_(expected, y.double().cpu(), offsets.cpu(), numels.cpu(), w.double().cpu())
    xd, yd = x.double().cpu(), y.double().cpu()
    tol = (4 * UNIT_ROUNDOFF[acc] * (xd.abs() + yd.abs())
           + UNIT_ROUNDOFF[dtype] * expected.abs())
    assert torch.all((got.double().cpu() - expected).abs() <= tol)
    # weight 0 keeps x, weight 1 copies y, exactly
    o, n = int(offsets[0]), int(numels[0])
    assert torch.equal(got[o:o + n], x[o:o + n])
    o, n = int(offsets[1]), int(numels[1])
    assert torch.equal(got[o:o + n], y[o:o + n])


# --- column-segment ops: segment_gram, segment_combine_ ------------------------------------------

# With TILE = 1024 (monkeypatched): segments of 0 to 2 tiles and one of 3 (2500 columns).
COL_SIZES = [0, 1, 3, 17, 0, 1024, 1500, 2500, 5, 0]


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(mt_segments, "TILE", 1024)


def strided_J(K, P, dtype, gen):
    """(K, P) view with row stride P + 13 (> P) and a column offset of 5."""
    big = randn(K, P + 13, dtype=dtype, gen=gen)
    J = big[:, 5:5 + P]
    assert K == 1 or J.stride(0) == P + 13
    return J


def check_segment_gram(J, offsets, numels):
    G = mt.segment_gram(J, offsets, numels)
    S, K = offsets.numel(), J.shape[0]
    assert G.shape == (S, K, K) and G.dtype == ref.accumulation_dtype(J.dtype)
    Jd = J.double().cpu()
    R = ref.segment_gram(Jd, offsets.cpu(), numels.cpu())
    norms = torch.stack([Jd[:, o:o + n].norm(dim=1)
                         for o, n in zip(offsets.tolist(), numels.tolist())])  # (S, K)
    bound = acc_tol(J.dtype) * norms[:, :, None] * norms[:, None, :] + 1e-300
    err = (G.double().cpu() - R).abs()
    assert torch.all(err <= bound), f"max err/bound {(err / bound).max().item():.3g}"
    assert torch.equal(G, G.transpose(1, 2))  # exactly symmetric
    assert torch.all(G[numels == 0] == 0)
    assert torch.equal(G, mt.segment_gram(J, offsets, numels))  # bitwise deterministic
    return G


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("K", [1, 2, 3, 8])
def test_segment_gram(dtype, K, gen, small_tiles):
    J = strided_J(K, 6200, dtype, gen)
    offsets, numels = make_segments(J.shape[1], COL_SIZES, gen)
    check_segment_gram(J, offsets, numels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_gram_row_blocks_and_search(dtype, gen, small_tiles, monkeypatch):
    # K > 8: row-block pairs (NB = 3), contiguous rows; the binary-search table path.
    monkeypatch.setattr(mt_segments, "SMALL_S", 0)
    J = randn(17, 2000, dtype=dtype, gen=gen)
    offsets, numels = make_segments(J.shape[1], [1100, 0, 700, 9], gen, gap_max=20)
    check_segment_gram(J, offsets, numels)


def check_segment_combine(J, offsets, numels, W, into_row):
    dtype = J.dtype
    J_before = J.cpu().to(torch.float64, copy=True)  # a copy also for fp64 J (out may alias it)
    out = J[0] if into_row else randn(J.shape[1], dtype=dtype, gen=torch.Generator().manual_seed(1))
    out_before = out.clone()
    mt.segment_combine_(out, J, offsets, numels, W)
    expected = ref.segment_combine_(out_before.double().cpu(), J_before, offsets.cpu(),
                                    numels.cpu(), W.double().cpu())
    scale = torch.zeros(J.shape[1], dtype=torch.float64)
    inside = torch.zeros(J.shape[1], dtype=torch.bool)
    for s, (o, n) in enumerate(zip(offsets.tolist(), numels.tolist())):
        scale[o:o + n] = W[s].double().cpu().abs() @ J_before[:, o:o + n].abs()
        inside[o:o + n] = True
    got = out.double().cpu()
    bound = acc_tol(dtype) * scale + UNIT_ROUNDOFF[dtype] * expected.abs() + 1e-300
    err = (got - expected).abs()
    assert torch.all(err <= bound), f"max err/bound {(err / bound).max().item():.3g}"
    assert torch.equal(out[~inside.to(out.device)], out_before[~inside.to(out.device)])
    if J.shape[0] > 1 and into_row:  # the other rows of J are untouched
        assert torch.equal(J[1:].double().cpu(), J_before[1:])
    return out


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("K", [1, 2, 3, 8])
@pytest.mark.parametrize("into_row", [False, True], ids=["separate_out", "out_is_row_0"])
def test_segment_combine(dtype, K, into_row, gen, small_tiles):
    J = strided_J(K, 6200, dtype, gen)
    offsets, numels = make_segments(J.shape[1], COL_SIZES, gen)
    W = randn(len(COL_SIZES), K, dtype=ref.accumulation_dtype(dtype), gen=gen)
    J0 = torch.empty_strided(J.shape, J.stride(), dtype=dtype, device=DEV).copy_(J)
    got = check_segment_combine(J, offsets, numels, W, into_row)
    # bitwise deterministic, aliased or not
    again = J0[0].clone() if into_row else got.clone()
    if into_row:
        mt.segment_combine_(J0[0], J0, offsets, numels, W)
        again = J0[0]
    else:
        mt.segment_combine_(again, J, offsets, numels, W)
    assert torch.equal(got, again)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_combine_large_k_and_search(dtype, gen, small_tiles, monkeypatch):
    # K = 17: two unrolled row chunks of 16; the binary-search table path.
    monkeypatch.setattr(mt_segments, "SMALL_S", 0)
    J = randn(17, 3000, dtype=dtype, gen=gen)
    offsets, numels = make_segments(J.shape[1], [1100, 0, 700, 9], gen)
    W = randn(4, 17, dtype=torch.float32, gen=gen)
    check_segment_combine(J, offsets, numels, W, into_row=True)


def test_column_segment_ops_edge_cases(gen):
    e = torch.empty(0, dtype=torch.int64, device=DEV)
    J = randn(3, 50, dtype=torch.float32, gen=gen)
    assert mt.segment_gram(J, e, e).shape == (0, 3, 3)
    out = J[0].clone()
    mt.segment_combine_(out, J, e, e, torch.empty(0, 3, device=DEV))
    assert torch.equal(out, J[0])
    offsets = torch.tensor([10, 0], device=DEV)
    numels = torch.tensor([5, 0], device=DEV)
    G = mt.segment_gram(J[:0], offsets, numels)  # K = 0
    assert G.shape == (2, 0, 0)
    G = mt.segment_gram(J[:, :0], offsets[1:], numels[1:])  # P = 0
    assert G.shape == (1, 3, 3) and torch.all(G == 0)
    mt.segment_combine_(out, J[:0], offsets, numels, torch.empty(2, 0, device=DEV))  # K = 0
    assert torch.all(out[10:15] == 0) and torch.equal(out[:10], J[0, :10])
    with pytest.raises(ValueError):  # weights of the wrong shape
        mt.segment_combine_(out, J, offsets, numels, torch.ones(2, 2, device=DEV))
    with pytest.raises(ValueError):
        mt.segment_gram(torch.zeros(3, 8, device=DEV)[:, ::2], offsets, numels)


def test_segment_ops_reject_bad_tables():
    x = torch.zeros(10, device=DEV)
    with pytest.raises(TypeError):
        mt.segment_moments(x, torch.zeros(2, dtype=torch.int32, device=DEV),
                           torch.zeros(2, dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError):
        mt.segment_scale_(x, torch.zeros(2, dtype=torch.int64, device=DEV),
                          torch.zeros(2, dtype=torch.int64, device=DEV), torch.ones(2, device=DEV),
                          torch.ones(2, device=DEV))  # noise without a seed


@pytest.mark.skipif(DEV != "cuda", reason="needs a CUDA device (compiled kernels)")
def test_no_host_sync_and_cuda_graph_capture(gen):
    J = randn(5, 3000, dtype=torch.float32, gen=gen)
    w = randn(5, dtype=torch.float32, gen=gen)
    x0 = randn(24000, dtype=torch.float32, gen=gen)
    y = randn(24000, dtype=torch.float32, gen=gen)
    offsets, numels = make_segments(x0.numel(), SIZES, gen)
    S = len(SIZES)
    scale = randn(S, dtype=torch.float32, gen=gen)
    std = torch.rand(S, generator=gen).to(DEV)
    seed = torch.tensor([77], dtype=torch.int64, device=DEV)
    x = x0.clone()
    col_offsets, col_numels = make_segments(J.shape[1], [0, 1000, 17, 1500], gen)
    W = randn(4, 5, dtype=torch.float32, gen=gen)
    J2 = J.clone()

    def step():
        x.copy_(x0)
        J2.copy_(J)
        G = mt.gram(J)
        c = mt.combine(J, w)
        m = mt.segment_moments(x, offsets, numels)
        SG = mt.segment_gram(J, col_offsets, col_numels)
        mt.segment_combine_(J2[0], J2, col_offsets, col_numels, W)  # out aliases row 0
        mt.segment_scale_(x, offsets, numels, scale, std, seed)
        mt.segment_lerp_(x, y, offsets, numels, scale.sigmoid())
        return G, c, m, SG, J2.clone(), x.clone()

    eager = step()  # compiles the kernels
    with host_sync_raises():
        again = step()
    for a, b in zip(eager, again):
        assert torch.equal(a, b)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    seed.fill_(78)  # the seed is read on the device at replay time
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager[:5], captured[:5]):
        assert torch.equal(a, b)
    assert not torch.equal(eager[5], captured[5])
    seed.fill_(77)
    graph.replay()
    assert torch.equal(eager[5], captured[5])
