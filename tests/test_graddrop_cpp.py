"""The fused C++ GradDrop kernel (``mmgrad_C::graddrop``, ``csrc/cpu/graddrop.cpp``).

Oracles: ``ordered_graddrop`` below, the algorithm written out in torch elementwise ops with the
summation order the kernel documents (torch's CPU column-sum order) and the uniforms from the
independent ``mmgrad.reference.philox4x32``: the kernel must give its bits. Against the torch
block loop of ``GradDrop`` (MMGRAD_BACKEND=reference): the same bits where torch's column sums
take their main loop (64-column blocks), the same values to rounding elsewhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REQUIRE_CPP

from mmgrad import ops
from mmgrad.aggregators import graddrop as graddrop_module
from mmgrad.aggregators.graddrop import GradDrop
from mmgrad.reference import philox4x32

CPP_WHY = ops.available_backends("cpu")["cpp"]
if CPP_WHY is not None and REQUIRE_CPP:
    raise RuntimeError(f"MMGRAD_REQUIRE_CPP=1 but the C++ backend is unavailable: {CPP_WHY}")
pytestmark = pytest.mark.skipif(CPP_WHY is not None, reason=f"C++ backend unavailable: {CPP_WHY}")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def uniforms(seed, positions, dtype):
    """The aggregator's (packed) stream at ``positions``: (r >> 8) * 2^-24 with r word p % 4 of the
    Philox4x32-10 block at counter p // 4."""
    words = torch.stack(philox4x32(positions >> 2, torch.tensor(seed)), -1)
    return (words.gather(-1, (positions & 3).unsqueeze(-1)).squeeze(-1) >> 8).to(dtype) * 2.0**-24


