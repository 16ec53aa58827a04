"""The torch.optim contract of BalancedOptimizer: schedulers, GradScaler, closures, hooks,
accumulation, state_dict round trips, non-finite policy and construction errors."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmgrad
from test_methods import make


def build(model, method=None, inner=None, **kwargs):
    inner = inner or torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    method = method if method is not None else mmgrad.OGMGE(alpha=0.8, seed=3)
    return mmgrad.BalancedOptimizer(inner, modalities=dict(model.encoders.items()), method=method, **kwargs)


def train_step(opt, model, xs, y, method_kind="ogm", loss_scale=None):
    out, split, uni = model(xs)
    if method_kind == "ogm":
        loss = F.cross_entropy(out, y)
        opt.backward(loss if loss_scale is None else loss_scale(loss), logits=split, targets=y)
    else:
        losses = {"fusion": F.cross_entropy(out, y), **{m: F.cross_entropy(uni[m], y) for m in model.names}}
        if loss_scale is not None:
            losses = {k: loss_scale(v) for k, v in losses.items()}
        opt.backward(losses)


METHODS = {
    "ogm": lambda: mmgrad.OGM(alpha=0.5, params="all"),
    "ogmge": lambda: mmgrad.OGMGE(alpha=0.8, seed=3),
    "mmpareto": lambda: mmgrad.MMPareto(),
    "agm": lambda: mmgrad.AGM(alpha=0.1),
    "inforeg": lambda: mmgrad.InfoReg(),
}


def kind(name):
    return "mmpareto" if name == "mmpareto" else "ogm"


def test_is_an_optimizer_sharing_param_groups_and_state():
    model, xs, y = make()
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = build(model, inner=inner)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups
    opt.zero_grad()
    train_step(opt, model, xs, y)
    opt.step()
    assert opt.state is inner.state and len(inner.state) > 0


def test_lr_scheduler_drives_the_wrapped_optimizer():
    model, xs, y = make()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = build(model, inner=inner)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        opt.zero_grad()
        train_step(opt, model, xs, y)
        opt.step()
        sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.025)


@pytest.mark.parametrize("name", list(METHODS))
def test_closure(name):
    model, xs, y = make()
    opt = build(model, METHODS[name]())

    def closure():
        opt.zero_grad()
        train_step(opt, model, xs, y, kind(name))
        return torch.tensor(1.0)

    before = [p.clone() for p in model.parameters()]
    assert opt.step(closure).item() == 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_clipping_in_the_wrapped_optimizers_pre_hook_sees_the_edited_gradient():
    """The README's recipe: .grad between backward and step is one row (MMPareto keeps two); the
    wrapped optimizer's step pre-hook runs after the edit, on the gradient it applies."""
    model, xs, y = make()
    opt = build(model, mmgrad.MMPareto(), inner=torch.optim.SGD(model.parameters(), lr=0.1))
    norms = []
    opt.optimizer.register_step_pre_hook(
        lambda o, a, k: norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)))
    opt.zero_grad()
    train_step(opt, model, xs, y, "mmpareto")
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    moved = torch.sqrt(sum(((a - p.detach()) ** 2).sum() for a, p in zip(before, model.parameters())))
    assert len(norms) == 1 and norms[0] > 1e-2
    assert moved.item() == pytest.approx(0.1 * 1e-3, rel=1e-5)


def test_a_gradient_assigned_by_hand_is_applied():
    """As with a plain optimizer: a modality parameter's .grad set by hand (no backward reached it,
    so no accumulate hook ran) is folded into the buffer and stepped, not dropped."""
    a, v = nn.Linear(2, 2), nn.Linear(2, 2)
    opt = mmgrad.BalancedOptimizer(torch.optim.SGD([*a.parameters(), *v.parameters()], lr=1.0),
                                   shared=[*a.parameters(), *v.parameters()], method="mean")
    opt.zero_grad()
    opt.backward([a(torch.ones(1, 2)).sum()])  # reaches a only
    before = v.weight.detach().clone()
    v.weight.grad = torch.ones_like(v.weight)
    opt.step()
    assert torch.equal(v.weight.detach(), before - 1.0)


