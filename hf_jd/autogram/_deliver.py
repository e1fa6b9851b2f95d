"""Hand precomputed gradients to parameters through autograd.

Gradients go through each parameter's ``AccumulateGrad`` node, so that gradient hooks (DDP's
all-reduce, Accelerate's, ``register_post_accumulate_grad_hook``) fire as in an ordinary backward
pass. The tensors are handed over without an extra reference, so that ``AccumulateGrad`` can
adopt them as ``.grad`` instead of copying them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["deliver_gradients"]


class _Deliver(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, holder: list[list[Tensor]], *params: Tensor) -> Tensor:
        ctx.holder = holder
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx: Any, _: Tensor) -> tuple[Tensor | None, ...]:
        grads = ctx.holder.pop()
        ctx.holder = None
        return (None, *grads)


def deliver_gradients(params: Sequence[Tensor], grads: list[Tensor]) -> None:
    """Accumulate ``grads`` into ``params``' ``.grad`` through autograd (the list is emptied).

    Parameters
    ----------
    params
        The parameters (leaves that require grad).
    grads
        One gradient per parameter, of its shape.
    """
    holder = [list(grads)]
    grads.clear()
    with torch.enable_grad():
        root = _Deliver.apply(holder, *params)
    root.backward()
