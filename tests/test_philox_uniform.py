"""The fused counter-based uniform generator ``mmgrad.ops.philox_uniform`` and its users.

Every backend (reference, C++ with each ISA variant, Triton) must give, bit for bit, the uniforms a
loop over the stream positions computes with :func:`mmgrad.reference.philox4x32` (itself checked
here against a pure-Python Philox4x32-10 and Random123's known answer); the op must honour the
torch.library contract (opcheck, torch.compile); the seeded aggregators that draw with it
(``SeededMixin``) must draw what they drew before the op existed, and GradDrop's rewritten block
loop must return what the previous one returned, bit for bit.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import backend_cases, host_sync_raises
from mmgrad import ops
from mmgrad.aggregators.graddrop import GradDrop
from mmgrad.aggregators.projection import PCGrad
from mmgrad.reference import philox4x32

# The CUDA C++ backend has no kernel for this op (test_backend_cuda_is_refused covers it).
CASES = [c for c in backend_cases() if c.values[0] != ("cuda", "cuda")]
DTYPES = [torch.float32, torch.float64]
MASK32 = 0xFFFFFFFF


# --- independent references -------------------------------------------------------------------


def python_philox_r0(position: int, seed: int) -> int:
    """First output word of Philox4x32-10 in plain Python integers (Salmon et al., SC'11)."""
    c = [position & MASK32, (position >> 32) & MASK32, 0, 0]
    k = [seed & MASK32, (seed >> 32) & MASK32]
    for r in range(10):
        if r:
            k = [(k[0] + 0x9E3779B9) & MASK32, (k[1] + 0xBB67AE85) & MASK32]
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & MASK32, (p0 >> 32) ^ c[3] ^ k[1], p0 & MASK32]
    return c[0]


def loop_uniform(seed: int, positions: list[int], dtype: torch.dtype, packed: bool = False) -> torch.Tensor:
    """u = (r >> 8) / 2**24 at each stream position p (taken modulo 2**64), r from philox4x32: word
    0 of the block at counter p, or (packed) word p % 4 of the block at counter p // 4."""
    positions = [p % 2**64 for p in positions]
    blocks = [p // 4 if packed else p for p in positions]
    wrapped = [b - (2**64 if b >= 2**63 else 0) for b in blocks]  # as int64
    words = philox4x32(torch.tensor(wrapped, dtype=torch.int64), torch.tensor(seed))
    r = [words[p % 4 if packed else 0][i].item() for i, p in enumerate(positions)]
    return torch.tensor([(x >> 8) / 2**24 for x in r], dtype=torch.float64).to(dtype)


def draw(case, seed, counter, n=None, index=None, dtype=torch.float32, packed=False):
    device, backend = case
    out = ops.philox_uniform(
        torch.tensor(seed, device=device), torch.tensor(counter, device=device), n,
        index=None if index is None else index.to(device), dtype=dtype, packed=packed, backend=backend,
    )
    assert out.device.type == device and out.dtype == dtype
    return out.cpu()


def test_philox4x32_matches_plain_python_and_the_known_answer():
    assert python_philox_r0(0, 0) == 0x6627E8D5  # Random123 KAT, counter 0, key 0
    positions = [0, 1, 2**32 - 1, 2**32, 2**62 + 3, 2**63 - 1]
    for seed in (0, 1, 2**32 + 5, 2**63 - 1):
        r0 = philox4x32(torch.tensor(positions), torch.tensor(seed))[0].tolist()
        assert r0 == [python_philox_r0(p, seed) for p in positions]


# --- the op against the loop reference --------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 2, 15, 17, 33, 1000, 16385, 70001])
@pytest.mark.parametrize("packed", [False, True], ids=["word0", "packed"])
def test_consecutive_positions_match_loop_reference(case, dtype, n, packed):
    g = torch.Generator().manual_seed(n)
    seed = int(torch.randint(0, 2**63 - 1, (), generator=g))
    # Around the 2**32 carry into the high counter word (packed: of the block), far up, and at
    # every phase of a block of four.
    for counter in (2**32 - n // 2 - 1, 2**34 - n // 2 - 1, 2**62 + int(torch.randint(0, 2**40, (), generator=g)),
                    *(2**63 - 5 + k for k in range(4))):
        out = draw(case, seed, counter, n, dtype=dtype, packed=packed)
        assert out.shape == (n,)
        assert torch.equal(out, loop_uniform(seed, [counter + i for i in range(n)], dtype, packed))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["word0", "packed"])