def test_step_hooks_run():
    model, xs, y = make()
    opt = build(model)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.zero_grad()
    train_step(opt, model, xs, y)
    opt.step()
    assert calls == ["pre", "post"]


@pytest.mark.parametrize("name", ["ogm", "mmpareto"])
def test_gradient_accumulation_equals_one_big_batch(name):
    model, xs, y = make()
    model.eval()  # BatchNorm would see different batch statistics in the half batches
    twin = copy.deepcopy(model)
    opt, opt_twin = build(model, METHODS[name]()), build(twin, METHODS[name]())
    for _ in range(2):
        opt.zero_grad(), opt_twin.zero_grad()
        train_step(opt, model, xs, y, kind(name))
        # The same step as two half batches, each loss halved (cross-entropy is a mean).
        for half in (slice(0, 4), slice(4, 8)):
            train_step(opt_twin, twin, {m: x[half] for m, x in xs.items()}, y[half], kind(name), loss_scale=lambda l: l / 2)
        opt.step(), opt_twin.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.allclose(p, q, atol=1e-12)


@pytest.mark.parametrize("name", list(METHODS))
def test_state_dict_round_trip_continues_bitwise(name):
    model, xs, y = make()
    opt = build(model, METHODS[name]())
    for epoch in range(3):
        opt.set_epoch(epoch)
        opt.zero_grad()
        train_step(opt, model, xs, y, kind(name))
        opt.step()
    saved_model = copy.deepcopy(model.state_dict())
    blob = io.BytesIO()
    torch.save(opt.state_dict(), blob)
    for epoch in range(3, 6):
        opt.set_epoch(epoch)
        opt.zero_grad()
        train_step(opt, model, xs, y, kind(name))
        opt.step()
    # A fresh model and optimizer (different seed for the noise) restored from the checkpoint.
    resumed, _, _ = make(seed=99)
    resumed.load_state_dict(saved_model)
    torch.manual_seed(1234)
    opt2 = build(resumed, METHODS[name]())
    blob.seek(0)
    opt2.load_state_dict(torch.load(blob))
    for epoch in range(3, 6):
        opt2.set_epoch(epoch)
        opt2.zero_grad()
        train_step(opt2, resumed, xs, y, kind(name))
        opt2.step()
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["inforeg", "ogmge", "mmpareto"])
@pytest.mark.parametrize("mid_epoch", [False, True])
def test_resumed_loop_may_announce_the_checkpoint_epoch_again(name, mid_epoch):
    """The usual resume loop, ``for epoch in range(saved_epoch, E): opt.set_epoch(epoch)``,
    announces the checkpoint's epoch a second time: a no-op (InfoReg pushed the epoch's Fisher
    trace into its window twice and re-took its weight snapshot)."""
    def run(model, opt, steps):
        for g in steps:
            opt.set_epoch(g // 2)
            opt.zero_grad()
            train_step(opt, model, xs, y, kind(name))
            opt.step()

    model, xs, y = make()
    twin = copy.deepcopy(model)
    opt = build(model, METHODS[name]())
    cut = 5 if mid_epoch else 4
    run(model, opt, range(cut))
    if not mid_epoch:
        opt.set_epoch(cut // 2)  # a checkpoint taken right after announcing the epoch
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    run(model, opt, range(cut, 8))
    twin.load_state_dict(saved[0])
    opt2 = build(twin, METHODS[name]())
    opt2.load_state_dict(saved[1])
    run(twin, opt2, range(cut, 8))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_load_state_dict_refuses_another_set_up_and_changes_nothing():
    model, xs, y = make()
    opt = build(model, mmgrad.MMPareto())
    opt.zero_grad()
    train_step(opt, model, xs, y, "mmpareto")
    opt.step()
    saved = opt.state_dict()
    other = build(model, mmgrad.OGMGE(alpha=0.8), inner=torch.optim.SGD(model.parameters(), lr=0.01))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="saved by a BalancedOptimizer set up as .*MMPareto"):
        other.load_state_dict(saved)
    assert other.param_groups[0]["lr"] == 0.01 and len(other.state) == 0
    for (k1, v1), (k2, v2) in zip(_state_tensors(other.method.state_dict()), _state_tensors(before["method"])):
        assert k1 == k2 and (torch.equal(v1, v2) if isinstance(v1, torch.Tensor) else v1 == v2)
    with pytest.raises(ValueError, match=r"plain torch optimizer's state_dict: load it with opt\.optimizer"):
        other.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.5).state_dict())
    # A method state that fails to load part way leaves the wrapped optimizer as it was.
    broken = {**saved, "set_up": other.state_dict()["set_up"], "method": {"initial_seed": None}}
    with pytest.raises(Exception):
        other.load_state_dict(broken)
    assert other.param_groups[0]["lr"] == 0.01 and len(other.state) == 0


