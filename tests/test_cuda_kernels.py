"""Tests of the CUDA C++ backend (kernels/*.cuh launched from csrc/cuda/, backend "cuda").

The kernel tests need a CUDA device and an mmgrad._C built with its CUDA kernels (setup.py builds
them when torch is a CUDA build and nvcc is found; `make cuda-build-check` compiles them without a
GPU). Elsewhere they skip with the reason ops.available_backends gives. Two tests run anywhere:
the reason the backend gives when it cannot serve, and what `python -m mmgrad.env` reports.

Tolerances (the oracle is mmgrad.reference in float64 on the same input values), as for the
other backends:
* gram / segment_gram: |G - G_ref| <= tol * ||J_i|| ||J_j||, tol 1e-5 for fp16/bf16/fp32 (half
  values are exact in fp32, only the fp32 accumulation errs), 1e-12 for fp64; exactly symmetric.
* combine / segment_combine_: |c - c_ref| <= tol * (|w| @ |J|) + eps_out * |c_ref| + tiny, eps_out
  the unit roundoff of the output dtype and tiny half the spacing of its subnormals.
* segment_moments: |m - m_ref| <= tol * (sum |x|, sum x^2) per segment.
* segment_scale_ without noise and segment_lerp_: bitwise equal to the reference run by torch on
  the same dtype (each product and sum rounded once, as the reference's separate ops do).
* noise: |z - philox_normal| <= 1e-5 (float32 evaluation of the float64 formula).
"""

import sys

import pytest
import torch

from mmgrad import _extension, env, ops
from mmgrad import reference as ref
from conftest import host_sync_raises, random_segments


def _cuda_backend_missing():
    if not torch.cuda.is_available():
        return "no CUDA device"
    return ops.available_backends("cuda")["cuda"]


_MISSING = _cuda_backend_missing()
cuda_only = pytest.mark.skipif(_MISSING is not None, reason=f"CUDA C++ backend unavailable: {_MISSING}")

DEV = "cuda"
ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24,
                 torch.float64: 2.0**-53}
OPS = ("gram", "combine", "segment_moments", "segment_gram", "segment_combine_", "segment_scale_",
       "segment_lerp_")


def out_tol(dtype):
    """Rounding of a value stored in ``dtype``: relative eps_out, and half the spacing of the
    subnormals near zero (fp16 results of small products are subnormal)."""
    return UNIT_ROUNDOFF[dtype], torch.finfo(dtype).smallest_normal * UNIT_ROUNDOFF[dtype]


def acc_tol(dtype):
    return 1e-12 if dtype == torch.float64 else 1e-5


def randn(*shape, dtype, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEV)


def misaligned_J(K, P, dtype, gen, shift=1, pad=3):
    """(K, P) view starting `shift` elements into its storage, row stride P + pad: neither the
    base nor the rows are 16-byte aligned (the kernels' scalar path)."""
    big = randn(K, P + pad, dtype=dtype, gen=gen)
    J = big[:, shift:shift + P]
    assert K == 1 or J.stride(0) == P + pad
    return J



def make_segments(N, sizes, gen, gap_max=40):
    return random_segments(N, sizes, gen, DEV, gap_max)


# Empty segments, sizes below and around the vector widths, and segments of 2 and 3 tiles (16384
# elements per tile).
SIZES = [0, 1, 3, 5, 7, 9, 17, 0, 1024, 1500, 20000, 40001, 0]


def many_sizes(gen, S=300):
    return [int(s) for s in torch.randint(0, 3000, (S,), generator=gen)]


# --- runs anywhere ---------------------------------------------------------------------------


def test_cuda_backend_gives_the_precise_reason_on_cpu_tensors():
    why = ops._backend_error("cuda", torch.device("cpu"))
    assert why is not None and "runs on CUDA tensors, not cpu" in why
    info = _extension.build_info()
    if _extension.cpp_error() is not None:
        assert _extension.cpp_error() in why
    elif info.CUDA_VERSION is None:
        assert "mmgrad._C was built without CUDA kernels" in why
        if torch.version.cuda is None:
            assert f"torch {torch.__version__} is a CPU build" in why
    with pytest.raises(RuntimeError, match="cannot serve cpu tensors: the CUDA C\\+\\+ backend runs on CUDA"):
        ops.gram(torch.randn(2, 3), backend="cuda")


