"""The main job (``make demo`` / ``python -m mmgrad.demo``): a real training comparison on UCI mfeat.

Two views of real handwritten digits, a strong one (``fac``, profile correlations) and a weak one
(``fou``, Fourier coefficients), each with its own MLP encoder, a concat fusion head and one
unimodal head per view. Trained with SGD, over several seeds:

* ``joint``: the fused cross-entropy only (plain joint training, the usual baseline);
* ``sum``: fused + unimodal losses summed;
* ``ogm_ge``: OGM-GE on the encoders (alpha 0.8, every weight matrix modulated);
* ``mmpareto``: MMPareto (fused loss vs each unimodal loss per encoder, gamma 1.5);
* ``<aggregator>`` (``upgrad``, ``mgda``, ...): the three losses as objectives on the encoders'
  parameters, aggregated from their 3 x 3 Gram matrix;
* ``alone:<view>``: the same encoder trained on its view alone, the ceiling for its probe.

Reported per method: fused test accuracy, and a linear probe on each frozen encoder (how much each
modality's encoder learnt). The weak view's gap to its ceiling is the modality imbalance.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import mmgrad
import mmgrad.nn
from mmgrad import ops
from mmgrad.datasets import load_mfeat


class TwoViewNet(nn.Module):
    def __init__(self, dims: dict[str, int], hidden: int = 64, feature: int = 32, classes: int = 10):
        super().__init__()
        self.views = list(dims)
        self.encoders = nn.ModuleDict(
            {v: nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, feature), nn.ReLU()) for v, d in dims.items()}
        )
        self.fusion = nn.Linear(feature * len(dims), classes)
        self.unimodal = nn.ModuleDict({v: nn.Linear(feature, classes) for v in dims})

    def forward(self, xs: dict[str, torch.Tensor]):
        z = {v: self.encoders[v](xs[v]) for v in self.views}
        fused = self.fusion(torch.cat([z[v] for v in self.views], dim=1))
        return fused, {v: self.unimodal[v](z[v]) for v in self.views}, z


def linear_probe(train_z, train_y, test_z, test_y, classes=10, steps=200) -> float:
    """Test accuracy of a logistic regression fit on frozen features (full-batch L-BFGS)."""
    mean, std = train_z.mean(0), train_z.std(0).clamp_min(1e-6)
    a, b = (train_z - mean) / std, (test_z - mean) / std
    probe = nn.Linear(a.shape[1], classes)
    opt = torch.optim.LBFGS(probe.parameters(), lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(a), train_y) + 1e-3 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (probe(b).argmax(1) == test_y).float().mean().item()


def make_optimizer(method: str, model: TwoViewNet, lr: float):
    """The optimizer for ``method``: plain SGD for joint training, else a BalancedOptimizer."""
    sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    encoders = {v: model.encoders[v] for v in model.views}
    if method in ("joint", "sum") or method.startswith("alone:"):
        return sgd
    if method == "ogm_ge":
        # No conv kernels in MLP encoders: modulate every weight matrix (the author's intent).
        return mmgrad.BalancedOptimizer(sgd, modalities=encoders, method=mmgrad.OGMGE(alpha=0.8, params="weights"))
    if method == "mmpareto":
        return mmgrad.BalancedOptimizer(sgd, modalities=encoders, method=mmgrad.MMPareto())
    # Any aggregator: fused and unimodal losses as objectives on the encoders' parameters.
    shared = [p for v in model.views for p in model.encoders[v].parameters()]
    return mmgrad.BalancedOptimizer(sgd, shared=shared, method=method)


def train_one(method: str, train, test, seed: int, epochs: int, lr: float, batch: int = 64):
    torch.manual_seed(seed)
    alone = method.startswith("alone:")
    views = [method.split(":", 1)[1]] if alone else list(train.views)
    model = TwoViewNet({v: train.views[v].shape[1] for v in views})
    opt = make_optimizer(method, model, lr)
    n = len(train)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        if isinstance(opt, mmgrad.BalancedOptimizer):
            opt.set_epoch(epoch)
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            idx = perm[i : i + batch]
            xs = {v: train.views[v][idx] for v in views}
            y = train.labels[idx]
            fused, uni, z = model(xs)
            opt.zero_grad()
            if method == "joint" or alone:
                F.cross_entropy(fused, y).backward()
            elif method == "sum":
                (F.cross_entropy(fused, y) + sum(F.cross_entropy(uni[v], y) for v in views)).backward()
            elif method == "ogm_ge":
                split = mmgrad.nn.split_concat_logits(model.fusion, z)
                opt.backward(F.cross_entropy(fused, y), logits=split, targets=y)
            elif method == "mmpareto":
                opt.backward({"fusion": F.cross_entropy(fused, y), **{v: F.cross_entropy(uni[v], y) for v in views}})
            else:
                opt.backward([F.cross_entropy(fused, y)] + [F.cross_entropy(uni[v], y) for v in views])
            opt.step()
    train_time = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        fused, _, z_test = model({v: test.views[v] for v in views})
        _, _, z_train = model({v: train.views[v] for v in views})
    acc = (fused.argmax(1) == test.labels).float().mean().item()
    probes = {v: linear_probe(z_train[v], train.labels, z_test[v], test.labels) for v in views}
    return {"fused": acc, "probe": probes, "time": train_time}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", default="fac,fou", help="two mfeat views: strong,weak (default fac,fou)")
    parser.add_argument("--methods", default="joint,ogm_ge,mmpareto,upgrad,sum",
                        help="comma-separated: joint, sum, ogm_ge, mmpareto, or an aggregator name (upgrad, mgda, ...)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args(argv)
    # Under plain joint training the weak branch's activations decay into subnormal floats, which
    # x86 CPUs process hundreds of times slower; flushing them changes no reported figure.
    torch.set_flush_denormal(True)
    views = args.views.split(",")
    methods = args.methods.split(",") + [f"alone:{v}" for v in views]
    print(f"mmgrad {mmgrad.__version__} demo: mfeat {'+'.join(views)}, {args.seeds} seeds, {args.epochs} epochs, "
          f"ops backend '{ops.resolve_backend(torch.device('cpu'))}'")
    results = {}
    for m in methods:
        runs = []
        for seed in range(args.seeds):
            train, test = load_mfeat(views, seed=seed)
            runs.append(train_one(m, train, test, seed, args.epochs, args.lr))
        results[m] = runs
        print(f"  {m:<12} done ({sum(r['time'] for r in runs):.1f} s)")

    def ms(values):
        values = [100 * v for v in values]
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0:.1f}"

    header = ["method", "fused acc %"] + [f"probe {v} %" for v in views] + ["train s/run"]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for m, runs in results.items():
        probes = [ms([r["probe"][v] for r in runs]) if v in runs[0]["probe"] else "" for v in views]
        fused = ms([r["fused"] for r in runs]) if not m.startswith("alone:") else ""
        print(f"| {m} | {fused} | " + " | ".join(probes) + f" | {statistics.mean(r['time'] for r in runs):.2f} |")
    weak = views[1]
    ceiling = statistics.mean(r["probe"][weak] for r in results[f"alone:{weak}"])
    base = statistics.mean(r["probe"][weak] for r in results["joint"]) if "joint" in results else None
    if base is not None and ceiling > base:
        print(f"\nWeak view '{weak}': joint-training probe {100 * base:.1f} %, alone {100 * ceiling:.1f} % "
              f"(gap {100 * (ceiling - base):.1f} points). Share of the gap closed:")
        for m, runs in results.items():
            if m != "joint" and not m.startswith("alone:"):
                p = statistics.mean(r["probe"][weak] for r in runs)
                print(f"  {m:<12} {100 * (p - base) / (ceiling - base):6.1f} %")


if __name__ == "__main__":
    main()
