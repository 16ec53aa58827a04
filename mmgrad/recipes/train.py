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
* ``opm``        OPM: drops the dominant modality's features in the forward pass (``q_base`` 0.4,
                 ``lam`` 0.5, ``p_exe`` 0.7, from epoch ``start`` 5 on: a warm-up as in the paper,
                 whose code starts one epoch later, at ``epoch > 5``).
* ``relearn``    Diagnosing & Re-learning: every ``every`` epochs (7: epochs 7, 14, 21 of 30, the
                 paper's 20/40/60 of 90 scaled), at most ``times`` (3), each encoder is pulled toward
                 its initial weights by tanh(``lam`` x train/validation purity gap) (``lam`` 3). The
                 validation split is the data set's own, else ``val`` (0.1) of the training split.
* ``sample``, ``modality``  sample- / modality-level valuation: from epoch ``start`` (4) on, each
                 epoch adds re-sampled training rows in which only the low-contribution modality
                 feeds the head (``part_ratio`` 0.2 and ``alpha`` 1 for ``modality``).
* ``crmt``       CRMT: orthogonal-normalised split head with per-class integration weights, fused
                 cross-entropy + ``rho`` (2) x margin regulariser; then ``stage2`` epochs (epochs // 3
                 - 1 when -1) tuning the integration weights for the certified bound.
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
    "opm": ({"q_base": 0.4, "lam": 0.5, "p_exe": 0.7, "start": 5}, False,
            "OPM: drop the dominant modality's features in the forward pass"),
    "relearn": ({"lam": 3.0, "every": 7, "times": 3, "val": 0.1}, False,
                "Diagnosing & Re-learning: pull encoders toward init by their purity gap"),
    "sample": ({"start": 4}, False, "sample-level valuation: re-sample rows of low-contribution modalities"),
    "modality": ({"start": 4, "part_ratio": 0.2, "alpha": 1.0}, False,
                 "modality-level valuation: re-sample rows of the weaker modality"),
    "crmt": ({"rho": 2.0, "stage2": -1}, False, "CRMT: orthogonal split head + margin loss, certified-bound stage 2"),
}


# Methods that train with the plain optimizer: they act on the loss, the forward pass, the data or
# between epochs, not on the gradients.
_PLAIN_OPTIMIZER = ("joint", "sum", "opm", "relearn", "sample", "modality", "crmt")


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
        defaults = METHODS[name][0]
        unknown = set(opts) - set(defaults)
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} for {name}; it takes {sorted(defaults)}")
        for key, value in opts.items():
            numeric = isinstance(defaults[key], (int, float)) and not isinstance(defaults[key], bool)
            if numeric and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"option {key} of {name} takes a number, got {value!r}")
        opts = {**defaults, **opts}
    elif name not in mmgrad.aggregators.NAMES:
        raise ValueError(f"unknown method {name!r}: not one of {', '.join(METHODS)} nor an aggregator "
                         f"({', '.join(mmgrad.aggregators.NAMES)})")
    else:
        try:
            mmgrad.aggregators.get(name, **opts)
        except (ValueError, TypeError) as exc:
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
    if spec.name in _PLAIN_OPTIMIZER or spec.alone:
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
        train, val = data.train, data.val
        if spec.name == "relearn" and val is None:
            train, val = _validation_split(train, spec.opts["val"], 0)
        _EpochHooks(spec, model, train, val, data.classes, 0)  # OPM, Re-learning, valuation options
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{spec.label} cannot run on {data.spec}: {exc}") from None


@torch.no_grad()
def _evaluate(model: MultimodalNet, split: MultiViewSplit) -> tuple[float, dict, dict, dict]:
    """Fused accuracy, per-modality head-part and unimodal-head accuracies, and the features."""
    out = model({m: split.views[m] for m in model.modalities})
    parts = model.head_parts(out.features)
    head = {m: accuracy(parts[m], split.labels) for m in model.modalities}
    uni = {m: accuracy(out.unimodal[m], split.labels) for m in out.unimodal}
    return accuracy(out.fused, split.labels), head, uni, out.features


