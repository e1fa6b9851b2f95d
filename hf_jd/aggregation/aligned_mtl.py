"""Aligned-MTL: aligning the principal components of the gradients.

Reference: D. Senushkin, N. Patakin, A. Kuznetsov and A. Konushin, "Independent Component
Alignment for Multi-Task Learning", CVPR 2023 (arXiv 2305.19000).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ._base import GramianWeightedAggregator, Weighting
from ._preference import check_pref_vector, resolve_pref_vector
from ._simplex import eigh, gramian_to_numpy, rank_cutoff, weights_to_tensor

__all__ = ["AlignedMTLWeighting", "AlignedMTL"]


class AlignedMTLWeighting(Weighting):
    """Weights of Aligned-MTL (Senushkin et al., CVPR 2023), computed from the Gramian.

    Aligned-MTL makes the linear system of the gradients perfectly conditioned before combining
    them. With the eigendecomposition ``G = J Jᵀ = V Λ Vᵀ`` restricted to its ``r`` non-zero
    eigenvalues (those above ``m·eps`` of the input dtype times the largest, and above ten times the
    magnitude of a negative eigenvalue, which shows the Gramian's rounding noise) and ``λ_r`` the
    smallest of them, the balance transformation is

    .. math::  B = \\sqrt{λ_r}\\, V Λ^{-1/2} V^\\top,

    so that the aligned gradients ``B J`` have Gramian ``B G B = λ_r V Vᵀ``: all their singular
    values equal the smallest one of ``J`` (condition number ``1``). The update combines the
    aligned gradients with the preference weights ``w``: ``wᵀ B J``, i.e. the weights are ``B w``.

    If all rows are zero the weights are zero.

    Parameters
    ----------
    pref_vector
        Preference weights ``w`` of the objectives (shape ``[m]``); ``None`` means ``1/m`` each.
    """

    def __init__(self, pref_vector: Sequence[float] | Tensor | None = None) -> None:
        self.pref_vector = check_pref_vector(pref_vector)

    def compute(self, gramian: Tensor) -> Tensor:
        """The Aligned-MTL weights of ``gramian`` (see the class docstring).

        Parameters
        ----------
        gramian
            A Gramian ``J Jᵀ`` of shape ``[m, m]`` that passed :func:`check_gramian`.

        Returns
        -------
        Tensor
            The weights, shape ``[m]``, with the dtype and device of ``gramian``.
        """
        array = gramian_to_numpy(gramian)
        m = array.shape[0]
        preference = resolve_pref_vector(self.pref_vector, m, 1.0 / m).numpy()
        eigenvalues, eigenvectors = eigh(array)
        largest = float(eigenvalues[-1])
        if not largest > 0:
            return weights_to_tensor(np.zeros(m), gramian)
        keep = eigenvalues > rank_cutoff(eigenvalues, m * torch.finfo(gramian.dtype).eps)
        if not keep.any():  # (a negative eigenvalue of at least a tenth of the largest: not rounding)
            raise ValueError(
                f"The Gramian is not positive semi-definite (an eigenvalue of {float(eigenvalues[0]):.3g} against a "
                f"largest of {largest:.3g}): it is no J Jᵀ. Pass the Gramian of a Jacobian (e.g. compute_gramian(J))."
            )
        eigenvalues, eigenvectors = eigenvalues[keep], eigenvectors[:, keep]
        smallest = float(eigenvalues.min())
        # B w = V (sqrt(λ_r/λ) ⊙ (Vᵀ w)): two matrix-vector products.
        weights = eigenvectors @ (np.sqrt(smallest / eigenvalues) * (eigenvectors.T @ preference))
        return weights_to_tensor(weights, gramian)

    def __repr__(self) -> str:
        pref = None if self.pref_vector is None else self.pref_vector.tolist()
        return f"{type(self).__name__}(pref_vector={pref})"


class AlignedMTL(GramianWeightedAggregator):
    """Aligned-MTL aggregator (Senushkin et al., CVPR 2023); see :class:`AlignedMTLWeighting`.

    Parameters
    ----------
    pref_vector
        Preference weights of the objectives (shape ``[m]``); ``None`` means ``1/m`` each.
    """

    def __init__(self, pref_vector: Sequence[float] | Tensor | None = None) -> None:
        super().__init__(AlignedMTLWeighting(pref_vector))
