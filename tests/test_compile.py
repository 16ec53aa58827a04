"""torch.compile: mmgrad's ops and solvers trace into one graph (no graph break) and do not
recompile step after step."""

import pytest
import torch

import mmgrad
from mmgrad import ops


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_fused_ops_compile_without_graph_breaks_or_recompiles():
    offsets, numels = ops.table([300, 0, 700])
    seed = torch.tensor([5])

    def edit(J, x):
        G = ops.gram(J)
        d = ops.combine(J, G.diagonal())
        m = ops.segment_moments(x, offsets, numels)
        ops.segment_scale_(x, offsets, numels, torch.rand(3), ops.segment_std(m, numels), seed)
        ops.segment_combine_(x, J, offsets, numels, torch.ones(3, J.shape[0]))
        return d, ops.segment_gram(J, offsets, numels)

    compiled = torch.compile(edit, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(4):
            J, x = torch.randn(3, 1000), torch.randn(1000)
            d, sg = compiled(J, x.clone())
            ref_d, ref_sg = edit(J, x.clone())
            assert torch.allclose(d, ref_d) and torch.allclose(sg, ref_sg)


def _triton_on_cpu() -> str | None:
    """Why the Triton backend cannot serve CPU tensors here (None: it can, in the interpreter)."""
    return ops.available_backends("cpu")["triton"]


@pytest.mark.parametrize("backend", [
    None, pytest.param("triton", marks=pytest.mark.skipif(
        _triton_on_cpu() is not None, reason=f"Triton on CPU: {_triton_on_cpu()}"))])
@pytest.mark.parametrize("name", mmgrad.aggregators.GRAM_NAMES)
def test_aggregators_trace_into_one_graph(name, backend, monkeypatch):
    """Also with the Triton backend, whose solver kernels run inside their custom ops and whose
    eager-only kernels (the trace normalisation, the eigen methods' whole weights) give way to
    torch ops in the trace: the compiled call returns the eager weights."""
    if backend is not None:
        monkeypatch.setenv("MMGRAD_BACKEND", backend)

    def aggregate_with(agg):
        return lambda J: ops.combine(J, agg.weights(ops.gram(J)))

    compiled = torch.compile(aggregate_with(mmgrad.aggregators.get(name)), fullgraph=True,
                             backend="aot_eager")
    J = torch.randn(4, 500)
    out = compiled(J)
    assert out.shape == (500,) and torch.isfinite(out).all()
    eager = aggregate_with(mmgrad.aggregators.get(name))(J)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)


def test_inductor_compiles_gram_and_combine():
    compiled = torch.compile(lambda J, w: ops.combine(J, w) + ops.gram(J).sum(), fullgraph=True)
    J, w = torch.randn(3, 257), torch.randn(3)
    assert torch.allclose(compiled(J, w), ops.combine(J, w) + ops.gram(J).sum())
    # combine into an out: its aliasing check reads storage pointers, skipped in the trace
    into = torch.compile(lambda J, w, out: ops.combine(J, w, out=out), fullgraph=True)
    assert torch.equal(into(J, w, torch.empty(257)), ops.combine(J, w))


def _two_modality_run(method_name: str):
    """A tiny audio/visual model, its BalancedOptimizer and one training-step function."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    audio = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU())
    visual = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU())
    head = torch.nn.Linear(16, 3)
    params = [*audio.parameters(), *visual.parameters(), *head.parameters()]
    method = mmgrad.OGMGE(alpha=0.5, params="all", seed=3) if method_name == "ogm_ge" else mmgrad.MMPareto()
    opt = mmgrad.BalancedOptimizer(torch.optim.SGD(params, lr=0.1, momentum=0.9),
                                   modalities={"audio": audio, "visual": visual}, method=method)

    def train_step(xa, xv, y):
        za, zv = audio(xa), visual(xv)
        loss = F.cross_entropy(head(torch.cat([za, zv], 1)), y)
        parts = mmgrad.nn.split_concat_logits(head, {"audio": za, "visual": zv})
        opt.zero_grad()
        if method_name == "ogm_ge":
            opt.backward(loss, logits=parts, targets=y)
        else:
            opt.backward({"fusion": loss, **{m: F.cross_entropy(parts[m], y) for m in parts}})
        opt.step()
        return loss.detach()

    return params, opt, train_step


@pytest.mark.parametrize("method_name", ["ogm_ge", "mmpareto"])
def test_compiled_training_step_matches_eager_and_stops_recompiling(method_name):
    """A whole training step (forward, BalancedOptimizer backward and step) under torch.compile:
    the edit with its fused ops is one traced graph, the graph breaks are only at the host
    bookkeeping around it, the parameters follow the eager run, and after the first steps
    and the first epoch change (then the step counter and the epoch are dynamic) nothing recompiles."""
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 6, generator=g), torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g))
               for _ in range(12)]
    eager_params, eager_opt, eager_step = _two_modality_run(method_name)
    params, opt, train_step = _two_modality_run(method_name)

    graphs = []

    def record(gm, inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(train_step, backend=record)
    for i, batch in enumerate(batches):
        epoch = i // 3  # dynamo specialises on the first epoch and step, then makes them dynamic
        opt.set_epoch(epoch)
        eager_opt.set_epoch(epoch)
        if i == 6:
            settled = len(graphs)
        compiled(*batch)
        eager_step(*batch)
    assert len(graphs) == settled, f"recompiled in epochs 2-3: {len(graphs) - settled} new graphs"
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    fused = {"ogm_ge": {"mmgrad.segment_moments.default", "mmgrad.segment_scale_.default"},
             "mmpareto": {"mmgrad.segment_gram.default", "mmgrad.segment_combine_.default"}}[method_name]
    in_one_graph = [g for g in graphs if fused <= {str(n.target) for n in g.graph.nodes if n.op == "call_function"}]
    assert in_one_graph, f"no traced graph holds all of {sorted(fused)}"

    explained = torch._dynamo.explain(train_step)(*batches[0])
    for reason in explained.break_reasons:
        frames = [f"{f.filename}:{f.name}" for f in reason.user_stack]
        assert not any("mmgrad/ops.py" in f or ":edit" in f for f in frames), (reason.reason, frames)
