"""Aggregator benchmark: mmgrad vs torchjd 0.18 vs a LibMTL-style implementation, same J, one run.

For every K in --K and P in --P (fp32 J of shape (K, P)) it times

* ``floor``: two ``J.sum()`` calls (two passes over J: the memory floor of "Gram, combine"),
  timed alternately with each method's mmgrad calls; mmgrad/floor is the median of the per-pair
  ratios (the machine's bandwidth drifts);
* ``mmgrad``: ``mmgrad.aggregators.aggregate(J, name)`` (gram + solve + combine);
* ``solver``: ``get(name).weights(G)`` alone on the K x K Gram matrix;
* ``torchjd``: the torchjd 0.18 aggregator on the same J (when installed);
* ``libmtl``: the LibMTL way, written here: per-task gradients as a list of per-parameter
  tensors, ``torch.cat`` to flatten, Python loops over tasks (and for PCGrad over task pairs on
  full vectors), weights with ``.item()``-driven host solvers, then the result split back into
  per-parameter tensors (mean, mgda, pcgrad, imtl_g).

then the two kernels alone (``ops.gram``, ``ops.combine``) against one ``J.sum()``, and
``weights(G)`` alone on rank-deficient Grams (the solvers' hard case: nearly singular faces), and
prints markdown tables of median times and the ratios mmgrad/floor and torchjd/mmgrad
(``--out FILE`` appends it to FILE). Times are medians of ``--repeat`` runs after one warm-up.

    python benchmarks/bench_aggregators.py --quick
    python benchmarks/bench_aggregators.py --out benchmarks/results/aggregators_cpu.md
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
import warnings

import torch

import mmgrad.aggregators as A
from mmgrad import ops


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, repeat, dev, budget_s=None):
    fn()
    _sync(dev)
    ts = []
    t_start = time.perf_counter()
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        ts.append(time.perf_counter() - t0)
        if budget_s is not None and time.perf_counter() - t_start > budget_s:
            break
    return statistics.median(ts)


def timeit_against_floor(fn, floor_fn, repeat, dev):
    """Times ``floor_fn`` and ``fn`` alternately, ``repeat`` pairs after one warm-up pair: on a
    shared machine the memory bandwidth drifts by up to 2x within minutes, so the floor is taken
    beside each measurement it divides. Returns (median floor, median fn, median of the per-pair
    ratios fn / floor)."""
    floor_ts, ts = [], []
    for i in range(repeat + 1):
        for f, out in ((floor_fn, floor_ts), (fn, ts)):
            _sync(dev)
            t0 = time.perf_counter()
            f()
            _sync(dev)
            if i:
                out.append(time.perf_counter() - t0)
    ratios = [t / f for t, f in zip(ts, floor_ts)]
    return statistics.median(floor_ts), statistics.median(ts), statistics.median(ratios)


# ----------------------------------------------------------------------------- torchjd
def torchjd_aggregator(name, K):
    try:
        import torchjd.aggregation as T
    except ImportError:
        return None
    ctors = {
        "mean": T.Mean, "sum": T.Sum, "mgda": T.MGDA, "pcgrad": T.PCGrad,
        "cagrad": lambda: T.CAGrad(c=0.5), "imtl_g": T.IMTLG, "nash_mtl": lambda: T.NashMTL(K),
        "aligned_mtl": T.AlignedMTL, "upgrad": T.UPGrad, "dualproj": T.DualProj,
        "gradvac": T.GradVac, "config": T.ConFIG, "graddrop": T.GradDrop,
    }
    try:
        return ctors[name]()
    except Exception:
        return None


# ----------------------------------------------------------------------------- LibMTL style
def split_params(P, n=64):
    """Sizes of ~n parameter tensors adding up to P (a few big weights, many small vectors)."""
    big = max(1, n // 4)
    sizes = [P // (2 * big)] * big
    rest = P - sum(sizes)
    small = n - big
    sizes += [rest // small] * (small - 1)
    sizes.append(P - sum(sizes))
    return sizes


def libmtl_grads(J, sizes):
    return [list(torch.split(J[k], sizes)) for k in range(J.shape[0])]


def _libmtl_flat(per_task):
    return torch.stack([torch.cat([g.reshape(-1) for g in grads]) for grads in per_task])


def _libmtl_writeback(new, sizes):
    return [t.clone() for t in torch.split(new, sizes)]


def libmtl_mean(per_task, sizes):
    grads = _libmtl_flat(per_task)
    return _libmtl_writeback(grads.mean(0), sizes)


def libmtl_mgda(per_task, sizes):
    grads = _libmtl_flat(per_task)
    K = grads.shape[0]
    G = (grads @ grads.T).cpu()
    sol = [1.0 / K] * K  # Frank-Wolfe on the host, .item() per iteration (MinNormSolver style)
    for _ in range(250):
        Gs = [sum(G[i, j].item() * sol[j] for j in range(K)) for i in range(K)]
        t = min(range(K), key=lambda i: Gs[i])
        a = Gs[t]
        b = sum(sol[i] * Gs[i] for i in range(K))
        c = G[t, t].item()
        gamma = 1.0 if c <= a else (0.0 if b <= a else (b - a) / (b + c - 2 * a))
        new = [(1 - gamma) * s for s in sol]
        new[t] += gamma
        if sum(abs(x - y) for x, y in zip(new, sol)) < 1e-5:
            sol = new
            break
        sol = new
    w = torch.tensor(sol, dtype=grads.dtype, device=grads.device)
    return _libmtl_writeback(w @ grads, sizes)


def libmtl_pcgrad(per_task, sizes):
    grads = _libmtl_flat(per_task)
    K = grads.shape[0]
    pc = grads.clone()
    for i in range(K):
        order = torch.randperm(K).tolist()
        for j in order:
            if j == i:
                continue
            gij = torch.dot(pc[i], grads[j])
            if gij < 0:
                pc[i] -= gij * grads[j] / (grads[j].norm().pow(2))
    return _libmtl_writeback(pc.sum(0), sizes)


def libmtl_imtl_g(per_task, sizes):
    grads = _libmtl_flat(per_task)
    K = grads.shape[0]
    unit = grads / grads.norm(dim=1, keepdim=True)
    D = grads[0:1].repeat(K - 1, 1) - grads[1:]
    U = unit[0:1].repeat(K - 1, 1) - unit[1:]
    alpha = torch.matmul(torch.matmul(grads[0], U.t()), torch.inverse(torch.matmul(D, U.t())))
    alpha = torch.cat((1 - alpha.sum().unsqueeze(0), alpha), dim=0)
    return _libmtl_writeback(alpha @ grads, sizes)


LIBMTL = {"mean": libmtl_mean, "mgda": libmtl_mgda, "pcgrad": libmtl_pcgrad,
          "imtl_g": libmtl_imtl_g}


# ----------------------------------------------------------------------------- kernels alone
KERNEL_HEADER = ("| K | P | one J.sum ms | gram ms | gram GFLOP/s | combine ms | (gram + combine) / floor "
                 "| UPGrad solver + call overhead / floor |")


def kernel_row(J, K, P, repeat, dev):
    """The two passes without solver or aggregator code: what part of mmgrad/floor is the kernels'
    (``ops.gram``'s K (K + 1) / 2 dot products are compute-bound at large K) and what is the rest."""
    w = torch.full((K,), 1.0 / K, device=dev)
    t_sum = timeit(lambda: J.sum(), repeat, dev)
    t_gram = timeit(lambda: ops.gram(J), repeat, dev)
    t_comb = timeit(lambda: ops.combine(J, w), repeat, dev)
    t_agg = timeit(lambda: A.aggregate(J, "upgrad"), repeat, dev)
    flops = K * (K + 1) * P  # K (K + 1) / 2 dot products of P multiply-adds
    floor = 2 * t_sum
    return (f"| {K} | {P / 1e6:g}M | {fmt_t(t_sum)} | {fmt_t(t_gram)} | {flops / t_gram / 1e9:.0f} "
            f"| {fmt_t(t_comb)} | {fmt_r((t_gram + t_comb) / floor)} "
            f"| {fmt_r((t_agg - t_gram - t_comb) / floor)} |")


# Gram matrices the active-set solvers find hardest: rows spanning a subspace of dimension
# rank < K (J = A B with A of K x rank), whose faces are nearly singular; "full" is J of K random
# rows, the benchmark's J.
SOLVER_RANKS = {"full": None, "rank K/4": 4, "rank K/2": 2, "rank 3K/4": 4 / 3}
SOLVER_SEEDS = 3


def hard_gram(K, kind, seed, dev):
    g = torch.Generator(device=dev).manual_seed(seed)
    if SOLVER_RANKS[kind] is None:
        J = torch.randn(K, 4096, generator=g, device=dev, dtype=torch.float64)
    else:
        rank = max(1, round(K / SOLVER_RANKS[kind]))
        J = (torch.randn(K, rank, generator=g, device=dev, dtype=torch.float64)
             @ torch.randn(rank, 4096, generator=g, device=dev, dtype=torch.float64))
    return ops.gram(J.float())


def solver_rows(Ks, methods, repeat, dev):
    """``weights(G)`` of every Gram-based method with a solver (not mean, sum) on the Grams of
    SOLVER_RANKS: the slowest of
    SOLVER_SEEDS seeds (median of ``repeat`` calls each), in ms, one row per (method, K)."""
    rows = []
    for name in [m for m in methods if A.get(m).gramian_based and m not in ("mean", "sum")]:
        for K in Ks:
            cells = []
            for kind in SOLVER_RANKS:
                agg = A.get(name)
                worst = max(timeit(lambda: agg.weights(G), repeat, dev)
                            for G in (hard_gram(K, kind, seed, dev) for seed in range(SOLVER_SEEDS)))
                cells.append(fmt_t(worst))
            rows.append(f"| {name} | {K} | " + " | ".join(cells) + " |")
    return rows


# ----------------------------------------------------------------------------- main
def fmt_t(t):
    if t is None or (isinstance(t, float) and math.isnan(t)):
        return "-"
    return f"{t * 1e3:.2f}" if t < 10 else f"{t:.1f}s"


def fmt_r(x):
    return "-" if x is None or math.isnan(x) else f"{x:.2f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="K in {2, 8}, P = 1M, 3 repeats")
    ap.add_argument("--K", type=int, nargs="+", default=[2, 4, 8, 16, 64])
    ap.add_argument("--P", type=float, nargs="+", default=[1e6, 16e6], help="P values (floats ok)")
    ap.add_argument("--methods", nargs="+", default=list(A.NAMES))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-torchjd", action="store_true")
    ap.add_argument("--no-libmtl", action="store_true")
    ap.add_argument("--peer-budget", type=float, default=20.0,
                    help="seconds after which a peer's repeats stop (slow torchjd/LibMTL cells)")
    ap.add_argument("--no-solver-table", action="store_true",
                    help="skip the table of weights(G) on rank-deficient Grams")
    ap.add_argument("--solvers-only", action="store_true",
                    help="only the table of weights(G) on rank-deficient Grams")
    ap.add_argument("--out", help="append the markdown table to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.K, args.P, args.repeat = [2, 8], [1e6], 3
    dev = torch.device(args.device)
    warnings.simplefilter("ignore")

    header = ("| method | K | P | floor ms | mmgrad ms | solver ms | torchjd ms | libmtl ms "
              "| mmgrad/floor | torchjd/mmgrad | libmtl/mmgrad |")
    lines = [] if args.solvers_only else [header, "|" + "---|" * 11]
    print("\n".join(lines), flush=True)
    t_all = time.perf_counter()
    kernels = []
    for P in [] if args.solvers_only else [int(p) for p in args.P]:
        for K in args.K:
            g = torch.Generator(device=dev).manual_seed(0)
            J = torch.randn(K, P, generator=g, device=dev, dtype=torch.float32)
            two_passes = lambda: (J.sum(), J.sum())  # noqa: E731
            G = ops.gram(J)
            sizes = split_params(P)
            per_task = None
            for name in args.methods:
                floor, t_mm, ratio = timeit_against_floor(lambda: A.aggregate(J, name), two_passes,
                                                          args.repeat, dev)
                agg = A.get(name)
                t_solve = timeit(lambda: agg.weights(G), max(args.repeat, 20), dev) if agg.gramian_based else float("nan")
                t_jd = None
                if not args.no_torchjd:
                    tj = torchjd_aggregator(name, K)
                    if tj is not None:
                        try:
                            t_jd = timeit(lambda: tj(J), args.repeat, dev, args.peer_budget)
                        except Exception as e:  # a peer failing is reported, not fatal
                            print(f"# torchjd {name} K={K} P={P} failed: {type(e).__name__}: {e}",
                                  file=sys.stderr)
                t_lib = None
                # (its per-parameter copy of J does not fit beside J at K = 64, P = 16M)
                if (not args.no_libmtl and name in LIBMTL and K * P <= 2**28
                        and not (name == "pcgrad" and K * K * P > 2e9)):
                    if per_task is None:
                        per_task = libmtl_grads(J, sizes)
                    t_lib = timeit(lambda: LIBMTL[name](per_task, sizes), args.repeat, dev,
                                   args.peer_budget)
                row = (f"| {name} | {K} | {P / 1e6:g}M | {fmt_t(floor)} | {fmt_t(t_mm)} "
                       f"| {fmt_t(t_solve) if t_solve == t_solve else '-'} | {fmt_t(t_jd)} "
                       f"| {fmt_t(t_lib)} | {fmt_r(ratio)} "
                       f"| {fmt_r(t_jd / t_mm if t_jd else float('nan'))} "
                       f"| {fmt_r(t_lib / t_mm if t_lib else float('nan'))} |")
                lines.append(row)
                print(row, flush=True)
            kernels.append(kernel_row(J, K, P, args.repeat, dev))
            del J, G, per_task
    if kernels:
        lines += ["", KERNEL_HEADER, "|" + "---|" * 8] + kernels
        print("\n" + "\n".join(lines[-len(kernels) - 2:]), flush=True)
    if not args.no_solver_table:
        solvers = solver_rows(args.K, args.methods, max(args.repeat, 20), dev)
        solver_header = ("| method | K | " + " | ".join(f"{kind} ms" for kind in SOLVER_RANKS)
                         + " |")
        lines += ["", f"`weights(G)` alone, slowest of {SOLVER_SEEDS} seeds:", "", solver_header,
                  "|" + "---|" * (2 + len(SOLVER_RANKS))] + solvers
        print("\n" + "\n".join(lines[-len(solvers) - 4:]), flush=True)
    total = time.perf_counter() - t_all
    meta = (f"\n_{platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, device {dev}, fp32 J, median of {args.repeat}; "
            f"ms unless marked s; total {total:.0f} s._\n")
    print(meta)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n" + meta + "\n")


if __name__ == "__main__":
    main()
