"""Every GPU benchmark in one call, as one compact table (also runs on CPU to check its logic).

For each backend usable on the device (CUDA: ``triton`` and ``cuda`` (CUDA C++); CPU: ``cpp``; the
Triton interpreter is never timed) and for plain torch doing the same work, it times

* the copy bandwidth, measured in the same run: ``dst.copy_(src)`` of the largest J (bytes read +
  written / time), the 100 % reference of the "% of copy" column;
* ``gram`` and ``combine`` on a (K, P) fp32 J for every K in ``--K``, against ``J @ J.T`` and
  ``w @ J``;
* the segment ops on two ResNet-18-sized gradient sets (124 tensors, 22.4M values):
  ``segment_moments``, ``segment_scale_`` without and with noise, the whole OGM-GE edit (moments +
  std + scale + noise), ``segment_lerp_``, and MMPareto's K = 2 edit ``segment_gram`` /
  ``segment_combine_``, against per-tensor loops over views of the same buffer;
* one training step of the two-encoder model of ``bench_step.py`` with OGM-GE and with MMPareto
  (whole step and gradient edit alone), against the reference-style step and plain training;
* ``mmgrad.aggregate(J, name)`` for every aggregator against torchjd 0.18 on the same J (when
  torchjd is importable).

GB/s = bytes the op must move / time: gram reads K*P values, combine reads K*P and writes P, the
segment ops their reads and writes (moments 1 pass, scale 2, OGM-GE edit 3, lerp 3, segment_gram
K passes, segment_combine_ K + 1), an aggregator the two passes of "Gram, solve, combine"
((2K + 1) P values; GradDrop, elementwise, (K + 1) P); steps have none. "vs peer" = the peer's
time / this row's time (> 1: faster than the peer); the peers are plain torch (ops), torchjd
(aggregators) and the reference-style implementation (steps). On CPU a row can pass 100 % of copy:
the copy writes a fresh buffer (its lines are read before they are written, traffic the GB/s do not
count), in-place ops do not, and small buffers stay in cache.

Progress goes to stderr row by row (a run killed by a timeout still shows what it measured); the
report goes to stdout and, with ``--out FILE``, is appended to FILE.

    python benchmarks/bench_gpu.py --device cuda --seconds 240 --out results_gpu.md
    python benchmarks/bench_gpu.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import math
import os
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_step  # noqa: E402
from bench_aggregators import timeit as timeit_with_budget  # noqa: E402
from bench_aggregators import torchjd_aggregator  # noqa: E402
from common import (  # noqa: E402
    best_time, emit_report, machine_description, markdown_table, median_time, resnet18_shapes,
)

import mmgrad  # noqa: E402
from mmgrad import ops  # noqa: E402

HEADER = ["what", "backend", "K", "P", "ms", "GB/s", "% of copy", "vs peer"]
ELT = 4  # bytes per fp32 value


@contextlib.contextmanager
def forced_backend(name: str):
    """Route every mmgrad op to backend ``name`` inside the block (ops and the code that calls them
    without a ``backend=`` argument: aggregators, the optimizer), via ``MMGRAD_BACKEND``."""
    old = os.environ.get("MMGRAD_BACKEND")
    os.environ["MMGRAD_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["MMGRAD_BACKEND"]
        else:
            os.environ["MMGRAD_BACKEND"] = old


def usable_backends(device: torch.device, requested: list[str] | None = None) -> tuple[list[str], list[str]]:
    """The backends to time on ``device`` and notes on those left out (with the reason)."""
    wanted = requested or (["triton", "cuda"] if device.type == "cuda" else ["cpp"])
    reasons = ops.available_backends(device)
    usable, notes = [], []
    for b in wanted:
        if b not in reasons:
            raise SystemExit(f"unknown backend {b!r}; choose from {', '.join(reasons)}")
        if b == "triton" and device.type == "cpu":
            notes.append("triton not timed on CPU (the Triton interpreter is a test tool, not a backend to time)")
        elif reasons[b] is not None:
            notes.append(f"{b} not timed: {reasons[b]}")
        else:
            usable.append(b)
    if not usable:
        usable = ["reference"]
        notes.append("no requested backend is usable here: timing the reference backend instead")
    return usable, notes


def fmt_count(n: int) -> str:
    """A value count in units of M = 2**20 (exact powers of two print without decimals)."""
    return f"{n / 2**20:.3g}M" if n >= 2**16 else str(n)


class Bench:
    """Collects the table rows, the copy bandwidth they refer to and the notes, and runs each
    measurement as a job that is skipped once the time budget is spent (or noted if it fails)."""

    def __init__(self, device: torch.device, seconds: float | None):
        self.device = device
        self.seconds = seconds
        self.start = time.perf_counter()
        self.rows: list[list[object]] = []
        self.notes: list[str] = []
        self.skipped: list[str] = []
        self.failed: list[str] = []
        self.copy_gbs: float | None = None

    def add(self, what, backend, K, P, t, nbytes=None, peer_t=None) -> None:
        """One row: ``t`` seconds; ``nbytes`` the bytes the op must move (None: no GB/s);
        ``peer_t`` the peer's seconds for the "vs peer" column."""
        gbs = nbytes / t / 1e9 if nbytes is not None else None
        pct = 100 * gbs / self.copy_gbs if gbs is not None and self.copy_gbs else None
        row = [what, backend, "" if K is None else K, fmt_count(P), 1e3 * t,
               "" if gbs is None else gbs, "" if pct is None else pct,
               "" if peer_t is None else peer_t / t]
        self.rows.append(row)
        print(markdown_table(HEADER, [row]).splitlines()[-1], file=sys.stderr, flush=True)

    def job(self, label: str, fn) -> None:
        elapsed = time.perf_counter() - self.start
        if self.seconds is not None and elapsed > self.seconds:
            self.skipped.append(label)
            return
        try:
            fn()
        except Exception as exc:  # one failing row (a GPU out of memory) must not lose the others
            traceback.print_exc()
            self.failed.append(f"{label}: {type(exc).__name__}: {exc}")
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