def test_env_reports_the_cuda_version_and_architectures_of_the_build():
    text = env.report()
    info = _extension.build_info()
    if info is None:
        assert f"mmgrad._C: not loaded: {_extension.cpp_error()}" in text
        return
    line = next(ln for ln in text.splitlines() if ln.startswith("mmgrad._C built for torch"))
    assert f"torch {info.TORCH_VERSION}, CUDA {info.CUDA_VERSION} " in line
    if info.CUDA_VERSION is None:  # this machine's CPU build: "CUDA None (CPU kernels only: ...)"
        assert "CPU kernels only" in line
    else:
        assert f"CUDA kernels for architectures {info.CUDA_ARCHS}" in line


def test_env_reports_an_extension_built_for_another_torch_as_refused(monkeypatch):
    class OtherBuild:
        TORCH_VERSION = "1.0.0+other"
        CUDA_VERSION = "11.8"
        CUDA_ARCHS = "8.0"
        CUDA_SKIPPED = None

    monkeypatch.setattr(_extension, "_state", {})
    monkeypatch.setitem(sys.modules, "mmgrad._build_info", OtherBuild)
    line = env._extension_line()
    assert line.startswith("mmgrad._C: not loaded: mmgrad._C was built for torch 1.0.0+other")
    assert f"but torch {torch.__version__} is installed" in line
    assert "built for torch 1.0.0+other" in ops._backend_error("cuda", torch.device("cuda"))


# --- gram ----------------------------------------------------------------------------------------


def check_gram(J):
    G = ops.gram(J, backend="cuda")
    assert G.dtype == ref.accumulation_dtype(J.dtype) and G.shape == (J.shape[0],) * 2
    assert G.device == J.device
    Jd = J.double().cpu()
    norms = Jd.norm(dim=1)
    bound = acc_tol(J.dtype) * norms[:, None] * norms[None, :] + 1e-300
    err = (G.double().cpu() - ref.gram(Jd)).abs()
    assert torch.all(err <= bound), f"max err/bound {(err / bound).max().item():.3g}"
    assert torch.equal(G, G.T)
    assert torch.equal(G, ops.gram(J, backend="cuda"))  # bitwise deterministic
    return G


@cuda_only
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("K,P", [(1, 1), (1, 37), (2, 1), (2, 513), (3, 1001), (4, 2048), (5, 7),
                                 (8, 129), (9, 333), (12, 4099), (16, 200), (16, 100003),
                                 (40, 31), (70, 999)])
def test_gram(dtype, K, P, gen):
    check_gram(randn(K, P, dtype=dtype, gen=gen))


