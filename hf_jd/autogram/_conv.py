"""Records of ``nn.Conv2d`` and ``nn.Conv1d`` calls (zero padding), via the unfold (im2col) form.

A 2-D convolution is a Linear map applied to every unfolded input patch, so its per-row weight
gradients are ``Σ_l g_{ekl} u_{el}ᵀ`` with ``u`` the unfolded patches ``[E, L, C·kh·kw]`` and
``g`` the output gradients ``[E, m, L, C_out]``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._layout import RowLayout
from ._outer import OuterProductRecord, OuterProductRows
from ._record import Record, compute_dtype

__all__ = [
    "Conv2dRecord",
    "PatchConvRecord",
    "batched_input",
    "check_samples_first",
    "is_unfoldable_conv2d",
    "is_unfoldable_grouped_conv",
]


def check_samples_first(record: Record, layout: RowLayout) -> None:
    """Raise unless the engine's batch dimension is that of the module's samples (dimension 0, as for
    convolutions and GroupNorm) or absent.

    Parameters
    ----------
    record
        The convolution's or GroupNorm's record.
    layout
        The row layout of the losses.

    Raises
    ------
    RuntimeError
        If the layout's batch dimension is another dimension than 0.
    """
    if layout.batch_dim not in (None, 0):
        raise RuntimeError(
            f"Module {record.describe()} takes its samples along dimension 0 (channels along dimension 1), but "
            f"the engine has batch_dim={layout.batch_dim}: the examples would be mixed. Use "
            "Engine(..., batch_dim=0), or batch_dim=None with task losses."
        )


def batched_input(record: Record, inputs: Tensor, spatial: int) -> Tensor:
    """The detached input of a convolution call, which must be batched: ``[N, C, *spatial dims]``.

    Parameters
    ----------
    record
        The call's record (for the error message).
    inputs
        The call's input.
    spatial
        Number of spatial dimensions (1 for ``Conv1d``, 2 for ``Conv2d``).

    Returns
    -------
    Tensor
        The input, detached.

    Raises
    ------
    RuntimeError
        If the input does not have ``spatial + 2`` dimensions.
    """
    if inputs.dim() != spatial + 2:
        raise RuntimeError(
            f"Module {record.describe()} received an input of shape {tuple(inputs.shape)}; the autogram engine "
            f"needs batched [N, C, {'L' if spatial == 1 else 'H, W'}] inputs for {type(record.module).__name__}."
        )
    return inputs.detach()


def is_unfoldable_conv2d(module: nn.Module) -> bool:
    """Whether ``module`` is a stock ``nn.Conv2d`` the unfold form handles.

    Parameters
    ----------
    module
        The module.

    Returns
    -------
    bool
        ``True`` for a stock, ungrouped ``Conv2d`` with zero padding given as numbers.
    """
    return (
        isinstance(module, nn.Conv2d)
        and type(module).forward is nn.Conv2d.forward
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


class Conv2dRecord(OuterProductRecord):
    """One call of a ``Conv2d`` on a ``[N, C, H, W]`` input.

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

    def __init__(
        self,
        module: nn.Module,
        module_name: str,
        params: dict[str, nn.Parameter],
        args: tuple[Any, ...],
        output: Tensor,
    ) -> None:
        super().__init__(module, module_name, params)
        self.inputs = batched_input(self, args[0], spatial=2)
        # Under autocast the product used the inputs cast to the output dtype: mirror it.
        self.product_dtype = output.dtype

    def _bind(self, grads: list[Tensor | None], layout: RowLayout) -> None:
        (grad,) = grads
        assert grad is not None
        check_samples_first(self, layout)
        conv = self.module
        assert isinstance(conv, nn.Conv2d)
        dtype = compute_dtype(next(iter(self.params.values())))  # not conv.weight: no parametrisation re-run
        self.check_batch(self.inputs, layout, "input")
        padding = conv.padding
        assert not isinstance(padding, str)  # numbers only (is_unfoldable_conv2d)
        patches = F.unfold(
            self.inputs, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride
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


def is_unfoldable_grouped_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a stock ``nn.Conv1d``, or a stock grouped (e.g. depthwise) ``nn.Conv2d``,
    with zero padding given as numbers: handled by :class:`PatchConvRecord`.

    Parameters
    ----------
    module
        The module.

    Returns
    -------
    bool
        ``True`` when :class:`PatchConvRecord` handles the module.
    """
    if isinstance(module, nn.Conv1d):
        stock = type(module).forward is nn.Conv1d.forward
    elif isinstance(module, nn.Conv2d):
        stock = type(module).forward is nn.Conv2d.forward and module.groups > 1
    else:
        return False
    return stock and module.padding_mode == "zeros" and not isinstance(module.padding, str)


class PatchConvRecord(Record):
    """One call of a ``Conv1d`` (any groups) or grouped ``Conv2d``: per-row weight gradients
    ``Σ_l g_{ekgl} u_{egl}ᵀ`` per group ``g`` of channels, from the unfolded input patches ``u``,
    materialised (``[R, numel]``, the size of the weight per row: small for depthwise kernels).

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

    def __init__(
        self,
        module: nn.Module,
        module_name: str,
        params: dict[str, nn.Parameter],
        args: tuple[Any, ...],
        output: Tensor,
    ) -> None:
        super().__init__(module, module_name, params)
        self.inputs = batched_input(self, args[0], spatial=1 if isinstance(module, nn.Conv1d) else 2)
        self.product_dtype = output.dtype

    def _bind(self, grads: list[Tensor | None], layout: RowLayout) -> None:
        (grad,) = grads
        assert grad is not None
        check_samples_first(self, layout)
        conv = self.module
        assert isinstance(conv, (nn.Conv1d, nn.Conv2d))
        dtype = compute_dtype(next(iter(self.params.values())))  # not conv.weight: no parametrisation re-run
        self.check_batch(self.inputs, layout, "input")
        inputs = self.inputs.to(self.product_dtype).to(dtype)
        del self.inputs
        conv_padding = conv.padding
        assert not isinstance(conv_padding, str)  # numbers only (is_unfoldable_grouped_conv)
        kernel: tuple[int, ...]
        dilation: tuple[int, ...]
        padding: tuple[int, ...]
        stride: tuple[int, ...]
        if isinstance(conv, nn.Conv1d):  # as a Conv2d over [N, C, 1, L]
            inputs = inputs.unsqueeze(2)
            kernel, dilation = (1, conv.kernel_size[0]), (1, conv.dilation[0])
            padding, stride = (0, conv_padding[0]), (1, conv.stride[0])
        else:
            kernel, dilation, padding, stride = conv.kernel_size, conv.dilation, conv_padding, conv.stride
        patches = F.unfold(inputs, kernel, dilation=dilation, padding=padding, stride=stride)  # [N, C*K, L]
        samples, _, positions = patches.shape
        groups = conv.groups
        self.patches = patches.view(samples, groups, -1, positions)  # [N, G, C_in/G * K, L]
        num_tasks = grad.shape[0]
        out_rows = grad.to(dtype).reshape(num_tasks, samples, groups, -1, positions)  # [m, N, G, C_out/G, L]
        if layout.batch_dim is None:  # the whole batch is one "example", one row per task
            self.grads = out_rows.unsqueeze(0)  # [1, m, N, G, C_out/G, L]
        else:
            self.grads = out_rows.transpose(0, 1).unsqueeze(2)  # [E, m, 1, G, C_out/G, L]
            self.patches = self.patches.unsqueeze(1)  # [E, 1, G, C_in/G * K, L]

    def per_row(self, name: str) -> Tensor:
        """Per-row gradients of ``weight`` (per group, from the patches) or ``bias``.

        Parameters
        ----------
        name
            The parameter's name in ``params``.

        Returns
        -------
        Tensor
            Shape ``[R, numel]``.
        """
        assert self.layout is not None
        num_rows = self.layout.num_rows
        if name == "bias":
            return self.grads.sum(dim=(2, -1)).reshape(num_rows, -1)
        patches = self.patches if self.patches.dim() == 5 else self.patches.unsqueeze(0)  # [E, n, G, I, L]
        return torch.einsum("ekngol,engil->ekgoi", self.grads, patches).reshape(num_rows, -1)

    def compact(self) -> None:
        """Drop the factors :meth:`weighted_grad` no longer needs once every parameter's rows are kept."""
        if set(self.kept_rows) >= set(self.params):
            self.grads = self.patches = None  # type: ignore[assignment]

    def release(self) -> None:
        """Drop the factors and the kept rows once the record's contributions are added."""
        super().release()
        self.grads = self.patches = None  # type: ignore[assignment]