# --- sections ----------------------------------------------------------------------------------


def copy_time(src: torch.Tensor, repeat: int) -> float:
    """Fastest ``dst.copy_(src)`` into a fresh buffer (freed on return): the peak the rows refer to."""
    dst = torch.empty_like(src)
    return best_time(lambda: dst.copy_(src), src.device, repeat=repeat)


def bench_copy_gram_combine(bench: Bench, backends, P: int, Ks: list[int], repeat: int) -> None:
    dev = bench.device
    # One J of the largest K; the smaller K use its first rows (contiguous views).
    J_all = torch.randn(max(Ks), P, device=dev)
    nbytes = J_all.numel() * ELT
    t = copy_time(J_all, repeat)
    bench.copy_gbs = 2 * nbytes / t / 1e9  # bytes read + written
    bench.add("copy dst.copy_(src)", "torch", max(Ks), P, t, 2 * nbytes)

    def gram(K):
        J = J_all[:K]
        t_mm = median_time(lambda: J @ J.T, dev, repeat=repeat)
        bench.add("gram", "torch J @ J.T", K, P, t_mm, K * P * ELT)
        for b in backends:
            t = median_time(lambda b=b: ops.gram(J, backend=b), dev, repeat=repeat)
            bench.add("gram", b, K, P, t, K * P * ELT, t_mm)

    def combine(K):
        J = J_all[:K]
        w = torch.randn(K, device=dev)
        t_wj = median_time(lambda: w @ J, dev, repeat=repeat)
        bench.add("combine", "torch w @ J", K, P, t_wj, (K + 1) * P * ELT)
        for b in backends:
            t = median_time(lambda b=b: ops.combine(J, w, backend=b), dev, repeat=repeat)
            bench.add("combine", b, K, P, t, (K + 1) * P * ELT, t_wj)

    for K in Ks:
        bench.job(f"gram K={K}", lambda K=K: gram(K))
    for K in Ks:
        bench.job(f"combine K={K}", lambda K=K: combine(K))


