"""Plain eager calls of mmgrad's custom ops skip the op wrapper; everything else goes through it."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mmgrad import _custom_op, ops
from mmgrad._custom_op import plain_eager


class Marked(torch.Tensor):
    """A tensor subclass (as tensor-parallel and quantisation libraries make)."""


def test_which_calls_are_plain_eager():
    x = torch.randn(3)
    assert plain_eager([x, None, 2, "cpp"])
    assert not plain_eager([x.as_subclass(Marked)])
    leaf = torch.randn(3, requires_grad=True)
    assert not plain_eager([leaf])
    with torch.no_grad():
        assert plain_eager([leaf])
    with FlopCounterMode(display=False):
        assert not plain_eager([x])
    with torch.device("cpu"):  # a torch function mode
        assert not plain_eager([x])
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert not plain_eager([torch.empty(3)])


def test_plain_calls_run_the_body_and_others_the_registered_op(monkeypatch):
    seen = []
    real_call = _custom_op._CustomOp.__call__

    def spy(self, *args, **kwargs):
        seen.append(plain_eager(args) and plain_eager(kwargs.values()))
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(_custom_op._CustomOp, "__call__", spy)
    J = torch.randn(3, 50)
    direct = ops.gram(J)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:  # only the registered op has a fake kernel
        fake = ops.gram(mode.from_tensor(J))
    assert fake.shape == (3, 3) and fake.dtype == torch.float32
    assert seen == [True, False]
    with torch.no_grad():
        assert torch.equal(ops.gram(J), direct)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_both_routes_give_the_same_bits(requires_grad):
    J = torch.randn(4, 300, requires_grad=requires_grad)
    w = torch.rand(4)
    eager = ops.combine(J.detach(), w)
    via_op = ops.combine(J, w)  # through the op when J requires grad
    assert torch.equal(eager, via_op.detach())
    assert torch.equal(ops.gram(J.detach()), ops.gram(J).detach())
