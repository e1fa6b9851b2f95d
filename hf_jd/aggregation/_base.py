"""Base classes of the aggregation package: weightings, aggregators and input checks.

A *weighting* maps the Gramian ``G = J Jᵀ`` (shape ``[m, m]``) of a Jacobian ``J`` (shape
``[m, n]``) to a weight vector ``w`` (shape ``[m]``). An *aggregator* maps ``J`` itself to an
update vector (shape ``[n]``). Every aggregator whose weights depend on ``J`` only through its
Gramian is a :class:`GramianWeightedAggregator`: its update is ``wᵀ J`` and it exposes its
weighting as ``.weighting``, which is what the autogram engine uses without ever forming ``J``.

Weightings that solve a problem on the Gramian (UPGrad, DualProj, MGDA) are
:class:`ArrayWeighting` subclasses: one conversion of the Gramian to a float64 NumPy array, checked
in one fused pass, then NumPy only. At the small ``m`` of a training step, where each operation
costs mostly its call overhead, that is what keeps their latency low.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, TypeGuard, TypeVar

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Weighting",
    "Aggregator",
    "GramianWeightedAggregator",
    "check_matrix",
    "check_gramian",
    "ArrayWeighting",
    "checked_gramian_array",
    "float64_array",
    "weights_tensor",
    "update_is_weighted_rows",
    "computes_weighted_rows",
    "FLOAT32_GRAMIAN_FLOOR",
]


def check_matrix(matrix: Tensor, what: str = "matrix") -> None:
    """Raise ``ValueError`` unless ``matrix`` is a non-empty, finite, floating 2-D tensor.

    Parameters
    ----------
    matrix
        The matrix to check (one row per objective).
    what
        How to call it in the error messages.

    Raises
    ------
    TypeError
        If ``matrix`` is not a tensor.
    ValueError
        If it is not 2-D, has no row, has a non-floating dtype, is on the meta device or has non-finite
        entries.
    """
    _check_matrix_layout(matrix, what)
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError(_non_finite_message(what))


def _check_matrix_layout(matrix: Tensor, what: str) -> None:
    """The checks of :func:`check_matrix` that need no pass over the entries."""
    if not isinstance(matrix, Tensor):
        raise TypeError(f"The {what} must be a torch.Tensor, got {type(matrix).__name__}.")
    if matrix.dim() != 2:
        if what == "Gramian":
            raise ValueError(
                f"The Gramian must be 2-D (shape [m, m]: J @ J.T for a Jacobian J of m rows), got shape "
                f"{tuple(matrix.shape)}."
            )
        raise ValueError(
            f"The {what} must be 2-D (shape [m, n]: one row per objective), got shape "
            f"{tuple(matrix.shape)}. Flatten each gradient into one row first."
        )
    if matrix.shape[0] == 0:
        raise ValueError(f"The {what} is empty (shape {tuple(matrix.shape)}): it needs at least one row.")
    if not matrix.is_floating_point():
        raise ValueError(f"The {what} must have a floating dtype, got {matrix.dtype}.")
    if matrix.is_meta:
        raise ValueError(
            f"The {what} is on the meta device, which holds shapes but no values: aggregate tensors with values "
            "(materialise the model, e.g. with to_empty() and a checkpoint, before computing gradients)."
        )


def _non_finite_message(what: str) -> str:
    return (
        f"The {what} has non-finite entries (inf or nan): check the losses and gradients "
        "that produced it."
    )


def check_gramian(gramian: Tensor) -> None:
    """Raise ``ValueError`` unless ``gramian`` could be ``J Jᵀ`` up to rounding.

    It must be a finite, square, floating 2-D tensor whose diagonal (squared norms of the rows) is
    not negative, which is symmetric and satisfies the Cauchy–Schwarz inequality
    ``|Gᵢⱼ| ≤ sqrt(Gᵢᵢ Gⱼⱼ)`` (necessary for positive semi-definiteness, ``O(m²)`` to check),
    both up to a relative ``tol = max(1e-3, 100·eps)`` of ``sqrt(Gᵢᵢ Gⱼⱼ)`` (``eps`` of its dtype) plus
    ``1e-6`` of the largest diagonal entry. For ``m ≥ 3`` (where those are not sufficient), its smallest eigenvalue
    must also be at least ``-min(0.1, m·tol)`` times its largest diagonal entry (one Cholesky factorisation, about
    10 µs for ``m ≤ 32`` and 1.4 ms at ``m = 256``): a loose bound, which rounding never reaches, that catches a
    matrix that is not a Gramian.

    Parameters
    ----------
    gramian
        The matrix to check, shape ``[m, m]``.

    Raises
    ------
    TypeError
        If ``gramian`` is not a tensor.
    ValueError
        If it fails one of the checks above (the message names which).
    """
    checked_gramian_array(gramian)


def checked_gramian_array(gramian: Tensor) -> np.ndarray:
    """Check ``gramian`` as :func:`check_gramian` does and return it as a new float64 array.

    The Gramian is converted once (:func:`float64_array`) and checked in NumPy: a valid Gramian
    costs one fused pass (finiteness, sign of the diagonal, symmetry and Cauchy–Schwarz together);
    only when that pass fails are the checks run one by one, to raise the error that names the
    problem.

    Parameters
    ----------
    gramian
        The matrix to check and convert, shape ``[m, m]``.

    Returns
    -------
    numpy.ndarray
        The Gramian, float64, C-contiguous, owned by the caller (it may be overwritten).

    Raises
    ------
    TypeError, ValueError
        As :func:`check_gramian`.
    """
    _check_matrix_layout(gramian, "Gramian")
    array = float64_array(gramian)
    tol = _gramian_rtol(gramian.dtype)
    if not (array.shape[0] == array.shape[1] and _passes_gramian_checks(array, tol)):
        _raise_unless_gramian(array, tol)
    if array.shape[0] > 2:  # (for m ≤ 2, Cauchy–Schwarz and the diagonal's sign are sufficient)
        _check_semi_definite(array, tol)
    return array


def _check_semi_definite(gramian: np.ndarray, tol: float) -> None:
    """Raise unless the smallest eigenvalue of ``gramian`` (square, float64, passed the structural checks;
    symmetrised) is at least ``-min(0.1, m·tol)`` times its largest diagonal entry: one Cholesky factorisation of the
    shifted matrix, the eigenvalues only for the message. Rounding (also of low-precision products) stays far above
    that bound."""
    m = gramian.shape[0]
    largest = float(gramian.diagonal().max())
    if not largest > 0:
        return  # (all rows zero: checked by the structural checks)
    shift = min(_PSD_MAX_RTOL, m * tol) * largest
    shifted = (gramian + gramian.T) / 2
    shifted.flat[:: m + 1] += shift
    try:
        np.linalg.cholesky(shifted)
    except np.linalg.LinAlgError:
        smallest = float(np.linalg.eigvalsh(shifted)[0]) - shift
        raise ValueError(
            f"The Gramian is not positive semi-definite: its smallest eigenvalue is {smallest:.4g}, below -{shift:.3g} "
            f"({shift / largest:.3g} times its largest diagonal entry, {largest:.4g}, far beyond rounding), so it is "
            "not J @ J.T of any matrix J. Pass the Gramian of the Jacobian, J @ J.T."
        ) from None


def float64_array(tensor: Tensor) -> np.ndarray:
    """Return the values of ``tensor`` as a new C-contiguous float64 NumPy array on the CPU.

    One conversion: a CPU float16/32/64 tensor through a NumPy view (no PyTorch operation), any
    other through one ``Tensor.to``.

    Parameters
    ----------
    tensor
        Any real tensor (detached first if it requires grad).

    Returns
    -------
    numpy.ndarray
        A new float64 array with the values and shape of ``tensor``.
    """
    if tensor.requires_grad:
        tensor = tensor.detach()
    if tensor.is_cpu and tensor.dtype in _NUMPY_DTYPES:
        return tensor.numpy().astype(np.float64, order="C")
    return np.ascontiguousarray(tensor.to(device="cpu", dtype=torch.float64).numpy())


def weights_tensor(weights: np.ndarray, like: Tensor) -> Tensor:
    """Return float64 ``weights`` (a new array, which the result may share) as a tensor with the
    dtype and device of ``like``.

    Parameters
    ----------
    weights
        Float64 weights, shape ``[m]``.
    like
        Tensor whose dtype and device the result takes.

    Returns
    -------
    Tensor
        The weights, shape ``[m]``.
    """
    dtype = like.dtype
    if dtype == torch.float64:
        result = torch.from_numpy(weights)
    elif dtype == torch.float32:
        result = torch.from_numpy(weights.astype(np.float32))
    else:
        result = torch.from_numpy(weights).to(dtype)
    return result if like.is_cpu else result.to(like.device)


def _passes_gramian_checks(gramian: np.ndarray, tol: float) -> bool:
    """Whether a square float64 ``gramian`` passes every check of :func:`check_gramian`, in one pass.

    Entries finite (below ``1e300`` in magnitude: nothing can overflow), a non-negative diagonal,
    then ``max(|Gᵢⱼ − Gⱼᵢ|, |Gᵢⱼ| · tol / (1 + tol)) ≤ tol · bᵢⱼ`` with ``bᵢⱼ = sqrt(Gᵢᵢ Gⱼⱼ)``:
    the symmetry and Cauchy–Schwarz checks without their absolute tolerance (so stricter).
    ``False`` can be a false alarm (rounding around a zero row, a slightly negative diagonal
    within tolerance, huge entries): the caller then runs the exact checks one by one.
    """
    absolute = np.abs(gramian)
    if not absolute.max() < 1e300:  # also false for nan
        return False
    diagonal = gramian.diagonal()
    if not diagonal.min() >= 0:
        return False
    excess = np.subtract(gramian, gramian.T)
    np.abs(excess, out=excess)
    absolute *= tol / (1.0 + tol)
    np.maximum(excess, absolute, out=excess)
    norms = np.sqrt(diagonal * tol)
    excess -= norms[:, None] * norms
    return bool(excess.max() <= 0)


def _raise_unless_gramian(gramian: np.ndarray, tol: float) -> None:
    """The checks of :func:`check_gramian` one by one, each with its own error (``float64``)."""
    if not np.isfinite(gramian).all():
        raise ValueError(_non_finite_message("Gramian"))
    if gramian.shape[0] != gramian.shape[1]:
        raise ValueError(
            f"The Gramian must be square (shape [m, m]), got shape {tuple(gramian.shape)}. "
            "Pass J @ J.T, not the Jacobian J itself."
        )
    diagonal = gramian.diagonal()
    largest = float(np.abs(diagonal).max())
    if bool((diagonal < -1e-5 * largest).any()):
        raise ValueError(
            f"The Gramian has negative diagonal entries (min {float(diagonal.min()):.3g}), so it is not J @ J.T "
            "of any matrix J. Pass the Gramian of the Jacobian."
        )
    if gramian.shape[0] > 1:
        with np.errstate(over="ignore", invalid="ignore"):  # huge entries: inf compares as it should
            _check_symmetric_and_cauchy_schwarz(gramian, diagonal, largest, tol)


def _check_symmetric_and_cauchy_schwarz(
    gramian: np.ndarray, diagonal: np.ndarray, largest: float, tol: float
) -> None:
    """The structural part of :func:`check_gramian` (``gramian``: float64, finite)."""
    norms = np.sqrt(np.maximum(diagonal, 0.0))
    bound = norms[:, None] * norms
    allowed = bound * tol + _GRAMIAN_ATOL * largest
    asymmetry = np.abs(gramian - gramian.T) - allowed
    if bool((asymmetry > 0).any()):
        i, j = divmod(int(asymmetry.argmax()), gramian.shape[0])
        raise ValueError(
            f"The Gramian is not symmetric (G[{i}, {j}] = {float(gramian[i, j]):.4g} but "
            f"G[{j}, {i}] = {float(gramian[j, i]):.4g}), so it is not J @ J.T of any matrix J. "
            "Pass the Gramian of the Jacobian, J @ J.T."
        )
    excess = np.abs(gramian) - bound - allowed
    if bool((excess > 0).any()):
        i, j = divmod(int(excess.argmax()), gramian.shape[0])
        raise ValueError(
            f"The Gramian is not positive semi-definite: |G[{i}, {j}]| = {float(abs(gramian[i, j])):.4g} "
            f"exceeds sqrt(G[{i}, {i}] G[{j}, {j}]) = {float(bound[i, j]):.4g} (Cauchy-Schwarz), so it is "
            "not J @ J.T of any matrix J. Pass the Gramian of the Jacobian, J @ J.T."
        )


def _gramian_rtol(dtype: torch.dtype) -> float:
    """Relative tolerance of the structural checks for a Gramian of ``dtype``."""
    tol = _GRAMIAN_RTOLS.get(dtype)
    if tol is None:
        tol = max(_GRAMIAN_RTOL, 100.0 * torch.finfo(dtype).eps)
    return tol


# Tolerances of check_gramian's symmetry and Cauchy–Schwarz checks: relative to sqrt(Gᵢᵢ Gⱼⱼ)
# (at least 100 eps of the dtype) and to the largest diagonal entry.
_GRAMIAN_RTOL = 1e-3
_GRAMIAN_ATOL = 1e-6
# Largest tolerance of check_gramian's positive semi-definiteness check, relative to the largest diagonal entry (it is
# m times the structural checks' relative tolerance below that).
_PSD_MAX_RTOL = 0.1
_GRAMIAN_RTOLS = {
    dtype: max(_GRAMIAN_RTOL, 100.0 * torch.finfo(dtype).eps)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}
# Dtypes whose CPU tensors convert to NumPy without a PyTorch operation.
_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)
# Largest diagonal entry below which a float32 Gramian is recomputed in float64.
FLOAT32_GRAMIAN_FLOOR = 1e-30
# Dtypes whose Gramians and weighted rows are computed in float32 (their range and 8 to 11 bits do not hold them).
LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)


class _Stateful:
    """State handling shared by weightings and aggregators; stateless by default."""

    def reset(self) -> None:
        """Forget any state accumulated over previous calls (no-op when stateless)."""

    def state_dict(self) -> dict[str, Any]:
        """Return the state to save in a checkpoint (empty when stateless)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict`."""
        if state:
            raise ValueError(
                f"{type(self).__name__} is stateless but received a non-empty state "
                f"with keys {sorted(state)}."
            )

    @property
    def is_stateful(self) -> bool:
        """Whether this object keeps state across calls (and so needs checkpointing)."""
        return type(self).state_dict is not _Stateful.state_dict


class Weighting(_Stateful, ABC):
    """Maps a Gramian ``G`` of shape ``[m, m]`` to weights of shape ``[m]``.

    Subclasses implement :meth:`compute`; calling the object validates the input first.
    """

    def __call__(self, gramian: Tensor) -> Tensor:
        check_gramian(gramian)
        weights = self.compute(gramian)
        return weights

    @abstractmethod
    def compute(self, gramian: Tensor) -> Tensor:
        """Return the weights for a validated Gramian (same dtype and device).

        Parameters
        ----------
        gramian
            A Gramian ``J Jᵀ`` of shape ``[m, m]`` that passed :func:`check_gramian`.

        Returns
        -------
        Tensor
            The weights, shape ``[m]``.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ArrayWeighting(Weighting):
    """A weighting computed in float64 NumPy, from one conversion of the Gramian.

    Calling it converts the Gramian once and checks it in that array
    (:func:`checked_gramian_array`), then :meth:`compute_array` works on the same array: no further
    PyTorch operations or conversions. At small ``m`` every operation is per-call overhead, all
    the more right after a training step's forward and backward passes have evicted the CPU
    caches, so this is what keeps the weighting's latency in a step low.
    """

    def __call__(self, gramian: Tensor) -> Tensor:
        return weights_tensor(self.compute_array(checked_gramian_array(gramian)), gramian)

    def compute(self, gramian: Tensor) -> Tensor:
        """Return :meth:`compute_array` of the Gramian converted to float64, as a tensor.

        Parameters
        ----------
        gramian
            A Gramian of shape ``[m, m]`` that passed :func:`check_gramian`.

        Returns
        -------
        Tensor
            The weights, shape ``[m]``, with the dtype and device of ``gramian``.
        """
        return weights_tensor(self.compute_array(float64_array(gramian)), gramian)

    @abstractmethod
    def compute_array(self, gramian: np.ndarray) -> np.ndarray:
        """Return the weights (a new float64 array, shape ``[m]``) for a valid float64 Gramian.

        ``gramian`` (C-contiguous, shape ``[m, m]``) belongs to the call: it may be overwritten.

        Parameters
        ----------
        gramian
            The Gramian, float64, shape ``[m, m]``.

        Returns
        -------
        numpy.ndarray
            The weights, float64, shape ``[m]``.
        """


class Aggregator(_Stateful, ABC):
    """Maps a Jacobian matrix of shape ``[m, n]`` to an update vector of shape ``[n]``.

    Subclasses implement :meth:`aggregate`; calling the object validates the input first.
    """

    def __call__(self, matrix: Tensor) -> Tensor:
        check_matrix(matrix)
        return self.aggregate(matrix)

    @abstractmethod
    def aggregate(self, matrix: Tensor) -> Tensor:
        """Return the update vector for a validated matrix (same dtype and device).

        Parameters
        ----------
        matrix
            A Jacobian of shape ``[m, n]`` that passed :func:`check_matrix`.

        Returns
        -------
        Tensor
            The update, shape ``[n]``.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class GramianWeightedAggregator(Aggregator):
    """Aggregator ``J ↦ wᵀ J`` where ``w = weighting(J Jᵀ)``.

    Gradients: when ``J`` requires grad, the result is differentiable with the weights held constant
    (the weightings solve their problems outside autograd): the gradient of ``wᵀ J`` at fixed ``w``,
    which is the derivative of the aggregator itself only when ``w`` does not depend on ``J`` (mean,
    sum, constant, random weights).

    Parameters
    ----------
    weighting
        The weighting applied to the Gramian of the matrix.

    Raises
    ------
    TypeError
        If ``weighting`` is not a :class:`Weighting`.
    """

    def __init__(self, weighting: Weighting) -> None:
        if not isinstance(weighting, Weighting):
            raise TypeError(f"weighting must be a Weighting, got {type(weighting).__name__}.")
        self._weighting = weighting

    @property
    def weighting(self) -> Weighting:
        """The weighting that maps the Gramian to the weights."""
        return self._weighting

    def weights(self, matrix: Tensor) -> Tensor:
        """Return the weights this aggregator gives to the rows of ``matrix`` (in its dtype; float32 for a float16 or
        bfloat16 matrix, whose range the weights may exceed).

        Parameters
        ----------
        matrix
            The Jacobian, shape ``[m, n]``.

        Returns
        -------
        Tensor
            The weights ``w``, shape ``[m]``.

        Raises
        ------
        TypeError, ValueError
            If ``matrix`` fails :func:`check_matrix` or its Gramian fails :func:`check_gramian`.
        """
        check_matrix(matrix)
        dtype = torch.float32 if matrix.dtype in LOW_PRECISION_DTYPES else matrix.dtype
        return self._weighting(compute_gramian(matrix)).to(dtype)

    def aggregate(self, matrix: Tensor) -> Tensor:
        """Return ``wᵀ J`` with ``w`` the weighting of ``J Jᵀ``.

        Parameters
        ----------
        matrix
            A Jacobian ``J`` of shape ``[m, n]`` that passed :func:`check_matrix`.

        Returns
        -------
        Tensor
            The update, shape ``[n]``, in the dtype of ``matrix``.
        """
        return weighted_rows(self._weighting(compute_gramian(matrix)), matrix)

    def reset(self) -> None:
        """Reset the weighting's state (see :meth:`Weighting.reset`)."""
        self._weighting.reset()

    def state_dict(self) -> dict[str, Any]:
        """The state of the weighting.

        Returns
        -------
        dict
            What the weighting's ``state_dict`` returns (empty for a stateless one).
        """
        return self._weighting.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the weighting's state.

        Parameters
        ----------
        state
            A dictionary returned by :meth:`state_dict`.
        """
        self._weighting.load_state_dict(state)

    @property
    def is_stateful(self) -> bool:
        """Whether the weighting keeps state across calls."""
        return self._weighting.is_stateful

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._weighting!r})"


# aggregate methods that return wᵀ J (see computes_weighted_rows).
_WEIGHTED_ROWS_AGGREGATES: set[Callable[..., Tensor]] = {GramianWeightedAggregator.aggregate}


_Aggregate = TypeVar("_Aggregate", bound=Callable[..., Tensor])


def update_is_weighted_rows(aggregator: Aggregator) -> TypeGuard[GramianWeightedAggregator]:
    """Whether ``aggregator``'s update is ``wᵀ J`` with ``w`` its weighting of ``J Jᵀ``, so that the
    weighting alone gives the update (``jac_to_grad``'s block-wise Gramian, the autogram engine).

    That is a :class:`GramianWeightedAggregator` whose subclass does not override ``aggregate``
    or ``__call__`` (e.g. to clip or rescale the update).

    Parameters
    ----------
    aggregator
        The aggregator.

    Returns
    -------
    bool
        ``True`` when the weights determine the update.
    """
    return isinstance(aggregator, GramianWeightedAggregator) and class_updates_weighted_rows(type(aggregator))


def class_updates_weighted_rows(cls: type[Aggregator]) -> bool:
    """:func:`update_is_weighted_rows` for every instance of ``cls``.

    Parameters
    ----------
    cls
        An aggregator class.

    Returns
    -------
    bool
        ``True`` when the weights of its instances determine their updates.
    """
    return (
        issubclass(cls, GramianWeightedAggregator)
        and cls.aggregate in _WEIGHTED_ROWS_AGGREGATES
        and cls.__call__ is Aggregator.__call__
    )


def computes_weighted_rows(aggregate: _Aggregate) -> _Aggregate:
    """Mark an ``aggregate`` override of a :class:`GramianWeightedAggregator` subclass that still
    returns ``wᵀ J`` with ``w`` its weighting's (e.g. a shortcut that skips the Gramian), so that
    :func:`update_is_weighted_rows` holds for the subclass.

    Parameters
    ----------
    aggregate
        The method.

    Returns
    -------
    Callable
        The same method.
    """
    _WEIGHTED_ROWS_AGGREGATES.add(aggregate)
    return aggregate


def weighted_rows(weights: Tensor, matrix: Tensor) -> Tensor:
    """Return ``wᵀ J`` in the dtype of ``matrix``, the product taken in float32 for a float16 or bfloat16 ``matrix``.

    Weights are computed in float32 or float64 and may exceed float16's range (UPGrad's weight of a row 10⁵ times
    smaller than another, Nash-MTL's ``1 / |g_i|``) where their products with the rows do not.

    Parameters
    ----------
    weights
        The weights ``w``, shape ``[m]``.
    matrix
        The Jacobian ``J``, shape ``[m, n]``.

    Returns
    -------
    Tensor
        Shape ``[n]``, in the dtype of ``matrix``.

    Raises
    ------
    ValueError
        If the update of a finite low-precision matrix is not finite in its dtype (it overflows it).
    """
    if matrix.dtype not in LOW_PRECISION_DTYPES:
        return weights.to(matrix.dtype) @ matrix
    update = (weights.float() @ matrix.float()).to(matrix.dtype)
    if not bool(torch.isfinite(update).all()):
        raise ValueError(
            f"The update does not fit {matrix.dtype} (its largest entry overflows it): aggregate a float32 Jacobian "
            "(e.g. keep the parameters in float32 and train under autocast)."
        )
    return update


def compute_gramian(matrix: Tensor) -> Tensor:
    """Return ``matrix @ matrix.T``, symmetrised to remove rounding asymmetry.

    A float16 or bfloat16 matrix has its Gramian computed in float32: the products of its rows
    are exact there, whereas rounding them to the matrix's own 8 to 11 bits would leave the
    weightings a Gramian accurate to only two or three digits. A float32 Gramian that overflows,
    whose largest entry is below ``1e-30`` (subnormal or zero) for a non-zero matrix, or with a subnormal or zero
    diagonal entry for a non-zero row, is computed in float64 instead.

    Parameters
    ----------
    matrix
        The Jacobian, shape ``[m, n]``.

    Returns
    -------
    Tensor
        The Gramian, shape ``[m, m]``: in the dtype of ``matrix``, float32 or float64 as above.

    Raises
    ------
    ValueError
        If the Gramian overflows even float64.
    """
    work = matrix.float() if matrix.dtype in LOW_PRECISION_DTYPES else matrix
    gramian = work @ work.T
    if work.dtype == torch.float32 and _outside_float32_range(gramian, work):
        # Products of rows that overflow float32 (entries above ~1e19) or underflow it (below
        # ~1e-19: the Gramian would be 0, or subnormal and imprecise) are exact in float64.
        work = matrix.double()
        gramian = work @ work.T
    if not bool(torch.isfinite(gramian.diagonal()).all()):
        raise ValueError(
            f"The Gramian J @ J.T of the matrix overflows {gramian.dtype} (its entries reach "
            f"{float(matrix.abs().max()):.3g}): scale the losses down."
        )
    return (gramian + gramian.T) / 2


def _outside_float32_range(gramian: Tensor, matrix: Tensor) -> bool:
    """Whether a float32 Gramian overflowed, is below ``1e-30`` for a non-zero matrix, or has a diagonal entry below
    float32's smallest normal number for a non-zero row (a row ``1e-25`` times smaller than the others, whose squared
    norm underflows: taken for a zero row, the update could conflict with it)."""
    diagonal = gramian.diagonal().abs()
    largest = diagonal.max()
    if not bool(torch.isfinite(largest)):
        return True
    if bool(largest < FLOAT32_GRAMIAN_FLOOR):
        return bool((matrix != 0).any())
    tiny = diagonal < torch.finfo(torch.float32).tiny
    return bool(tiny.any()) and bool((matrix[tiny] != 0).any())
