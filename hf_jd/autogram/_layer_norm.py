"""Record of ``nn.LayerNorm`` calls, in closed form.

With ``x̂`` the normalised input, ``y = γ ⊙ x̂ + β``, so row ``r = (e, k)`` has gradients
``Σ_t g_{ekt} ⊙ x̂_{et}`` for ``γ`` and ``Σ_t g_{ekt}`` for ``β``. ``x̂`` is recomputed from the
captured input (a normalisation only, the module itself is not re-run).
"""

from __future__ import annotations

import math
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ._layout import RowLayout
from ._record import Record, compute_dtype

__all__ = ["LayerNormRecord", "is_layer_norm"]


def is_layer_norm(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.LayerNorm`` with the stock forward."""
    return isinstance(module, nn.LayerNorm) and type(module).forward is nn.LayerNorm.forward


class LayerNormRecord(Record):
    """One call of an ``nn.LayerNorm``."""

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
        self.inputs = args[0].detach()

    def _bind(self, grads: list[Tensor | None], layout: RowLayout) -> None:
        (grad,) = grads
        assert grad is not None
        norm = self.module
        assert isinstance(norm, nn.LayerNorm)
        dtype = compute_dtype(next(iter(self.params.values())))
        self.check_batch(self.inputs, layout, "input")
        size = math.prod(norm.normalized_shape)
        inputs = self.inputs.to(dtype)
        del self.inputs
        normalised = F.layer_norm(inputs, norm.normalized_shape, None, None, norm.eps)
        self.normalised = layout.input_to_rows(normalised).reshape(layout.num_examples, -1, size)
        rows = layout.grad_to_rows(grad).to(dtype)
        self.rows = rows.reshape(layout.num_examples, layout.num_tasks, -1, size)

    def compact(self) -> None:
        if set(self.kept_rows) >= set(self.params):  # weighted_grad uses the kept [R, d] rows
            self.rows = self.normalised = None  # type: ignore[assignment]

    def release(self) -> None:
        super().release()
        del self.rows, self.normalised

    def per_row(self, name: str) -> Tensor:
        num_rows = self.rows.shape[0] * self.rows.shape[1]
        if name == "weight":
            return (self.rows * self.normalised.unsqueeze(1)).sum(dim=2).reshape(num_rows, -1)
        return self.rows.sum(dim=2).reshape(num_rows, -1)
