"""Records of position-wise affine maps: ``nn.Linear`` and transformers' GPT-2 ``Conv1D``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._layout import RowLayout
from ._outer import OuterProductRecord, OuterProductRows
from ._record import compute_dtype

__all__ = ["LinearRecord", "computes_linear", "is_linear", "is_linear_subclass", "is_conv1d"]


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` with the stock forward.

    Parameters
    ----------
    module
        The module.

    Returns
    -------
    bool
        ``True`` for a stock ``nn.Linear``.
    """
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def is_linear_subclass(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` subclass with a forward of its own (e.g. Falcon's
    ``FalconLinear``, ``x @ W.T + b``): a candidate for the Linear closed form, verified on its
    first call by :func:`computes_linear`.

    Parameters
    ----------
    module
        The module.

    Returns
    -------
    bool
        ``True`` for a candidate subclass.
    """
    return isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward


def computes_linear(module: nn.Module, args: tuple[Any, ...], output: Any) -> bool:
    """Whether a call's output equals ``F.linear`` of its first input (one extra product, once).

    Parameters
    ----------
    module
        The module that was called.
    args
        The call's positional arguments.
    output
        The call's output.

    Returns
    -------
    bool
        ``True`` when the output matches ``F.linear`` (relative tolerance ``1e-4``).
    """
    if len(args) != 1 or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
        return False
    weight, bias = module.weight, module.bias
    if not isinstance(weight, Tensor) or not (bias is None or isinstance(bias, Tensor)):
        return False
    inputs = args[0]
    if inputs.dim() < 1 or inputs.shape[-1] != weight.shape[1] or output.shape != (*inputs.shape[:-1], weight.shape[0]):
        return False
    with torch.no_grad():
        dtype = output.dtype
        expected = F.linear(inputs.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        return bool(torch.allclose(expected, output.detach(), rtol=1e-4, atol=1e-5 * max(scale, 1e-12)))


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (weight stored ``[d_in, d_out]``).

    Parameters
    ----------
    module
        The module.

    Returns
    -------
    bool
        ``True`` for a stock ``Conv1D``.
    """
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D) and type(module).forward is Conv1D.forward


class LinearRecord(OuterProductRecord):
    """One call ``y = x Wᵀ + b`` (or ``x W + b`` for ``Conv1D``) on inputs ``[..., d_in]``.

    Parameters
    ----------
    module
        The module that was called.
    module_name
        Its qualified name (for error messages).
    params
        Its direct trainable parameters at call time, by attribute name.
    args
        The call's positional arguments (the input first).
    output
        The call's output.
    """

    inserts_batch = True

    def __init__(
        self,
        module: nn.Module,
        module_name: str,
        params: dict[str, nn.Parameter],
        args: tuple[Any, ...],
        output: Tensor,
    ) -> None:
        super().__init__(module, module_name, params)
        self.transposed = not isinstance(module, nn.Linear)
        inputs = args[0]
        self.inputs = inputs.detach()
        # Under autocast the product used the inputs cast to the output dtype: mirror it.
        self.product_dtype = output.dtype

    def _bind(self, grads: list[Tensor | None], layout: RowLayout) -> None:
        (grad,) = grads
        assert grad is not None
        dtype = compute_dtype(next(iter(self.params.values())))  # not module.weight: no parametrisation re-run
        self.check_batch(self.inputs, layout, "input")
        d_in = self.inputs.shape[-1]
        d_out = grad.shape[-1]
        inputs = layout.input_to_rows(self.inputs).reshape(layout.num_examples, -1, d_in)
        rows = layout.grad_to_rows(grad).reshape(layout.num_examples, layout.num_tasks, -1, d_out)
        self.factors = OuterProductRows(inputs.to(self.product_dtype).to(dtype), rows.to(dtype), self.transposed)
        del self.inputs