def torch_order_sum(terms):
    """Column sums of (K, P) ``terms`` in the order of ATen's CPU column sum (cascade_sum): runs of
    2^power rows summed from +0, each run into level 1, level 1 into level 2 every 2^power runs,
    and ((rest + level 1) + level 2) + level 3 at the end."""
    K = terms.shape[0]
    power = max(4, (K - 1).bit_length() // 4)
    run, mask = 1 << power, (1 << power) - 1
    zero = torch.zeros_like(terms[0])
    rest = zero
    if K < run:
        for i in range(K):
            rest = rest + terms[i]
        return rest
    lev = [zero, zero, zero]
    i = 0
    while i + run <= K:
        for _ in range(run):
            rest = rest + terms[i]
            i += 1
        lev[0], rest = lev[0] + rest, zero
        for j in (1, 2):
            if i & (mask << (j * power)):
                break
            lev[j], lev[j - 1] = lev[j] + lev[j - 1], zero
    for k in range(i, K):
        rest = rest + terms[k]
    return ((rest + lev[0]) + lev[1]) + lev[2]


def ordered_graddrop(J, seed, positions, leak=None):
    acc = _acc(J.dtype)
    X = J.to(acc)
    s = torch_order_sum(X)
    a = torch_order_sum(X.abs())
    purity = 0.5 * (1.0 + s / torch.where(a > 0, a, torch.ones_like(a)))
    U = uniforms(seed, positions, acc)
    sign = torch.where(purity > U, 1.0, torch.where(purity < U, -1.0, 0.0)).to(acc)
    keep = (X * sign) > 0
    if leak is None:
        m = keep.to(acc)
    else:
        lk = leak.to(acc).unsqueeze(1)
        m = torch.where(keep, (1 - lk) + lk, 0 + lk)
    return torch_order_sum(X * m).to(J.dtype)


def fused(J, seed, counter, leak=None, index=None):
    lk = None if leak is None else leak.to(_acc(J.dtype))
    return torch.ops.mmgrad_C.graddrop(J, torch.tensor(seed), torch.tensor(counter), lk, index)


def assert_same_bits(out, ref):
    """Equal bits, NaNs in the same places (their payloads are not specified)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    nan = torch.isnan(out)
    assert torch.equal(nan, torch.isnan(ref))
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[out.element_size()]
    bad = (out.view(ints) != ref.view(ints)) & ~nan
    assert not bad.any(), f"{int(bad.sum())} of {out.numel()} differ, first at {bad.nonzero()[:5].flatten().tolist()}"


def make_J(K, P, dtype, gen, scale=1.0, specials=True):
    J = torch.randn(K, P, dtype=torch.float64, generator=gen) * scale
    J[torch.rand(K, P, generator=gen) < 0.2] = 0.0  # exact zeros
    if P > 12:
        J[:, 3:6] = 0.0  # zero columns
        J[0, 6:9] = -0.0
        J[:, 9] = J[0, 9].abs()  # equal rows: purity 1
    if specials and P > 50:
        J[-1, 40], J[0, 41], J[-1, 42] = float("inf"), float("-inf"), float("nan")
    return J.to(dtype)


# --- the kernel against the written-out algorithm -------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [1, 2, 3, 8, 17, 64, 300])
def test_matches_ordered_oracle(K, dtype, gen):
    for P in (1, 63, 1000 + 2 * K + 1):
        if K == 300 and P > 100:
            continue
        J = make_J(K, P, dtype, gen)
        leak = torch.rand(K, dtype=torch.float64, generator=gen)
        leak[0] = 1.0
        for lk in (None, leak):
            counter = 2**32 - 500  # the stream crosses the 32-bit boundary of the counter
            out = fused(J, 11, counter, lk)
            ref = ordered_graddrop(J, 11, counter + torch.arange(P), lk)
            assert_same_bits(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_scales_and_near_ties(dtype, gen):
    # Tiny and huge gradients; rows that nearly cancel (purity near 0.5); near-parallel rows.
    K, P = 8, 2048 + 37
    for scale in (1e-10, 1e10):
        J = make_J(K, P, dtype, gen, scale, specials=False)
        assert_same_bits(fused(J, 3, 0), ordered_graddrop(J, 3, torch.arange(P)))
    J = torch.randn(K, P, dtype=torch.float64, generator=gen)
    J[1] = -J[0] * (1 + 1e-7)
    J[2] = J[3] * (1 + 1e-12)
    J = J.to(dtype)
    assert_same_bits(fused(J, 3, 7), ordered_graddrop(J, 3, 7 + torch.arange(P)))


def test_sharded_call_is_the_whole_matrix_at_its_columns(gen):
    K, total = 8, 5000
    J = make_J(K, total, torch.float32, gen)
    whole = fused(J, 4, 123)
    cols = torch.randperm(total, generator=gen)[:777]
    shard = fused(J[:, cols].contiguous(), 4, 123, index=cols)
    assert_same_bits(shard, whole[cols])
    assert_same_bits(shard, ordered_graddrop(J[:, cols], 4, 123 + cols))
    # Through the aggregator: the stream advances by `total`, as the torch path's.
    agg = GradDrop(seed=4)
    agg._counters["cpu"] = torch.tensor(123)
    assert_same_bits(agg(J[:, cols], cols, total), whole[cols])
    assert agg._counters["cpu"].item() == 123 + total
    empty = agg(J[:, :0], cols[:0], total)
    assert empty.shape == (0,) and agg._counters["cpu"].item() == 123 + 2 * total


def test_zero_columns_give_positive_zero():
    J = torch.zeros(5, 300)
    J[1, ::2] = -0.0
    for lk in (None, torch.linspace(0, 1, 5)):
        out = fused(J, 0, 0, lk)
        assert torch.equal(out.view(torch.int32), torch.zeros(300, dtype=torch.int32))


def test_same_bits_for_every_thread_count(gen):
    J = make_J(8, 3 * 8192 + 77, torch.float32, gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused(J, 9, 5)
        torch.set_num_threads(2)
        two = fused(J, 9, 5)
    finally:
        torch.set_num_threads(before)
    assert_same_bits(one, two)


def test_strided_rows_and_non_contiguous_J(gen):
    big = make_J(6, 700, torch.float32, gen)
    view = big[:, 50:650]  # rows 700 apart
    assert_same_bits(fused(view, 2, 0), fused(view.contiguous(), 2, 0))
    transposed = big.t().contiguous().t()[:, 50:650]  # column-major storage
    assert_same_bits(fused(transposed, 2, 0), fused(view.contiguous(), 2, 0))


_ISA_SCRIPT = textwrap.dedent(
    """
    import torch
    from mmgrad import ops
    assert ops.available_backends("cpu")["cpp"] is None  # loads mmgrad._C
    g = torch.Generator().manual_seed(5)
    index = torch.randperm(5000, generator=g)[:1031]
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        J = (torch.randn(19, 1031, generator=g) * (torch.rand(19, 1031, generator=g) > 0.2)).to(dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        lk = torch.linspace(0, 1, 19, dtype=acc)
        for leak in (None, lk):
            for idx in (None, index):
                out = torch.ops.mmgrad_C.graddrop(J, torch.tensor(8), torch.tensor(2**32 - 100), leak, idx)
                print(dtype, leak is None, idx is None, out.double().tolist())
    """
)


def test_every_isa_variant_gives_the_same_bits():
    # The ISA is fixed once per process: each variant runs in its own.
    results = {}
    for isa in ("avx512", "avx2", "default"):
        env = dict(os.environ, MMGRAD_CPU_ISA=isa, OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True,
                              text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[isa] = proc.stdout
    assert results["avx2"] == results["avx512"] and results["default"] == results["avx512"]
    assert len(results["default"].splitlines()) == 12


# --- the aggregator: fused path against the torch path --------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [1, 2, 3, 8, 64])
def test_torch_path_bits_in_its_main_loop(K, dtype, gen, monkeypatch):
    # 64-column blocks: every torch column sum runs its main vectorised loop, in the kernel's order.
    P = 64 * 40
    J = make_J(K, P, dtype, gen)
    leak = torch.rand(K, dtype=torch.float64, generator=gen)
    for lk in (None, leak):
        out = GradDrop(leak=lk, seed=6)(J)
        monkeypatch.setenv("MMGRAD_BACKEND", "reference")
        ref = GradDrop(leak=lk, seed=6, block=64)(J)
        monkeypatch.delenv("MMGRAD_BACKEND")
        assert_same_bits(out, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [1, 2, 3, 8, 64])
def test_torch_path_values_with_its_default_blocks(K, dtype, gen, monkeypatch):
    # Odd P: the torch path's tail columns sum in another order, so values agree to rounding.
    P = 70_001 if K <= 8 else 9_001
    J = make_J(K, P, dtype, gen, specials=False)
    leak = torch.rand(K, dtype=torch.float64, generator=gen)
    for lk in (None, leak):
        agg = GradDrop(leak=lk, seed=12)
        outs = [agg(J), agg(J)]
        monkeypatch.setenv("MMGRAD_BACKEND", "reference")
        ref_agg = GradDrop(leak=lk, seed=12)
        refs = [ref_agg(J), ref_agg(J)]
        monkeypatch.delenv("MMGRAD_BACKEND")
        assert torch.equal(agg._counters["cpu"], ref_agg._counters["cpu"])
        tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
        for out, ref in zip(outs, refs):
            torch.testing.assert_close(out, ref, rtol=tol, atol=tol * J.abs().max().item())
        if K > 1:  # (one row has purity 0 or 1: no draw changes a decision)
            assert not torch.equal(outs[0], outs[1])  # fresh draws on the second call


def test_dispatch(monkeypatch, gen):
    # The torch block loop runs for any other f, and inside the op when the backend is not C++.
    loops = []
    real = graddrop_module._drop_blocks
    monkeypatch.setattr(graddrop_module, "_drop_blocks", lambda *a: loops.append(1) or real(*a))
    J = make_J(4, 100, torch.float32, gen)
    fused_out = GradDrop()(J)
    GradDrop()(J.double())
    assert loops == []
    GradDrop(f=lambda p: p)(J)
    assert len(loops) == 1
    monkeypatch.setenv("MMGRAD_BACKEND", "reference")
    assert_same_bits(GradDrop(block=64)(J[:, :64]), fused_out[:64])
    assert len(loops) == 2


def test_state_dict_resume(gen):
    Js = [make_J(5, 999, torch.float32, gen) for _ in range(4)]
    a = GradDrop(seed=2, leak=[0.1, 0, 0.5, 0, 1])
    for J in Js[:2]:
        a(J)
    assert a._counters["cpu"].item() == 2 * 1000  # P rounded up to a multiple of 4 per call
    b = GradDrop(seed=2, leak=[0.1, 0, 0.5, 0, 1])
    b.load_state_dict(a.state_dict())
    for J in Js[2:]:
        assert_same_bits(a(J), b(J))
    a.reset()
    assert_same_bits(a(Js[0]), GradDrop(seed=2, leak=[0.1, 0, 0.5, 0, 1])(Js[0]))


def test_opcheck_and_compile(gen, monkeypatch):
    J = make_J(6, 517, torch.float32, gen, specials=False)  # (opcheck compares NaNs as unequal)
    op = graddrop_module.graddrop_identity
    args = (J, torch.tensor(3), torch.tensor(10), torch.linspace(0, 1, 6), torch.arange(517) * 3)
    for backend in ("cpp", "reference"):
        monkeypatch.setenv("MMGRAD_BACKEND", backend)
        torch.library.opcheck(op.op, args)  # .op: the registered op behind the eager shortcut
        torch.library.opcheck(op.op, args[:4] + (None, 64))
    monkeypatch.delenv("MMGRAD_BACKEND")
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: op(*a), fullgraph=True)
    assert_same_bits(compiled(*args), op(*args))
    # The whole aggregator compiles too (the backend is chosen inside the op, at run time).
    agg, ref = GradDrop(seed=3), GradDrop(seed=3)
    step = torch.compile(lambda J: agg(J), fullgraph=True)
    for _ in range(2):
        assert_same_bits(step(J), ref(J))
    assert agg._counters["cpu"].item() == ref._counters["cpu"].item() == 2 * 520


def test_argument_errors():
    J = torch.randn(3, 10)
    seed, counter = torch.tensor(0), torch.tensor(0)
    with pytest.raises(RuntimeError, match=r"leak must be a Float tensor of shape \(3,\)"):
        torch.ops.mmgrad_C.graddrop(J, seed, counter, torch.zeros(4), None)
    with pytest.raises(RuntimeError, match=r"leak must be a Float tensor of shape \(3,\)"):
        torch.ops.mmgrad_C.graddrop(J, seed, counter, torch.zeros(3, dtype=torch.float64), None)
    with pytest.raises(RuntimeError, match="index must be an int64 tensor of shape"):
        torch.ops.mmgrad_C.graddrop(J, seed, counter, None, torch.arange(9))
    with pytest.raises(RuntimeError, match="counter must be an int64"):
        torch.ops.mmgrad_C.graddrop(J, seed, torch.tensor(0.0), None, None)
    with pytest.raises(RuntimeError, match="J must be 2-D"):
        torch.ops.mmgrad_C.graddrop(J[0], seed, counter, None, None)
    with pytest.raises(RuntimeError, match="at least one row"):
        torch.ops.mmgrad_C.graddrop(J[:0], seed, counter, None, None)
    with pytest.raises(ValueError, match="leak has 2 entries"):
        GradDrop(leak=[0.0, 1.0])(J)
