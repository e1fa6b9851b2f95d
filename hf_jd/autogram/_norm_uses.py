"""Layer and group norms of the data with weight-derived scales and shifts, as sums of blocks.

A module that subclasses ``nn.LayerNorm`` or ``nn.GroupNorm`` with a forward of its own (BiT's group norm followed by
its activation, a layer norm that casts to float32 first, Nemotron's ``weight + 1``) takes the generic path: one
vector-Jacobian product per example through it. But ``y = x̂ ⊙ γ + β`` with ``x̂`` the normalised input, which the
norm's autograd node keeps the pieces of (its input, mean and reciprocal standard deviation): the gradient of ``γ`` is
``Σ g ⊙ x̂`` and that of ``β`` is ``Σ g`` over the positions, each position a block whose example is found as for every
product (see :mod:`._matmul_uses`):

* ``layer_norm`` over the trailing ``normalized_shape``: a block per entry of the leading dimensions;
* ``group_norm`` of ``[N, C, *spatial]``: a block per sample, summed over its positions.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._use_blocks import UseBlocks, bias_factors, per_sample

__all__ = ["NORM_NODES", "norm_blocks"]

NORM_NODES = frozenset({"NativeLayerNormBackward0", "NativeGroupNormBackward0"})


def _normalised_input(node: Any) -> Tensor | None:
    """``x̂``, shaped as the norm's input, from what the node keeps (``None`` if it keeps too little)."""
    inputs, mean, rstd = node._saved_input, node._saved_result1, node._saved_result2
    if inputs is None or mean is None or rstd is None:
        return None
    inputs = inputs.detach()
    if type(node).__name__ == "NativeLayerNormBackward0":
        if mean.dim() != inputs.dim():
            return None
        return (inputs - mean.detach()) * rstd.detach()
    samples, groups = int(node._saved_N), int(node._saved_group)
    if tuple(mean.shape) != (samples, groups) or inputs.dim() < 2 or inputs.shape[0] != samples:
        return None
    grouped = inputs.reshape(samples, groups, -1)
    return ((grouped - mean.detach().unsqueeze(2)) * rstd.detach().unsqueeze(2)).reshape(inputs.shape)


def norm_blocks(node: Any, operands: set[int]) -> list[UseBlocks] | None:
    """Describe a norm node's uses of its weight-derived scale (input ``1``) and shift (input ``2``) as blocks.

    Parameters
    ----------
    node
        A ``NativeLayerNormBackward0`` or ``NativeGroupNormBackward0`` node.
    operands
        Which of its inputs are weight-derived; the normalised input (``0``) must not be.

    Returns
    -------
    list of UseBlocks or None
        ``None`` when the node keeps too little to describe it.
    """
    if 0 in operands or not operands:
        return None
    out_shape = torch.Size(node._input_metadata[0].shape)
    if out_shape.numel() == 0:
        return None
    normalised = _normalised_input(node) if 1 in operands else None
    if 1 in operands and (normalised is None or normalised.shape != out_shape):
        return None
    found = []
    if type(node).__name__ == "NativeLayerNormBackward0":  # (elementwise uses, a block per position)
        reduced = tuple(int(size) for size in node._saved_normalized_shape)
        num_blocks = math.prod(out_shape[: len(out_shape) - len(reduced)])
        if normalised is not None:
            found.append(UseBlocks(1, "elementwise", normalised.reshape(num_blocks, -1), None, 1, num_blocks,
                                   reduced=reduced))
        if 2 in operands:
            found.append(UseBlocks(2, "elementwise", None, None, 1, num_blocks, reduced=reduced))
        return found
    samples, channels = int(out_shape[0]), int(out_shape[1])  # (a block per sample)
    if normalised is not None:
        data = normalised.reshape(samples, channels, -1)
        found.append(UseBlocks(1, "elementwise", data, None, 1, samples, per_sample(1), bias_factors(channels, data)))
    if 2 in operands:
        found.append(UseBlocks(2, "elementwise", None, None, 1, samples, per_sample(1), bias_factors(channels)))
    return found
