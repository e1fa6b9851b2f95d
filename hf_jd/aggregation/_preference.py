"""Validation of the preference vectors taken by Aligned-MTL and ConFIG."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["check_pref_vector", "resolve_pref_vector"]


def check_pref_vector(pref_vector: Sequence[float] | Tensor | None) -> Tensor | None:
    """Return ``pref_vector`` as a float64 CPU tensor (``None`` stays ``None``).

    Raises
    ------
    TypeError
        If it is not a tensor or a sequence of numbers.
    ValueError
        If it is not a non-empty 1-D vector of finite numbers.
    """
    if pref_vector is None:
        return None
    if not isinstance(pref_vector, Tensor):
        try:
            pref_vector = torch.as_tensor(pref_vector, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(
                "pref_vector must be None, a 1-D tensor or a sequence of numbers, got "
                f"{pref_vector!r}."
            ) from error
    if pref_vector.dim() != 1 or pref_vector.numel() == 0:
        raise ValueError(
            f"pref_vector must be a non-empty 1-D vector (one weight per objective), got shape "
            f"{tuple(pref_vector.shape)}."
        )
    pref_vector = pref_vector.detach().to(device="cpu", dtype=torch.float64).clone()
    if not bool(torch.isfinite(pref_vector).all()):
        raise ValueError("pref_vector has non-finite entries (inf or nan).")
    return pref_vector


def resolve_pref_vector(pref_vector: Tensor | None, m: int, default: float) -> np.ndarray:
    """Return the preference weights for ``m`` objectives (``default`` each when ``None``)."""
    if pref_vector is None:
        return np.full(m, default)
    if pref_vector.shape[0] != m:
        raise ValueError(
            f"pref_vector has {pref_vector.shape[0]} entries but there are {m} objectives; "
            "pass one preference weight per objective."
        )
    return pref_vector.numpy().copy()
