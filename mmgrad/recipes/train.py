"""Training recipes: one run of one method on one data set and seed, and the comparison loop.

Methods (``name[:key=value[:key=value...]]`` on the command line):

* ``joint``      the fused cross-entropy only (plain joint training, the baseline).
* ``sum``        fused + unimodal cross-entropies summed, one plain backward (the ``sum``
                 aggregator on the same objectives, without the Gram matrix); option ``weight``
                 on the unimodal losses (1).
* ``ogm``, ``ogm_ge``  OGM / OGM-GE on the encoders (``alpha`` 0.8, ``params`` ``weights``:
                 MLP encoders have no conv kernels; ``start``/``end`` epochs of the window).
* ``mmpareto``   MMPareto, fused vs each unimodal loss per encoder (``gamma`` 1.5).
* ``agm``        AGM from the fused head's Shapley responses (``alpha`` 0.1).
* ``inforeg``    InfoReg (two modalities; the strong one is monitored).
* any aggregator of :mod:`mmgrad.aggregators` (``upgrad``, ``mgda``, ``pcgrad``, ``cagrad``, ...):
                 the fused and the unimodal losses as objectives on the encoders' parameters;
                 options go to the aggregator.
* ``alone:<modality>``  the same encoder and a linear head trained on that modality only (the
                 ceiling of its probe).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

import mmgrad
import mmgrad.nn
from mmgrad.recipes.data import MultiViewData, MultiViewSplit
from mmgrad.recipes.metrics import accuracy, confidence_scores, discrepancy_ratio, linear_probe, shapley_accuracy
from mmgrad.recipes.models import MultimodalNet, build_model

__all__ = ["MethodSpec", "TrainConfig", "parse_method", "run_one", "METHODS", "method_help", "setup_determinism",
           "restore_settings", "check_method"]

# name -> (default options, needs unimodal heads, one-line description)
METHODS: dict[str, tuple[dict, bool, str]] = {
    "joint": ({}, False, "fused cross-entropy only (the baseline)"),
    "sum": ({"weight": 1.0}, True, "fused + weight x unimodal cross-entropies, summed"),
    "ogm": ({"alpha": 0.8, "params": "weights", "start": 0, "end": 1000}, False, "OGM gradient modulation"),
    "ogm_ge": ({"alpha": 0.8, "params": "weights", "start": 0, "end": 1000}, False, "OGM + generalisation-enhancement noise"),
    "mmpareto": ({"gamma": 1.5}, True, "MMPareto: Pareto integration of fused and unimodal gradients"),
    "agm": ({"alpha": 0.1}, False, "AGM: adaptive modulation from Shapley responses"),
    "inforeg": ({"threshold": 0.05}, False, "InfoReg: proximal regulation of the dominant encoder (2 modalities)"),
}


def method_help() -> str:
    """Lines describing every method and its default options (for ``--help``)."""
    lines = []
    for name, (opts, _, text) in METHODS.items():
        lines.append(f"  {name:<18} {text}")
        if opts:
            lines.append(f"  {'':<18}   options: " + ":".join(f"{k}={v}" for k, v in opts.items()))
    lines.append(f"  {'<aggregator>':<18} fused + unimodal losses as objectives on the encoders, aggregated by one of")
    lines.append(f"  {'':<18}   {', '.join(n for n in mmgrad.aggregators.NAMES if n not in METHODS)}")
    lines.append(f"  {'':<18}   (options go to the aggregator, e.g. cagrad:c=0.4)")
    lines.append(f"  {'alone:<modality>':<18} that modality alone (compare adds one per modality)")
    return "\n".join(lines)


@dataclass(frozen=True)
class MethodSpec:
    """A method name, its options (defaults filled in) and the label it was given."""

    name: str
    options: tuple = ()
    label: str = ""

    @property
    def opts(self) -> dict:
        return dict(self.options)

    @property
    def alone(self) -> Optional[str]:
        return self.name[6:] if self.name.startswith("alone:") else None

    @property
    def aggregator(self) -> bool:
        return self.alone is None and self.name not in METHODS

    @property
    def needs_unimodal_heads(self) -> bool:
        return self.aggregator or (self.name in METHODS and METHODS[self.name][1])


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_method(text: str) -> MethodSpec:
    """``"ogm_ge:alpha=0.5:end=20"`` -> MethodSpec with the defaults of the rest; ``"alone:fou"``."""
    text = text.strip()
    if text.startswith("alone:"):
        return MethodSpec(text, (), text)
    name, *parts = text.split(":")
    opts: dict[str, Any] = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"method option {part!r} in {text!r} is not key=value")
        opts[key] = _value(value)
    if name in METHODS:
        unknown = set(opts) - set(METHODS[name][0])
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} for {name}; it takes {sorted(METHODS[name][0])}")
        opts = {**METHODS[name][0], **opts}
    else:
        try:
            mmgrad.aggregators.get(name, **opts)
        except ValueError as exc:
            raise ValueError(f"unknown method {name!r}: not one of {', '.join(METHODS)} nor an aggregator ({exc})") from None
        except TypeError as exc:
            raise ValueError(f"bad options for aggregator {name!r}: {exc}") from None
    return MethodSpec(name, tuple(sorted(opts.items())), text)


@dataclass
class TrainConfig:
    """Everything a run depends on besides the data set, the method and the seed."""

    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    encoder: str = "mlp"
    hidden: tuple = (64,)
    features: int = 32
    fusion: str = "concat"
    test_fraction: float = 0.3
    val_fraction: float = 0.0
    probe_steps: int = 200

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d


def make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    """The wrapped torch optimizer (SGD with momentum as in the papers, or Adam / AdamW)."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    raise ValueError(f"optimizer must be sgd, adam or adamw, got {config.optimizer!r}")