def test_method_state_saved_apart_from_the_wrapped_optimizers():
    """The README's pattern for torch.distributed.checkpoint: the wrapped optimizer's state goes
    through DCP (here its own state_dict), the rest of opt.state_dict() apart; resumes bitwise."""
    model, xs, y = make()
    twin = copy.deepcopy(model)
    opt = build(model, mmgrad.OGMGE(alpha=0.8, seed=3))

    def run(model, opt, epochs):
        for epoch in epochs:
            opt.set_epoch(epoch)
            opt.zero_grad()
            train_step(opt, model, xs, y)
            opt.step()

    run(model, opt, range(3))
    twin.load_state_dict(model.state_dict())
    inner_state = copy.deepcopy(opt.optimizer.state_dict())
    rest = copy.deepcopy({k: v for k, v in opt.state_dict().items() if k != "optimizer"})
    run(model, opt, range(3, 5))
    opt2 = build(twin, mmgrad.OGMGE(alpha=0.8, seed=11))
    opt2.optimizer.load_state_dict(inner_state)
    opt2.load_state_dict(rest)
    run(twin, opt2, range(3, 5))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_multi_objective_checkpoint_checks_the_number_of_objectives():
    model, xs, y = make()
    opt = mmgrad.BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), shared=model,
                                   method="nash_mtl")
    out, split, uni = model(xs)
    opt.zero_grad()
    opt.backward([F.cross_entropy(out, y)] + [F.cross_entropy(uni[m], y) for m in model.names])
    opt.step()
    fresh = mmgrad.BalancedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), shared=model,
                                     method="nash_mtl")
    fresh.load_state_dict(opt.state_dict())
    out, split, uni = model(xs)
    with pytest.raises(ValueError, match="the loaded checkpoint aggregated 3 objectives"):
        fresh.backward([F.cross_entropy(out, y), F.cross_entropy(uni[model.names[0]], y)])


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("fused", [False, True])
def test_nonfinite_step_is_skipped_and_leaves_parameters_and_state_alone(name, fused):
    model, xs, y = make()
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=fused)
    opt = build(model, METHODS[name](), inner=inner)
    opt.zero_grad()
    train_step(opt, model, xs, y, kind(name))
    opt.step()  # a finite step creates the momentum buffers
    params = [p.clone() for p in model.parameters()]
    state = copy.deepcopy(inner.state_dict())
    opt.zero_grad()
    train_step(opt, model, xs, y, kind(name))
    first = opt._layout.buffer.params[0]
    first.grad.view(-1)[0] = float("nan")
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    after = inner.state_dict()
    for k, v in state["state"].items():
        assert torch.equal(v["momentum_buffer"], after["state"][k]["momentum_buffer"])


def _state_tensors(tree, prefix=""):
    """(key, value) leaves of a nested state dict, tensors cloned."""
    if isinstance(tree, dict):
        return [kv for k, v in tree.items() for kv in _state_tensors(v, f"{prefix}.{k}")]
    if isinstance(tree, (list, tuple)):
        return [kv for i, v in enumerate(tree) for kv in _state_tensors(v, f"{prefix}[{i}]")]
    return [(prefix, tree.clone() if isinstance(tree, torch.Tensor) else copy.deepcopy(tree))]


MULTI_OBJECTIVE = {
    "gradvac": lambda: mmgrad.aggregators.get("gradvac", seed=1),
    "nash_mtl": lambda: mmgrad.aggregators.get("nash_mtl"),
    "pcgrad": lambda: mmgrad.aggregators.get("pcgrad", seed=2),
    "graddrop": lambda: mmgrad.aggregators.get("graddrop", seed=2),
}


