"""Record of ``nn.Conv2d`` calls (zero padding, one group), via the unfold (im2col) form.

A 2-D convolution is a Linear map applied to every unfolded input patch, so its per-row weight
gradients are ``Σ_l g_{ekl} u_{el}ᵀ`` with ``u`` the unfolded patches ``[E, L, C·kh·kw]`` and
``g`` the output gradients ``[E, m, L, C_out]``.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ._layout import RowLayout
from ._outer import OuterProductRecord, OuterProductRows
from ._record import compute_dtype

__all__ = ["Conv2dRecord", "is_unfoldable_conv2d"]


def is_unfoldable_conv2d(module: nn.Module) -> bool:
    """Whether ``module`` is a stock ``nn.Conv2d`` the unfold form handles."""
    return (
        isinstance(module, nn.Conv2d)
        and type(module).forward is nn.Conv2d.forward
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


class Conv2dRecord(OuterProductRecord):
    """One call of a ``Conv2d`` on a ``[N, C, H, W]`` input."""

    def __init__(
        self,
        module: nn.Module,
        module_name: str,
        params: dict[str, nn.Parameter],
        args: tuple[Any, ...],
        output: Tensor,
    ) -> None:
        super().__init__(module, module_name, params)
        inputs = args[0]
        if inputs.dim() != 4:
            raise RuntimeError(
                f"Module {self.describe()} received an input of shape {tuple(inputs.shape)}; the "
                "autogram engine needs batched [N, C, H, W] inputs for Conv2d."
            )
        self.inputs = inputs.detach()
        # Under autocast the product used the inputs cast to the output dtype: mirror it.
        self.product_dtype = output.dtype

    def _bind(self, grads: list[Tensor | None], layout: RowLayout) -> None:
        (grad,) = grads
        assert grad is not None
        if layout.batch_dim not in (None, 0):
            raise RuntimeError(
                f"Module {self.describe()}: Conv2d inputs are batched along dimension 0, but the "
                f"engine has batch_dim={layout.batch_dim}. Use batch_dim=0 or None."
            )
        conv = self.module
        assert isinstance(conv, nn.Conv2d)
        dtype = compute_dtype(conv.weight)
        self.check_batch(self.inputs, layout, "input")
        patches = F.unfold(
            self.inputs, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride
        ).transpose(1, 2)  # [N, L, C*kh*kw]
        del self.inputs
        channels = grad.shape[-3]
        out_rows = grad.flatten(-2).transpose(-1, -2)  # [m, N, L, C_out]
        if layout.batch_dim is None:
            inputs = patches.reshape(1, -1, patches.shape[-1])
            out_rows = out_rows.reshape(1, out_rows.shape[0], -1, channels)
        else:
            inputs = patches
            out_rows = out_rows.transpose(0, 1)
        self.factors = OuterProductRows(inputs.to(self.product_dtype).to(dtype), out_rows.to(dtype))