def _balanced(spec: MethodSpec, model: MultimodalNet, inner: torch.optim.Optimizer):
    """The BalancedOptimizer for ``spec`` (None for methods that need only the plain optimizer)."""
    o = spec.opts
    encoders = {m: model.encoders[m] for m in model.modalities}
    if spec.name in ("joint", "sum") or spec.alone:
        return None
    if spec.name in ("ogm", "ogm_ge"):
        cls = mmgrad.OGMGE if spec.name == "ogm_ge" else mmgrad.OGM
        method = cls(alpha=o["alpha"], params=o["params"], modulation_starts=o["start"], modulation_ends=o["end"])
        return mmgrad.BalancedOptimizer(inner, modalities=encoders, method=method)
    if spec.name == "mmpareto":
        return mmgrad.BalancedOptimizer(inner, modalities=encoders, method=mmgrad.MMPareto(gamma=o["gamma"]))
    if spec.name == "agm":
        return mmgrad.BalancedOptimizer(inner, modalities=encoders, method=mmgrad.AGM(alpha=o["alpha"]))
    if spec.name == "inforeg":
        return mmgrad.BalancedOptimizer(inner, modalities=encoders, method=mmgrad.InfoReg(threshold=o["threshold"]))
    shared = [p for m in model.modalities for p in model.encoders[m].parameters()]
    return mmgrad.BalancedOptimizer(inner, shared=shared, method=mmgrad.aggregators.get(spec.name, **o))


def check_method(data: MultiViewData, spec: MethodSpec, config: TrainConfig) -> None:
    """Raise ValueError now if ``spec`` cannot run on ``data`` (e.g. InfoReg on three modalities),
    instead of after the runs before it have trained."""
    if spec.alone:
        if spec.alone not in data.modalities:
            raise ValueError(f"{spec.label}: {spec.alone!r} is not a modality of {data.spec} ({', '.join(data.modalities)})")
        return
    model = build_model(data.shapes, data.classes, encoder=config.encoder, hidden=config.hidden,
                        features=config.features, fusion=config.fusion, unimodal_heads=spec.needs_unimodal_heads)
    try:
        _balanced(spec, model, make_optimizer(config, model.parameters()))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{spec.label} cannot run on {data.spec}: {exc}") from None


def _batches(n: int, batch: int, g: torch.Generator):
    perm = torch.randperm(n, generator=g)
    for i in range(0, n, batch):
        yield perm[i : i + batch]


@torch.no_grad()
def _evaluate(model: MultimodalNet, split: MultiViewSplit) -> tuple[float, dict, dict, dict]:
    """Fused accuracy, per-modality head-part and unimodal-head accuracies, and the features."""
    out = model({m: split.views[m] for m in model.modalities})
    parts = model.head_parts(out.features)
    head = {m: accuracy(parts[m], split.labels) for m in model.modalities}
    uni = {m: accuracy(out.unimodal[m], split.labels) for m in out.unimodal}
    return accuracy(out.fused, split.labels), head, uni, out.features