def _multi_objective_step(opt, model, xs, y):
    out, _, uni = model(xs)
    opt.backward([F.cross_entropy(out, y)] + [F.cross_entropy(uni[m], y) for m in model.names])


@pytest.mark.parametrize("name", ["ogmge", "agm", "inforeg"] + list(MULTI_OBJECTIVE))
@pytest.mark.parametrize("where", ["rows", "head"])
def test_a_skipped_step_leaves_the_methods_state_alone(name, where):
    """A step skipped for an inf / NaN (in the buffer rows, or in a head gradient that the method
    never reads) changes no method state: OGM-GE's noise stream, AGM's running average,
    InfoReg's Fisher trace, the aggregators' EMA targets, warm starts and random streams (all
    chosen on the device). Nash-MTL's host call counter still counts the call."""
    model, xs, y = make()
    if name in MULTI_OBJECTIVE:
        inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        opt = mmgrad.BalancedOptimizer(inner, shared=list(model.encoders.parameters()),
                                       method=MULTI_OBJECTIVE[name]())
        step = lambda: _multi_objective_step(opt, model, xs, y)  # noqa: E731
    else:
        opt = build(model, METHODS[name]())
        step = lambda: train_step(opt, model, xs, y, kind(name))  # noqa: E731
    for _ in range(2):
        opt.zero_grad()
        step()
        opt.step()
    before = _state_tensors(opt.method.state_dict())
    opt.zero_grad()
    step()
    if where == "rows":
        opt._buffer.row(0)[1] = float("nan")
    else:
        model.head.weight.grad.view(-1)[0] = float("inf")
    opt.step()
    assert not opt.diagnostics["finite"]
    after = _state_tensors(opt.method.state_dict())
    assert [k for k, _ in after] == [k for k, _ in before]
    for (key, a), (_, b) in zip(before, after):
        if key == ".aggregator.step":  # Nash-MTL's host-side call counter
            assert b == a + 1
        elif isinstance(a, torch.Tensor):
            assert torch.equal(a, b), key
        else:
            assert a == b, key


@pytest.mark.parametrize("name", ["ogm", "agm", "inforeg"])
@pytest.mark.parametrize("zero", ["opt", "model"])
def test_a_step_the_grad_scaler_skips_leaves_no_statistics_behind(name, zero):
    """When GradScaler skips ``opt.step()`` (an inf in ``.grad``), the scores that batch's
    backward collected are dropped at the next ``opt.zero_grad()`` / ``model.zero_grad()``: the
    following steps equal a run that never saw that batch."""

    def run(with_bad_batch):
        model, _, _ = make()
        model = model.float()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10**6)
        opt = build(model, METHODS[name](), inner=torch.optim.SGD(model.parameters(), lr=0.05),
                    grad_scaler=scaler)
        gen = torch.Generator().manual_seed(3)
        batches = [(torch.randn(8, c, 7, 7, generator=gen) for c in (1, 3)) for _ in range(4)]
        batches = [dict(zip(model.names, b)) for b in batches]
        y = torch.randint(0, 5, (8,), generator=gen)
        bad = {m: x * (8.0 if m == "visual" else 1.0) for m, x in batches[0].items()}
        seen = []
        for i, xs in enumerate(batches[:1] + ([bad] if with_bad_batch else []) + batches[1:]):
            opt.zero_grad() if zero == "opt" else model.zero_grad()
            train_step(opt, model, xs, y, kind(name), loss_scale=scaler.scale)
            if xs is bad:
                model.head.weight.grad.view(-1)[0] = float("inf")
            scaler.step(opt)
            scaler.update()
            if xs is not bad:
                seen.append(opt.diagnostics["scores"].clone())
        return seen, [p.detach().clone() for p in model.parameters()]

    (scores, params), (scores_bad, params_bad) = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(scores, scores_bad))
    assert all(torch.equal(a, b) for a, b in zip(params, params_bad))


