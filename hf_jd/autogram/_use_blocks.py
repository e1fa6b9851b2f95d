"""How an operation that uses a weight-derived tensor splits into blocks (see :mod:`._matmul_uses`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

__all__ = ["Factors", "UseBlocks", "bias_factors", "per_sample"]

# Maps the flat gradients of a use's blocks ``[blocks, features]`` to the factors ``L [blocks, n, a]`` and
# ``R [blocks, n, b]`` whose products ``Σ_r L_rᵀ R_r`` are the gradient of the weight-derived tensor.
Factors = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass
class UseBlocks:
    """An autograd node's use of one weight-derived input, as blocks whose gradients sum to that input's.

    Attributes
    ----------
    operand
        Which input of the node the weight-derived tensor is.
    kind
        What the use is (``"columns"``, ``"rows"``, ``"bias"``, ``"elementwise"``; see ``_matmul_uses._Use``).
    data
        What the blocks' gradients are combined with (``None`` for a bias).
    slices
        Per block, the slice of the weight-derived tensor along its first dimension that the block's gradient is (a
        convolution's group; ``None``: the whole tensor).
    num_slices
        The number of slices (1 without them).
    num_blocks
        The number of blocks.
    to_blocks
        Maps the node's output gradients ``[K, *output]`` to the blocks' ``[K, blocks, features]`` (``None``: a
        reshape).
    factors
        The block products' factors from the blocks' gradients (``None``: those of ``kind``).
    reduced
        ``"elementwise"``: the weight-derived tensor's shape (within a block).
    """

    operand: int
    kind: str
    data: Tensor | None
    slices: Tensor | None
    num_slices: int
    num_blocks: int
    to_blocks: Callable[[Tensor], Tensor] | None = None
    factors: Factors | None = None
    reduced: tuple[int, ...] = ()


def per_sample(count: int) -> Callable[[Tensor], Tensor]:
    """Blocks of a ``[K, N, ...]`` output: ``count`` per sample (a sample's groups), each its share of the entries.

    Parameters
    ----------
    count
        Blocks per sample.

    Returns
    -------
    Callable
        ``[K, N, *rest]`` → ``[K, N · count, numel(rest) / count]`` (a view).
    """
    def to_blocks(grads: Tensor) -> Tensor:
        return grads.reshape(grads.shape[0], grads.shape[1] * count, -1)

    return to_blocks


def bias_factors(channels: int, scale: Tensor | None = None) -> Factors:
    """Factors of a per-channel tensor added to (or, with ``scale``, multiplying) channels-first samples.

    Parameters
    ----------
    channels
        The number of channels ``C``.
    scale
        What the tensor multiplies, ``[blocks, C, L]`` (a norm's normalised input); ``None`` for an addition.

    Returns
    -------
    Factors
        Block gradients ``[blocks, C · L]`` → ``(1, Σ_l g_l ⊙ scale_l)``, ``[blocks, 1, 1]`` and ``[blocks, 1, C]``.
    """
    def factors(grads: Tensor) -> tuple[Tensor, Tensor]:
        blocks = grads.reshape(grads.shape[0], channels, -1)
        if scale is not None:
            blocks = blocks * scale.to(grads.dtype)
        return grads.new_ones(grads.shape[0], 1, 1), blocks.sum(2).unsqueeze(1)

    return factors