def bench_segments(bench: Bench, backends, numels: list[int], repeat: int) -> None:
    dev = bench.device
    S, N = len(numels), sum(numels)
    offsets, counts = ops.table(numels, dev)
    starts = offsets.tolist()
    x = torch.randn(N, device=dev)
    y = torch.randn(N, device=dev)
    J = torch.randn(2, N, device=dev)
    out = torch.empty(N, device=dev)
    xs = [x[o:o + n] for o, n in zip(starts, numels)]
    ys = [y[o:o + n] for o, n in zip(starts, numels)]
    Js = [J[:, o:o + n] for o, n in zip(starts, numels)]
    outs = [out[o:o + n] for o, n in zip(starts, numels)]
    # Scales just under 1 keep repeated in-place calls away from denormals.
    scale = torch.full((S,), 0.99, device=dev)
    std = ops.segment_std(ops.segment_moments(x, offsets, counts), counts)
    std_list = std.tolist()
    seed = torch.tensor([1], dtype=torch.int64, device=dev)
    seg_w = torch.rand(S, 2, device=dev)
    lerp_w = 0.1

    def ogm_ge_edit(b):
        m = ops.segment_moments(x, offsets, counts, backend=b)
        ops.segment_scale_(x, offsets, counts, scale, ops.segment_std(m, counts), seed, backend=b)

    def plain_ogm_ge_edit():
        for g in xs:
            g.mul_(0.99).add_(torch.randn_like(g) * g.std())

    cases = [
        # what, bytes moved, mmgrad call on backend b, plain torch doing the same work
        ("segment_moments", N * ELT,
         lambda b: ops.segment_moments(x, offsets, counts, backend=b),
         lambda: [(g.sum(), torch.dot(g, g)) for g in xs]),
        ("segment_scale_", 2 * N * ELT,
         lambda b: ops.segment_scale_(x, offsets, counts, scale, backend=b),
         lambda: [g.mul_(0.99) for g in xs]),
        ("segment_scale_ + noise", 2 * N * ELT,
         lambda b: ops.segment_scale_(x, offsets, counts, scale, std, seed, backend=b),
         lambda: [g.mul_(0.99).add_(torch.randn_like(g), alpha=s) for g, s in zip(xs, std_list)]),
        ("OGM-GE edit (moments, std, scale, noise)", 3 * N * ELT, ogm_ge_edit, plain_ogm_ge_edit),
        ("segment_lerp_", 3 * N * ELT,
         lambda b: ops.segment_lerp_(x, y, offsets, counts, lerp_w, backend=b),
         lambda: [g.lerp_(h, lerp_w) for g, h in zip(xs, ys)]),
        ("segment_gram (MMPareto)", 2 * N * ELT,
         lambda b: ops.segment_gram(J, offsets, counts, backend=b),
         lambda: [j @ j.T for j in Js]),
        ("segment_combine_ (MMPareto)", 3 * N * ELT,
         lambda b: ops.segment_combine_(out, J, offsets, counts, seg_w, backend=b),
         lambda: [torch.mv(Js[s].T, seg_w[s], out=outs[s]) for s in range(S)]),
    ]

    def one(what, nbytes, fused, plain):
        K = 2 if "MMPareto" in what else None
        t_plain = median_time(plain, dev, repeat=repeat)
        bench.add(what, "torch per-tensor loop", K, N, t_plain, nbytes)
        for b in backends:
            t = median_time(lambda b=b: fused(b), dev, repeat=repeat)
            bench.add(what, b, K, N, t, nbytes, t_plain)

    for case in cases:
        bench.job(case[0], lambda case=case: one(*case))