def test_arbitrary_indices_match_loop_reference(case, dtype, packed):
    g = torch.Generator().manual_seed(1)
    index = torch.cat([
        torch.randint(0, 2**62, (999,), generator=g),  # beyond 2**32 and up to 2**62
        torch.tensor([0, 5, 5, 2**32 - 1, 2**32, 2**62, 2**63 - 1000, 3]),  # repeats, edges
        torch.randint(0, 100, (37,), generator=g),  # unsorted small positions
    ])
    for seed, counter in ((2**63 - 1, 17), (0, 0), (int(torch.randint(0, 2**63 - 1, (), generator=g)), 2**33 + 1)):
        out = draw(case, seed, counter, index=index, dtype=dtype, packed=packed)
        assert torch.equal(out, loop_uniform(seed, [counter + i for i in index.tolist()], dtype, packed))


@pytest.mark.parametrize("case", CASES)
def test_index_shape_dtype_and_layout(case):
    # Any integer index is accepted, the output has its shape; n may repeat its element count.
    base = torch.randint(0, 2**31, (6, 10))
    ref = loop_uniform(9, [3 + i for i in base.reshape(-1).tolist()], torch.float32).reshape(6, 10)
    assert torch.equal(draw(case, 9, 3, index=base), ref)
    assert torch.equal(draw(case, 9, 3, 60, index=base.to(torch.int32)), ref)
    assert torch.equal(draw(case, 9, 3, index=base.t()), ref.t())  # non-contiguous
    assert torch.equal(draw(case, 9, 3, index=base[:, ::3]), ref[:, ::3])
    assert draw(case, 9, 3, index=torch.empty(0, 4, dtype=torch.int64)).shape == (0, 4)


MILLION = (1_000_000, 2**32 - 400_000, 2**40 + 77)  # n, counter, seed


@functools.lru_cache(maxsize=None)
def million_references():
    """(consecutive float64 draws, an index, float32 draws at it) of MILLION, vectorised with
    philox4x32 (a Python loop over 1M positions would take minutes), shared by every backend."""
    n, counter, seed = MILLION
    ref = (philox4x32(torch.arange(n) + counter, torch.tensor(seed))[0] >> 8).to(torch.float64) * 2.0**-24
    # Spot checks of the vectorised reference against the plain-Python Philox.
    for i in (0, 399_999, 400_000, n - 1):
        assert ref[i].item() == (python_philox_r0(counter + i, seed) >> 8) / 2**24
    index = torch.randint(0, 2**62, (n,), generator=torch.Generator().manual_seed(3))
    ref_at = (philox4x32(index + counter, torch.tensor(seed))[0] >> 8).to(torch.float32) * 2.0**-24
    return ref, index, ref_at


@pytest.mark.parametrize("case", CASES)
def test_a_million_draws(case):
    n, counter, seed = MILLION
    ref, index, ref_at = million_references()
    assert torch.equal(draw(case, seed, counter, n, dtype=torch.float64), ref)
    assert torch.equal(draw(case, seed, counter, index=index), ref_at)


@pytest.mark.parametrize("case", CASES)
def test_counter_is_read_on_the_device_and_not_advanced(case):
    device, backend = case
    seed, counter = torch.tensor(5, device=device), torch.tensor(100, device=device)
    a = ops.philox_uniform(seed, counter, 50, backend=backend)
    assert counter.item() == 100
    counter.add_(20)  # in place: the next call sees it
    b = ops.philox_uniform(seed, counter, 30, backend=backend)
    assert torch.equal(a[20:], b)
    assert not torch.equal(ops.philox_uniform(seed + 1, counter, 30, backend=backend), b)
    # Values are 24-bit uniforms in [0, 1).
    u = ops.philox_uniform(seed, counter, 4096, dtype=torch.float64, backend=backend)
    assert ((u >= 0) & (u < 1)).all() and torch.equal(u, torch.floor(u * 2**24) / 2**24)
    assert 0.45 < u.mean().item() < 0.55


