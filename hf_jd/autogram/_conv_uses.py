"""Convolutions as sums of block products, for generic calls whose weights meet the data in a convolution.

A module that computes its kernel before convolving (BiT's weight-standardised ``Conv2d``, timm's ``StdConv2d``, an
old-style ``weight_norm`` of a ``ConvTranspose1d`` in a HiFi-GAN-style vocoder, ``F.conv2d(x, self.weight * scale)``)
takes the generic path: its per-example gradients came from one vector-Jacobian product per example through the
convolution. But the gradient of a convolution's kernel is a sum of outer products over positions, as for a Linear
layer (see :mod:`._conv`), and the per-example gradients of the module's parameters follow from those of the kernel
through the operations on the parameters alone. This module describes a convolution node of the autograd graph
(``ConvolutionBackward0``, whose saved input, kernel and geometry are all it needs) as such blocks:

* ``y = conv(x, W)``: a block per sample and group, whose gradient is ``Σ_l g_lᵀ u_l`` over its output positions
  ``l``, with ``u_l`` the input patch there (unfolded, ``[C_in / G · k]``) and ``g_l`` the output gradient
  (``[C_out / G]``);
* ``y = conv_transpose(x, W)``: the adjoint, ``⟨conv_transpose(x, W), g⟩ = ⟨x, conv(g, W)⟩``, so a block's gradient
  is ``Σ_l x_lᵀ u(g)_l`` over its input positions ``l``, with ``u(g)_l`` the patch of the output gradient the kernel
  reaches from there (unfolded with the convolution's stride, padding and dilation);
* the bias: a block per sample, whose gradient is the sum of its output gradients over the positions.

Which example each block belongs to is then found as for every product (see :mod:`._matmul_uses`). One- and
two-dimensional convolutions are described; others (3-D) are not, and keep the usual path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._use_blocks import UseBlocks, bias_factors, per_sample

__all__ = ["CONVOLUTION_NODES", "convolution_blocks"]

CONVOLUTION_NODES = frozenset({"ConvolutionBackward0"})


@dataclass
class _Geometry:
    """A convolution's kernel size and how it moves, with one or two spatial dimensions (one is taken as two, the
    first of size 1, so that ``F.unfold`` handles both)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    def unfold(self, tensor: Tensor) -> Tensor:
        """``[N, C, *spatial]`` → the patches ``[N, C · k, L]`` (channel-major, as a kernel's entries are)."""
        if tensor.dim() == 3:
            tensor = tensor.unsqueeze(2)
        return F.unfold(tensor, self.kernel, dilation=self.dilation, padding=self.padding, stride=self.stride)

    def positions(self, size: tuple[int, int]) -> tuple[int, int]:
        """The number of patch positions along each dimension of an input of spatial ``size``."""
        first, second = (
            (length + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
            for length, pad, dilation, kernel, stride in zip(
                size, self.padding, self.dilation, self.kernel, self.stride
            )
        )
        return first, second


def _pair(values: Any, spatial: int) -> tuple[int, int]:
    """Two sizes from a convolution's one (one spatial dimension: the leading one of size 1 added) or two."""
    numbers = [int(value) for value in values]
    return (1, numbers[0]) if spatial == 1 else (numbers[0], numbers[1])


def _geometry(node: Any, spatial: int) -> _Geometry | None:
    """The geometry a ``ConvolutionBackward0`` node saved (``None`` for three spatial dimensions)."""
    if spatial not in (1, 2):
        return None
    return _Geometry(
        _pair(node._saved_weight.shape[2:], spatial), _pair(node._saved_stride, spatial),
        # (one spatial dimension: the leading one added has no padding)
        (0, int(node._saved_padding[0])) if spatial == 1 else _pair(node._saved_padding, 2),
        _pair(node._saved_dilation, spatial), int(node._saved_groups),
    )


def _spatial_size(tensor_shape: torch.Size) -> tuple[int, int]:
    """The spatial sizes of a ``[N, C, *spatial]`` shape, two of them (one is taken as two, the first of size 1)."""
    return _pair(tensor_shape[2:], len(tensor_shape) - 2)


def convolution_blocks(node: Any, operands: set[int]) -> list[UseBlocks] | None:
    """Describe a ``ConvolutionBackward0`` node's uses of its weight-derived kernel and bias as blocks.

    Parameters
    ----------
    node
        The autograd node.
    operands
        Which of its inputs are weight-derived: ``1`` (the kernel) and/or ``2`` (the bias); the input (``0``) must not
        be.

    Returns
    -------
    list of UseBlocks or None
        ``None`` when the convolution is not one this module describes (three spatial dimensions, nothing saved).
    """
    weight = node._saved_weight
    if 0 in operands or not operands or weight is None:
        return None
    spatial = weight.dim() - 2
    geometry = _geometry(node, spatial)
    out_shape = torch.Size(node._input_metadata[0].shape)
    if geometry is None or len(out_shape) != spatial + 2 or out_shape.numel() == 0:
        return None
    found: list[UseBlocks] = []
    if 1 in operands:
        inputs = node._saved_input
        if inputs is None or inputs.dim() != spatial + 2:
            return None
        describe = _transposed_kernel_blocks if node._saved_transposed else _kernel_blocks
        blocks = describe(inputs.detach(), geometry, out_shape)
        if blocks is None:
            return None
        found.append(blocks)
    if 2 in operands:
        found.append(UseBlocks(2, "bias", None, None, 1, int(out_shape[0]), per_sample(1), bias_factors(out_shape[1])))
    return found


def _kernel_blocks(inputs: Tensor, geometry: _Geometry, out_shape: torch.Size) -> UseBlocks | None:
    """``y = conv(x, W)``: a block per sample and group, ``Σ_l g_lᵀ u_l`` over its positions ``l`` with ``u`` the
    input patches."""
    groups = geometry.groups
    if geometry.positions(_spatial_size(inputs.shape)) != _spatial_size(out_shape):
        return None  # (padding the node does not describe: not expected from aten's convolution)
    patches = geometry.unfold(inputs)  # [N, C_in · k, L]
    positions = patches.shape[2]
    data = patches.reshape(-1, patches.shape[1] // groups, positions).mT  # [N · G, L, C_in / G · k] (a view)
    out_channels = int(out_shape[1]) // groups

    def factors(grads: Tensor) -> tuple[Tensor, Tensor]:
        return grads.reshape(grads.shape[0], out_channels, positions).mT, data.to(grads.dtype)

    return UseBlocks(1, "columns", data, _groups_of(data.shape[0], groups, inputs.device), groups, data.shape[0],
                     per_sample(groups), factors)


def _transposed_kernel_blocks(inputs: Tensor, geometry: _Geometry, out_shape: torch.Size) -> UseBlocks | None:
    """``y = conv_transpose(x, W)``: a block per sample and group, ``Σ_l x_lᵀ u(g)_l`` over its input positions ``l``
    with ``u(g)`` the patches of the output gradients."""
    groups = geometry.groups
    if geometry.positions(_spatial_size(out_shape)) != _spatial_size(inputs.shape):
        return None  # (an output padding of a stride or more)
    samples, channels = inputs.shape[:2]
    data = inputs.reshape(samples * groups, channels // groups, -1).mT  # [N · G, L_in, C_in / G] (a view)
    sizes = (int(out_shape[1]) // groups, *out_shape[2:])

    def factors(grads: Tensor) -> tuple[Tensor, Tensor]:
        patches = geometry.unfold(grads.reshape(grads.shape[0], *sizes))  # [blocks, C_out / G · k, L_in]
        return data.to(grads.dtype), patches.mT

    return UseBlocks(1, "rows", data, _groups_of(data.shape[0], groups, inputs.device), groups, data.shape[0],
                     per_sample(groups), factors)


def _groups_of(num_blocks: int, groups: int, device: torch.device) -> Tensor | None:
    """Each block's group (``None`` without groups): blocks are sample-major."""
    return None if groups == 1 else torch.arange(groups, device=device).repeat(num_blocks // groups)
