"""Per-step time of BalancedOptimizer + DistributedDataParallel against plain DDP, 2 gloo ranks.

Two conv encoders (audio 1 x 32 x 32, visual 3 x 32 x 32), a concat head and unimodal heads,
float32. Every configuration lives in the same spawned ranks and is timed in interleaved rounds
(so load drifts hit all alike); each round runs ``--block`` steps between barriers, and the table
reports rank 0's median step time over the rounds. A step is forward, backward pass(es), edit and
SGD step.

Rows:
* ``plain, no comm`` / ``plain DDP``: the fused + unimodal losses summed, one ``backward()``, SGD
  (what one trains without mmgrad); the second adds DDP's bucketed all-reduce, overlapped with the
  backward pass.
* ``<method>, no comm``: BalancedOptimizer with ``distributed="off"`` (each rank alone): the
  method's own cost (its extra backward passes, the fused edit).
* ``<method> + DDP``: ``ddp=model`` with the default ``"exact"`` mode (K rows averaged once per step),
  and ``local_gram`` where K > 1 (one row averaged).

Usage: ``python benchmarks/bench_distributed.py [--world 2] [--width 32] [--batch 16] [--rounds 12]
[--out benchmarks/RESULTS.md]``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table  # noqa: E402

import mmgrad  # noqa: E402


def encoder(cin, w, feat):
    return nn.Sequential(
        nn.Conv2d(cin, w, 3, 2, 1), nn.ReLU(), nn.Conv2d(w, 2 * w, 3, 2, 1), nn.ReLU(),
        nn.Conv2d(2 * w, 4 * w, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, feat),
    )


class AVNet(nn.Module):
    def __init__(self, w=32, feat=64, classes=10):
        super().__init__()
        self.audio, self.visual = encoder(1, w, feat), encoder(3, w, feat)
        self.head = nn.Linear(2 * feat, classes)
        self.uni_audio, self.uni_visual = nn.Linear(feat, classes), nn.Linear(feat, classes)

    def forward(self, a, v):
        za, zv = self.audio(a), self.visual(v)
        out = self.head(torch.cat([za, zv], 1))
        split = mmgrad.nn.split_concat_logits(self.head, {"audio": za, "visual": zv})
        return out, split, {"audio": self.uni_audio(za), "visual": self.uni_visual(zv)}


CONFIGS = [
    # name, method (None: plain training), DDP?, distributed mode, losses ("sum", "logits", "pareto", "multi")
    ("plain, no comm", None, False, None, "sum"),
    ("plain DDP", None, True, None, "sum"),
    ("OGM-GE, no comm", "ogmge", False, "off", "logits"),
    ("OGM-GE + DDP", "ogmge", True, "exact", "logits"),
    ("MMPareto, no comm", "mmpareto", False, "off", "pareto"),
    ("MMPareto + DDP", "mmpareto", True, "exact", "pareto"),
    ("MMPareto + DDP local_gram", "mmpareto", True, "local_gram", "pareto"),
    ("UPGrad (K=3), no comm", "upgrad", False, "off", "multi"),
    ("UPGrad (K=3) + DDP", "upgrad", True, "exact", "multi"),
    ("UPGrad (K=3) + DDP local_gram", "upgrad", True, "local_gram", "multi"),
]


def make_step(cfg, args, rank):
    name, method, use_ddp, mode, losses = cfg
    torch.manual_seed(0)
    model = AVNet(args.width)
    forward = nn.parallel.DistributedDataParallel(model) if use_ddp else model
    inner = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    if method is None:
        opt = inner
    else:
        kwargs = dict(distributed=mode, ddp=forward if use_ddp else None)
        if method == "upgrad":
            shared = list(model.audio.parameters()) + list(model.visual.parameters())
            opt = mmgrad.BalancedOptimizer(inner, shared=shared, method="upgrad", **kwargs)
        else:
            m = mmgrad.OGMGE(alpha=0.8, seed=1) if method == "ogmge" else mmgrad.MMPareto()
            opt = mmgrad.BalancedOptimizer(inner, modalities={"audio": model.audio, "visual": model.visual}, method=m, **kwargs)
    g = torch.Generator().manual_seed(rank)
    a = torch.randn(args.batch, 1, 32, 32, generator=g)
    v = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)

    def step():
        out, split, uni = forward(a, v)
        opt.zero_grad()
        fused = F.cross_entropy(out, y)
        if losses == "sum":
            (fused + F.cross_entropy(uni["audio"], y) + F.cross_entropy(uni["visual"], y)).backward()
        elif losses == "logits":
            opt.backward(fused, logits=split, targets=y)
        elif losses == "pareto":
            opt.backward({"fusion": fused, "audio": F.cross_entropy(uni["audio"], y), "visual": F.cross_entropy(uni["visual"], y)})
        else:
            opt.backward([fused, F.cross_entropy(uni["audio"], y), F.cross_entropy(uni["visual"], y)])
        opt.step()

    nparams = sum(p.numel() for p in model.parameters())
    return step, nparams


def worker(rank, args, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=args.world,
                            timeout=datetime.timedelta(seconds=300))
    steps = [make_step(cfg, args, rank) for cfg in CONFIGS]
    for step, _ in steps:  # warm-up (lazy initialisation, first-iteration DDP work)
        for _ in range(2):
            step()
    times = [[] for _ in CONFIGS]
    for _ in range(args.rounds):
        for i, (step, _) in enumerate(steps):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(args.block):
                step()
            dist.barrier()
            times[i].append((time.perf_counter() - t0) / args.block)
    if rank == 0:
        torch.save({"times": times, "nparams": steps[0][1]}, out_file)
    dist.barrier()
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16, help="samples per rank")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--block", type=int, default=3, help="steps per timed block")
    parser.add_argument("--out", default=None, help="append the markdown table to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.pt")
        mp.start_processes(worker, args=(args, os.path.join(tmp, "init"), result), nprocs=args.world, join=True,
                           start_method="spawn")
        data = torch.load(result)
    med = [statistics.median(t) * 1e3 for t in data["times"]]
    base = {name: m for (name, *_), m in zip(CONFIGS, med)}
    rows = []
    for (name, method, use_ddp, mode, _), m in zip(CONFIGS, med):
        if method is None:
            ref = base["plain, no comm"] if use_ddp else None
        else:
            ref = base[[c[0] for c in CONFIGS if c[1] == method and c[3] == "off"][0]] if use_ddp else None
        rows.append([name, round(m, 2), "" if ref is None else f"+{m - ref:.2f}", f"{m / base['plain DDP']:.2f}x"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    text = (
        f"\n### Distributed step time ({args.world} gloo ranks on one machine, 1 thread each; "
        f"{os.cpu_count()} cores, load average {load:.1f} at the end; torch {torch.__version__})\n\n"
        f"AVNet width {args.width}: {data['nparams']} parameters, {args.batch} samples per rank; "
        f"median of {args.rounds} rounds of {args.block} steps.\n\n"
        + markdown_table(["configuration", "ms / step", "communication (vs same, no comm)", "vs plain DDP"], rows)
        + "\n"
    )
    print(text)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
