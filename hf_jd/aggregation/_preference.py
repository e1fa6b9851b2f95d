"""Validation of the per-objective vectors given at construction: preferences, weights, leaks.

Used by UPGrad, DualProj, Aligned-MTL and ConFIG (``pref_vector``), Constant (``weights``) and
GradDrop (``leak``): one place converts them to float64 CPU tensors and checks their shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["check_vector", "check_pref_vector", "resolve_pref_vector", "resolve_pref_array"]


def check_vector(value: object, name: str) -> Tensor:
    """Return ``value`` as a new float64 CPU tensor, checking that it is a finite 1-D vector.

    Parameters
    ----------
    value
        A tensor or a sequence of numbers, one per objective.
    name
        The parameter's name, used in the error messages.

    Returns
    -------
    Tensor
        The vector, float64, on the CPU, shape ``[m]``.

    Raises
    ------
    TypeError
        If ``value`` is not a tensor or a sequence of numbers.
    ValueError
        If it is not a non-empty 1-D vector of finite numbers.
    """
    try:
        if isinstance(value, Tensor):
            vector = value.detach().to(device="cpu", dtype=torch.float64).clone()
        else:  # Python numbers straight to float64 (through float32 they would be rounded, e.g. 0.1)
            vector = torch.as_tensor(value, dtype=torch.float64).clone()
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(
            f"{name} must be a 1-D tensor or a sequence of numbers, got {type(value).__name__}."
        ) from error
    if vector.dim() != 1 or vector.numel() == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-D vector (one value per objective), got shape "
            f"{tuple(vector.shape)}."
        )
    if not bool(torch.isfinite(vector).all()):
        raise ValueError(f"{name} must be finite (no inf or nan), got {vector.tolist()}.")
    return vector


def check_pref_vector(
    pref_vector: Sequence[float] | Tensor | None, *, non_negative: bool = False
) -> Tensor | None:
    """Return ``pref_vector`` as a float64 CPU tensor (``None`` stays ``None``).

    Parameters
    ----------
    pref_vector
        One preference weight per objective, or ``None`` for the aggregator's default.
    non_negative
        Also require every entry to be ``≥ 0`` and at least one to be positive (the weights of
        the projections of UPGrad and DualProj).

    Returns
    -------
    Tensor or None
        The preference vector, float64, on the CPU, or ``None``.

    Raises
    ------
    TypeError
        If it is not a tensor or a sequence of numbers.
    ValueError
        If it is not a non-empty 1-D vector of finite numbers (non-negative and not all zero
        with ``non_negative``).
    """
    if pref_vector is None:
        return None
    vector = check_vector(pref_vector, "pref_vector")
    if non_negative:
        if bool((vector < 0).any()):
            raise ValueError(f"pref_vector must be >= 0, got {vector.tolist()}.")
        if not bool((vector > 0).any()):
            raise ValueError("pref_vector must have at least one positive entry (it is all zeros).")
    return vector


def resolve_pref_vector(pref_vector: Tensor | None, m: int, default: float) -> Tensor:
    """Return the float64 preference weights for ``m`` objectives (``default`` each when ``None``).

    Parameters
    ----------
    pref_vector
        Checked preference weights (see :func:`check_pref_vector`), or ``None``.
    m
        Number of objectives.
    default
        Weight of each objective when ``pref_vector`` is ``None``.

    Returns
    -------
    Tensor
        The weights, float64, shape ``[m]``.

    Raises
    ------
    ValueError
        If ``pref_vector`` does not have ``m`` entries.
    """
    if pref_vector is None:
        return torch.full((m,), default, dtype=torch.float64)
    if pref_vector.shape[0] != m:
        raise ValueError(
            f"pref_vector has {pref_vector.shape[0]} entries but the Jacobian has {m} rows "
            "(objectives): give one preference weight per objective."
        )
    return pref_vector.clone()


def resolve_pref_array(pref_vector: Tensor | None, m: int, default: float) -> np.ndarray:
    """:func:`resolve_pref_vector` as a new float64 NumPy array.

    Parameters
    ----------
    pref_vector, m, default
        As :func:`resolve_pref_vector`.

    Returns
    -------
    numpy.ndarray
        The weights, float64, shape ``[m]``.

    Raises
    ------
    ValueError
        If ``pref_vector`` does not have ``m`` entries.
    """
    if pref_vector is None:
        return np.full(m, default)
    return resolve_pref_vector(pref_vector, m, default).numpy()
