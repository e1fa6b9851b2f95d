"""GradDrop: gradient sign dropout.

Reference: Z. Chen, J. Ngiam, Y. Huang, T. Luong, H. Kretzschmar, Y. Chai and D. Anguelov, "Just
Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020
(arXiv 2010.06808).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._base import Aggregator
from ._generator import SeededGenerator, SeededStateMixin
from ._preference import check_vector

__all__ = ["GradDrop"]


def _check_leak(leak: Sequence[float] | Tensor | None) -> Tensor | None:
    if leak is None:
        return None
    leak = check_vector(leak, "leak")
    if not bool(((leak >= 0) & (leak <= 1)).all()):
        raise ValueError(f"Every leak value must be in [0, 1], got {leak.tolist()}.")
    return leak


class GradDrop(SeededStateMixin, Aggregator):
    """GradDrop aggregator (Chen et al., NeurIPS 2020): sign-purity masking per coordinate.

    For every coordinate ``k`` the positive sign purity of the rows is

    .. math::  P_k = \\tfrac12 \\Big(1 + \\frac{\\sum_i J_{ik}}{\\sum_i |J_{ik}|}\\Big) \\in [0, 1]

    (``½`` where the column is zero). One uniform ``U_k ∈ [0, 1)`` is drawn per coordinate; the
    mask keeps the positive entries of the column if ``P_k > U_k`` and its negative entries if
    ``P_k < U_k``. With leak coefficients ``ℓ_i`` (default ``0``) the update is

    .. math::  d_k = \\sum_i \\big(ℓ_i + (1 - ℓ_i) M_{ik}\\big) J_{ik}.

    The paper applies this to the gradients of a shared layer's activations; here it is applied
    to the rows of the Jacobian, coordinate by coordinate. The masks depend on the signs of the
    individual coordinates, so GradDrop is not Gramian-based.

    Random numbers come from this object's ``torch.Generator`` on the device of the input, seeded
    with ``seed`` (``None``: a seed drawn from PyTorch's global generator): results are
    deterministic given the seed on a given device. The generator state is the object's state
    (``state_dict``/``load_state_dict``; ``reset`` goes back to the seed).

    Parameters
    ----------
    leak
        Leak coefficients ``ℓ_i ∈ [0, 1]`` (shape ``[m]``): the share of each row always kept;
        ``None`` means ``0`` for every row (pure GradDrop).
    seed
        Seed of the generator of the uniform draws.
    """

    def __init__(
        self, leak: Sequence[float] | Tensor | None = None, seed: int | None = None
    ) -> None:
        self.leak = _check_leak(leak)
        self._generator = SeededGenerator(seed)

    def aggregate(self, matrix: Tensor) -> Tensor:
        """The GradDrop update of ``matrix``: each coordinate keeps the rows of one sign, drawn at
        random with the probability given by the purity of the signs.

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
            If ``leak`` was given with another number of entries than ``m``.
        """
        m = matrix.shape[0]
        if self.leak is not None and self.leak.shape[0] != m:
            raise ValueError(
                f"leak has {self.leak.shape[0]} entries but the matrix has {m} rows; pass one leak "
                "value per objective."
            )
        positive = matrix.clamp(min=0.0)
        negative = matrix.clamp(max=0.0)
        positive_total, negative_total = positive.sum(dim=0), negative.sum(dim=0)
        # P_k = ½ (1 + Σ_i J_ik / Σ_i |J_ik|), with Σ_i |J_ik| = positive_total - negative_total.
        absolute_total = positive_total - negative_total
        safe_total = torch.where(
            absolute_total > 0, absolute_total, torch.ones_like(absolute_total)
        )
        purity = 0.5 * (1.0 + (positive_total + negative_total) / safe_total)
        generator = self._generator.get(matrix.device)
        uniform = torch.rand(
            matrix.shape[1], generator=generator, device=matrix.device, dtype=matrix.dtype
        )
        # The mask keeps every positive entry of column k if P_k > U_k and every negative one if
        # P_k < U_k, so the masked column sum is Σ_i (1-ℓ_i) max(J_ik, 0) or the same with min.
        if self.leak is None:
            kept_positive, kept_negative = positive_total, negative_total
        else:
            leak = self.leak.to(device=matrix.device, dtype=matrix.dtype)
            kept_positive, kept_negative = (1.0 - leak) @ positive, (1.0 - leak) @ negative
        zero = torch.zeros_like(kept_positive)
        masked = torch.where(
            purity > uniform, kept_positive, torch.where(purity < uniform, kept_negative, zero)
        )
        if self.leak is None:
            return masked
        return leak @ matrix + masked

    def __repr__(self) -> str:
        leak = None if self.leak is None else self.leak.tolist()
        return f"{type(self).__name__}(leak={leak}, seed={self.seed})"
