"""Shared test set-up.

Triton kernels run on CPU tensors under TRITON_INTERPRET=1, which must be set before triton is
imported; without a GPU the suite sets it so every Triton kernel is exercised here too.
"""

import contextlib
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mmgrad import ops  # noqa: E402  (after TRITON_INTERPRET is set)

# `make test` sets MMGRAD_REQUIRE_CPP=1: a missing C++ extension is then a failure, not a skip.
REQUIRE_CPP = os.environ.get("MMGRAD_REQUIRE_CPP") == "1"


def _missing_kernel(device: str, backend: str, op) -> str | None:
    """Why ``backend`` cannot run ``op`` on a usable ``device``, or None (some ops have no kernel in
    every backend: the policy then picks another one)."""
    if op is None:
        return None
    impl = ops._implementation(torch.device(device), backend)
    return None if hasattr(impl, op) else f"the {backend} backend has no {op} kernel"


def backend_cases(op: str | None = None) -> list:
    """(device, backend) pairs to test, each a pytest param skipped with its reason if unusable:
    every CPU backend here, and Triton / the reference on CUDA tensors when a GPU is present.
    With ``op``, backends without a kernel for that op are skipped too."""
    params = []
    for name, why in ops.available_backends("cpu").items():
        if name == "cuda":
            continue  # CUDA tensors only, below
        if why is not None and name == "cpp" and REQUIRE_CPP:
            raise RuntimeError(f"MMGRAD_REQUIRE_CPP=1 but the C++ backend is unavailable: {why}")
        why = why or _missing_kernel("cpu", name, op)
        marks = [pytest.mark.skip(reason=why)] if why is not None else []
        params.append(pytest.param(("cpu", name), marks=marks, id=f"cpu-{name}"))
    for name in ("triton", "cuda", "reference"):
        why = "no CUDA device" if not torch.cuda.is_available() else ops.available_backends("cuda")[name]
        why = why or _missing_kernel("cuda", name, op)
        marks = [pytest.mark.skip(reason=why)] if why is not None else []
        params.append(pytest.param(("cuda", name), marks=marks, id=f"cuda-{name}"))
    return params


def random_segments(N, sizes, gen, device, gap_max=40):
    """(offsets, numels) on ``device`` of disjoint segments of the given sizes inside N elements, at
    random (mostly unaligned) offsets with gaps of up to ``gap_max``, listed in shuffled order."""
    offs, pos = [], 0
    for n in sizes:
        pos += int(torch.randint(0, gap_max + 1, (1,), generator=gen))
        offs.append(pos)
        pos += n
    assert pos <= N
    perm = torch.randperm(len(sizes), generator=gen)
    offsets = torch.tensor(offs, dtype=torch.int64)[perm]
    numels = torch.tensor(sizes, dtype=torch.int64)[perm]
    return offsets.to(device), numels.to(device)


@contextlib.contextmanager
def host_sync_raises():
    """Run the block with ``torch.cuda.set_sync_debug_mode("error")``: any host synchronisation
    inside it raises. Synchronises first, so that earlier work (warm-up, compilation) is not
    blamed; restores the previous mode on the way out."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def random_gram(K: int, kind: str, scale: float, gen: torch.Generator) -> torch.Tensor:
    """A float64 K x K Gram matrix of K random rows of ``kind`` ("full", "low_rank", "zero_rows",
    "duplicates", "near_parallel", or "float32_gram": what the aggregators see, ``ops.gram`` of the
    rows in float32, slightly indefinite), times ``scale``; exactly symmetric (a float64 matmul is
    symmetric only to rounding, ``ops.gram``'s output is exactly)."""
    P = 4 * K + 3
    rank = max(1, K // 3) if kind == "low_rank" else K
    J = torch.randn(K, rank, generator=gen, dtype=torch.float64) @ torch.randn(rank, P, generator=gen, dtype=torch.float64)
    if kind == "zero_rows":
        J[::3] = 0
    elif kind == "duplicates" and K > 1:
        J[1::2] = J[0::2][: K // 2]
    elif kind == "near_parallel" and K > 1:
        J[1:] = J[0] + 1e-6 * J[1:]
    if kind == "float32_gram":
        return ops.gram(J.float()).to(torch.float64) * scale
    G = J @ J.T
    return (G + G.T) / 2 * scale


def triton_device() -> str:
    """The device the Triton tests run on: ``"cuda"`` with a GPU, else ``"cpu"`` (Triton's
    interpreter). Skips the calling test module when triton is missing, or when it was imported
    before TRITON_INTERPRET=1 could be set (no GPU then leaves nothing to run the kernels on)."""
    triton = pytest.importorskip("triton", reason="triton is not installed")
    interpret = triton.knobs.runtime.interpret
    if torch.cuda.is_available() and not interpret:
        return "cuda"
    if not interpret:
        pytest.skip("no CUDA, and triton was imported before TRITON_INTERPRET=1 could be set",
                    allow_module_level=True)
    return "cpu"


def solver_tol(kind: str, regularised: bool) -> float:
    """Relative agreement to expect between two backends' QP solvers (same iteration, different
    factorisations). The regularised (+1e-4 I) dual-cone faces have condition number <= ~1e4.
    Without that, faces of a rank-deficient G (low rank, duplicate or near-parallel rows) are
    singular up to the 1e-12 ridge (condition ~1e12): two backward-stable solves of the same
    system then agree to ~1e-4 only. (Zero rows are singular too, but decoupled: their 1 / ridge
    entries are exact.)"""
    if regularised or kind not in ("low_rank", "duplicates", "near_parallel"):
        return 1e-12
    return 1e-3


def assert_rows_close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """Every row of ``got`` within ``rtol`` x (largest entry of that row of ``want``)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    want2, got2 = want.reshape(-1, want.shape[-1]), got.reshape(-1, got.shape[-1])
    scale = want2.abs().amax(dim=1, keepdim=True)
    err = (got2 - want2).abs()
    assert torch.isfinite(got2).all() and (err <= rtol * scale).all(), (err / scale).max()


def cagrad_inputs(Gn: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(b, s)`` of the CAGrad dual for the normalised Gram ``Gn``: ``b = Gn u``,
    ``s = c |g_0|`` with ``u`` uniform."""
    u = torch.full((Gn.shape[0],), 1.0 / Gn.shape[0], dtype=Gn.dtype, device=Gn.device)
    b = Gn @ u
    return b, c * (u @ b).clamp(min=0).sqrt()


@pytest.fixture
def gen(request):
    """A generator seeded from the test's id: each test draws its own reproducible inputs;
    MMGRAD_TEST_SEED=<n> shifts every seed to draw fresh ones."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("MMGRAD_TEST_SEED", "0")))
    return g


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny tensors gain nothing from more, and on a busy shared
    machine waking a descheduled OpenMP worker can stretch a call from microseconds to seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
