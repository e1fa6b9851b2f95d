"""Records of ``nn.Conv2d`` and ``nn.Conv1d`` calls (any padding mode: other than zeros, the captured input is padded
as the module pads it), via the unfold (im2col) form, and of ``nn.Conv3d`` calls that cut separate patches.

A 2-D convolution is a Linear map applied to every unfolded input patch, so its per-row weight
gradients are ``Σ_l g_{ekl} u_{el}ᵀ`` with ``u`` the unfolded patches ``[E, L, C·kh·kw]`` and
``g`` the output gradients ``[E, m, L, C_out]``. A convolution whose kernel is its stride (no padding,
no dilation) needs no unfolding: its patches are a reshaping of the input.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from ._layout import RowLayout
from ._outer import OuterProductRecord, OuterProductRows
from ._precision import full_float32_precision
from ._record import Record, compute_dtype

__all__ = [
    "Conv2dRecord",
    "PatchConvRecord",
    "batched_input",
    "ConvTransposePatchRecord",
    "check_samples_first",
    "is_patch_conv3d",
    "is_patch_conv_transpose2d",
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
        Number of spatial dimensions (1 for ``Conv1d``, 2 for ``Conv2d``, 3 for ``Conv3d``).

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
            f"needs batched [N, C, {('L', 'H, W', 'D, H, W')[spatial - 1]}] inputs for {type(record.module).__name__}."
        )
    return inputs.detach()


def numeric_padding(conv: _ConvNd) -> tuple[int, ...] | None:
    """The zero padding of each spatial side of ``conv`` as numbers: its own, or that of ``padding="valid"`` (none)
    or ``padding="same"`` (``dilation * (kernel - 1) / 2`` on each side when that is a whole number; an odd total is
    padded unevenly by torch, which the unfold form does not do: ``None`` then).

    Parameters
    ----------
    conv
        The convolution.

    Returns
    -------
    tuple of int or None
        One padding per spatial dimension, or ``None``.
    """
    padding = conv.padding
    if not isinstance(padding, str):
        return tuple(padding)
    if padding == "valid":
        return (0,) * len(conv.kernel_size)
    totals = [dilation * (kernel - 1) for dilation, kernel in zip(conv.dilation, conv.kernel_size)]
    if padding != "same" or any(total % 2 for total in totals):
        return None
    return tuple(total // 2 for total in totals)


def padded_input(conv: _ConvNd, inputs: Tensor) -> tuple[Tensor, tuple[int, ...] | None]:
    """The input as the convolution pads it, and the zero padding left to apply: for ``padding_mode`` other than
    ``"zeros"`` (``"reflect"``, ``"replicate"``, ``"circular"``: HiFi-GAN-style vocoders), the input padded that way
    first, as ``nn.Conv1d``/``nn.Conv2d`` do, and no padding left; else the input and :func:`numeric_padding`.

    Parameters
    ----------
    conv
        The convolution.
    inputs
        Its ``[N, C, ...]`` input.

    Returns
    -------
    tuple
        The input and the zero padding of each spatial dimension (``None`` as :func:`numeric_padding`).
    """
    if conv.padding_mode == "zeros":
        return inputs, numeric_padding(conv)
    padded = F.pad(inputs, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
    return padded, (0,) * len(conv.kernel_size)


def _pads_supported(conv: _ConvNd) -> bool:
    """Whether the records can pad like ``conv``: zero padding they can express, or another padding mode, which they
    apply to the input (see :func:`padded_input`)."""
    return conv.padding_mode != "zeros" or numeric_padding(conv) is not None


def is_patch_conv3d(module: nn.Module) -> bool:
    """Whether ``module`` is a stock ``nn.Conv3d`` that cuts its input into separate patches (kernel equal to the
    stride, no padding, no dilation, one group: the patch embeddings of video transformers), which is a Linear
    layer on the patches: handled by :class:`Conv2dRecord` with the patches cut by reshaping.

    Parameters
    ----------
    module
        The module.

    Returns
    -------
    bool
        ``True`` for such a ``Conv3d``.
    """
    return _cuts_separate_patches(module, nn.Conv3d)


def _cuts_separate_patches(module: nn.Module, stock: type[_ConvNd]) -> bool:
    """Whether ``module`` is a ``stock`` convolution with its own forward pass, one group, no padding and no dilation,
    whose kernel is its stride: each input (or, transposed, output) position's patch is its own."""
    return (
        isinstance(module, stock)
        and type(module).forward is stock.forward
        and module.groups == 1
        and module.padding_mode == "zeros"
        and numeric_padding(module) == (0,) * len(module.kernel_size)
        and all(dilation == 1 for dilation in module.dilation)
        and tuple(module.kernel_size) == tuple(module.stride)
    )


