"""Coordinate-wise trimmed mean.

Reference: D. Yin, Y. Chen, K. Ramchandran and P. Bartlett, "Byzantine-Robust Distributed
Learning: Towards Optimal Statistical Rates", ICML 2018. For every coordinate (column of the
Jacobian), the ``trim_number`` largest and ``trim_number`` smallest values are discarded and the
remaining ``m − 2·trim_number`` are averaged. The weights differ per coordinate, so this aggregator
is not Gramian-based.
"""

from __future__ import annotations

from torch import Tensor

from ._base import Aggregator

__all__ = ["TrimmedMean"]


class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean of the rows (Yin et al., ICML 2018).

    Parameters
    ----------
    trim_number
        Number of values removed at each end of every coordinate; requires ``m > 2·trim_number``.

    Raises
    ------
    TypeError
        If ``trim_number`` is not an integer.
    ValueError
        If it is negative.
    """

    def __init__(self, trim_number: int) -> None:
        if isinstance(trim_number, bool) or not isinstance(trim_number, int):
            raise TypeError(f"trim_number must be an integer, got {type(trim_number).__name__}.")
        if trim_number < 0:
            raise ValueError(f"trim_number must be >= 0, got {trim_number}.")
        self.trim_number = trim_number

    def aggregate(self, matrix: Tensor) -> Tensor:
        """The mean, per coordinate, of the values left once the ``trim_number`` smallest and
        largest are removed.

        Parameters
        ----------
        matrix
            A Jacobian of shape ``[m, n]`` that passed :func:`check_matrix`.

        Returns
        -------
        Tensor
            The update, shape ``[n]``.

        Raises
        ------
        ValueError
            If ``m ≤ 2·trim_number``.
        """
        m = matrix.shape[0]
        t = self.trim_number
        if m <= 2 * t:
            raise ValueError(
                f"TrimmedMean with trim_number={t} needs more than 2*trim_number = {2 * t} rows, "
                f"got m={m}. Use more objectives or a smaller trim_number."
            )
        sorted_values = matrix.sort(dim=0).values
        return sorted_values[t : m - t].mean(dim=0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(trim_number={self.trim_number})"