def test_a_method_object_serves_the_optimizer_it_was_given_to_last():
    """Two optimizers sharing one method object: the earlier one refuses to go on (it used to
    step with gradients the method no longer edits)."""
    model, xs, y = make()
    twin = copy.deepcopy(model)
    method = mmgrad.OGM(alpha=0.5, params="all")
    first = build(model, method)
    second = build(twin, method)
    second.zero_grad()
    train_step(second, twin, xs, y)
    second.step()
    first.zero_grad()
    with pytest.raises(RuntimeError, match="its own method object"):
        train_step(first, model, xs, y)
    with pytest.raises(RuntimeError, match="its own method object"):
        first.step()


def test_inforeg_reports_the_steps_scores():
    model, xs, y = make()
    opt = build(model, mmgrad.InfoReg())
    opt.zero_grad()
    train_step(opt, model, xs, y)
    opt.step()
    assert (opt.diagnostics["scores"] > 0).all()


def test_nonfinite_raise_policy():
    model, xs, y = make()
    opt = build(model, nonfinite="raise")
    opt.zero_grad()
    train_step(opt, model, xs, y)
    model.head.weight.grad.view(-1)[0] = float("inf")  # a head gradient, outside the buffer
    params = [p.clone() for p in model.parameters()]
    with pytest.raises(mmgrad.NonFiniteGradientError):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))


