import pytest
import torch
from torch import nn

from mmgrad import ops
from mmgrad.buffers import FlatGradBuffer, SegmentTable, flat_grad_buffers


def two_branch_model():
    torch.manual_seed(0)
    return nn.ModuleDict({"a": nn.Linear(5, 3), "b": nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))})


def loss_of(model, which="both"):
    xa, xb = torch.randn(8, 5), torch.randn(8, 4)
    out = 0
    if which in ("a", "both"):
        out = out + model["a"](xa).pow(2).sum()
    if which in ("b", "both"):
        out = out + model["b"](xb).pow(2).sum()
    return out


def test_backward_writes_straight_into_the_flat_buffer():
    model = two_branch_model()
    params = list(model.parameters())
    buf = FlatGradBuffer(params)
    storage = buf.data.untyped_storage().data_ptr()
    loss_of(model).backward()
    for p, view in zip(params, buf.views(0)):
        # Same storage, same view: autograd accumulated in place, nothing was copied.
        assert p.grad.untyped_storage().data_ptr() == storage
        assert p.grad.data_ptr() == view.data_ptr()
    assert buf.is_bound()
    expected = torch.cat([p.grad.reshape(-1) for p in params])
    assert torch.equal(buf.row(0), expected)
    # The flat row matches gradients computed without any buffer.
    reference = two_branch_model()
    loss_of(reference).backward()
    assert torch.allclose(buf.row(0), torch.cat([p.grad.reshape(-1) for p in reference.parameters()]))


def test_rows_gather_separate_backward_passes():
    model = two_branch_model()
    buf = FlatGradBuffer(list(model.parameters()), rows=2)
    torch.manual_seed(1)
    loss_of(model, "a").backward()
    buf.bind(1)
    torch.manual_seed(2)
    loss_of(model, "b").backward()
    na = sum(p.numel() for p in model["a"].parameters())
    assert buf.row(0)[:na].abs().sum() > 0 and (buf.row(0)[na:] == 0).all()
    assert (buf.row(1)[:na] == 0).all() and buf.row(1)[na:].abs().sum() > 0
    G = ops.gram(buf.data)
    assert G[0, 1] == 0  # the two objectives touch disjoint parameters


def test_params_without_grad_are_reported_and_zero_grad_rebinds():
    model = two_branch_model()
    buf = FlatGradBuffer(list(model.parameters()))
    loss_of(model, "a").backward()
    n_a = len(list(model["a"].parameters()))
    assert buf.params_without_grad() == list(range(n_a, len(buf.params)))
    buf.zero_()
    assert (buf.data == 0).all() and buf.params_without_grad() == list(range(len(buf.params)))


def test_foreign_grads_are_folded_in_when_rebinding():
    model = two_branch_model()
    buf = FlatGradBuffer(list(model.parameters()))
    torch.manual_seed(3)
    loss_of(model).backward()  # into the buffer
    model.zero_grad(set_to_none=True)  # breaks the binding, as torch.optim's zero_grad does
    assert not buf.is_bound()
    torch.manual_seed(4)
    loss_of(model).backward()  # autograd allocates fresh .grad tensors outside the buffer
    fresh = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    in_buffer = buf.row(0).clone()
    buf.bind(0)  # the foreign gradients are added into the row: nothing computed is lost
    assert buf.is_bound()
    assert torch.allclose(buf.row(0), in_buffer + fresh)


def test_lazy_zero_copies_first_gradients_and_zeroes_the_rest_on_materialize():
    model = two_branch_model()
    params = list(model.parameters())
    n_a = len(list(model["a"].parameters()))
    buf = FlatGradBuffer(params, rows=2)
    loss_of(model).backward()  # leftovers in row 0
    buf.bind(1)
    loss_of(model).backward()  # and in row 1
    buf.bind(0)
    buf.zero_(lazy=True)
    assert all(p.grad is None for p in params) and buf.is_bound()
    assert buf.row(0).abs().sum() > 0  # nothing was written
    torch.manual_seed(5)
    loss_of(model, "a").backward()
    torch.manual_seed(6)
    loss_of(model, "a").backward()  # a second micro-batch accumulates in place
    for p, view in zip(params[:n_a], buf.views(0)[:n_a]):
        assert p.grad.data_ptr() == view.data_ptr()
    assert all(p.grad is None for p in params[n_a:])  # not reached: None, as torch leaves it
    buf.materialize()
    assert buf.is_bound() and (buf.data[1] == 0).all()  # row 1 got nothing this step
    reference = two_branch_model()
    torch.manual_seed(5)
    loss_of(reference, "a").backward()
    torch.manual_seed(6)
    loss_of(reference, "a").backward()
    expected = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
                          for p in reference.parameters()])
    assert torch.equal(buf.row(0), expected)
    assert buf.params_without_grad() == list(range(n_a, len(params)))


