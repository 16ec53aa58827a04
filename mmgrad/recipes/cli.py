"""The ``mmgrad`` command (also ``python -m mmgrad``): training comparisons on real data.

``mmgrad compare`` trains the joint baseline, the balancing methods and every modality alone on
each data set over several seeds, and writes a report; ``mmgrad train`` does the same for one
method. Both run on the CPU in minutes; see ``mmgrad compare --help``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from typing import Optional, Sequence

import torch

import mmgrad
from mmgrad.recipes.data import AVDIGITS_VARIANTS, MFEAT_VIEWS, load_dataset
from mmgrad.recipes.report import safe_name, summarise, write_report
from mmgrad.recipes.train import (MethodSpec, TrainConfig, check_method, method_help, parse_method, restore_settings,
                                  run_one, setup_determinism)

__all__ = ["main", "build_parser", "DEFAULT_DATA", "DEFAULT_METHODS"]

DEFAULT_DATA = ["mfeat:fac+fou", "avdigits:weak-audio"]
DEFAULT_METHODS = ["joint", "ogm_ge", "mmpareto", "upgrad", "mgda", "pcgrad", "cagrad", "gradvac", "graddrop", "agm",
                   "inforeg", "sum", "opm", "relearn", "sample", "modality", "crmt"]

_DATA_HELP = f"""data sets (--data), DATA[:ARG]:
  mfeat:VIEW+VIEW[+...]   UCI mfeat, views as modalities: {', '.join(MFEAT_VIEWS)} (default fac+fou)
  avdigits:VARIANT        sklearn digit images + FSDD spoken digits; variants:
""" + "\n".join(f"    {k:<20} {v}" for k, v in AVDIGITS_VARIANTS.items())

_EPILOG = f"""{_DATA_HELP}

methods (--methods / --method), NAME[:OPTION=VALUE[:...]] with their defaults:
{method_help()}

examples:
  mmgrad compare                                    # the default comparison (about 3 minutes on 2 cores)
  mmgrad compare --data avdigits:noisy-image --methods joint mmpareto ogm_ge:alpha=0.3 --seeds 5
  mmgrad compare --epochs 1 --seeds 1 --quiet --out /tmp/smoke
  mmgrad train --data mfeat:fac+pix+zer --method upgrad --optimizer adam --lr 1e-3
"""


def _seeds(text: str) -> list[int]:
    """``"3"`` -> [0, 1, 2]; ``"0,5,7"`` -> [0, 5, 7]."""
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
            if not seeds:
                raise ValueError
            if len(set(seeds)) != len(seeds):
                raise argparse.ArgumentTypeError(f"--seeds lists a seed twice: {text!r} (each run would count twice)")
            return seeds
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes a count (3) or a list (0,5,7), got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("--seeds must be at least 1")
    return list(range(n))


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _hidden(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hidden takes widths W[,W...], got {text!r}") from None
    if any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"--hidden widths must be at least 1, got {text!r}")
    return widths


def _add_common(p: argparse.ArgumentParser, out_default: str) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--seeds", type=_seeds, default=_seeds("3"), metavar="N|LIST",
                   help="number of seeds (0..N-1) or a comma list; each seed draws its own split and init (default 3)")
    g.add_argument("--epochs", type=_positive_int, default=30, help="epochs per run (default 30)")
    g.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default="sgd",
                   help="wrapped optimizer (default sgd with momentum, as in the papers)")
    g.add_argument("--lr", type=float, default=0.01, help="learning rate (default 0.01)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay (default 1e-4)")
    g.add_argument("--batch-size", type=_positive_int, default=64, help="mini-batch size (default 64)")
    g = p.add_argument_group("model")
    g.add_argument("--encoder", choices=["mlp", "conv"], default="mlp",
                   help="per-modality encoder: mlp, or conv for image modalities (AV-digits images) (default mlp)")
    g.add_argument("--hidden", type=_hidden, default=(64,), metavar="W[,W...]", help="MLP hidden widths (default 64)")
    g.add_argument("--features", type=_positive_int, default=32, help="encoder output width (default 32)")
    g.add_argument("--fusion", choices=["concat", "sum"], default="concat", help="fusion head (default concat)")
    g = p.add_argument_group("data")
    g.add_argument("--test-fraction", type=float, default=0.3, help="share of the data held out for testing (default 0.3)")
    g.add_argument("--val-fraction", type=float, default=0.0,
                   help="share held out (from the non-test part) as a validation split; its fused accuracy is reported "
                        "as val_fused in results.json, the test split is unchanged (default 0)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=out_default, help=f"output directory for the report (default {out_default})")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress output; print only the report's path")
    g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard logs under OUT/tensorboard")
    g.add_argument("--threads", type=_positive_int, default=1,
                   help="torch CPU threads (default 1: the models are tiny, and one thread is immune to "
                        "oversubscription on a busy machine)")


def build_parser() -> argparse.ArgumentParser:
    """The ``mmgrad`` argument parser (subcommands ``compare`` and ``train``)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="mmgrad", description=__doc__, formatter_class=fmt, epilog=_EPILOG)
    parser.add_argument("--version", action="version", version=f"mmgrad {mmgrad.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{compare,train}")
    c = sub.add_parser("compare", help="compare balancing methods against joint training and each modality alone",
                       description="Train the joint baseline, each method and every modality alone on each data set, "
                                   "over several seeds, and write a markdown report with plots.",
                       formatter_class=fmt, epilog=_EPILOG)
    c.add_argument("--data", nargs="+", default=DEFAULT_DATA, metavar="SPEC",
                   help=f"data sets (default {' '.join(DEFAULT_DATA)})")
    c.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, metavar="METHOD",
                   help="methods, space- or comma-separated; 'joint' is added when missing (default: "
                        + " ".join(DEFAULT_METHODS) + ")")
    c.add_argument("--no-alone", action="store_true", help="skip the modality-alone ceilings")
    _add_common(c, "runs/compare")
    t = sub.add_parser("train", help="train one method on one data set over seeds",
                       description="Train one method on one data set over several seeds and write its report.",
                       formatter_class=fmt, epilog=_EPILOG)
    t.add_argument("--data", default=DEFAULT_DATA[0], metavar="SPEC", help=f"data set (default {DEFAULT_DATA[0]})")
    t.add_argument("--method", default="joint", metavar="METHOD", help="the method (default joint)")
    _add_common(t, "runs/train")
    return parser