def bench_steps(bench: Bench, backends, batch: int, size: int, repeat: int) -> None:
    dev = bench.device
    setup = {}

    def ensure_setup():
        # Built by the first step job that runs (none when the budget is spent before).
        if not setup:
            model, a, v, y = bench_step.make_inputs(dev, batch, size)
            setup["steps"] = bench_step.step_functions(model, a, v, y)
            setup["P"] = sum(p.numel() for p in model.parameters())
            _, setup["t_sgd"] = bench_step.timed(setup["steps"]["sgd_step_only"], dev, repeat)
            bench.notes.append(
                f"Steps: two ResNet-18 encoders, batch {batch} of {size}x{size}; plain = one backward of the "
                f"loss(es) the method uses; edit = mmgrad's timed step minus the SGD step alone "
                f"({1e3 * setup['t_sgd']:.2f} ms)."
            )
        return setup["steps"], setup["P"], setup["t_sgd"]

    def method(label, plain_name, ref_name, mm_name):
        steps, P, t_sgd = ensure_setup()
        t_plain, _ = bench_step.timed(steps[plain_name], dev, repeat)
        bench.add(f"{label} step", "plain torch (no edit)", None, P, t_plain)
        t_ref, e_ref = bench_step.timed(steps[ref_name], dev, repeat)
        bench.add(f"{label} step", "reference-style", None, P, t_ref)
        edits = []
        for b in backends:
            with forced_backend(b):
                t_mm, e_mm = bench_step.timed(steps[mm_name], dev, repeat)
            bench.add(f"{label} step", b, None, P, t_mm, peer_t=t_ref)
            bench.notes.append(f"{label} step, {b}: {t_mm / t_plain:.2f}x the plain step.")
            edits.append((b, e_mm - t_sgd))  # mmgrad's timed part includes the SGD step
        bench.add(f"{label} edit", "reference-style", None, P, e_ref)
        for b, e in edits:
            if e > 0:
                bench.add(f"{label} edit", b, None, P, e, peer_t=e_ref)
            else:
                bench.notes.append(f"{label} edit, {b}: below the timing noise of the SGD step (no row).")

    bench.job("OGM-GE step", lambda: method("OGM-GE", "plain", "reference_ogm_ge", "mmgrad_ogm_ge"))
    bench.job("MMPareto step", lambda: method("MMPareto", "plain_three_losses", "reference_mmpareto", "mmgrad_mmpareto"))


def bench_aggregators(bench: Bench, backends, P: int, Ks: list[int], methods: list[str], repeat: int,
                      use_torchjd: bool, peer_budget: float) -> None:
    dev = bench.device
    if use_torchjd:
        try:
            import torchjd.aggregation  # noqa: F401
            bench.notes.append(f"Aggregator peer: torchjd {importlib.metadata.version('torchjd')}.")
        except ImportError as exc:
            use_torchjd = False
            bench.notes.append(f"torchjd is not importable ({exc}): aggregator rows have no peer.")
    no_peer = []
    speedups: dict[str, list] = {}  # backend -> [(torchjd time / mmgrad time, which)]

    def one(J, name):
        K = J.shape[0]
        agg = mmgrad.aggregators.get(name)
        nbytes = ((2 * K + 1) if agg.gramian_based else (K + 1)) * P * ELT
        t_jd = None
        tj = torchjd_aggregator(name, K) if use_torchjd else None
        if tj is not None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t_jd = timeit_with_budget(lambda: tj(J), repeat, dev, peer_budget)
                bench.add(f"aggregate {name}", "torchjd", K, P, t_jd, nbytes)
            except Exception as exc:  # a failing peer is reported, the mmgrad rows still run
                no_peer.append(f"{name} (K={K}: torchjd raised {type(exc).__name__}: {exc})")
        elif use_torchjd:
            no_peer.append(f"{name} (K={K})")
        for b in backends:
            with forced_backend(b):
                t = median_time(lambda: mmgrad.aggregate(J, name), dev, repeat=repeat)
            bench.add(f"aggregate {name}", b, K, P, t, nbytes, t_jd)
            if t_jd is not None:
                speedups.setdefault(b, []).append((t_jd / t, f"{name} K={K}"))

    current: dict[int, torch.Tensor] = {}  # the J of the K being timed, drawn by its first job that runs

    def matrix(K):
        if K not in current:
            current.clear()  # frees the previous K's J first
            current[K] = torch.randn(K, P, device=dev)
        return current[K]

    for K in Ks:
        for name in methods:
            bench.job(f"aggregate {name} K={K}", lambda K=K, name=name: one(matrix(K), name))
    current.clear()
    if no_peer:
        bench.notes.append("No torchjd time for: " + ", ".join(no_peer) + ".")
    for b, ratios in speedups.items():
        ratios.sort()
        bench.notes.append(
            f"Aggregators, {b} vs torchjd: slowest {ratios[0][0]:.2f}x ({ratios[0][1]}), "
            f"median {ratios[len(ratios) // 2][0]:.2f}x, fastest {ratios[-1][0]:.2f}x ({ratios[-1][1]})."
        )


# --- main --------------------------------------------------------------------------------------