@pytest.mark.parametrize("name", list(METHODS))
def test_grad_scaler_not_given_to_a_multi_row_method_is_refused(name):
    """GradScaler unscales .grad only: a method that keeps rows apart (MMPareto) would edit scaled
    rows. Refused at the first scaler.step(opt), before any parameter moves; one-row methods work."""
    model, xs, y = make()
    model, xs = model.float(), {m: x.float() for m, x in xs.items()}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = build(model, METHODS[name]())
    opt.zero_grad()
    train_step(opt, model, xs, y, kind(name), loss_scale=scaler.scale)
    before = [p.clone() for p in model.parameters()]
    if opt.method.rows == 1:
        scaler.step(opt)
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        return
    with pytest.raises(ValueError, match=r"pass the scaler to the optimizer, BalancedOptimizer\(\.\.\., grad_scaler=scaler\)"):
        scaler.step(opt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # A disabled scaler (the enabled=args.amp pattern) only calls opt.step(): no loss scale to undo.
    torch.amp.GradScaler("cpu", enabled=False).step(opt)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("name", list(METHODS))
def test_grad_scaler_with_a_forced_inf_step(name):
    model, xs, y = make()
    model = model.float()
    xs = {m: x.float() for m, x in xs.items()}
    twin = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = build(model, METHODS[name](), grad_scaler=scaler)
    ref = build(twin, METHODS[name]())
    for step in range(3):
        opt.zero_grad(), ref.zero_grad()
        train_step(opt, model, xs, y, kind(name), loss_scale=scaler.scale)
        if step == 1:
            model.head.weight.grad.view(-1)[0] = float("inf")
            before = [p.clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        if step == 1:
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            assert scaler.get_scale() == 2.0**9  # the scaler backed off
            continue
        train_step(ref, twin, xs, y, kind(name))
        ref.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.allclose(p, q, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["mmpareto", "upgrad"])
def test_grad_scaler_backs_off_for_an_inf_in_a_row_apart_from_grad(name):
    """An overflow in a row that ``.grad`` does not point at (MMPareto's multimodal row, the
    first objective's row) escapes the scaler's own check: mmgrad skips the step and reports it,
    so ``scaler.update()`` backs off instead of growing the scale while every step is skipped."""
    model, xs, y = make()
    model = model.float()
    xs = {m: x.float() for m, x in xs.items()}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    if name == "upgrad":
        opt = mmgrad.BalancedOptimizer(inner, shared=list(model.encoders.parameters()), method=name,
                                       grad_scaler=scaler)
    else:
        opt = build(model, METHODS[name](), inner=inner, grad_scaler=scaler)
    for step in range(3):
        opt.zero_grad()
        if name == "upgrad":
            out, _, uni = model(xs)
            opt.backward([scaler.scale(F.cross_entropy(o, y)) for o in (out, uni["audio"], uni["visual"])])
        else:
            train_step(opt, model, xs, y, kind(name), loss_scale=scaler.scale)
        if step >= 1:
            assert opt._buffer.active_row != 0
            opt._buffer.row(0)[0] = float("inf")
        before = [p.clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        moved = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert moved == (step == 0)
        assert scaler.get_scale() == [2.0**11, 2.0**10, 2.0**9][step]


def test_more_construction_errors():
    model, xs, y = make()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    enc = model.encoders
    with pytest.raises(ValueError, match="at least two"):
        mmgrad.BalancedOptimizer(sgd, modalities={"audio": enc["audio"]}, method=mmgrad.OGMGE(alpha=0.8))
    with pytest.raises(ValueError, match="multimodal loss key 'audio' is also a modality"):
        mmgrad.BalancedOptimizer(sgd, modalities=dict(enc.items()), method=mmgrad.MMPareto(multimodal="audio"))
    mlp_and_conv = {"audio": enc["audio"], "text": nn.Linear(4, 4).double()}
    sgd_all = torch.optim.SGD([p for m in mlp_and_conv.values() for p in m.parameters()], lr=0.1)
    with pytest.raises(ValueError, match=r"no parameter tensor of modality \['text'\] matches params='conv'"):
        mmgrad.BalancedOptimizer(sgd_all, modalities=mlp_and_conv, method=mmgrad.OGMGE(alpha=0.8))
    with pytest.raises(ValueError, match="e.g. MMPareto.multimodal='multimodal'"):
        mmgrad.BalancedOptimizer(sgd, modalities={"fusion": enc["audio"], "visual": enc["visual"]},
                                 method=mmgrad.MMPareto())
    with pytest.raises(TypeError, match=r"OGMGE is a class: pass an object, e.g. method=OGMGE\(...\)"):
        mmgrad.BalancedOptimizer(sgd, modalities=dict(enc.items()), method=mmgrad.OGMGE)
    with pytest.raises(TypeError, match="a forward-pass method such as OPM is a module of the model"):
        mmgrad.BalancedOptimizer(sgd, modalities=dict(enc.items()), method=mmgrad.OPM(list(enc)))
    for bad in (lambda: mmgrad.MMPareto(gamma=float("inf")), lambda: mmgrad.MMPareto(eps=-1),
                lambda: mmgrad.AGM(alpha=float("inf")), lambda: mmgrad.AGM(fusion_clip=-1),
                lambda: mmgrad.InfoReg(threshold=float("nan")), lambda: mmgrad.InfoReg(base=(-1, 0.1)),
                lambda: mmgrad.InfoReg(window=0)):
        with pytest.raises(ValueError, match="must be"):
            bad()
    np = pytest.importorskip("numpy")  # numbers from a sweep's arrays are numbers too
    assert mmgrad.MMPareto(gamma=np.float32(1.5)).gamma == 1.5
    assert mmgrad.InfoReg(window=np.int64(5)).window == 5 and mmgrad.InfoReg(window=5.0).window == 5
    with pytest.raises(ValueError, match="ddp= and distributed='off' contradict each other"):
        mmgrad.BalancedOptimizer(sgd, modalities=dict(enc.items()), method=mmgrad.OGM(alpha=0.5),
                                 ddp=model, distributed="off")
    enc["visual"].float()
    with pytest.raises(ValueError, match="share one flat gradient buffer"):
        mmgrad.BalancedOptimizer(sgd, modalities=dict(enc.items()), method=mmgrad.OGM(alpha=0.5))


def test_a_layer_unfrozen_after_construction_is_reported_at_set_epoch():
    model, xs, y = make()
    conv = model.encoders["audio"][0]
    conv.weight.requires_grad_(False)
    opt = build(model)
    conv.weight.requires_grad_(True)
    with pytest.warns(RuntimeWarning, match=r"modality 'audio' has 1 trainable parameter\(s\) that were frozen"):
        opt.set_epoch(1)


def test_parameters_that_get_no_gradient_are_not_decayed():
    model, xs, y = make()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1)
    opt = mmgrad.BalancedOptimizer(inner, modalities=dict(model.encoders.items()), method=mmgrad.OGM(alpha=0.5, params="all"))
    audio = [p.clone() for p in model.encoders["audio"].parameters()]
    opt.zero_grad()
    out, split, _ = model(xs)
    loss = F.cross_entropy(model.head(torch.cat([model.encoders["visual"](xs["visual"]).detach() * 0 + 1,
                                                 model.encoders["visual"](xs["visual"])], 1)), y)
    with pytest.warns(RuntimeWarning, match="modality 'audio' received no gradient"):
        opt.backward(loss, logits=split, targets=y)
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(audio, model.encoders["audio"].parameters()))


def test_user_zero_grad_set_to_none_keeps_working():
    model, xs, y = make()
    opt = build(model)
    model.zero_grad(set_to_none=True)  # the user bypasses opt.zero_grad()
    train_step(opt, model, xs, y)
    opt.step()
    assert opt._layout.buffer.is_bound()


@pytest.mark.parametrize("name", ["ogm", "mmpareto", "agm", "upgrad", "nash_mtl"])
def test_zeroing_through_the_model_or_the_wrapped_optimizer_equals_opt_zero_grad(name):
    """``model.zero_grad()`` (either ``set_to_none``) or the wrapped optimizer's ``zero_grad()``
    instead of ``opt.zero_grad()``: each step sees its own batch's gradient only, as in torch
    (the buffer rows used to keep the last step's gradients and add the new ones to them)."""

    def run(zero):
        model, _, _ = make()
        inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if name in ("upgrad", "nash_mtl"):
            opt = mmgrad.BalancedOptimizer(inner, shared=list(model.encoders.parameters()), method=name)
        else:
            opt = build(model, METHODS[name](), inner=inner)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            xs = {m: torch.randn(8, c, 7, 7, generator=gen, dtype=torch.float64) for m, c in zip(model.names, (1, 3))}
            y = torch.randint(0, 5, (8,), generator=gen)
            {"opt": opt.zero_grad, "model": model.zero_grad, "inner": inner.zero_grad,
             "in place": lambda: model.zero_grad(set_to_none=False)}[zero]()
            if name in ("upgrad", "nash_mtl"):
                _multi_objective_step(opt, model, xs, y)
            else:
                train_step(opt, model, xs, y, kind(name))
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    want = run("opt")
    for zero in ("model", "inner", "in place"):
        got = run(zero)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), zero