class _Progress:
    """A tqdm bar over all epochs of all runs when tqdm is installed and stderr is a terminal, else
    one line per finished run; nothing in quiet mode. Writes to stderr so stdout stays clean."""

    def __init__(self, total_epochs: int, total_runs: int, quiet: bool):
        self.quiet, self.total_runs, self.done = quiet, total_runs, 0
        self.bar = None
        if quiet or not sys.stderr.isatty():
            return  # a bar redrawn into a log file is noise: one line per run instead
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total_epochs, unit="epoch", file=sys.stderr, dynamic_ncols=True, leave=False)

    def start(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_description(label)

    def epoch(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def finish(self, label: str, result: dict, seconds: float) -> None:
        self.done += 1
        if self.quiet or self.bar is not None:
            return
        print(f"[{self.done:>3}/{self.total_runs}] {label:<48} fused {100 * result['fused']:5.1f} %  ({seconds:.1f} s)",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _versions() -> dict:
    from mmgrad import ops

    try:
        backend = ops.resolve_backend(torch.device("cpu"))
    except Exception as exc:  # a forced backend that cannot serve: say so in the report
        backend = f"unavailable ({exc})"
    return {
        "mmgrad": mmgrad.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "backend": backend,
        "MMGRAD_BACKEND": os.environ.get("MMGRAD_BACKEND", "(unset)"),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def _rerun(args, spec: str, method: MethodSpec) -> str:
    """A ``mmgrad train`` command that re-runs one row of the report."""
    parts = ["mmgrad", "train", "--data", spec, "--method", method.label, "--seeds", ",".join(map(str, args.seeds)),
             "--epochs", str(args.epochs), "--optimizer", args.optimizer, "--lr", str(args.lr),
             "--momentum", str(args.momentum), "--weight-decay", str(args.weight_decay),
             "--batch-size", str(args.batch_size), "--encoder", args.encoder,
             "--hidden", ",".join(map(str, args.hidden)), "--features", str(args.features), "--fusion", args.fusion,
             "--test-fraction", str(args.test_fraction), "--val-fraction", str(args.val_fraction),
             "--threads", str(args.threads)]
    return shlex.join(parts)


def run(args) -> str:
    """Run the comparison (or single method) ``args`` describe; return the report's path. Torch's
    thread count and deterministic mode are restored afterwards."""
    previous = setup_determinism(args.threads)
    try:
        return _run(args)
    finally:
        restore_settings(previous)


def _run(args) -> str:
    if args.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    if args.command == "compare":
        tokens = [t for item in args.methods for t in item.split(",") if t.strip()]
        specs = [parse_method(t) for t in tokens]
        labels = [s.label for s in specs]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise ValueError(f"--methods lists {', '.join(twice)} more than once (each run would count twice)")
        if not any(s.name == "joint" and not s.options for s in specs):
            specs.insert(0, parse_method("joint"))
        data_specs = list(dict.fromkeys(args.data))
    else:
        specs = [parse_method(args.method)]
        data_specs = [args.data]
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, encoder=args.encoder, hidden=args.hidden, features=args.features,
        fusion=args.fusion, test_fraction=args.test_fraction, val_fraction=args.val_fraction,
    )
    # Load everything first: a bad spec or a missing data package fails before any training.
    data = {s: {seed: load_dataset(s, seed, args.test_fraction, args.val_fraction) for seed in args.seeds} for s in data_specs}
    plan = []
    for s in data_specs:
        mods = data[s][args.seeds[0]].modalities
        extra = [] if args.command != "compare" or args.no_alone else [parse_method(f"alone:{m}") for m in mods]
        for spec in specs + extra:
            check_method(data[s][args.seeds[0]], spec, config)
            plan.append((s, spec))
    progress = _Progress(len(plan) * len(args.seeds) * args.epochs, len(plan) * len(args.seeds), args.quiet)
    results: dict = {s: {} for s in data_specs}
    start = time.perf_counter()
    try:
        for s, spec in plan:
            for seed in args.seeds:
                label = f"{s} {spec.label} seed {seed}"
                progress.start(label)
                writer = None
                if args.tensorboard:
                    writer = SummaryWriter(os.path.join(args.out, "tensorboard", safe_name(s), safe_name(spec.label), f"seed{seed}"))
                t0 = time.perf_counter()
                r = run_one(data[s][seed], spec, seed, config, on_epoch=lambda e, rec: progress.epoch(), writer=writer)
                if writer is not None:
                    writer.close()
                progress.finish(label, r, time.perf_counter() - t0)
                results[s].setdefault(spec.label, []).append(r)
    finally:
        progress.close()
    elapsed = time.perf_counter() - start
    argv = getattr(args, "argv", None)
    run_config = {
        "command": shlex.join(["mmgrad", *argv]) if argv is not None else "mmgrad " + args.command,
        "subcommand": args.command,
        "data": data_specs,
        "modalities": {s: data[s][args.seeds[0]].modalities for s in data_specs},
        "methods": {sp.label: {"name": sp.name, "options": sp.opts} for sp in specs},
        "seeds": args.seeds,
        "train": config.to_dict(),
        "deterministic": {"torch.use_deterministic_algorithms": True, "flush_denormal": True, "threads": args.threads},
        "versions": _versions(),
        "wall_time_s": round(elapsed, 1),
        "rerun": {s: {label: _rerun(args, s, parse_method(label)) for label in results[s]} for s in data_specs},
    }
    descriptions = {s: data[s][args.seeds[0]].description for s in data_specs}
    path = write_report(args.out, results, run_config, descriptions)
    if not args.quiet:
        _print_summary(results, run_config, elapsed)
    return path


def _print_summary(results: dict, config: dict, elapsed: float) -> None:
    for s, runs in results.items():
        summary = summarise(runs, config["modalities"][s])
        print(f"{s}: " + ", ".join(f"{k} {100 * sum(r['fused'] for r in v) / len(v):.1f} %" for k, v in runs.items()
                                    if not k.startswith("alone:")))
        if "weak" in summary:
            w = summary["weak"]
            print(f"  weak modality {w}: probe joint {100 * summary['baseline'][w]:.1f} %, alone "
                  f"{100 * summary['ceilings'][w]:.1f} % (gap {100 * summary['gaps'][w]:.1f} points); share closed: "
                  + ", ".join(f"{k} {100 * c['share_closed']:.0f} %" for k, c in summary["closed"].items()))
    print(f"done in {elapsed:.0f} s")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``mmgrad`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    args.argv = argv
    try:
        path = run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"mmgrad {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a forced MMGRAD_BACKEND that cannot serve: a set-up error too
        if not str(exc).startswith("mmgrad backend"):
            raise
        print(f"mmgrad {args.command}: error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