def _validation_split(train: MultiViewSplit, fraction: float, seed: int) -> tuple[MultiViewSplit, MultiViewSplit]:
    """A seeded random ``fraction`` of ``train`` held out as validation (for methods that need one
    when the data set has none; the test split is never used for it)."""
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction}")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(10_000 + seed))
    n_val = max(1, int(round(fraction * len(train))))
    parts = []
    for idx in (perm[n_val:], perm[:n_val]):
        parts.append(MultiViewSplit({m: v[idx] for m, v in train.views.items()}, train.labels[idx]))
    return parts[0], parts[1]


class _EpochHooks:
    """The forward-, data- and schedule-level methods' parts of the training loop: the rows an
    epoch trains on, the feature edit before the head, the loss, and the end-of-epoch callback."""

    def __init__(self, spec: MethodSpec, model: MultimodalNet, train: MultiViewSplit, val: Optional[MultiViewSplit],
                 classes: int, seed: int):
        self.spec, self.model, self.train, self.val, self.classes = spec, model, train, val, classes
        self.modalities = model.modalities
        o = spec.opts
        self.opm = self.relearn = self.resampler = None
        self.extra = None  # re-sampled rows for the next epoch (valuation methods)
        if spec.name == "opm":
            from mmgrad.methods.opm import OPM

            self.opm = OPM(self.modalities, q_base=o["q_base"], lam=o["lam"], p_exe=o["p_exe"], start_epoch=o["start"], seed=seed)
        elif spec.name == "relearn":
            from mmgrad.methods.relearning import Relearning

            encoders = {m: model.encoders[m] for m in self.modalities}
            self.relearn = Relearning(encoders, lam=o["lam"], every=o["every"], max_times=o["times"], seed=seed)
        elif spec.name in ("sample", "modality"):
            from mmgrad.methods.valuation import ValuationResampler

            kwargs = {"part_ratio": o["part_ratio"], "alpha": o["alpha"]} if spec.name == "modality" else {}
            self.resampler = ValuationResampler(self.modalities, level=spec.name, start_epoch=o["start"], seed=seed, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        if self.opm is not None:
            self.opm.set_epoch(epoch)
            self.opm.train()

    def rows(self, g: torch.Generator) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """This epoch's training rows (sample indices, shuffled) and which modalities feed the head
        for each (None: all of them)."""
        n = len(self.train)
        if self.extra is None:
            return torch.randperm(n, generator=g), None
        from mmgrad.methods.valuation import epoch_rows

        index, keep = epoch_rows(n, self.extra)
        perm = torch.randperm(index.numel(), generator=g)
        return index[perm], keep[perm]

    def loss(self, z: dict, keep: Optional[torch.Tensor], y: torch.Tensor):
        """The training loss and the model outputs on the batch's features ``z``."""
        if keep is not None:
            z = {m: z[m] * keep[:, k : k + 1].to(z[m].dtype) for k, m in enumerate(self.modalities)}
        if self.opm is not None:
            parts = self.model.head_parts(z)
            dropped = self.opm(z, parts, y)
            out = self.model.outputs(dropped.features)
            return self.opm.loss(out.fused, y, dropped), out
        out = self.model.outputs(z)
        if self.spec.name == "crmt":
            from mmgrad.methods.crmt import crmt_loss

            return crmt_loss(self.model.fusion(z), y, rho=self.spec.opts["rho"]), out
        return F.cross_entropy(out.fused, y), out

    @torch.no_grad()
    def end_epoch(self, epoch: int) -> Optional[dict]:
        """Re-learning's diagnosis, the valuation methods' re-sampling plan; returns what to log."""
        model = self.model
        if self.relearn is not None and self.relearn.due(epoch + 1):
            # After epoch e (0-based) the model has trained e + 1 epochs: the paper's "epoch 20".
            model.eval()
            z_train = model.encode(self.train.views)
            z_val = model.encode(self.val.views)
            alpha = self.relearn.diagnose(z_train, self.train.labels, z_val, self.val.labels)
            self.relearn.relearn(alpha, epoch=epoch + 1)
            return {"relearn_alpha": alpha}
        if self.resampler is not None and epoch >= self.resampler.start_epoch:
            model.eval()
            from mmgrad.methods.valuation import modality_shapley

            phi = modality_shapley(model.head, model.encode(self.train.views), self.train.labels,
                                   names=self.resampler.names)
            self.extra = self.resampler.plan(phi, epoch=epoch)
            return {"extra_rows": int(self.extra.index.numel()), "mean_shapley": phi.mean(0).tolist()}
        return None

    def finish(self, config: TrainConfig, seed: int) -> Optional[dict]:
        """CRMT's second stage: tune the integration weights for the certified bound (encoders and
        the normalised head frozen, so the unimodal logits are computed once)."""
        if self.spec.name != "crmt":
            return None
        from mmgrad.methods.crmt import lipschitz_estimate

        model, head = self.model, self.model.fusion
        epochs = self.spec.opts["stage2"]
        epochs = max(config.epochs // 3 - 1, 0) if epochs < 0 else int(epochs)
        model.eval()
        lipschitz = lipschitz_estimate(lambda xs: model(xs).fused, self.train.views, self.classes, names=head.names)
        with torch.no_grad():
            uni = head(model.encode(self.train.views)).unimodal
            h = torch.stack([uni[m] for m in head.names])
        losses = head.tune_integration(h, self.train.labels, lipschitz, epochs=epochs, lr=0.03 * config.lr,
                                       batch_size=config.batch_size, generator=torch.Generator().manual_seed(seed))
        return {"stage2_loss": losses}


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
    parts on the training batches, train head-part accuracy, test fused and head-part accuracy,
    and what the epoch-level methods did). ``on_epoch(epoch, record)`` is called after every
    epoch; ``writer`` is an optional TensorBoard ``SummaryWriter``.
    """
    modalities = [spec.alone] if spec.alone else list(data.modalities)
    if spec.alone and spec.alone not in data.modalities:
        raise ValueError(f"{spec.label}: {spec.alone!r} is not a modality of {data.spec} ({', '.join(data.modalities)})")
    torch.manual_seed(seed)
    model = build_model(
        {m: data.shapes[m] for m in modalities}, data.classes, encoder=config.encoder, hidden=config.hidden,
        features=config.features, fusion="crmt" if spec.name == "crmt" else config.fusion,
        unimodal_heads=spec.needs_unimodal_heads,
    )
    inner = make_optimizer(config, model.parameters())
    balanced = _balanced(spec, model, inner)
    opt = balanced if balanced is not None else inner
    train, test, val = data.train, data.test, data.val
    if spec.name == "relearn" and val is None:
        train, val = _validation_split(train, spec.opts["val"], seed)
    hooks = _EpochHooks(spec, model, train, val, data.classes, seed)
    g = torch.Generator().manual_seed(seed)
    history: list[dict] = []
    times: list[float] = []
    for epoch in range(config.epochs):
        model.train()
        start = time.perf_counter()
        if balanced is not None:
            balanced.set_epoch(epoch)
        hooks.set_epoch(epoch)
        scores = torch.zeros(len(modalities), dtype=torch.float64)
        correct = torch.zeros(len(modalities), dtype=torch.float64)
        loss_sum, seen = 0.0, 0
        rows, row_keep = hooks.rows(g)
        for b in range(0, rows.numel(), config.batch_size):
            idx = rows[b : b + config.batch_size]
            keep = row_keep[b : b + config.batch_size] if row_keep is not None else None
            xs = {m: train.views[m][idx] for m in modalities}
            y = train.labels[idx]
            z = model.encode(xs)
            loss, out = hooks.loss(z, keep, y)
            parts = model.head_parts(out.features)
            opt.zero_grad()
            name = spec.name
            if balanced is None and name != "sum":
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
        action = hooks.end_epoch(epoch)
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
        if action:
            record.update(action)
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

    finish = hooks.finish(config, seed)
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
    if finish:
        result.update(finish)
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
    """Undo :func:`setup_determinism` (thread count, deterministic mode, and denormal flushing,
    back to torch's default: off; torch cannot report what it was)."""
    torch.set_flush_denormal(False)
    torch.set_num_threads(previous["threads"])
    torch.use_deterministic_algorithms(previous["deterministic"], warn_only=previous["warn_only"])
