"""``custom_op``: ``torch.library.custom_op`` whose plain eager calls skip the op's wrapper.

A call through a ``torch.library`` custom op costs ~8 us of Python on the CPU (dispatcher, schema
checks, the call back into Python), more than the arithmetic of a K x K solve or of a Gram over
a few thousand columns; an aggregation goes through three to five such ops. When nothing has to
see the op (no ``torch.compile`` trace, no dispatch or function mode such as ``FakeTensorMode`` or
``FlopCounterMode``, no tensor subclass, no input that autograd must follow) the call runs the
op's Python body directly: the same function, so the same result. Every other call goes through
the registered op.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

__all__ = ["custom_op", "plain_eager"]


def plain_eager(values: Iterable[Any]) -> bool:
    """Whether a call with these arguments may skip the op wrapper (see the module docstring)."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled()):
        return False
    grad = torch.is_grad_enabled()
    for v in values:
        if isinstance(v, torch.Tensor) and (type(v) is not torch.Tensor or (grad and v.requires_grad)):
            return False
    return True


class _CustomOp:
    """The registered op (``.op``; its ``register_fake`` etc. are reachable on this object) and
    its body, which plain eager calls run directly."""

    def __init__(self, op: Any, body: Callable[..., Any]) -> None:
        self.op, self.body = op, body

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if plain_eager(args) and plain_eager(kwargs.values()):
            return self.body(*args, **kwargs)
        return self.op(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.op, name)


def custom_op(name: str, *, mutates_args: Iterable[str] | str, **options: Any) -> Callable[[Callable[..., Any]], _CustomOp]:
    """Decorator: ``torch.library.custom_op(name, mutates_args=..., **options)`` on the function,
    returning an object that calls the op, or in plain eager mode the function itself."""

    def wrap(body: Callable[..., Any]) -> _CustomOp:
        return _CustomOp(torch.library.custom_op(name, body, mutates_args=mutates_args, **options), body)

    return wrap
