"""Records of position-wise affine maps: ``nn.Linear`` and transformers' GPT-2 ``Conv1D``."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ._layout import RowLayout
from ._outer import OuterProductRecord, OuterProductRows
from ._record import compute_dtype

__all__ = ["LinearRecord", "is_linear", "is_conv1d"]


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` with the stock forward."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (weight stored ``[d_in, d_out]``)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D) and type(module).forward is Conv1D.forward


class LinearRecord(OuterProductRecord):
    """One call ``y = x Wᵀ + b`` (or ``x W + b`` for ``Conv1D``) on inputs ``[..., d_in]``."""

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