@pytest.mark.skipif(ops.available_backends("cpu")["cpp"] is not None, reason="needs the C++ extension")
def test_cpp_is_the_same_for_every_thread_count():
    threads = torch.get_num_threads()
    index = torch.randint(0, 2**62, (100_003,))
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append((ops.philox_uniform(3, 11, 100_003, backend="cpp"),
                            ops.philox_uniform(3, 11, index=index, dtype=torch.float64, backend="cpp")))
    finally:
        torch.set_num_threads(threads)
    for a, b in results[1:]:
        assert torch.equal(a, results[0][0]) and torch.equal(b, results[0][1])


_ISA_SCRIPT = textwrap.dedent("""
    import torch
    from mmgrad import ops
    from mmgrad.reference import philox4x32
    for n in (0, 1, 7, 8, 9, 16, 17, 100, 16384, 16385, 50001):
        for dtype in (torch.float32, torch.float64):
            for counter in (2**32 - 33, 2**62 + 5):
                out = ops.philox_uniform(2**63 - 1, counter, n, dtype=dtype, backend="cpp")
                ref = (philox4x32(torch.arange(n) + counter, torch.tensor(2**63 - 1))[0] >> 8).to(dtype) * 2.0**-24
                assert torch.equal(out, ref), (n, dtype, counter)
                index = torch.randint(0, 2**62, (n,))
                out = ops.philox_uniform(7, counter, index=index, dtype=dtype, backend="cpp")
                ref = (philox4x32(index + counter, torch.tensor(7))[0] >> 8).to(dtype) * 2.0**-24
                assert torch.equal(out, ref), (n, dtype, counter, "index")
                for start in (counter, counter + 1, counter + 3):  # every phase of a block of four
                    out = ops.philox_uniform(5, start, n, dtype=dtype, packed=True, backend="cpp")
                    pos = torch.arange(n) + start
                    words = torch.stack(philox4x32(pos >> 2, torch.tensor(5)), -1)
                    ref = (words.gather(-1, (pos & 3)[:, None])[:, 0] >> 8).to(dtype) * 2.0**-24
                    assert torch.equal(out, ref), (n, dtype, start, "packed")
    print("ok")
""")