def parse_args(argv=None):
    count = lambda s: int(float(s))  # noqa: E731  (accepts 64e6 or 67108864)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", nargs="+", default=None,
                    help="backends to time (default: triton and cuda on CUDA, cpp on CPU)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (checks the script)")
    ap.add_argument("--P", type=count, default=None, help="columns of J for gram/combine (default 64M on CUDA, 4M on CPU)")
    ap.add_argument("--K", type=int, nargs="+", default=None, help="rows of J for gram/combine (default 2 4 8 16 64)")
    ap.add_argument("--agg-P", type=count, default=None, help="columns of J for the aggregators (default 16M on CUDA, 1M on CPU)")
    ap.add_argument("--agg-K", type=int, nargs="+", default=None, help="rows of J for the aggregators (default 2 8 64 on CUDA, 2 8 on CPU)")
    ap.add_argument("--methods", nargs="+", default=list(mmgrad.aggregators.NAMES))
    ap.add_argument("--batch", type=int, default=None, help="step batch (default 64 on CUDA, 8 on CPU)")
    ap.add_argument("--size", type=int, default=None, help="step input height and width (default 112 on CUDA, 64 on CPU)")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per op (median; default 7)")
    ap.add_argument("--step-repeat", type=int, default=None, help="timed runs per training step (default 5)")
    ap.add_argument("--no-torchjd", action="store_true")
    ap.add_argument("--peer-budget", type=float, default=10.0, help="seconds after which a torchjd cell stops repeating")
    ap.add_argument("--seconds", type=float, default=None,
                    help="overall budget: rows not started when it is spent are skipped with a note")
    ap.add_argument("--out", default=None, help="append the markdown report to this file")
    args = ap.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    quick = args.quick
    defaults = {
        "P": 2**16 if quick else (64 * 2**20 if cuda else 4 * 2**20),
        "K": [2, 8] if quick else [2, 4, 8, 16, 64],
        "agg_P": 2**14 if quick else (16 * 2**20 if cuda else 2**20),
        "agg_K": [2, 8] if quick or not cuda else [2, 8, 64],
        "batch": 2 if quick else (64 if cuda else 8),
        "size": 16 if quick else (112 if cuda else 64),
        "repeat": 3 if quick else 7,
        "step_repeat": 1 if quick else 5,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    backends, backend_notes = usable_backends(device, args.backends)
    bench = Bench(device, args.seconds)
    bench.notes += backend_notes
    # Two ResNet-18-sized gradient sets; --quick shrinks every tensor 256-fold (still 124 segments,
    # each of at least 2 values so that the per-tensor std of the plain edit is defined).
    numels = [math.prod(s) for s in resnet18_shapes()] * 2
    if args.quick:
        numels = [max(2, n // 256) for n in numels]

    print("| " + " | ".join(HEADER) + " |", file=sys.stderr, flush=True)
    bench_copy_gram_combine(bench, backends, args.P, args.K, args.repeat)
    bench_segments(bench, backends, numels, args.repeat)
    bench_steps(bench, backends, args.batch, args.size, args.step_repeat)
    bench_aggregators(bench, backends, args.agg_P, args.agg_K, args.methods, args.repeat,
                      not args.no_torchjd, args.peer_budget)
    total = time.perf_counter() - bench.start

    command = "python benchmarks/bench_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"## One-call benchmark, {machine_description(device)}, backends {', '.join(f'`{b}`' for b in backends)}",
        "",
        f"mmgrad {mmgrad.__version__}; `{command.strip()}`; fp32; median of {args.repeat} runs per op, "
        f"{args.step_repeat} per step; total {total:.0f} s. Copy bandwidth (read + write) measured in this run: "
        f"{bench.copy_gbs:.1f} GB/s = 100 %. GB/s = bytes the op must move / time; "
        "vs peer = the peer's time / this row's time (peers: plain torch for the ops, torchjd for the "
        "aggregators, the reference-style step); M = 2^20 values.",
        "",
        markdown_table(HEADER, bench.rows),
        "",
    ]
    lines += [f"* {n}" for n in bench.notes]
    if bench.skipped:
        lines.append(f"* Skipped once the {args.seconds:g} s budget was spent: {', '.join(bench.skipped)}.")
    lines += [f"* FAILED {f}" for f in bench.failed]
    text = "\n".join(lines) + "\n"
    emit_report(text, args.out)
    return text


if __name__ == "__main__":
    main()
