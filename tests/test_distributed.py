"""Distributed training (mmgrad.distributed): DDP and FSDP2 on CPU with gloo, 2 and 3 ranks.

Each world size spawns its ranks once (``torch.multiprocessing``, ``init_method=file://``); every
rank runs every scenario (DDP, FSDP2, ...) and method configuration for a few steps on its slice of
a global batch and saves the final parameters and the collectives it issued (recorded with a
dispatch mode that sees every c10d op). This process then checks, per configuration:

* the ranks agree bitwise;
* the parameters equal one process that trains on the concatenated batch: float64 throughout,
  ``|distributed - single| <= 1e-12 + 1e-10 |single|`` after 3 steps (only the summation order
  differs: rank averages against a mean over the whole batch, partial Grams added up against one
  Gram; observed differences are about 1e-16);
* what crossed ranks: under DDP the K gradient rows exactly once per step (one all-reduce of K x P
  elements, none in backward); under FSDP2 only the K x K Gram or the per-tensor statistics and the
  per-batch scores during ``step()`` (the gradients themselves are only reduce-scattered by FSDP in
  backward, one reduce-scatter per objective).
"""

from __future__ import annotations

import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import mmgrad

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny references: more threads only contend

B = 4  # samples per rank per micro-batch
STEPS = 3
TOL = dict(rtol=1e-10, atol=1e-12)  # observed: at most ~1e-16 apart


class Net(nn.Module):
    """Two small conv encoders, a concat head and unimodal heads; no BatchNorm (its batch statistics
    would differ between one rank's batch and the concatenated one)."""

    def __init__(self, feat=4, classes=3):
        super().__init__()
        self.audio = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, feat))
        self.visual = nn.Sequential(nn.Conv2d(2, 5, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, feat))
        self.head = nn.Linear(2 * feat, classes)
        self.uni_audio, self.uni_visual = nn.Linear(feat, classes), nn.Linear(feat, classes)

    def forward(self, a, v):
        za, zv = self.audio(a), self.visual(v)
        out = self.head(torch.cat([za, zv], 1))
        split = mmgrad.nn.split_concat_logits(self.head, {"audio": za, "visual": zv})
        uni = {"audio": self.uni_audio(za), "visual": self.uni_visual(zv)}
        return out, split, uni


