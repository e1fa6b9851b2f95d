"""Products ``rows @ otherᵀ`` of per-row gradients: few rows (``R``), very long rows (``numel``).

On CUDA, a single matrix product with ``R`` of a few dozen and an inner dimension of hundreds of
thousands runs far below the memory bandwidth (too few output tiles to occupy the device). Splitting
the inner dimension into ``s`` slices, multiplying the slices as one batched product and summing the
``s`` partial results gives the same value with every multiprocessor busy. On CPU the plain product
is as fast, and is kept.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["row_products"]

# Split the inner dimension when it is at least this many times the number of rows.
SPLIT_MIN_RATIO = 256
# Length of each slice of the inner dimension.
SPLIT_SLICE = 8192


def row_products(rows: Tensor, other: Tensor | None = None, split: bool | None = None) -> Tensor:
    """``rows @ otherᵀ`` (``other`` defaults to ``rows``), both ``[R, n]`` with the same ``n``.

    ``split`` forces (``True``) or forbids (``False``) the split of the inner dimension; by default
    it is used on CUDA when ``n`` is long compared with ``R``.
    """
    other = rows if other is None else other
    size, inner = rows.shape
    if split is None:
        split = rows.is_cuda and inner >= SPLIT_MIN_RATIO * max(size, other.shape[0]) and inner >= 2 * SPLIT_SLICE
    if not split or inner < 2:
        return rows @ other.T
    slices = max(2, inner // SPLIT_SLICE)
    length = inner // slices
    head = slices * length
    left = rows[:, :head].unflatten(1, (slices, length)).transpose(0, 1)  # [s, R, length]
    right = other[:, :head].unflatten(1, (slices, length)).transpose(0, 1)
    out = (left @ right.transpose(1, 2)).sum(0)
    if head < inner:
        out = out + rows[:, head:] @ other[:, head:].T
    return out