@pytest.mark.filterwarnings("error")  # no gradient-layout-contract warning
def test_non_contiguous_parameters():
    w = nn.Parameter(torch.randn(6, 4).T)  # a non-contiguous leaf
    assert not w.is_contiguous()
    buf = FlatGradBuffer([w])
    x = torch.randn(3, 4)
    (x @ w).pow(2).sum().backward()
    assert w.grad.data_ptr() == buf.data.data_ptr()
    w_plain = nn.Parameter(w.detach().clone())
    (x @ w_plain).pow(2).sum().backward()
    assert torch.allclose(w.grad, w_plain.grad)
    # The view keeps w's strides (gradient layout contract): the row holds w's memory order.
    assert w.grad.stride() == w.stride()
    assert torch.allclose(buf.row(0), w_plain.grad.permute(1, 0).reshape(-1))


def test_construction_errors():
    a = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="at least one"):
        FlatGradBuffer([])
    with pytest.raises(ValueError, match="twice"):
        FlatGradBuffer([a, a])
    with pytest.raises(ValueError, match="share dtype and device"):
        FlatGradBuffer([a, nn.Parameter(torch.randn(2, dtype=torch.float64))])
    frozen = nn.Parameter(torch.randn(2), requires_grad=False)
    with pytest.raises(ValueError, match="frozen"):
        FlatGradBuffer([frozen])


def test_flat_grad_buffers_groups_by_dtype_and_skips_frozen():
    a = nn.Parameter(torch.randn(3))
    b = nn.Parameter(torch.randn(2, dtype=torch.float64))
    c = nn.Parameter(torch.randn(4))
    frozen = nn.Parameter(torch.randn(5), requires_grad=False)
    bufs = flat_grad_buffers([a, b, frozen, c])
    assert [buf.numel for buf in bufs.values()] == [7, 2]
    assert frozen.grad is None


def test_segment_table_validation_and_tiling():
    with pytest.raises(ValueError, match="overlaps"):
        SegmentTable([0, 3], [5, 2], 10)
    with pytest.raises(ValueError, match="outside"):
        SegmentTable([8], [5], 10)
    t = SegmentTable([0, 4, 9], [4, 0, 1], 10)
    tiled = t.tile_rows(3, 10)
    assert tiled.host_offsets == [0, 4, 9, 10, 14, 19, 20, 24, 29]
    assert len(t.select([2])) == 1 and t.select([2]).host_offsets == [9]


def test_cpu_copied_gradients_are_freed_after_the_optimizer_step():
    """The gradients the hooks copy into the rows stay alive until the step (as plain training's
    do; freeing them mid-backward makes glibc return the memory and page-fault it back)."""
    import weakref

    import mmgrad

    torch.manual_seed(0)
    model = two_branch_model()
    opt = mmgrad.BalancedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), modalities={"a": model["a"], "b": model["b"]}, method=mmgrad.OGM(alpha=0.5, params="all")
    )
    buffer = opt._buffer
    seen = []
    for p in buffer.params:  # runs before the copy: the tensor autograd hands the parameter
        p.register_hook(lambda g: seen.append(weakref.ref(g)) or g)
    opt.zero_grad()
    out_a, out_b = model["a"](torch.randn(4, 5)), model["b"](torch.randn(4, 4))
    targets = torch.zeros(4, dtype=torch.long)
    opt.backward(out_a.pow(2).sum() + out_b.pow(2).sum(), logits={"a": out_a, "b": out_b}, targets=targets)
    assert len(seen) == len(buffer.params)
    assert len(buffer._retired) == len(buffer.params)
    assert all(p.grad.untyped_storage().data_ptr() == buffer.data.untyped_storage().data_ptr() for p in buffer.params)
    opt.step()
    assert buffer._retired == []
    del out_a, out_b
    assert all(ref() is None for ref in seen)