def batches(world: int, micro: int = 1):
    """Per step, per micro-batch: the global (a, v, y) of world * B samples."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(STEPS):
        out.append([
            (torch.randn(world * B, 1, 5, 5, generator=g, dtype=torch.float64),
             torch.randn(world * B, 2, 5, 5, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (world * B,), generator=g))
            for _ in range(micro)
        ])
    return out


# name -> (method factory (model -> method or aggregator name), how backward is called, options)
CONFIGS = {
    "ogm": (lambda m: mmgrad.OGM(alpha=0.8), "logits", {}),
    "ogmge": (lambda m: mmgrad.OGMGE(alpha=0.8, params="all"), "logits", {}),  # seed drawn per rank, broadcast
    "ogm_update": (lambda m: mmgrad.OGM(alpha=0.5, params="weights", scale="update"), "logits", {"adam": True}),
    "mmpareto": (lambda m: mmgrad.MMPareto(), "pareto", {}),
    "mmpareto_accum": (lambda m: mmgrad.MMPareto(), "pareto", {"micro": 2}),
    # GradScaler, and an inf on one rank at step 1: opt.synchronize() before scaler.step(opt) makes
    # every rank skip that step together (and equal the single process, which skips it too).
    "mmpareto_scaler": (lambda m: mmgrad.MMPareto(), "pareto", {"scaler": True}),
    # opt.synchronize() between two micro-batches: the batch statistics it summed count once
    "ogm_sync_mid": (lambda m: mmgrad.OGM(alpha=0.8), "logits", {"micro": 2, "sync_mid": True}),
    # an inf in rank 1's rows at step 1, no GradScaler: every rank skips, method state stays equal
    "ogmge_inf": (lambda m: mmgrad.OGMGE(alpha=0.8, params="all"), "logits", {"inf_row": True}),
    "agm": (lambda m: mmgrad.AGM(alpha=0.1, fusion=list(m.head.parameters()), fusion_clip=0.02), "logits", {}),
    "inforeg": (lambda m: mmgrad.InfoReg(threshold=-1.0), "logits", {"epochs": True}),
    "upgrad": (lambda m: "upgrad", "multi", {}),
    "mgda": (lambda m: "mgda", "multi", {}),
    "pcgrad": (lambda m: "pcgrad", "multi", {}),
    "cagrad": (lambda m: "cagrad", "multi", {}),
    "graddrop": (lambda m: "graddrop", "multi", {}),
    # a seed each rank draws from its own RNG: the aggregator's seed is broadcast as OGM-GE's
    "graddrop_rank_seed": (lambda m: mmgrad.aggregators.get("graddrop", seed=int(torch.randint(0, 2**31, ()))),
                           "multi", {}),
    # the head frozen when the optimizer is built, unfrozen before training: still averaged
    "ogm_unfrozen_head": (lambda m: mmgrad.OGM(alpha=0.8), "logits", {"unfreeze_head": True}),
    # "local*" modes: an inf in rank 1's modality gradient with a GradScaler (its own inf check
    # sees .grad only); synchronize() agrees on the rows too, every rank skips
    "ogm_scaler_modality_inf": (lambda m: mmgrad.OGM(alpha=0.8), "logits", {"scaler": True, "inf_in": "audio"}),
}
# Every aggregator (the slow test); the default run covers a representative few above.
for _agg in mmgrad.aggregators.NAMES:
    CONFIGS.setdefault(_agg, (lambda m, _a=_agg: _a, "multi", {}))
FAST_CONFIGS = ["ogm", "ogmge", "ogm_update", "ogm_sync_mid", "mmpareto", "mmpareto_accum", "mmpareto_scaler", "agm",
                "inforeg", "upgrad", "mgda", "pcgrad", "cagrad", "graddrop", "graddrop_rank_seed", "ogm_unfrozen_head"]
FSDP_CONFIGS = ["ogm", "ogmge", "mmpareto", "agm", "inforeg", "upgrad", "graddrop"]
LOCAL_CONFIGS = ["ogmge", "ogmge_inf", "mmpareto", "mmpareto_scaler", "upgrad", "ogm_scaler_modality_inf"]
DIM1_CONFIGS = ["ogmge", "mmpareto", "graddrop"]  # FSDP2 with Shard(1) where it divides evenly


def build(name, model, rank=0, **dist_kwargs):
    factory, kind, options = CONFIGS[name]
    params = list(model.parameters())
    inner = torch.optim.Adam(params, lr=0.01) if options.get("adam") else torch.optim.SGD(params, lr=0.1, momentum=0.9)
    torch.manual_seed(100 + rank)  # ranks draw different default seeds: OGM-GE's must be broadcast
    method = factory(model)
    if options.get("scaler"):
        dist_kwargs["grad_scaler"] = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    if options.get("unfreeze_head"):
        model.head.requires_grad_(False)
    if kind == "multi":
        shared = list(model.audio.parameters()) + list(model.visual.parameters())
        opt = mmgrad.BalancedOptimizer(inner, shared=shared, method=method, **dist_kwargs)
    else:
        opt = mmgrad.BalancedOptimizer(inner, modalities={"audio": model.audio, "visual": model.visual}, method=method,
                                       **dist_kwargs)
    model.head.requires_grad_(True)
    return opt


def backward(opt, kind, out, split, uni, y, scale=lambda loss: loss):
    if kind == "logits":
        opt.backward(scale(F.cross_entropy(out, y)), logits=split, targets=y)
    elif kind == "pareto":
        opt.backward({"fusion": scale(F.cross_entropy(out, y)), "audio": scale(F.cross_entropy(uni["audio"], y)),
                      "visual": scale(F.cross_entropy(uni["visual"], y))})
    else:
        opt.backward([scale(F.cross_entropy(out, y)), scale(F.cross_entropy(uni["audio"], y)),
                      scale(F.cross_entropy(uni["visual"], y))])


class CommRecorder(TorchDispatchMode):
    """Records every c10d collective (op name, numel of each tensor argument)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional"):
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))
            self.ops.append((func.__name__.split(".")[0], [t.numel() for t in leaves if isinstance(t, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


def train(name, model, forward, opt, lo, hi, world):
    """STEPS steps on samples [lo, hi) of the global batches of ``world`` ranks; returns the
    collectives issued in each backward and each step."""
    _, kind, options = CONFIGS[name]
    comm = {"backward": [], "step": []}
    for t, micro_batches in enumerate(batches(world, options.get("micro", 1))):
        if options.get("epochs"):
            opt.set_epoch(t)
        opt.zero_grad()
        scaler = opt.grad_scaler
        for i, (a, v, y) in enumerate(micro_batches):
            out, split, uni = forward(a[lo:hi], v[lo:hi])
            with CommRecorder() as rec:
                backward(opt, kind, out, split, uni, y[lo:hi], scaler.scale if scaler else (lambda loss: loss))
            comm["backward"].append(rec.ops)
            if options.get("sync_mid") and i == 0:
                opt.synchronize()
        with CommRecorder() as rec:
            if scaler is None:
                if options.get("inf_row") and t == 1 and (lo == B or hi - lo == world * B):
                    opt._buffer.row(0)[0] = float("inf")
                opt.step()
            else:
                if t == 1 and (lo == B or hi - lo == world * B):  # rank 1, or the single process
                    where = model.audio[0].weight if options.get("inf_in") == "audio" else model.head.bias
                    where.grad.view(-1)[0] = float("inf")
                opt.synchronize()
                scaler.step(opt)
                scaler.update()
        comm["step"].append(rec.ops)
    return comm


def single_process(name, world):
    """The reference: one process on the concatenated batch (with rank 0's seeds)."""
    torch.manual_seed(0)
    model = Net().double()
    opt = build(name, model, distributed="off")  # "off": a single process even inside a process group
    train(name, model, model, opt, 0, world * B, world)
    return [p.detach().clone() for p in model.parameters()]


# --- the spawned ranks ------------------------------------------------------------------------


# Everything one world size needs runs in one spawn (starting the ranks costs seconds).
JOBS = {
    2: [("ddp", FAST_CONFIGS), ("fsdp", FSDP_CONFIGS), ("fsdp_dim1", DIM1_CONFIGS), ("plain", ["ogmge", "mmpareto"]),
        ("ddp_local_gram", LOCAL_CONFIGS), ("ddp_local", LOCAL_CONFIGS), ("ddp_bn", ["ogm"]),
        ("errors", ["nonmember", "scaler_nosync", "fsdp_sync_off"])],
    3: [("ddp", FAST_CONFIGS), ("fsdp", FSDP_CONFIGS), ("fsdp_dim1", DIM1_CONFIGS)],
    "slow": [("ddp", list(mmgrad.aggregators.NAMES)), ("fsdp", list(mmgrad.aggregators.NAMES))],
}


def _worker(rank, world, job, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        for scenario, names in JOBS[job]:
            for name in names:
                results[scenario, name] = _run_rank(scenario, name, rank, world)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


class BNNet(Net):
    """Net with a BatchNorm in the audio encoder (its running statistics are per rank)."""

    def __init__(self):
        super().__init__()
        self.audio[0] = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3))


def _run_rank(scenario, name, rank, world):
    if scenario == "errors":
        return _expected_error(name, rank, world)
    torch.manual_seed(0)
    model = (BNNet() if scenario == "ddp_bn" else Net()).double()
    if scenario in ("fsdp", "fsdp_dim1"):
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Shard

        def placement(p):  # columns where they split evenly: a shard is then not a contiguous range
            return Shard(1) if scenario == "fsdp_dim1" and p.dim() > 1 and p.shape[1] % world == 0 else Shard(0)

        fully_shard(model.audio, shard_placement_fn=placement)
        fully_shard(model.visual, shard_placement_fn=placement)
        fully_shard(model, shard_placement_fn=placement)
        opt = build(name, model, rank)
        forward = model
    elif scenario == "plain":  # no DDP wrapper: mmgrad averages over the default group
        opt = build(name, model, rank)
        forward = model
    else:
        ddp = nn.parallel.DistributedDataParallel(model)
        mode = {"ddp_local_gram": "local_gram", "ddp_local": "local"}.get(scenario, "exact")
        opt = build(name, model, rank, ddp=ddp, distributed=mode)
        forward = ddp
    comm = train(name, model, forward, opt, rank * B, (rank + 1) * B, world)
    if scenario == "ddp_bn":  # as with plain DDP, the next forward starts from rank 0's buffers
        model.eval()
        with torch.no_grad():
            forward(*[t[:B] for t in batches(world)[0][0][:2]])
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in model.parameters()]
    return {
        "params": params,
        "buffers": [b.detach().clone() for b in model.buffers()],
        "comm": comm,
        "rows": opt._buffer.rows,
        "P_local": opt._buffer.numel,
        "segments": len(opt._buffer.params),
        "shard_dims": [pl.dim for p in opt._buffer.params for pl in getattr(p, "placements", ()) if pl.is_shard()],
        "others": sum(p.numel() for p in opt._sync.others),
        "method_state": opt.method.state_dict(),
    }


def _expected_error(name, rank, world):
    """The message of the error this rank raises (None: none), for set-ups that used to hang or
    fail deep inside a collective."""
    torch.manual_seed(0)
    model = Net().double()
    try:
        if name == "nonmember":  # a process group rank 1 is not in
            group = dist.new_group([0])
            build("ogm", model, rank, process_group=group)
        elif name == "scaler_nosync":  # scaler.step(opt) without opt.synchronize() first
            ddp = nn.parallel.DistributedDataParallel(model)
            opt = build("mmpareto_scaler", model, rank, ddp=ddp)
            (a, v, y), = batches(world)[0]
            out, split, uni = ddp(a[rank * B:(rank + 1) * B], v[rank * B:(rank + 1) * B])
            backward(opt, "pareto", out, split, uni, y[rank * B:(rank + 1) * B], opt.grad_scaler.scale)
            opt.grad_scaler.step(opt)
        elif name == "fsdp_sync_off":  # FSDP2 accumulation without gradient sync mixes MMPareto's rows
            from torch.distributed.fsdp import fully_shard

            for module in (model.audio, model.visual, model):
                fully_shard(module)
            opt = build("mmpareto", model, rank)
            model.set_requires_gradient_sync(False)
            (a, v, y), = batches(world)[0]
            out, split, uni = model(a[rank * B:(rank + 1) * B], v[rank * B:(rank + 1) * B])
            backward(opt, "pareto", out, split, uni, y[rank * B:(rank + 1) * B])
    except (ValueError, RuntimeError) as exc:
        return str(exc)
    return None


_CACHE: dict = {}


def run_job(job, world):
    """Per rank: {(scenario, config name): results}, computed once per job."""
    if job not in _CACHE:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                mp.start_processes(_worker, args=(world, job, os.path.join(tmp, "init"), tmp), nprocs=world,
                                   join=True, start_method="spawn")
                _CACHE[job] = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]
            except Exception as exc:  # fail every test of the job with it, without re-spawning
                _CACHE[job] = exc
    if isinstance(_CACHE[job], Exception):
        raise _CACHE[job]
    return _CACHE[job]


def scenario(name, world, job=None):
    return [{k[1]: v for k, v in res.items() if k[0] == name} for res in run_job(job or world, world)]


def _check_ranks_agree(results, name):
    ref = results[0][name]["params"]
    for r, res in enumerate(results[1:], 1):
        for p, q in zip(ref, res[name]["params"]):
            assert torch.equal(p, q), f"{name}: rank {r} differs from rank 0"


def _check_single(results, name, world):
    single = single_process(name, world)
    for p, q in zip(results[0][name]["params"], single):
        torch.testing.assert_close(p, q, **TOL)
    # and the run moved the parameters (a step was not skipped)
    torch.manual_seed(0)
    init = [p.detach() for p in Net().double().parameters()]
    assert any(not torch.equal(p, q) for p, q in zip(single, init))


# --- DDP --------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", FAST_CONFIGS)
def test_ddp_matches_single_process_and_ranks_agree(name, world):
    results = scenario("ddp", world)
    _check_ranks_agree(results, name)
    _check_single(results, name, world)
    res = results[0][name]
    K, P = res["rows"], res["P_local"]
    for ops in res["comm"]["backward"]:
        assert ops == [], "DDP's reducer must stay off in backward"
    for ops in res["comm"]["step"]:
        # The K rows: one all-reduce of K x P elements per step, whatever the number of micro-batches.
        assert [n for op, n in ops if n == [K * P]] == [[K * P]]
        total = sum(n[0] for _, n in ops)
        assert total <= K * P + res["others"] + 3 * res["segments"] + 8


def test_ddp_buffers_are_broadcast_as_with_plain_ddp():
    results = scenario("ddp_bn", 2)
    _check_ranks_agree(results, "ogm")
    for b0, b1 in zip(results[0]["ogm"]["buffers"], results[1]["ogm"]["buffers"]):
        assert torch.equal(b0, b1)


@pytest.mark.slow
@pytest.mark.parametrize("name", mmgrad.aggregators.NAMES)
def test_every_aggregator_ddp_and_fsdp2(name):
    for kind in ("ddp", "fsdp"):
        results = scenario(kind, 2, job="slow")
        _check_ranks_agree(results, name)
        _check_single(results, name, 2)


def test_misuse_that_used_to_hang_gets_a_clear_error():
    results = scenario("errors", 2)
    assert results[0]["nonmember"] is None  # rank 0 trains alone in its group of one
    assert "this rank is not a member of process_group" in results[1]["nonmember"]
    for res in results:  # every rank, before any collective of the step
        assert "call opt.synchronize() before scaler.step(opt)" in res["scaler_nosync"]
        assert "FSDP's gradient sync is off" in res["fsdp_sync_off"]


def test_plain_data_parallel_without_ddp_wrapper():
    results = scenario("plain", 2)
    for name in ("ogmge", "mmpareto"):
        _check_ranks_agree(results, name)
        _check_single(results, name, 2)


# --- FSDP2 ------------------------------------------------------------------------------------


def _expected_step_elements(name, res):
    """Elements all-reduced by step() under FSDP2: per-batch statistics + the finite flag, and the
    statistics of the sharded rows (never a gradient)."""
    S, K = res["segments"], res["rows"]
    batch = {"ogm": 2, "ogmge": 2, "agm": 3, "inforeg": 2}.get(name, 0) + 1
    rows = {"mmpareto": 4 * S, "upgrad": K * K, "graddrop": K * K, "agm": 2 * S + 2}.get(name, 2 * S)
    return batch + rows


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", FSDP_CONFIGS)
def test_fsdp2_matches_single_process_and_moves_only_statistics(name, world, monkeypatch):
    # OGM-GE under FSDP draws its noise with the reference formula (see scale_segments_); the single
    # process then uses the reference backend too, so both draw the same float64 numbers.
    if name == "ogmge":
        monkeypatch.setenv("MMGRAD_BACKEND", "reference")
    results = scenario("fsdp", world)
    _check_ranks_agree(results, name)
    _check_single(results, name, world)
    for r, res in enumerate(results):
        K = res[name]["rows"]
        for ops in res[name]["comm"]["step"]:
            assert all(op == "allreduce_" for op, _ in ops), ops
            assert sum(n[0] for _, n in ops) == _expected_step_elements(name, res[name])
        for ops in res[name]["comm"]["backward"]:
            # FSDP's own data-parallel reduction: one reduce-scatter per objective per FSDP group.
            assert sum("reduce_scatter" in op for op, _ in ops) >= K
            assert not any(op.startswith("allreduce") for op, _ in ops)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", DIM1_CONFIGS)
def test_fsdp2_column_shards_draw_the_unsharded_noise(name, world, monkeypatch):
    """Shard(1) parameters: each element's Philox counter is its index in the unsharded buffer."""
    if name == "ogmge":
        monkeypatch.setenv("MMGRAD_BACKEND", "reference")
    results = scenario("fsdp_dim1", world)
    assert set(results[0][name]["shard_dims"]) == {0, 1}
    _check_ranks_agree(results, name)
    _check_single(results, name, world)


# --- cheaper data-parallel modes ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ddp_local_gram", "ddp_local"])
def test_local_modes_keep_ranks_in_step_with_one_gradient_reduction(mode):
    results = scenario(mode, 2)
    for name in LOCAL_CONFIGS:
        _check_ranks_agree(results, name)
        for key, value in results[0][name]["method_state"].items():  # a skipped step's too
            other = results[1][name]["method_state"][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key
        res = results[0][name]
        P = res["P_local"]
        for t, ops in enumerate(res["comm"]["step"]):
            big = [n[0] for _, n in ops if n[0] >= P]
            if name in ("mmpareto_scaler", "ogm_scaler_modality_inf") and t == 1:  # every rank's scaler skipped opt.step()
                assert big == [], f"{name}: a rank stepped into the edit at the skipped step"
                continue
            assert big == [P], f"{name}: one all-reduce of the edited row, not K rows ({big})"


def test_local_gram_is_the_average_of_local_grams():
    """"local_gram" with UPGrad, re-done by hand: per step, the weights solve the average of the
    ranks' local Grams and the update is w @ (mean of the local rows); the heads get the mean of the
    ranks' summed gradients."""
    world = 2
    results = scenario("ddp_local_gram", world)
    torch.manual_seed(0)
    model = Net().double()
    shared = list(model.audio.parameters()) + list(model.visual.parameters())
    heads = [p for p in model.parameters() if all(p is not q for q in shared)]
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for (a, v, y), in batches(world):
        rows, grams, head_grads = [], [], []
        for r in range(world):
            sl = slice(r * B, (r + 1) * B)
            out, split, uni = model(a[sl], v[sl])
            losses = [F.cross_entropy(out, y[sl]), F.cross_entropy(uni["audio"], y[sl]), F.cross_entropy(uni["visual"], y[sl])]
            J = torch.stack([
                torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in
                           zip(torch.autograd.grad(l, shared, retain_graph=True, allow_unused=True), shared)])
                for l in losses
            ])
            rows.append(J)
            grams.append(J @ J.T)
            head_grads.append(torch.autograd.grad(sum(losses), heads))
        w = mmgrad.weights(sum(grams) / world, "upgrad")
        d = w @ (sum(rows) / world)
        start = 0
        for p in shared:
            p.grad = d[start:start + p.numel()].view_as(p).clone()
            start += p.numel()
        for i, p in enumerate(heads):
            p.grad = sum(g[i] for g in head_grads) / world
        sgd.step()
    for p, q in zip(results[0]["upgrad"]["params"], model.parameters()):
        torch.testing.assert_close(p, q.detach(), **TOL)