def test_construction_errors_say_what_to_fix():
    model, xs, y = make()
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.1)  # noqa: E731
    enc = model.encoders
    with pytest.raises(ValueError, match="both modality 'a' and 'b'"):
        mmgrad.BalancedOptimizer(sgd(model.parameters()), modalities={"a": enc["audio"], "b": enc["audio"]}, method=mmgrad.OGM(alpha=1))
    with pytest.raises(ValueError, match="not in the wrapped optimizer"):
        mmgrad.BalancedOptimizer(sgd(enc["audio"].parameters()), modalities={"a": enc["audio"], "v": enc["visual"]}, method=mmgrad.OGM(alpha=1))
    with pytest.raises(ValueError, match="no trainable parameters"):
        mmgrad.BalancedOptimizer(sgd(model.parameters()), modalities={"a": enc["audio"], "v": []}, method=mmgrad.OGM(alpha=1))
    with pytest.raises(ValueError, match="modalities is empty"):
        mmgrad.BalancedOptimizer(sgd(model.parameters()), modalities={}, method=mmgrad.OGM(alpha=1))
    emb = nn.Embedding(10, 3, sparse=True)
    with pytest.raises(ValueError, match="sparse"):
        mmgrad.BalancedOptimizer(sgd(emb.parameters()), modalities={"t": emb}, method=mmgrad.OGM(alpha=1, params="all"))
    with pytest.raises(ValueError, match="method is required"):
        mmgrad.BalancedOptimizer(sgd(model.parameters()), modalities={"a": enc["audio"]})
    with pytest.raises(ValueError, match="exactly one of"):
        mmgrad.BalancedOptimizer(sgd(model.parameters()), method="upgrad")
    with pytest.raises(ValueError, match="nonfinite"):
        mmgrad.BalancedOptimizer(sgd(model.parameters()), modalities={"a": enc["audio"]}, method=mmgrad.OGM(alpha=1), nonfinite="zero")
    with pytest.raises(ValueError, match="alpha"):
        mmgrad.OGM(alpha=0)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        mmgrad.BalancedOptimizer(object(), modalities={"a": enc["audio"]}, method=mmgrad.OGM(alpha=1))