@cuda_only
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("K", [1, 3, 8, 16])
def test_gram_misaligned_rows_and_zero_row(dtype, K, gen):
    J = misaligned_J(K, 3001, dtype, gen)
    J[K // 2].zero_()
    G = check_gram(J)
    assert torch.all(G[K // 2] == 0) and torch.all(G[:, K // 2] == 0)
    # The same values at an aligned address give the same bits: the column partition and the
    # order of the sums do not depend on the alignment.
    assert torch.equal(G, ops.gram(J.contiguous(), backend="cuda"))


@cuda_only
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("K", [2, 16])
def test_gram_large_p(dtype, K, gen):
    # P = 4M + 3: 1024 column tiles of many sweeps each, and a ragged last tile.
    check_gram(randn(K, 2**22 + 3, dtype=dtype, gen=gen))


@cuda_only
def test_gram_scales_and_empty():
    for scale in (1e-30, 1e30):
        J = torch.full((3, 1000), scale, dtype=torch.float64, device=DEV)
        assert torch.allclose(ops.gram(J, backend="cuda"), torch.full((3, 3), 1000 * scale**2, dtype=torch.float64, device=DEV),
                              rtol=1e-12, atol=0)
    for K, P in [(0, 5), (3, 0), (0, 0)]:
        G = ops.gram(torch.empty(K, P, device=DEV), backend="cuda")
        assert G.shape == (K, K) and torch.all(G == 0)


# --- combine -------------------------------------------------------------------------------------


def check_combine(J, w):
    c = ops.combine(J, w, backend="cuda")
    assert c.dtype == J.dtype and c.shape == (J.shape[1],)
    Jd, wd = J.double().cpu(), w.double().cpu()
    R = ref.combine(Jd, wd)
    rel, tiny = out_tol(J.dtype)
    bound = acc_tol(J.dtype) * (wd.abs() @ Jd.abs()) + rel * R.abs() + tiny + 1e-300
    err = (c.double().cpu() - R).abs()
    assert torch.all(err <= bound), f"max err/bound {(err / bound).max().item():.3g}"
    assert torch.equal(c, ops.combine(J, w, backend="cuda"))
    return c


@cuda_only
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("K,P", [(1, 1), (1, 1025), (2, 7), (3, 2049), (5, 100), (7, 9999),
                                 (16, 333), (16, 100003)])
def test_combine(dtype, K, P, gen):
    check_combine(randn(K, P, dtype=dtype, gen=gen), randn(K, dtype=ref.accumulation_dtype(dtype), gen=gen))


@cuda_only
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_combine_misaligned_and_empty(dtype, gen):
    acc = ref.accumulation_dtype(dtype)
    J = misaligned_J(6, 1027, dtype, gen)
    w = randn(6, dtype=acc, gen=gen)
    c = check_combine(J, w)
    assert torch.equal(c, ops.combine(J.contiguous(), w, backend="cuda"))  # same sums, same bits
    assert ops.combine(J[:, :0], w, backend="cuda").shape == (0,)
    z = ops.combine(J[:0], torch.empty(0, dtype=acc, device=DEV), backend="cuda")
    assert z.shape == (1027,) and torch.all(z == 0)


@cuda_only
def test_combine_rejects_a_weight_of_the_wrong_dtype_or_device():
    J = torch.randn(3, 10, device=DEV)
    with pytest.raises(RuntimeError, match="w must be Float"):
        torch.ops.mmgrad_C.combine(J, torch.ones(3, dtype=torch.float64, device=DEV))
    with pytest.raises(RuntimeError, match="w must be on cuda"):
        torch.ops.mmgrad_C.combine(J, torch.ones(3))


# --- flat segment ops ----------------------------------------------------------------------------


def check_moments(x, offsets, numels):
    m = ops.segment_moments(x, offsets, numels, backend="cuda")
    assert m.shape == (offsets.numel(), 2) and m.dtype == ref.accumulation_dtype(x.dtype)
    xd = x.double().cpu()
    R = ref.segment_moments(xd, offsets.cpu(), numels.cpu())
    scale = ref.segment_moments(xd.abs(), offsets.cpu(), numels.cpu())
    err = (m.double().cpu() - R).abs()
    assert torch.all(err <= acc_tol(x.dtype) * scale + 1e-300)
    assert torch.all(m[numels == 0] == 0)
    assert torch.equal(m, ops.segment_moments(x, offsets, numels, backend="cuda"))


@cuda_only
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_segment_moments(dtype, gen):
    x = randn(70000, dtype=dtype, gen=gen)
    check_moments(x, *make_segments(x.numel(), SIZES, gen))
    check_moments(x[3:], *make_segments(x.numel() - 3, SIZES, gen))  # misaligned buffer


@cuda_only
def test_segment_moments_many_segments(gen):
    sizes = many_sizes(gen) + [50000]
    x = randn(sum(sizes) + 301 * 8, dtype=torch.float32, gen=gen)
    check_moments(x, *make_segments(x.numel(), sizes, gen, gap_max=8))


@cuda_only
def test_segment_ops_without_segments():
    x = torch.ones(10, device=DEV)
    e = torch.empty(0, dtype=torch.int64, device=DEV)
    assert ops.segment_moments(x, e, e, backend="cuda").shape == (0, 2)
    ops.segment_scale_(x, e, e, torch.empty(0, device=DEV), backend="cuda")
    ops.segment_lerp_(x, x.clone(), e, e, torch.empty(0, device=DEV), backend="cuda")
    assert torch.all(x == 1)


@cuda_only
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shift", [0, 1])
def test_segment_scale_exact(dtype, shift, gen):
    # One multiply per element, rounded once, then the cast: bitwise the reference on the same
    # dtype, overflow and underflow included; elements outside every segment untouched.
    x = randn(70000, dtype=torch.float64, gen=gen)
    x[::7] *= 1e12
    x[3::7] *= 1e-12
    x = x.to(dtype)[shift:]
    offsets, numels = make_segments(x.numel(), SIZES, gen)
    S = len(SIZES)
    scale = randn(S, dtype=ref.accumulation_dtype(dtype), gen=gen)
    scale[0::3] = 1e30
    scale[1::3] = 1e-30
    expected = x.clone()
    ref.segment_scale_(expected, offsets, numels, scale)
    got = x.clone()
    ops.segment_scale_(got, offsets, numels, scale, backend="cuda")
    assert torch.equal(got, expected)


SEEDS = [0, 12345, 2**32 - 1, 2**32 + 7, 2**62 + 2**33 + 5, -3]


@cuda_only
@pytest.mark.parametrize("seed", SEEDS)
def test_noise_matches_reference(seed, gen):
    # scale 0, std 1: the buffer becomes the noise itself; segments start at every lane of a
    # Philox block and of a 128-bit vector.
    x = randn(9000, dtype=torch.float32, gen=gen)
    offsets = torch.tensor([3, 2101, 1200, 6002, 7001], device=DEV)
    numels = torch.tensor([1000, 3900, 0, 997, 1999], device=DEV)
    s = torch.tensor([seed], dtype=torch.int64, device=DEV)
    got = x.clone()
    zeros, ones = torch.zeros(5, device=DEV), torch.ones(5, device=DEV)
    ops.segment_scale_(got, offsets, numels, zeros, ones, s, backend="cuda")
    got = got.cpu().double()
    covered = torch.zeros(9000, dtype=torch.bool)
    for o, n in zip(offsets.tolist(), numels.tolist()):
        if n:
            z = ref.philox_normal(s.cpu(), torch.arange(o, o + n))
            assert (got[o:o + n] - z).abs().max() <= 1e-5
        covered[o:o + n] = True
    assert torch.equal(got[~covered], x.cpu().double()[~covered])


@cuda_only
def test_int64_indexing_past_two_to_the_31_elements():
    # A bfloat16 buffer of 2**31 + 4099 elements (4.3 GB): segments across and beyond element
    # 2**31, where int32 indices would wrap.
    N = 2**31 + 4099
    x = torch.zeros(N, dtype=torch.bfloat16, device=DEV)
    offsets = torch.tensor([2**31 - 3, N - 4001, 5], device=DEV)
    numels = torch.tensor([10, 4001, 7], device=DEV)
    s = torch.tensor([2**33 + 99], dtype=torch.int64, device=DEV)
    ops.segment_scale_(x, offsets, numels, torch.zeros(3, device=DEV), torch.ones(3, device=DEV), s,
                       backend="cuda")
    m = ops.segment_moments(x, offsets, numels, backend="cuda").double().cpu()
    c = ops.combine(x.view(1, N), torch.full((1,), 2.0, device=DEV), backend="cuda")
    for k, (o, n) in enumerate(zip(offsets.tolist(), numels.tolist())):
        z = ref.philox_normal(s.cpu(), torch.arange(o, o + n))
        got = x[o:o + n].cpu().double()
        assert (got - z).abs().max() <= 2.0**-8 * z.abs().max() + 1e-5
        mref = torch.stack([got.sum(), (got * got).sum()])
        assert torch.all((m[k] - mref).abs() <= 1e-5 * torch.stack([got.abs().sum(), mref[1]]))
        assert torch.equal(c[o:o + n].cpu().double(), 2 * got)
    assert int(torch.count_nonzero(x)) <= 10 + 4001 + 7


def _free_gpu_bytes():
    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0


@cuda_only
def test_noise_past_element_2_to_the_34():
    # From element 2**34 on the Philox block index (i >> 2) needs the counter's high word; a
    # bfloat16 buffer that long takes 32 GB.
    N = 2**34 + 4096
    if _free_gpu_bytes() < 2 * N + 2**30:
        pytest.skip(f"needs {(2 * N + 2**30) / 2**30:.0f} GiB of free GPU memory")
    x = torch.zeros(N, dtype=torch.bfloat16, device=DEV)
    offsets = torch.tensor([2**34 - 8, 7], device=DEV)
    numels = torch.tensor([4104, 9], device=DEV)
    s = torch.tensor([2**33 + 99], dtype=torch.int64, device=DEV)
    ops.segment_scale_(x, offsets, numels, torch.zeros(2, device=DEV), torch.ones(2, device=DEV), s,
                       backend="cuda")
    for o, n in zip(offsets.tolist(), numels.tolist()):
        z = ref.philox_normal(s.cpu(), torch.arange(o, o + n))
        assert (x[o:o + n].cpu().double() - z).abs().max() <= 2.0**-8 * z.abs().max() + 1e-5
    del x


@cuda_only
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_segment_scale_with_noise(dtype, gen):
    x = randn(70000, dtype=dtype, gen=gen)
    offsets, numels = make_segments(x.numel(), SIZES, gen)
    S = len(SIZES)
    acc = ref.accumulation_dtype(dtype)
    scale = randn(S, dtype=acc, gen=gen)
    std = torch.rand(S, generator=gen, dtype=torch.float64).to(acc).to(DEV)
    seed = torch.tensor([2**40 + 17], dtype=torch.int64, device=DEV)
    got = x.clone()
    ops.segment_scale_(got, offsets, numels, scale, std, seed, backend="cuda")
    expected = x.double().cpu().clone()
    ref.segment_scale_(expected, offsets.cpu(), numels.cpu(), scale.double().cpu(), std.double().cpu(), seed.cpu())
    tol = (1e-5 * std.double().cpu().abs().max() + 1e-6 * expected.abs() + UNIT_ROUNDOFF[dtype] * expected.abs())
    assert torch.all((got.double().cpu() - expected).abs() <= tol)
    again = x.clone()
    ops.segment_scale_(again, offsets, numels, scale, std, seed, backend="cuda")
    assert torch.equal(got, again)
    seed += 1  # read on the device: the same launch arguments give new noise
    ops.segment_scale_(again.copy_(x), offsets, numels, scale, std, seed, backend="cuda")
    assert not torch.equal(got, again)


@cuda_only
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shift", [0, 1])
def test_segment_lerp_exact(dtype, shift, gen):
    x = randn(70000, dtype=dtype, gen=gen)[shift:]
    y = randn(70000, dtype=dtype, gen=gen)[:70000 - shift]
    offsets, numels = make_segments(x.numel(), SIZES, gen)
    acc = ref.accumulation_dtype(dtype)
    w = torch.rand(len(SIZES), generator=gen, dtype=torch.float64).to(acc).to(DEV)
    w[0], w[1] = 0.0, 1.0
    expected = x.clone()
    ref.segment_lerp_(expected, y, offsets, numels, w)
    got = x.clone()
    ops.segment_lerp_(got, y, offsets, numels, w, backend="cuda")
    assert torch.equal(got, expected)


@cuda_only
def test_segment_ops_reject_a_table_on_another_device():
    x = torch.zeros(10, device=DEV)
    with pytest.raises(RuntimeError, match="offsets must be on cuda"):
        torch.ops.mmgrad_C.segment_moments(x, torch.zeros(1, dtype=torch.int64),
                                           torch.ones(1, dtype=torch.int64, device=DEV))
    with pytest.raises(RuntimeError, match="seed must be an int64 tensor with one element"):
        torch.ops.mmgrad_C.segment_scale_(x, torch.zeros(1, dtype=torch.int64, device=DEV),
                                          torch.ones(1, dtype=torch.int64, device=DEV),
                                          torch.ones(1, device=DEV), torch.ones(1, device=DEV),
                                          torch.zeros(2, dtype=torch.int64, device=DEV))


# --- column-segment ops --------------------------------------------------------------------------


def check_segment_gram(J, offsets, numels):
    G = ops.segment_gram(J, offsets, numels, backend="cuda")
    S, K = offsets.numel(), J.shape[0]
    assert G.shape == (S, K, K) and G.dtype == ref.accumulation_dtype(J.dtype)
    Jd = J.double().cpu()
    R = ref.segment_gram(Jd, offsets.cpu(), numels.cpu())
    norms = torch.stack([Jd[:, o:o + n].norm(dim=1) for o, n in zip(offsets.tolist(), numels.tolist())])
    bound = acc_tol(J.dtype) * norms[:, :, None] * norms[:, None, :] + 1e-300
    err = (G.double().cpu() - R).abs()
    assert torch.all(err <= bound), f"max err/bound {(err / bound).max().item():.3g}"
    assert torch.equal(G, G.transpose(1, 2))
    assert torch.all(G[numels == 0] == 0)
    assert torch.equal(G, ops.segment_gram(J, offsets, numels, backend="cuda"))


@cuda_only
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("K", [1, 2, 3, 5, 8, 16, 17])
def test_segment_gram(dtype, K, gen):
    J = misaligned_J(K, 70000, dtype, gen)
    check_segment_gram(J, *make_segments(J.shape[1], SIZES, gen))
    check_segment_gram(J.contiguous(), *make_segments(J.shape[1], SIZES, gen))


@cuda_only
def test_segment_gram_many_segments(gen):
    sizes = many_sizes(gen)
    J = randn(4, sum(sizes) + 301 * 8, dtype=torch.float32, gen=gen)
    check_segment_gram(J, *make_segments(J.shape[1], sizes, gen, gap_max=8))


def check_segment_combine(J, offsets, numels, weights, out=None):
    out = torch.full((J.shape[1],), 7.0, dtype=J.dtype, device=DEV) if out is None else out
    before = out.clone()
    Jd, wd = J.double().cpu(), weights.double().cpu()
    ops.segment_combine_(out, J, offsets, numels, weights, backend="cuda")
    covered = torch.zeros(J.shape[1], dtype=torch.bool)
    got = out.double().cpu()
    rel, tiny = out_tol(J.dtype)
    for s, (o, n) in enumerate(zip(offsets.tolist(), numels.tolist())):
        R = wd[s] @ Jd[:, o:o + n]
        bound = acc_tol(J.dtype) * (wd[s].abs() @ Jd[:, o:o + n].abs()) + rel * R.abs() + tiny + 1e-300
        assert torch.all((got[o:o + n] - R).abs() <= bound), f"segment {s}"
        covered[o:o + n] = True
    assert torch.equal(out.cpu()[~covered], before.cpu()[~covered])  # outside: untouched
    return out


@cuda_only
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("K", [1, 2, 3, 5, 16])
def test_segment_combine(dtype, K, gen):
    J = misaligned_J(K, 70000, dtype, gen)
    offsets, numels = make_segments(J.shape[1], SIZES, gen)
    weights = randn(len(SIZES), K, dtype=ref.accumulation_dtype(dtype), gen=gen)
    out = check_segment_combine(J, offsets, numels, weights)
    again = torch.full_like(out, 7.0)
    ops.segment_combine_(again, J.contiguous(), offsets, numels, weights, backend="cuda")
    assert torch.equal(out, again)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_segment_combine_into_a_row_of_J(dtype, gen):
    # out aliases row 0 of J: every column is read in full before it is written.
    K = 3
    J = randn(K, 70000, dtype=dtype, gen=gen)
    offsets, numels = make_segments(J.shape[1], SIZES, gen)
    weights = randn(len(SIZES), K, dtype=ref.accumulation_dtype(dtype), gen=gen)
    expected = J[0].clone()
    ops.segment_combine_(expected, J.clone(), offsets, numels, weights, backend="cuda")
    ops.segment_combine_(J[0], J, offsets, numels, weights, backend="cuda")
    assert torch.equal(J[0], expected)


@cuda_only
def test_segment_combine_with_no_rows_writes_zeros(gen):
    offsets, numels = make_segments(5000, [10, 0, 999], gen)
    out = torch.full((5000,), 7.0, device=DEV)
    ops.segment_combine_(out, torch.empty(0, 5000, device=DEV), offsets, numels,
                         torch.empty(3, 0, device=DEV), backend="cuda")
    for o, n in zip(offsets.tolist(), numels.tolist()):
        assert torch.all(out[o:o + n] == 0)
    assert int((out == 7.0).sum()) == 5000 - 1009


# --- guarantees on the device --------------------------------------------------------------------


def _all_ops(J, w, offsets, numels, x, y, scale, seed, weights, out):
    G = ops.gram(J, backend="cuda")
    c = ops.combine(J, w, backend="cuda")
    m = ops.segment_moments(x, offsets, numels, backend="cuda")
    std = ops.segment_std(m, numels)
    ops.segment_scale_(x, offsets, numels, scale, std, seed, backend="cuda")
    ops.segment_lerp_(x, y, offsets, numels, scale, backend="cuda")
    sg = ops.segment_gram(J, offsets, numels, backend="cuda")
    ops.segment_combine_(out, J, offsets, numels, weights, backend="cuda")
    return G, c, m, sg


def _inputs(gen, P=1_000_003):
    J = randn(8, P, dtype=torch.float32, gen=gen)
    w = randn(8, dtype=torch.float32, gen=gen)
    offsets, numels = ops.table([5000, 0, 1, 300_000, P - 305_001], DEV)
    x = randn(P, dtype=torch.float32, gen=gen)
    y = randn(P, dtype=torch.float32, gen=gen)
    scale = torch.rand(5, generator=gen).to(DEV)
    seed = torch.tensor([11], device=DEV)
    weights = randn(5, 8, dtype=torch.float32, gen=gen)
    out = torch.zeros(P, device=DEV)
    return J, w, offsets, numels, x, y, scale, seed, weights, out


@cuda_only
def test_every_op_is_sync_free(gen):
    args = _inputs(gen)
    _all_ops(*args)
    with host_sync_raises():
        _all_ops(*args)
    torch.cuda.synchronize()


@cuda_only
def test_bitwise_deterministic_run_after_run(gen):
    args = _inputs(gen)
    J, w, offsets, numels, x, y, scale, seed, weights, out = args
    x0 = x.clone()
    first = _all_ops(*args) + (x.clone(), out.clone())
    x.copy_(x0)
    out.zero_()
    second = _all_ops(*args) + (x.clone(), out.clone())
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@cuda_only
def test_captured_in_a_cuda_graph_with_fresh_noise_per_replay(gen):
    args = _inputs(gen, P=100_003)
    J, w, offsets, numels, x, y, scale, seed, weights, out = args
    _all_ops(*args)
    torch.cuda.synchronize()
    x0 = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        G, c, m, sg = _all_ops(*args)
        seed.add_(1)
    results = []
    for _ in range(2):
        x.copy_(x0)
        graph.replay()
        torch.cuda.synchronize()
        results.append(x.clone())
        assert torch.equal(G, ops.gram(J, backend="cuda")) and torch.equal(c, ops.combine(J, w, backend="cuda"))
    assert not torch.equal(results[0], results[1])


@cuda_only
def test_registered_for_every_op():
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mmgrad_C::{name}", "CUDA"), name