def _patches(tensor: Tensor, kernel: tuple[int, ...]) -> Tensor:
    """The separate patches ``[N, L, C * k1 * k2 * ...]`` of a ``[N, C, *spatial]`` tensor (a convolution's input, or
    a transposed convolution's output gradient), cut by a kernel equal to its stride (the remainder of each spatial
    size dropped, as the convolution drops it), in the layout of the convolution's flattened weight
    ``[C, k1, k2, ...]`` and in the order of the positions."""
    num, channels = tensor.shape[:2]
    counts = [size // k for size, k in zip(tensor.shape[2:], kernel)]
    index = (slice(None), slice(None), *(slice(0, count * k) for count, k in zip(counts, kernel)))
    cropped = tensor[index]
    split = [part for count, k in zip(counts, kernel) for part in (count, k)]
    grid = cropped.reshape(num, channels, *split)  # [N, C, o1, k1, o2, k2, ...]
    spatial = len(kernel)
    order = [0, *(2 + 2 * i for i in range(spatial)), 1, *(3 + 2 * i for i in range(spatial))]
    return grid.permute(order).reshape(num, math.prod(counts), channels * math.prod(kernel))


def is_unfoldable_conv2d(module: nn.Module) -> bool:
    """Whether ``module`` is a stock ``nn.Conv2d`` the unfold form handles.

    Parameters
    ----------
    module
        The module.

    Returns
    -------
    bool
        ``True`` for a stock, ungrouped ``Conv2d`` whose padding the records reproduce (see :func:`padded_input`).
    """
    return (
        isinstance(module, nn.Conv2d)
        and type(module).forward is nn.Conv2d.forward
        and module.groups == 1
        and _pads_supported(module)
    )


class _PatchProductRecord(OuterProductRecord):
    """A convolution call that is a Linear map between patches of its input and of its output, whose per-row weight
    gradients are sums over the patches of outer products (see :class:`OuterProductRows`); the call's input is kept
    until the record is bound.

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
        self.inputs = batched_input(self, args[0], spatial=len(cast(_ConvNd, module).kernel_size))
        # Under autocast the product used the inputs cast to the output dtype: mirror it.
        self.product_dtype = output.dtype

    def _set_factors(
        self, inputs: Tensor, out_rows: Tensor, layout: RowLayout, dtype: torch.dtype, transposed: bool = False
    ) -> None:
        """Set the factors from the input patches ``[N, L, d_in]`` and the output gradients ``[m, N, L, d_out]`` of
        the same ``L`` positions (all of them one "example" without ``batch_dim``)."""
        if layout.batch_dim is None:
            inputs = inputs.reshape(1, -1, inputs.shape[-1])
            out_rows = out_rows.reshape(1, out_rows.shape[0], -1, out_rows.shape[-1])
        else:
            out_rows = out_rows.transpose(0, 1)
        self.factors = OuterProductRows(inputs.to(self.product_dtype).to(dtype), out_rows.to(dtype), transposed)


class Conv2dRecord(_PatchProductRecord):
    """One call of a ``Conv2d`` on a ``[N, C, H, W]`` input (unfolded patches), or of a ``Conv3d`` that cuts its
    ``[N, C, D, H, W]`` input into separate patches (:func:`is_patch_conv3d`).

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

    # Samples per example when the call's samples are the examples' frames or images, regrouped as ``[E * k, C, H,
    # W]`` (a video model's frames, an image pair), a grouping the engine verified (see :meth:`split_batch`), whose
    # gradients then come as ``[m, E, k, C_out, ...]`` (also with k = 1); else None.
    group: int | None = None

    def can_split_batch(self, batch_dim: int) -> bool:
        """Whether :meth:`split_batch` applies: along the samples' dimension 0.

        Parameters
        ----------
        batch_dim
            The engine's batch dimension.

        Returns
        -------
        bool
            ``True`` for ``batch_dim=0`` while the input is held.
        """
        return batch_dim == 0 and isinstance(getattr(self, "inputs", None), Tensor)

    def split_batch(self, num_examples: int, batch_dim: int) -> None:
        """Take the samples ``[E * k, C, H, W]`` as ``k`` consecutive samples per example (a grouping the engine
        verified): each example's patches are those of its ``k`` samples.

        Parameters
        ----------
        num_examples
            ``E``.
        batch_dim
            The engine's batch dimension (0).
        """
        self.group = self.inputs.shape[0] // num_examples

    def _bind(self, grads: list[Tensor | None], layout: RowLayout) -> None:
        (grad,) = grads
        assert grad is not None
        check_samples_first(self, layout)
        conv = self.module
        assert isinstance(conv, (nn.Conv2d, nn.Conv3d))
        dtype = compute_dtype(next(iter(self.params.values())))  # not conv.weight: no parametrisation re-run
        if self.group is not None:  # [m, E, k, C_out, ...] gradients of [E * k, C, ...] samples
            grad = grad.flatten(1, 2)
        else:
            self.check_batch(self.inputs, layout, "input")
        if isinstance(conv, nn.Conv3d):  # separate patches (is_patch_conv3d)
            patches = _patches(self.inputs, tuple(conv.kernel_size))  # [N, L, C*kd*kh*kw]
        else:
            inputs, padding = padded_input(conv, self.inputs)
            assert padding is not None  # (is_unfoldable_conv2d)
            patches = F.unfold(
                inputs, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride
            ).transpose(1, 2)  # [N, L, C*kh*kw]
        del self.inputs
        out_rows = grad.flatten(-len(conv.kernel_size)).transpose(-1, -2)  # [m, N, L, C_out]
        if self.group is not None and self.group > 1:  # an example's patches: those of its k samples
            patches = patches.reshape(-1, self.group * patches.shape[1], patches.shape[2])
            out_rows = out_rows.reshape(out_rows.shape[0], -1, self.group * out_rows.shape[2], out_rows.shape[3])
        self._set_factors(patches, out_rows, layout, dtype)


def is_unfoldable_grouped_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a stock ``nn.Conv1d``, or a stock grouped (e.g. depthwise) ``nn.Conv2d``,
    whose padding the records reproduce (see :func:`padded_input`): handled by :class:`PatchConvRecord`.

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
    return stock and _pads_supported(module)


# Largest (C_in / groups) · (C_out / groups) for which a grouped convolution's per-row weight gradients come from the
# convolution's weight-gradient kernel run over all rows at once (the rows folded into the groups): faster and
# lighter than the unfolded patches for depthwise and narrow groups (1.5-4x on CPU), slower for wide ones.
MAX_FOLDED_GROUP_CHANNELS = 64 * 64


class PatchConvRecord(Record):
    """One call of a ``Conv1d`` (any groups) or grouped ``Conv2d``: per-row weight gradients
    ``Σ_l g_{ekgl} u_{egl}ᵀ`` per group ``g`` of channels (``u``: the input patches), materialised
    (``[R, numel]``, the size of the weight per row: small for depthwise kernels).

    For depthwise kernels (one input channel per group), each row's kernel gradient is the correlation of its input
    channel with its output gradients: one grouped convolution over all rows, the output gradients as its kernels (as
    fast as the weight gradient of an ordinary backward pass). For other narrow groups, the rows are folded into the
    groups (``[1, R · C_in, ...]`` inputs, ``R · groups`` groups) and the convolution's own weight-gradient kernel gives
    every row's weight gradient in one call; otherwise they come from the unfolded input patches (im2col), one batched
    product per row and group.

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
        inputs, conv_padding = padded_input(conv, self.inputs.to(self.product_dtype).to(dtype))
        del self.inputs
        assert conv_padding is not None  # (is_unfoldable_grouped_conv)
        self.kernel: tuple[int, ...]
        self.dilation: tuple[int, ...]
        self.padding: tuple[int, ...]
        self.stride: tuple[int, ...]
        if isinstance(conv, nn.Conv1d):  # as a Conv2d over [N, C, 1, L]
            inputs, grad = inputs.unsqueeze(2), grad.unsqueeze(-2)
            self.kernel, self.dilation = (1, conv.kernel_size[0]), (1, conv.dilation[0])
            self.padding, self.stride = (0, conv_padding[0]), (1, conv.stride[0])
        else:
            self.kernel, self.dilation = tuple(conv.kernel_size), tuple(conv.dilation)
            self.padding, self.stride = tuple(conv_padding), tuple(conv.stride)
        self.groups = conv.groups
        self.inputs = inputs  # [N, C_in, H, W]
        self.grads = grad.to(dtype)  # [m, N, C_out, H', W']

    def _folded(self) -> bool:
        """Whether the per-row weight gradients come from the convolution's kernel over the folded rows."""
        channels_in, channels_out = self.inputs.shape[1], self.grads.shape[2]
        return (channels_in // self.groups) * (channels_out // self.groups) <= MAX_FOLDED_GROUP_CHANNELS

    def _weight_rows_folded(self) -> Tensor:
        """``[R, numel]`` from one weight-gradient call of the convolution with the rows folded into the groups."""
        assert self.layout is not None
        inputs, grads = self.inputs, self.grads
        num_tasks, samples, channels_out = grads.shape[:3]
        channels_in = inputs.shape[1]
        # Rows (e, k), e-major; a row's input is its example's (the whole batch's when batch_dim is None).
        per_row_inputs = inputs.unsqueeze(1).expand(samples, num_tasks, *inputs.shape[1:])
        per_row_grads = grads.transpose(0, 1)  # [N, m, C_out, H', W']
        if self.layout.batch_dim is None:  # one "example": the batch's samples stay the kernel's batch
            batch, rows = samples, num_tasks
        else:
            batch, rows = 1, samples * num_tasks
        folded_inputs = per_row_inputs.reshape(batch, rows * channels_in, *inputs.shape[2:])
        folded_grads = per_row_grads.reshape(batch, rows * channels_out, *grads.shape[3:])
        # (the kernel reads only the weight's shape)
        weight = inputs.new_zeros(1, 1, 1, 1).expand(rows * channels_out, channels_in // self.groups, *self.kernel)
        with full_float32_precision(inputs.device, matmul=False):
            _, grad_weight, _ = torch.ops.aten.convolution_backward(
                folded_grads, folded_inputs, weight, None, list(self.stride), list(self.padding), list(self.dilation),
                False, [0, 0], rows * self.groups, [False, True, False],
            )
        return grad_weight.reshape(rows, -1)

    def _weight_rows_depthwise(self) -> Tensor:
        """``[R, numel]`` of a depthwise convolution (one input channel per group): each row's kernel gradient is the
        correlation of its input channel with its output gradients, one grouped convolution over all rows and channels
        at once (the output gradients as its kernels, the stride as its dilation and the dilation as its stride)."""
        assert self.layout is not None
        inputs, grads = self.inputs, self.grads
        num_tasks, samples, channels_out = grads.shape[:3]
        channels_in = inputs.shape[1]
        pad_h, pad_w = self.padding
        padded = F.pad(inputs, (pad_w, pad_w, pad_h, pad_h))
        pairs = samples * num_tasks  # (sample, task), sample-major
        folded_inputs = padded.unsqueeze(1).expand(samples, num_tasks, *padded.shape[1:])
        folded_inputs = folded_inputs.reshape(1, pairs * channels_in, *padded.shape[2:])
        kernels = grads.transpose(0, 1).reshape(pairs * channels_out, 1, *grads.shape[3:])
        with full_float32_precision(inputs.device, matmul=False):
            correlations = F.conv2d(
                folded_inputs, kernels, stride=self.dilation, dilation=self.stride, groups=pairs * channels_in
            )  # [1, pairs * C_out, >= kh, >= kw]
        kernel_h, kernel_w = self.kernel
        rows = correlations[0, :, :kernel_h, :kernel_w].reshape(samples, num_tasks, -1)
        if self.layout.batch_dim is None:  # one "example": the samples' gradients add up
            rows = rows.sum(0, keepdim=True)
        return rows.reshape(self.layout.num_rows, -1)

    def _weight_rows_unfolded(self) -> Tensor:
        """``[R, numel]`` from the unfolded input patches."""
        assert self.layout is not None
        patches = F.unfold(
            self.inputs, self.kernel, dilation=self.dilation, padding=self.padding, stride=self.stride
        )  # [N, C*K, L]
        samples, _, positions = patches.shape
        patches = patches.view(samples, self.groups, -1, positions)  # [N, G, C_in/G * K, L]
        num_tasks = self.grads.shape[0]
        out_rows = self.grads.reshape(num_tasks, samples, self.groups, -1, positions)  # [m, N, G, C_out/G, L]
        if self.layout.batch_dim is None:  # the whole batch is one "example", one row per task
            grads, patches = out_rows.unsqueeze(0), patches.unsqueeze(0)  # [1, m, N, G, o, L], [1, N, G, i, L]
        else:
            grads, patches = out_rows.transpose(0, 1).unsqueeze(2), patches.unsqueeze(1)  # [E, m, 1, ...], [E, 1, ...]
        return torch.einsum("ekngol,engil->ekgoi", grads, patches).reshape(self.layout.num_rows, -1)

    def per_row(self, name: str) -> Tensor:
        """Per-row gradients of ``weight`` (per group) or ``bias``.

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
        if name == "bias":
            if self.layout.batch_dim is None:
                return self.grads.sum(dim=(1, 3, 4)).reshape(self.layout.num_rows, -1)
            return self.grads.sum(dim=(3, 4)).transpose(0, 1).reshape(self.layout.num_rows, -1)
        if self.inputs.shape[1] == self.groups:
            return self._weight_rows_depthwise()
        return self._weight_rows_folded() if self._folded() else self._weight_rows_unfolded()

    def compact(self) -> None:
        """Drop the factors :meth:`weighted_grad` no longer needs once every parameter's rows are kept."""
        if set(self.kept_rows) >= set(self.params):
            self.grads = self.inputs = None  # type: ignore[assignment]

    def release(self) -> None:
        """Drop the factors and the kept rows once the record's contributions are added."""
        super().release()
        self.grads = self.inputs = None  # type: ignore[assignment]


def is_patch_conv_transpose2d(module: nn.Module) -> bool:
    """Whether ``module`` is a stock ``nn.ConvTranspose2d`` that maps each input position to its own output patch
    (kernel equal to the stride, no padding, no dilation, one group: the upsampling of segmentation decoders), which
    is a Linear layer from each position's channels to its patch: handled by :class:`ConvTransposePatchRecord`.

    Parameters
    ----------
    module
        The module.

    Returns
    -------
    bool
        ``True`` for such a ``ConvTranspose2d``.
    """
    return _cuts_separate_patches(module, nn.ConvTranspose2d) and cast(
        nn.ConvTranspose2d, module
    ).output_padding == (0, 0)


class ConvTransposePatchRecord(_PatchProductRecord):
    """One call of a ``ConvTranspose2d`` whose kernel is its stride, on a ``[N, C_in, H, W]`` input: the output patch
    ``[C_out, kh, kw]`` of each input position is ``Wᵀ x`` with the weight ``[C_in, C_out * kh * kw]`` (stored
    ``[C_in, C_out, kh, kw]``), so the per-row weight gradients are ``Σ_l x_{el} g_{ekl}ᵀ`` over the positions, with
    ``g`` the output gradients cut into the positions' patches. Output positions past the patches (an
    ``output_size`` larger than ``H * kh``) get the bias alone.

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

    bias_grads: Tensor | None = None

    def _bind(self, grads: list[Tensor | None], layout: RowLayout) -> None:
        (grad,) = grads
        assert grad is not None
        check_samples_first(self, layout)
        conv = self.module
        assert isinstance(conv, nn.ConvTranspose2d)
        dtype = compute_dtype(next(iter(self.params.values())))
        self.check_batch(self.inputs, layout, "input")
        num = self.inputs.shape[0]
        inputs = self.inputs.flatten(2).transpose(1, 2)  # [N, L, C_in]
        del self.inputs
        tasks, channels = grad.shape[0], grad.shape[2]
        # (the output patches of the input positions: the positions past them, which an output_size adds, dropped)
        patches = _patches(grad.flatten(0, 1), tuple(conv.kernel_size))  # [m * N, L, C_out * kh * kw]
        self._set_factors(inputs, patches.unflatten(0, (tasks, num)), layout, dtype, transposed=True)
        bias = grad.sum((3, 4))  # [m, N, C_out]: every output position, those past the patches too
        if layout.batch_dim is None:
            self.bias_grads = bias.sum(1).to(dtype)  # [m, C_out]
        else:
            self.bias_grads = bias.transpose(0, 1).reshape(num * tasks, channels).to(dtype)

    def per_row(self, name: str) -> Tensor:
        """Per-row gradients of ``weight`` (materialised from the factors) or ``bias`` (summed over the output).

        Parameters
        ----------
        name
            The parameter's name in ``params``.

        Returns
        -------
        Tensor
            Shape ``[R, numel]``.
        """
        if name == "weight":
            return super().per_row(name)
        assert self.bias_grads is not None
        return self.bias_grads

    def release(self) -> None:
        """Drop the factors, the bias rows and the kept rows once the record's contributions are added."""
        super().release()
        self.bias_grads = None
