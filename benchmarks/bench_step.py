"""One training step of a two-encoder model (two ResNet-18 encoders, 124 parameter tensors,
22.4M values) with OGM-GE and MMPareto: mmgrad against a reference-style implementation
(per-parameter Python loops, ``.item()``, ``normal_``; MMPareto with four backward passes and
per-parameter gradient copies) and against plain training, in one run.

Reported: the gradient-editing part alone (between the last backward and ``optimizer.step()``)
and the whole step (forward, backward(s), edit, SGD step).

Usage: ``python benchmarks/bench_step.py [--device cuda] [--batch 8] [--size 64] [--rounds 3] [--out FILE]``.
Each step kind is timed in fresh processes of its own, interleaved over rounds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit_report, machine_description, markdown_table, sync  # noqa: E402

import mmgrad  # noqa: E402
from mmgrad import ops  # noqa: E402


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet18Encoder(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1)


class AVModel(nn.Module):
    def __init__(self, classes=6):
        super().__init__()
        self.audio = ResNet18Encoder(1)
        self.visual = ResNet18Encoder(3)
        self.head = nn.Linear(1024, classes)
        self.head_audio = nn.Linear(512, classes)
        self.head_visual = nn.Linear(512, classes)

    def forward(self, a, v):
        za, zv = self.audio(a), self.visual(v)
        out = self.head(torch.cat([za, zv], 1))
        split = mmgrad.nn.split_concat_logits(self.head, {"audio": za, "visual": zv})
        return out, split["audio"], split["visual"], self.head_audio(za), self.head_visual(zv)


# --- reference-style edits (as the published code does them) ----------------------------------------


def reference_ogm_ge_edit(model, la, lv, y, alpha=0.8):
    softmax = torch.softmax
    score_a = sum(softmax(la, 1)[i][y[i]] for i in range(y.numel()))
    score_v = sum(softmax(lv, 1)[i][y[i]] for i in range(y.numel()))
    ratio_v = score_v / score_a
    ratio_a = 1 / ratio_v
    coeff_a = coeff_v = 1.0
    if ratio_v > 1:  # Python branches on tensors: host syncs
        coeff_v = 1 - math.tanh(alpha * ratio_v.item())
    else:
        coeff_a = 1 - math.tanh(alpha * ratio_a.item())
    for name, p in model.named_parameters():
        if p.grad is None or p.grad.dim() != 4:
            continue
        coeff = coeff_a if name.startswith("audio") else coeff_v if name.startswith("visual") else None
        if coeff is None:
            continue
        p.grad = p.grad * coeff + torch.zeros_like(p.grad).normal_(0, p.grad.std().item() + 1e-8)


def _min_norm_two(v11, v12, v22):
    if v12 >= v11:
        return 0.999
    if v12 >= v22:
        return 0.001
    return (v22 - v12) / (v11 + v22 - 2 * v12)


def reference_mmpareto_step(model, a, v, y, gamma=1.5):
    """Four backward passes, per-parameter copies, per-tensor norms with host round trips."""
    encoders = {"audio": model.audio, "visual": model.visual}
    grads = {}
    out, _, _, ua, uv = model(a, v)
    losses = {"mm": F.cross_entropy(out, y), "audio": F.cross_entropy(ua, y), "visual": F.cross_entropy(uv, y)}
    for key in ("mm", "audio", "visual"):
        model.zero_grad()
        losses[key].backward(retain_graph=True)
        grads[key] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    (losses["mm"] + losses["audio"] + losses["visual"]).backward()
    sync(a.device)
    t0 = time.perf_counter()
    for m, enc in encoders.items():
        names = [f"{m}.{n}" for n, _ in enc.named_parameters()]
        g1 = torch.cat([grads["mm"][n].flatten() for n in names])
        g2 = torch.cat([grads[m][n].flatten() for n in names])
        cos = F.cosine_similarity(g1, g2, dim=0)
        if cos.item() > 0:
            c = 0.5
        else:
            v11 = sum((grads["mm"][n] * grads["mm"][n]).sum().cpu().item() for n in names)
            v12 = sum((grads["mm"][n] * grads[m][n]).sum().cpu().item() for n in names)
            v22 = sum((grads[m][n] * grads[m][n]).sum().cpu().item() for n in names)
            c = _min_norm_two(v11, v12, v22)
        for n, p in enc.named_parameters():
            new = 2 * c * grads["mm"][f"{m}.{n}"] + 2 * (1 - c) * grads[m][f"{m}.{n}"]
            ratio = p.grad.norm() / new.norm()
            p.grad = gamma * ratio * new if ratio > 1 else gamma * new
    sync(a.device)
    return time.perf_counter() - t0


# --- timed steps -------------------------------------------------------------------------------


def timed(fn, device, repeat):
    fn()  # warm-up
    whole, edit = [], []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        e = fn()
        sync(device)
        whole.append(time.perf_counter() - t0)
        edit.append(e)
    whole.sort(), edit.sort()
    return whole[len(whole) // 2], edit[len(edit) // 2]


def make_inputs(device, batch: int, size: int, seed: int = 0):
    """The two-encoder model on ``device`` and one batch ``(a, v, y)`` of random inputs."""
    torch.manual_seed(seed)
    model = AVModel().to(device)
    a = torch.randn(batch, 1, size, size, device=device)
    v = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 6, (batch,), device=device)
    return model, a, v, y


def step_functions(model, a, v, y) -> dict:
    """The timed training steps on ``model`` and one batch, by name. Each call runs one whole step
    and returns the seconds its gradient edit took (0 for the plain steps; ``mmgrad_*`` time their
    edit together with the SGD step, whose own time ``sgd_step_only`` returns).

    Names: ``plain``, ``plain_three_losses``, ``sgd_step_only``, ``reference_ogm_ge``,
    ``mmgrad_ogm_ge``, ``reference_mmpareto``, ``mmgrad_mmpareto``. The mmgrad steps use whatever
    backend the ops resolve when they run (``MMGRAD_BACKEND`` selects one).
    """
    device = a.device
    sgd = lambda: torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)  # noqa: E731

    plain_opt = sgd()

    def plain():
        plain_opt.zero_grad()
        out, *_ = model(a, v)
        F.cross_entropy(out, y).backward()
        plain_opt.step()
        return 0.0

    def plain_three_losses():
        plain_opt.zero_grad()
        out, _, _, ua, uv = model(a, v)
        (F.cross_entropy(out, y) + F.cross_entropy(ua, y) + F.cross_entropy(uv, y)).backward()
        plain_opt.step()
        return 0.0

    def ref_ogm():
        plain_opt.zero_grad()
        out, la, lv, _, _ = model(a, v)
        F.cross_entropy(out, y).backward()
        sync(device)
        t0 = time.perf_counter()
        reference_ogm_ge_edit(model, la.detach(), lv.detach(), y)
        sync(device)
        e = time.perf_counter() - t0
        plain_opt.step()
        return e

    ogm_opt = mmgrad.BalancedOptimizer(sgd(), modalities={"audio": model.audio, "visual": model.visual}, method=mmgrad.OGMGE(alpha=0.8))

    def mm_ogm():
        ogm_opt.zero_grad()
        out, la, lv, _, _ = model(a, v)
        ogm_opt.backward(F.cross_entropy(out, y), logits={"audio": la, "visual": lv}, targets=y)
        sync(device)
        t0 = time.perf_counter()
        ogm_opt.step()  # edit + SGD step; the SGD part is timed separately below
        sync(device)
        return time.perf_counter() - t0

    def ref_pareto():
        e = reference_mmpareto_step(model, a, v, y)
        plain_opt.step()
        return e

    par_opt = mmgrad.BalancedOptimizer(sgd(), modalities={"audio": model.audio, "visual": model.visual}, method=mmgrad.MMPareto())

    def mm_pareto():
        par_opt.zero_grad()
        out, _, _, ua, uv = model(a, v)
        par_opt.backward({"fusion": F.cross_entropy(out, y), "audio": F.cross_entropy(ua, y), "visual": F.cross_entropy(uv, y)})
        sync(device)
        t0 = time.perf_counter()
        par_opt.step()
        sync(device)
        return time.perf_counter() - t0

    def sgd_step_only():
        plain_opt.zero_grad()  # fresh gradients (untimed), so that the step has work to do
        out, *_ = model(a, v)
        F.cross_entropy(out, y).backward()
        sync(device)
        t0 = time.perf_counter()
        plain_opt.step()
        sync(device)
        return time.perf_counter() - t0

    return {
        "plain": plain, "plain_three_losses": plain_three_losses, "sgd_step_only": sgd_step_only,
        "reference_ogm_ge": ref_ogm, "mmgrad_ogm_ge": mm_ogm,
        "reference_mmpareto": ref_pareto, "mmgrad_mmpareto": mm_pareto,
    }


#: The step kinds main() times, each in processes of its own (see ``_time_in_subprocess``).
TIMED_KINDS = ("plain", "plain_three_losses", "sgd_step_only", "reference_ogm_ge", "mmgrad_ogm_ge",
               "reference_mmpareto", "mmgrad_mmpareto")


def _time_kind(kind: str, device: torch.device, batch: int, size: int, repeat: int) -> tuple[float, float]:
    model, a, v, y = make_inputs(device, batch, size)
    return timed(step_functions(model, a, v, y)[kind], device, repeat)


def _time_in_subprocess(kind: str, args) -> tuple[float, float]:
    """Median (whole step, edit) seconds of ``kind`` in a fresh process. Each kind runs alone, as a
    user's training would: in one process the earlier kinds would leave the CPU allocator's heap
    warm (or fragmented) for the later ones, which moved the mmgrad / plain ratio by up to 30 %."""
    cmd = [sys.executable, os.path.abspath(__file__), "--kind", kind, "--device", args.device,
           "--batch", str(args.batch), "--size", str(args.size), "--repeat", str(args.repeat),
           "--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    whole, edit = json.loads(out.strip().splitlines()[-1])
    return whole, edit


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--repeat", type=int, default=5, help="timed steps per process (median)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="processes per step kind, interleaved across kinds (median over rounds)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--kind", choices=TIMED_KINDS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.kind is not None:  # a child of _time_in_subprocess
        print(json.dumps(_time_kind(args.kind, device, args.batch, args.size, args.repeat)))
        return
    samples = {kind: [] for kind in TIMED_KINDS}
    for _ in range(args.rounds):
        for kind in TIMED_KINDS:
            samples[kind].append(_time_in_subprocess(kind, args))

    def median(kind, part):
        values = sorted(s[part] for s in samples[kind])
        return values[len(values) // 2]

    def spread(kind):
        values = [s[0] for s in samples[kind]]
        return min(values), max(values)

    t_plain, t_plain3 = median("plain", 0), median("plain_three_losses", 0)
    t_sgd = median("sgd_step_only", 1)
    rows = []
    for label, ref, mm, base in (("OGM-GE", "reference_ogm_ge", "mmgrad_ogm_ge", t_plain),
                                 ("MMPareto", "reference_mmpareto", "mmgrad_mmpareto", t_plain3)):
        t_ref, e_ref = median(ref, 0), median(ref, 1)
        t_mm, e_mm = median(mm, 0), median(mm, 1) - t_sgd  # the mmgrad kinds time edit + SGD step
        ratios = sorted(s[0] / p[0] for s, p in zip(samples[mm], samples["plain" if label == "OGM-GE" else "plain_three_losses"]))
        rows.append([label, 1e3 * base, 1e3 * t_ref, 1e3 * t_mm, t_mm / base,
                     f"{ratios[0]:.2f}-{ratios[-1]:.2f}", 1e3 * e_ref, 1e3 * e_mm, e_ref / e_mm])
    header = ["method", "plain step ms", "reference-style step ms", "mmgrad step ms", "mmgrad / plain",
              "per-round ratios", "reference edit ms", "mmgrad edit ms", "edit speed-up"]
    model, *_ = make_inputs(torch.device("cpu"), 1, 8)
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = sum(1 for _ in model.audio.parameters()) + sum(1 for _ in model.visual.parameters())
    text = "\n".join([
        f"## Training step, two ResNet-18 encoders, {machine_description(device)}, ops backend `{ops.resolve_backend(device)}`",
        "",
        f"`python benchmarks/bench_step.py --batch {args.batch} --size {args.size} --repeat {args.repeat} --rounds {args.rounds}"
        f"{' --device ' + args.device if args.device != 'cpu' else ''}`: "
        f"{n_tensors} encoder tensors, {n_params / 1e6:.1f}M parameters, batch {args.batch} of {args.size}x{args.size} inputs. "
        f"Every step kind runs in a fresh process of its own ({args.rounds} rounds, kinds interleaved; median over rounds "
        f"of each process's median of {args.repeat} steps). Plain = one backward of the loss(es) the method uses, summed "
        f"(MMPareto: fused + two unimodal). The SGD step alone takes {1e3 * t_sgd:.1f} ms and is subtracted from "
        "mmgrad's timed step to give its edit time.",
        "",
        markdown_table(header, rows),
        "",
    ])
    emit_report(text, args.out)


if __name__ == "__main__":
    main()
