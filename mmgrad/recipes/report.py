"""The comparison report: markdown tables, PNG plots, raw results and the exact configuration.

Written to the output directory:

* ``report.md``     one section per data set: the results table (mean ± std over seeds), the weak
                    modality's probe gap and the share of it each method closes, the plots;
* ``config.json``   the exact configuration, the versions (torch, mmgrad, python, ops backend) and
                    a command that re-runs each row;
* ``results.json``  every run's numbers, per seed, with the per-epoch history;
* ``accuracy_<data>.png``, ``ratio_<data>.png``  per-modality test accuracy (head part) and the
                    OGM discrepancy ratio over training, mean over seeds, one line per method.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from typing import Optional

__all__ = ["summarise", "write_report", "safe_name"]


def safe_name(spec: str) -> str:
    """A file-name-safe form of a data-set spec (``mfeat:fac+fou`` -> ``mfeat_fac-fou``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", spec.replace("+", "-").replace(":", "_"))


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pct(values: list[float], digits: int = 1) -> str:
    m, s = _mean_std(values)
    if math.isnan(m):
        return ""
    return f"{100 * m:.{digits}f} ± {100 * s:.{digits}f}"


def summarise(runs_by_method: dict[str, list[dict]], modalities: list[str]) -> dict:
    """Means over seeds, the weak modality and every method's share of its probe gap closed.

    The weak modality is the one with the lowest alone ceiling (mean probe of ``alone:<m>``); its
    gap is ceiling - baseline (``joint``) probe. Returns ``{}`` parts where runs are missing.
    """
    mean = lambda method, key, m=None: _mean_std([r[key][m] if m else r[key] for r in runs_by_method[method]])[0]
    ceilings = {m: mean(f"alone:{m}", "probe", m) for m in modalities if f"alone:{m}" in runs_by_method}
    out: dict = {"ceilings": ceilings}
    if "joint" not in runs_by_method or not ceilings:
        return out
    baseline = {m: mean("joint", "probe", m) for m in modalities}
    weak = min(ceilings, key=ceilings.get)
    gaps = {m: ceilings[m] - baseline[m] for m in ceilings}
    base_fused = mean("joint", "fused")
    closed = {}
    for method, runs in runs_by_method.items():
        if method == "joint" or method.startswith("alone:"):
            continue
        p = mean(method, "probe", weak)
        closed[method] = {
            "probe": p,
            "share_closed": (p - baseline[weak]) / gaps[weak] if gaps[weak] > 0 else float("nan"),
            "fused_minus_baseline": mean(method, "fused") - base_fused,
            "strong_probe_change": {m: mean(method, "probe", m) - baseline[m] for m in modalities if m != weak},
        }
    out.update(weak=weak, baseline=baseline, gaps=gaps, baseline_fused=base_fused, closed=closed)
    return out


def _table(runs_by_method: dict[str, list[dict]], modalities: list[str]) -> list[str]:
    header = (["method", "fused acc %"] + [f"acc {m} %" for m in modalities] + [f"probe {m} %" for m in modalities]
              + [f"Shapley {m} %" for m in modalities] + ["s / epoch"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, runs in runs_by_method.items():
        alone = method.startswith("alone:")
        cells = [f"`{method}`", "" if alone else _pct([r["fused"] for r in runs])]
        for key in ("head_acc", "probe", "shapley"):
            cells += [_pct([r[key][m] for r in runs]) if m in runs[0][key] else "" for m in modalities]
        t, ts = _mean_std([r["epoch_time"] for r in runs])
        cells.append(f"{1000 * t:.0f} ± {1000 * ts:.0f} ms")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _unimodal_table(runs_by_method: dict[str, list[dict]], modalities: list[str]) -> list[str]:
    rows = [(m, r) for m, r in runs_by_method.items() if r[0].get("unimodal_acc")]
    if not rows:
        return []
    lines = ["Accuracy of the unimodal heads (methods that train them), test %:", "",
             "| method | " + " | ".join(f"head {m} %" for m in modalities) + " |", "|---|" + "---|" * len(modalities)]
    for method, runs in rows:
        lines.append(f"| `{method}` | " + " | ".join(_pct([r["unimodal_acc"][m] for r in runs]) for m in modalities) + " |")
    return lines + [""]


def _curves(runs: list[dict], key: str, m: str) -> list[float]:
    """Mean over seeds of history[epoch][key][m] (runs that stopped early are cut to the shortest)."""
    n = min(len(r["history"]) for r in runs)
    return [statistics.mean(r["history"][e][key][m] for r in runs) for e in range(n)]


def _plots(out_dir: str, spec: str, runs_by_method: dict[str, list[dict]], modalities: list[str], summary: dict) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    name = safe_name(spec)
    files = []
    methods = [k for k in runs_by_method if not k.startswith("alone:")]
    # Ten colours, then the same colours dash-dotted: tab20's paired shades are hard to tell apart.
    colours = {k: plt.cm.tab10.colors[i % 10] for i, k in enumerate(methods)}
    styles = {k: "-" if i < 10 else "-." for i, k in enumerate(methods)}

    fig, axes = plt.subplots(1, len(modalities), figsize=(3.6 * len(modalities) + 1.6, 3.4), squeeze=False)
    for ax, m in zip(axes[0], modalities):
        for k in methods:
            curve = [100 * v for v in _curves(runs_by_method[k], "test_head_acc", m)]
            ax.plot(curve, label=k, color=colours[k], ls=styles[k], lw=1.3)
        if f"alone:{m}" in runs_by_method:
            ax.plot([100 * v for v in _curves(runs_by_method[f"alone:{m}"], "test_head_acc", m)], label=f"alone:{m}",
                    color="black", ls="--", lw=1.2)
        ax.set_title(f"{spec}: {m} (its part of the head)", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy %")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.tight_layout()
    path = os.path.join(out_dir, f"accuracy_{name}.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    files.append(path)

    if len(modalities) >= 2:
        strong = max(summary.get("ceilings") or {m: 0 for m in modalities}, key=lambda m: (summary.get("ceilings") or {}).get(m, 0))
        fig, ax = plt.subplots(figsize=(6.0, 3.4))
        for k in methods:
            ax.plot(_curves(runs_by_method[k], "ratio", strong), label=k, color=colours[k], ls=styles[k], lw=1.3)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_title(f"{spec}: discrepancy ratio of {strong} (train batches)", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("ratio of confidence scores")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        fig.tight_layout()
        path = os.path.join(out_dir, f"ratio_{name}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(path)
    return files


def write_report(out_dir: str, results: dict, config: dict, descriptions: Optional[dict] = None) -> str:
    """Write report.md, config.json, results.json and the plots; return the report's path.

    ``results[data_spec][method_label]`` is the list of :func:`~mmgrad.recipes.train.run_one`
    results over seeds; ``config`` is what config.json holds (it must say how to re-run).
    """
    os.makedirs(out_dir, exist_ok=True)
    descriptions = descriptions or {}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=False)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=None, separators=(",", ":"))
    versions = config.get("versions", {})
    lines = [
        "# mmgrad comparison",
        "",
        f"Command: `{config.get('command', '')}`  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "  ",
        f"Seeds: {config.get('seeds')}; training: " + ", ".join(f"{k}={v}" for k, v in config.get("train", {}).items()),
        "",
        "All numbers are test-split figures after the last epoch, mean ± std over seeds (each seed draws its own "
        "split, pairing and initialisation). **acc m**: m's part of the fusion head (concat: its columns + bias/M; "
        "sum: its own layer). **probe m**: logistic regression on m's frozen encoder features. **Shapley m**: exact "
        "Shapley contribution of m to test accuracy, absent modalities' features zeroed before the head and "
        "v(empty) = 0, so the contributions add up to the fused accuracy. **s / epoch**: training wall time per "
        "epoch (median over the run's epochs, robust to a busy machine). "
        "`alone:m` trains the same encoder on m only: the ceiling of m's probe.",
        "",
    ]
    summaries = {}
    for spec, runs_by_method in results.items():
        first = next(iter(runs_by_method.values()))[0]
        modalities = [m for m in config.get("modalities", {}).get(spec, list(first["probe"]))]
        summary = summarise(runs_by_method, modalities)
        summaries[spec] = summary
        lines += [f"## {spec}", ""]
        if spec in descriptions:
            lines += [descriptions[spec], ""]
        lines += _table(runs_by_method, modalities) + [""]
        lines += _unimodal_table(runs_by_method, modalities)
        if "weak" in summary:
            weak = summary["weak"]
            lines += [
                f"**Weak modality: {weak}** (lowest alone ceiling). Probe of its encoder: joint training "
                f"{100 * summary['baseline'][weak]:.1f} %, alone {100 * summary['ceilings'][weak]:.1f} %: a gap of "
                f"{100 * summary['gaps'][weak]:.1f} points (joint fused accuracy {100 * summary['baseline_fused']:.1f} %).",
                "",
                f"| method | probe {weak} % | share of the gap closed | fused acc − joint (points) | "
                + " | ".join(f"probe {m} − joint (points)" for m in modalities if m != weak) + " |",
                "|---|---|---|---|" + "---|" * (len(modalities) - 1),
            ]
            def order(item):
                share = item[1]["share_closed"]
                return 0.0 if math.isnan(share) else -share

            ranked = sorted(summary["closed"].items(), key=order)
            for method, c in ranked:
                share = "" if math.isnan(c["share_closed"]) else f"{100 * c['share_closed']:.0f} %"
                strong = " | ".join(f"{100 * v:+.1f}" for v in c["strong_probe_change"].values())
                fused = 100 * c["fused_minus_baseline"]
                lines.append(f"| `{method}` | {100 * c['probe']:.1f} | {share} | {fused:+.1f} | {strong} |")
            lines.append("")
        for path in _plots(out_dir, spec, runs_by_method, modalities, summary):
            lines += [f"![{os.path.basename(path)}]({os.path.basename(path)})", ""]
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summaries, f, indent=2, default=lambda o: None)
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