@pytest.mark.skipif(ops.available_backends("cpu")["cpp"] is not None, reason="needs the C++ extension")
@pytest.mark.parametrize("isa", ["avx2", "default"])
def test_every_isa_variant_matches_reference(isa):
    # The ISA is fixed once per process, so each variant runs in its own (the best one runs here).
    env = dict(os.environ, MMGRAD_CPU_ISA=isa, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_argument_errors():
    with pytest.raises(ValueError, match="n must be"):
        ops.philox_uniform(1, 0)
    with pytest.raises(ValueError, match="n must be"):
        ops.philox_uniform(1, 0, -1)
    with pytest.raises(ValueError, match="n = 3"):
        ops.philox_uniform(1, 0, 3, index=torch.arange(4))
    with pytest.raises(ValueError, match="integer"):
        ops.philox_uniform(1, 0, index=torch.rand(4))
    with pytest.raises(ValueError, match="dtype"):
        ops.philox_uniform(1, 0, 4, dtype=torch.float16)
    with pytest.raises(ValueError, match="seed must be an int64"):
        ops.philox_uniform(torch.tensor(1.0), 0, 4)
    with pytest.raises(ValueError, match="counter must be an int64"):
        ops.philox_uniform(1, torch.tensor([1, 2]), 4)
    with pytest.raises(RuntimeError, match="cannot serve"):
        ops.philox_uniform(1, 0, 4, backend="cuda")


def test_policy_choosing_the_cuda_backend_falls_back_to_the_reference(monkeypatch):
    # Where the auto policy or MMGRAD_BACKEND picks the CUDA C++ backend (CUDA tensors, no
    # Triton), the op has no kernel there and runs the reference; an explicit backend="cuda" raises
    # (ops._kernel: the same rule as feature_drop).
    monkeypatch.setattr(ops, "resolve_backend", lambda device, backend=None: "cuda")
    assert torch.equal(ops.philox_uniform(3, 5, 100), loop_uniform(3, [5 + i for i in range(100)], torch.float32))
    with pytest.raises(NotImplementedError, match="no philox_uniform kernel"):
        ops.philox_uniform(3, 5, 100, backend="cuda")


def test_policy_choosing_the_cuda_backend_on_cuda_tensors_runs_the_triton_kernels(monkeypatch):
    # On CUDA tensors with Triton working, the ops the CUDA C++ backend lacks run Triton's kernels
    # (no tensor is needed to pick the function, so this runs without a GPU too).
    import mmgrad.triton

    monkeypatch.setattr(ops, "resolve_backend", lambda device, backend=None: "cuda")
    for op in ("philox_uniform", "feature_drop"):
        assert ops._kernel(op, torch.device("cuda"), None) is getattr(mmgrad.triton, op)
        assert ops._kernel(op, torch.device("cpu"), None) is ops._REFERENCE_KERNELS[op]
    monkeypatch.setenv("MMGRAD_TRITON", "0")  # the opt-out: the reference, and Triton unavailable
    assert ops._kernel("philox_uniform", torch.device("cuda"), None) is ops._REFERENCE_KERNELS["philox_uniform"]
    assert "MMGRAD_TRITON=0" in ops.available_backends("cpu")["triton"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA C++ backend needs a CUDA device")
def test_backend_cuda_is_refused():
    # No CUDA C++ kernel: forcing it says so (or, in a build without CUDA kernels, why not).
    seed, counter = torch.tensor(1, device="cuda"), torch.tensor(0, device="cuda")
    built = ops.available_backends("cuda")["cuda"] is None
    with pytest.raises(NotImplementedError if built else RuntimeError,
                       match="no philox_uniform kernel" if built else "cannot serve"):
        ops.philox_uniform(seed, counter, 4, backend="cuda")


# --- torch.library contract -------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_opcheck(case):
    device, backend = case
    seed, counter = torch.tensor(3, device=device), torch.tensor(2**33, device=device)
    index = torch.randint(0, 2**62, (37,), device=device)
    op = torch.ops.mmgrad.philox_uniform.default
    for packed in (False, True):
        torch.library.opcheck(op, (seed, counter, 37, None, torch.float32, packed, backend))
        torch.library.opcheck(op, (seed, counter, 37, index, torch.float64, packed, backend))
        torch.library.opcheck(op, (seed, counter, 0, None, torch.float32, packed, backend))


def test_torch_compile_fullgraph_traces_the_op():
    seed, counter = torch.tensor(4), torch.tensor(2**40)

    def f(x, index):
        u = ops.philox_uniform(seed, counter, x.shape[0])
        v = ops.philox_uniform(seed, counter, index=index, dtype=torch.float64)
        counter.add_(x.shape[0])
        return x + u, v

    x, index = torch.randn(1000), torch.randint(0, 2**62, (9,))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = [compiled(x, index) for _ in range(2)]
    assert counter.item() == 2**40 + 2000
    counter.fill_(2**40)
    expected = [f(x, index) for _ in range(2)]
    for (a, b), (c, d) in zip(got, expected):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert not torch.equal(got[0][0], got[1][0])  # the in-place counter advanced between calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="sync detection and CUDA graphs need a CUDA device")
def test_cuda_draws_are_sync_free_and_graph_replayable():
    seed, counter = torch.tensor(7, device="cuda"), torch.tensor(2**32 - 10, device="cuda")
    index = torch.randint(0, 2**62, (5000,), device="cuda")
    gd, J = GradDrop(seed=3), torch.randn(8, 100_003, device="cuda")

    def step():
        u = ops.philox_uniform(seed, counter, 100_003)
        v = ops.philox_uniform(seed, counter, index=index, dtype=torch.float64)
        counter.add_(100_003)
        return u, v, gd(J)

    step()  # compile the kernels first: compilation may synchronise
    torch.cuda.synchronize()
    counter.fill_(2**32 - 10)
    gd.reset()
    with host_sync_raises():
        u, v, _ = step()
    ref = loop_uniform(7, [2**32 - 10 + i for i in range(100_003)], torch.float32)
    assert torch.equal(u.cpu(), ref)
    assert torch.equal(v.cpu(), loop_uniform(7, [2**32 - 10 + i for i in index.tolist()], torch.float64))
    # Captured once, each replay reads the counter the previous replay advanced.
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        u_g, _, _ = step()
    counter.fill_(2**32 - 10)
    graph.replay()
    first = u_g.clone()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(first.cpu(), ref)
    assert torch.equal(u_g.cpu(), loop_uniform(7, [2**32 - 10 + 100_003 + i for i in range(100_003)], torch.float32))


# --- the seeded aggregators -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_seeded_mixin_draws_what_it_drew_before_the_op(dtype):
    # The pre-op implementation: philox4x32 at counter + arange(n), (r0 >> 8).to(dtype) * 2**-24.
    def previous(seed, positions):
        return (philox4x32(positions, torch.tensor(seed))[0] >> 8).to(dtype) * 2.0**-24

    agg = PCGrad(seed=2**62 + 9)
    a = agg._uniform(1001, torch.device("cpu"), dtype)
    assert a.dtype == dtype and torch.equal(a, previous(2**62 + 9, torch.arange(1001)))
    stream = agg._counters["cpu"]
    assert stream.item() == 1001
    index = torch.randint(0, 5000, (77,))
    b = agg._uniform_at(index, 5000, dtype)
    assert torch.equal(b, previous(2**62 + 9, index + 1001))
    assert agg._counters["cpu"] is stream and stream.item() == 6001  # advanced in place
    # A shard of a draw gives the same numbers as the whole draw at its positions.
    state = agg.state_dict()
    whole = agg._uniform(5000, torch.device("cpu"), dtype)
    agg.load_state_dict(state)
    assert torch.equal(agg._uniform_at(index, 5000, dtype), whole[index])


def previous_graddrop(J, draws, leak=None, f=lambda p: p, block=1 << 15):
    """GradDrop's block loop before this op (boolean masks, 32768-column blocks), as the oracle of
    the rewritten one."""
    P = J.shape[1]
    acc = torch.float64 if J.dtype == torch.float64 else torch.float32
    out = torch.empty(P, dtype=J.dtype)
    lk = None if leak is None else torch.as_tensor(leak, dtype=torch.float64).to(acc).unsqueeze(1)
    for start in range(0, P, block):
        Jb = J[:, start:start + block].to(acc)
        s = Jb.sum(0)
        a = Jb.abs().sum(0)
        purity = 0.5 * (1.0 + s / torch.where(a > 0, a, torch.ones_like(a)))
        fP = f(purity)
        U = draws[start:start + block]
        keep = ((fP > U) & (Jb > 0)) | ((fP < U) & (Jb < 0))
        r = (Jb * keep).sum(0) if lk is None else ((lk + (1 - lk) * keep) * Jb).sum(0)
        out[start:start + block] = r
    return out


def _bits(x):
    return x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


@pytest.mark.parametrize("K,P", [(1, 70), (5, 300), (8, 70_001), (64, 20_000), (3, 100_003)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_graddrop_is_bitwise_the_previous_block_loop(K, P, dtype):
    J = torch.randn(K, P, dtype=torch.float64)
    J[J.abs() < 0.3] = 0.0  # exact zeros, and columns of them
    J[:, 10:20] = 0.0
    J[0, 20:30] = -0.0
    if P > 100:
        J[-1, 40], J[0, 41], J[-1, 42] = float("inf"), float("-inf"), float("nan")
    J = J.to(dtype)
    leak = torch.linspace(0, 1, K, dtype=torch.float64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    flip = lambda p: torch.where(p > 0.5, 1.5, -0.5).to(p.dtype)  # noqa: E731
    # The stream: packed, word p % 4 of the Philox block p // 4.
    pos = torch.arange(P)
    words = torch.stack(philox4x32(pos >> 2, torch.tensor(21)), -1)
    draws = (words.gather(-1, (pos & 3)[:, None])[:, 0] >> 8).to(acc) * 2.0**-24
    for lk in (None, leak):
        for f in (lambda p: p, flip):
            ref = previous_graddrop(J, draws, lk, f)
            for block in (None, 64 if P < 1000 else 1024):  # any power-of-two width >= 64
                out = GradDrop(f=f, leak=lk, seed=21, block=block)(J)
                assert torch.equal(_bits(out), _bits(ref)), (lk is None, block)
            # A shard: the draws of the whole matrix at its columns.
            cols = torch.randperm(P)[: P // 2 + 1]
            out = GradDrop(f=f, leak=lk, seed=21)(J[:, cols], cols, P)
            assert torch.equal(_bits(out), _bits(previous_graddrop(J[:, cols], draws[cols], lk, f)))