def run_one(
    data: MultiViewData,
    spec: MethodSpec,
    seed: int,
    config: TrainConfig,
    on_epoch: Optional[Callable[[int, dict], None]] = None,
    writer=None,
) -> dict:
    """Train ``spec`` on ``data`` with ``seed`` and measure it on the test split.

    Returns a JSON-able dict: ``fused`` (test accuracy), ``head_acc[m]`` (m's part of the fusion
    head), ``unimodal_acc[m]`` (its unimodal head, when the method trains one), ``probe[m]`` (linear
    probe on m's frozen encoder), ``shapley[m]`` (exact Shapley contribution to test accuracy,
    absent modalities' features zeroed), ``epoch_time`` (median seconds of training per epoch) and
    ``history`` (per epoch: loss, the OGM confidence scores and discrepancy ratio of the head
    parts on the training batches, train head-part accuracy, test fused and head-part accuracy).
    ``on_epoch(epoch, record)`` is called after every epoch; ``writer`` is an optional TensorBoard
    ``SummaryWriter``.
    """
    modalities = [spec.alone] if spec.alone else list(data.modalities)
    if spec.alone and spec.alone not in data.modalities:
        raise ValueError(f"{spec.label}: {spec.alone!r} is not a modality of {data.spec} ({', '.join(data.modalities)})")
    torch.manual_seed(seed)
    model = build_model(
        {m: data.shapes[m] for m in modalities}, data.classes, encoder=config.encoder, hidden=config.hidden,
        features=config.features, fusion=config.fusion, unimodal_heads=spec.needs_unimodal_heads,
    )
    inner = make_optimizer(config, model.parameters())
    balanced = _balanced(spec, model, inner)
    opt = balanced if balanced is not None else inner
    train, test = data.train, data.test
    g = torch.Generator().manual_seed(seed)
    history: list[dict] = []
    times: list[float] = []
    for epoch in range(config.epochs):
        model.train()
        start = time.perf_counter()
        if balanced is not None:
            balanced.set_epoch(epoch)
        scores = torch.zeros(len(modalities), dtype=torch.float64)
        correct = torch.zeros(len(modalities), dtype=torch.float64)
        loss_sum, seen = 0.0, 0
        for idx in _batches(len(train), config.batch_size, g):
            xs = {m: train.views[m][idx] for m in modalities}
            y = train.labels[idx]
            out = model(xs)
            loss = F.cross_entropy(out.fused, y)
            parts = model.head_parts(out.features)
            opt.zero_grad()
            name = spec.name
            if spec.alone or name == "joint":
                loss.backward()
            elif name == "sum":
                w = spec.opts["weight"]
                (loss + w * sum(F.cross_entropy(out.unimodal[m], y) for m in modalities)).backward()
            elif name in ("ogm", "ogm_ge", "inforeg"):
                opt.backward(loss, logits=parts, targets=y)
            elif name == "agm":
                opt.backward(loss, logits=mmgrad.nn.shapley_logits(model.head, out.features), targets=y)
            elif name == "mmpareto":
                opt.backward({"fusion": loss, **{m: F.cross_entropy(out.unimodal[m], y) for m in modalities}})
            else:
                opt.backward([loss] + [F.cross_entropy(out.unimodal[m], y) for m in modalities])
            opt.step()
            # Monitoring only (detached): the OGM-style scores of each modality's head part.
            with torch.no_grad():
                scores += confidence_scores(parts, y, modalities)
                correct += torch.stack([(parts[m].argmax(1) == y).sum() for m in modalities]).double()
                loss_sum += loss.item() * y.numel()
                seen += y.numel()
        times.append(time.perf_counter() - start)
        model.eval()
        fused_acc, head_acc, _, _ = _evaluate(model, test)
        ratio = discrepancy_ratio(scores, "pairwise")
        record = {
            "epoch": epoch,
            "loss": loss_sum / max(seen, 1),
            "scores": {m: scores[k].item() for k, m in enumerate(modalities)},
            "ratio": {m: ratio[k].item() for k, m in enumerate(modalities)},
            "train_head_acc": {m: correct[k].item() / max(seen, 1) for k, m in enumerate(modalities)},
            "test_fused": fused_acc,
            "test_head_acc": head_acc,
        }
        history.append(record)
        if writer is not None:
            writer.add_scalar("loss/train", record["loss"], epoch)
            writer.add_scalar("accuracy/test_fused", fused_acc, epoch)
            for m in modalities:
                writer.add_scalar(f"accuracy/test_head_{m}", head_acc[m], epoch)
                writer.add_scalar(f"ratio/{m}", record["ratio"][m], epoch)
        if not math.isfinite(record["loss"]):
            break  # diverged: measure what there is, the report shows it
        if on_epoch is not None:
            on_epoch(epoch, record)

    model.eval()
    fused_acc, head_acc, uni_acc, z_test = _evaluate(model, test)
    with torch.no_grad():
        z_train = model({m: train.views[m] for m in modalities}).features
    probe = {
        m: linear_probe(z_train[m], train.labels, z_test[m], test.labels, data.classes, config.probe_steps)
        for m in modalities
    }
    shapley = shapley_accuracy(model.head, z_test, test.labels)
    result = {
        "method": spec.label,
        "seed": seed,
        "fused": fused_acc,
        "head_acc": head_acc,
        "unimodal_acc": uni_acc,
        "probe": probe,
        "shapley": shapley,
        # The median: one epoch delayed by another process on a shared machine does not skew it.
        "epoch_time": statistics.median(times) if times else 0.0,
        "history": history,
    }
    if data.val is not None:
        result["val_fused"] = _evaluate(model, data.val)[0]
    return result


def setup_determinism(threads: Optional[int] = 1) -> dict:
    """Deterministic kernels (cheap on CPU), flushed denormals and the CPU thread count; returns
    the previous settings for :func:`restore_settings`.

    One thread by default: these models are tiny, so a second thread buys little, and on a machine
    shared with other processes OpenMP threads contending for the cores slow every step by an order
    of magnitude. Under plain joint training the weak branch's activations decay into subnormal
    floats, which x86 CPUs process hundreds of times slower; flushing them changes no reported figure.
    """
    previous = {
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
    }
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_flush_denormal(True)
    if threads:
        torch.set_num_threads(threads)
    return previous


def restore_settings(previous: dict) -> None:
    """Undo :func:`setup_determinism` (thread count and deterministic mode)."""
    torch.set_num_threads(previous["threads"])
    torch.use_deterministic_algorithms(previous["deterministic"], warn_only=previous["warn_only"])
