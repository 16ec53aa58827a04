"""Times mmgrad's fused ops against plain torch doing the same work, in one run.

* gram: ``mmgrad.ops.gram(J)`` vs ``J @ J.T`` vs the read bandwidth of the same bytes (``J.sum()``);
* combine: ``mmgrad.ops.combine(J, w)`` vs ``w @ J`` vs ``J.sum()``;
* segment ops on two ResNet-18-sized gradient sets (124 tensors, 22.4M values): per-tensor sums of
  squares and std (``segment_moments``) and OGM-GE's scale + Gaussian noise (``segment_scale_``) vs
  the per-parameter loop reference code uses (``p.grad.std()``, ``normal_``) and vs ``torch.cat``.

Usage: ``python benchmarks/bench_ops.py [--quick] [--device cuda] [--backend cpp] [--out FILE]``.
``--out`` appends a markdown section to FILE (benchmarks/RESULTS.md by convention).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit_report, machine_description, markdown_table, median_time, resnet18_shapes  # noqa: E402

import mmgrad  # noqa: E402
from mmgrad import ops  # noqa: E402


def bench_gram_combine(device, backend, P, Ks, dtype=torch.float32):
    rows = []
    copy_bw = 0.0
    for K in Ks:
        J = torch.randn(K, P, device=device, dtype=dtype)
        w = torch.randn(K, device=device)
        nbytes = J.numel() * J.element_size()
        dst = torch.empty_like(J)
        t_copy = median_time(lambda: dst.copy_(J), device)
        copy_bw = max(copy_bw, 2 * nbytes / t_copy / 1e9)  # bytes read + written
        del dst
        t_sum = median_time(lambda: J.sum(), device)
        t_gram = median_time(lambda: ops.gram(J, backend=backend), device)
        t_mm = median_time(lambda: J @ J.T, device)
        t_comb = median_time(lambda: ops.combine(J, w, backend=backend), device)
        out = torch.empty(P, device=device, dtype=dtype)
        t_into = median_time(lambda: ops.combine(J, w, out=out, backend=backend), device)
        t_wJ = median_time(lambda: w @ J, device)
        # Bandwidth counts the bytes of J read (combine also writes P values: 1/K more).
        rows.append([
            K, f"{P / 2**20:.0f}M", nbytes / t_sum / 1e9,
            1e3 * t_gram, nbytes / t_gram / 1e9, 100 * t_sum / t_gram, 1e3 * t_mm, 100 * t_sum / t_mm,
            1e3 * t_comb, nbytes / t_comb / 1e9, 100 * t_sum / t_comb,
            1e3 * t_into, nbytes / t_into / 1e9, 100 * t_sum / t_into, 1e3 * t_wJ, 100 * t_sum / t_wJ,
        ])
        del J
    header = [
        "K", "P", "J.sum() GB/s", "gram ms", "gram GB/s", "gram % of sum bw", "J@J.T ms",
        "J@J.T % of sum bw", "combine ms", "combine GB/s", "combine % of sum bw", "combine out= ms",
        "combine out= GB/s", "combine out= % of sum bw", "w@J ms", "w@J % of sum bw",
    ]
    note = f"Device-to-device copy bandwidth (read + write) measured in the same run: {copy_bw:.0f} GB/s."
    return markdown_table(header, rows) + "\n\n" + note


def bench_segments(device, backend, encoders=2):
    shapes = resnet18_shapes() * encoders
    grads = [torch.randn(s, device=device) for s in shapes]
    flat = torch.cat([g.reshape(-1) for g in grads])
    offsets, numels = ops.table([g.numel() for g in grads], device)
    S, N = len(grads), flat.numel()
    scale = torch.full((S,), 0.8, device=device)
    seed = torch.tensor([1], device=device)
    t_sum = median_time(lambda: flat.sum(), device)
    t_cat = median_time(lambda: torch.cat([g.reshape(-1) for g in grads]), device)

    def loop_stats():
        return [(g.pow(2).sum(), g.std()) for g in grads]

    def fused_stats():
        m = ops.segment_moments(flat, offsets, numels, backend=backend)
        return m[:, 1], ops.segment_std(m, numels)

    def loop_ogm_ge():
        # The reference repo's edit: std of the unscaled grad, scale, add N(0, std^2) noise.
        for g in grads:
            std = g.std()
            g.mul_(0.8).add_(torch.zeros_like(g).normal_(0, std.item()))

    def loop_ogm_ge_no_noise():
        for g in grads:
            g.mul_(0.8)

    def fused_ogm_ge():
        m = ops.segment_moments(flat, offsets, numels, backend=backend)
        ops.segment_scale_(flat, offsets, numels, scale, ops.segment_std(m, numels), seed, backend=backend)

    def fused_scale_no_noise():
        ops.segment_scale_(flat, offsets, numels, scale, backend=backend)

    nbytes = N * 4
    rows = []
    for name, fn, moved, peer_name, peer in [
        ("per-tensor sumsq + std", fused_stats, nbytes, "per-parameter loop", loop_stats),
        ("scale (no noise)", fused_scale_no_noise, 2 * nbytes, "per-parameter mul_", loop_ogm_ge_no_noise),
        ("OGM-GE edit: std + scale + noise", fused_ogm_ge, 3 * nbytes, "per-parameter loop + normal_", loop_ogm_ge),
    ]:
        t = median_time(fn, device)
        tp = median_time(peer, device, repeat=3)
        rows.append([name, 1e3 * t, moved / t / 1e9, peer_name, 1e3 * tp, tp / t])
    table = markdown_table(["op", "mmgrad ms", "mmgrad GB/s", "peer", "peer ms", "peer / mmgrad"], rows)
    return (
        f"{S} tensors, {N / 1e6:.1f}M fp32 values; read floor `flat.sum()` {1e3 * t_sum:.2f} ms "
        f"({nbytes / t_sum / 1e9:.1f} GB/s); `torch.cat` of the per-parameter grads {1e3 * t_cat:.2f} ms.\n\n" + table
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default=None, help="force a backend (default: the auto policy)")
    parser.add_argument("--quick", action="store_true", help="P = 1M instead of 16M")
    parser.add_argument("--P", type=int, default=None, help="columns of J (default 16M, or 64M on CUDA)")
    parser.add_argument("--out", default=None, help="append the markdown report to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    backend = args.backend or ops.resolve_backend(device)
    P = args.P or (2**20 if args.quick else (64 * 2**20 if device.type == "cuda" else 16 * 2**20))
    torch.manual_seed(0)
    report = [
        f"## Fused ops, {machine_description(device)}, backend `{backend}`",
        "",
        f"mmgrad {mmgrad.__version__}; `python benchmarks/bench_ops.py{' --quick' if args.quick else ''}"
        f"{' --device ' + args.device if args.device != 'cpu' else ''}`. Median of 7 runs. "
        "'% of sum bw' = time of `J.sum()` on the same bytes / time of the op.",
        "",
        "### gram and combine (fp32)",
        "",
        bench_gram_combine(device, backend, P, [2, 4, 8, 16, 64]),
        "",
        "### Segment ops (two ResNet-18-sized gradient sets)",
        "",
        bench_segments(device, backend),
        "",
    ]
    text = "\n".join(report)
    emit_report(text, args.out)


if __name__ == "__main__":
    main()
