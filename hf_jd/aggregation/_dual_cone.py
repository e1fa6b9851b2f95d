"""Projection onto the dual cone of the rows of a Jacobian, expressed with its Gramian only.

Let ``J`` (shape ``[m, n]``) have Gramian ``G = J Jᵀ``. The *dual cone* of its rows is
``C = {x : J x ≥ 0}``: the updates that do not conflict with any objective. For a target weight
vector ``u`` (so the vector to project is ``uᵀ J``), Quinton & Rey (2024, "Jacobian Descent For
Multi-Objective Optimization", arXiv:2406.16232, Proposition 1, used by UPGrad and DualProj)
show that the projection of ``uᵀ J`` onto ``C`` is ``vᵀ J`` with

    v = argmin_{v ≥ u} vᵀ G v.

Substituting ``v = u + z`` turns this into the linear complementarity problem (LCP)

    w = G z + G u,   z ≥ 0,   w ≥ 0,   zᵢ wᵢ = 0,

whose unknowns ``z`` are the (non-negative) multipliers of the constraints ``J x ≥ 0``; ``w = J x``
holds the inner products of the projection with the rows. It is solved for all targets at once
by :func:`hf_jd.aggregation._lcp.solve_lcp`.

Regularisation
--------------
The problem has a unique solution only when ``G`` is positive definite. :func:`project_weights`
adds ``reg_eps · I`` to ``G``; if the result is still numerically singular (a Cholesky
factorisation fails, or a row lies within about 1e-5 radians of the span of the previous ones:
duplicate, parallel or zero rows, rank ``< m``), it adds ``δ · I`` instead, with
``δ = max(10⁻¹² · trace(G) / m, 10 · reg_eps)`` multiplied by 10 until that is no longer the case.
The answer is the exact solution for the regularised Gramian.

The weightings (:class:`DualConeWeighting`) regularise each row relative to its own squared norm,
``Gᵢᵢ → (1 + m · reg_eps) Gᵢᵢ`` (:func:`add_relative_ridge`), rather than by one ridge for all rows:
the constraints then hold as ``(G v)ᵢ ≥ −m · reg_eps · Gᵢᵢ vᵢ``, a relative slack for every row
however its norm compares with the others' (a common ridge lets the projection conflict with rows
much smaller than the largest: cosine −0.17 with a row 100 times larger), and the regularised problem
scales with the rows, which keeps UPGrad exactly linear under positive scaling of the rows.

Latency
-------
The weightings run inside every training step, where ``m`` (the batch size, or the number of
tasks) is often small and each operation costs mostly call overhead, several times more right
after the forward and backward passes have evicted the CPU caches. So they work on one float64
NumPy copy of the Gramian, made and validated once (:class:`~hf_jd.aggregation._base.ArrayWeighting`);
the Cholesky factorisation that decides the regularisation is the only factorisation before the
solver, which reuses it for large ``m``; at small ``m`` UPGrad's right-hand sides are the rows of
the unit-diagonal Gramian itself (:func:`_project_diagonal`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ._base import ArrayWeighting, GramianWeightedAggregator
from ._lcp import DEFAULT_TOL, few_threads, solve_lcp_unchecked, uses_small_solver
from ._lcp_small import solve_small, solve_unit_rows
from ._preference import check_pref_vector, resolve_pref_array

__all__ = [
    "add_relative_ridge",
    "project_weights",
    "regularize_gramian",
    "normalize_gramian",
    "check_non_negative_number",
    "DualConeWeighting",
    "DualConeAggregator",
]

_PIVOT_RATIO = 1e-10
_MAX_ITERS = 100
# Largest matrix factorised with NumPy rather than PyTorch.
_NUMPY_MAX_SIZE = 32


def regularize_gramian(gramian: Tensor, reg_eps: float = 0.0) -> Tensor:
    """Return ``gramian + δ I`` (float64) that is numerically positive definite.

    ``δ`` is ``reg_eps``; if the result is numerically singular (see the module docstring), ``δ``
    becomes ``max(10⁻¹² · trace / m, 10 · reg_eps)`` and is multiplied by 10 until it is not.

    Parameters
    ----------
    gramian
        Symmetric positive semi-definite matrix of shape ``[m, m]``.
    reg_eps
        Non-negative amount added to the diagonal in any case.

    Returns
    -------
    Tensor
        The regularised Gramian, float64, shape ``[m, m]``.
    """
    reg_eps = check_non_negative_number(reg_eps, "reg_eps")
    with few_threads(gramian.shape[0] ** 3):
        array = gramian.detach().to(device="cpu", dtype=torch.float64).numpy()
        return torch.from_numpy(_regularize(array, reg_eps)[0]).to(gramian.device)


def _regularize(gramian: np.ndarray, reg_eps: float) -> tuple[np.ndarray, np.ndarray]:
    """NumPy implementation of :func:`regularize_gramian` (float64 in, new float64 array out),
    with the Cholesky factor of the result."""
    matrix = gramian + gramian.T
    matrix *= 0.5
    return _make_definite(matrix, reg_eps)


def _make_definite(matrix: np.ndarray, reg_eps: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_regularize` of a symmetric ``matrix`` (float64, C-contiguous), which it returns
    itself when ``reg_eps`` is ``0`` and it is positive definite (it never modifies it), and the
    lower Cholesky factor of the result (reused by the solvers of large problems)."""
    regularized = matrix
    if reg_eps > 0:
        regularized = matrix.copy()
        _diagonal_view(regularized)[...] += reg_eps
    factor = _definite_factor(regularized)
    if factor is not None:
        return regularized, factor
    m = matrix.shape[0]
    mean_diagonal = float(matrix.trace()) / m
    scale = mean_diagonal if mean_diagonal > 0 else 1.0
    delta = max(1e-12 * scale, 10.0 * reg_eps)
    for _ in range(40):
        regularized = matrix.copy()
        _diagonal_view(regularized)[...] += delta
        factor = _definite_factor(regularized)
        if factor is not None:
            return regularized, factor
        delta *= 10.0
    raise RuntimeError(
        "Could not make the Gramian positive definite by adding a multiple of the identity; "
        "it is probably not symmetric positive semi-definite. Pass J @ J.T."
    )


def _diagonal_view(matrix: np.ndarray) -> np.ndarray:
    """A writable view of the diagonal of a C-contiguous square ``matrix``."""
    return matrix.reshape(-1)[:: matrix.shape[0] + 1]


def _is_positive_definite(matrix: np.ndarray) -> bool:
    """Cholesky succeeds and no row is within ~1e-5 radians of the span of the previous ones."""
    return _definite_factor(matrix) is not None


def _definite_factor(matrix: np.ndarray) -> np.ndarray | None:
    """The lower Cholesky factor of ``matrix`` if it is numerically positive definite (see
    :func:`_is_positive_definite`), else ``None``."""
    diagonal = matrix.diagonal()
    if not diagonal.min() > 0:
        return None
    factor = _cholesky(matrix)
    if factor is None:
        return None
    # factor[i, i]² / matrix[i, i] is the squared sine of the angle between row i and the span
    # of the previous rows (scale-invariant): near zero means numerically singular.
    pivots = factor.diagonal()
    return factor if (pivots * pivots / diagonal).min() >= _PIVOT_RATIO else None


def _cholesky(matrix: np.ndarray) -> np.ndarray | None:
    """Lower Cholesky factor, or ``None`` if the factorisation fails.

    NumPy for small matrices (less call overhead); PyTorch for larger ones, whose thread
    settings apply (NumPy's BLAS threads would spin-wait beside the single-thread solver).
    """
    m = matrix.shape[0]
    if m <= _NUMPY_MAX_SIZE:
        try:
            return np.linalg.cholesky(matrix)
        except np.linalg.LinAlgError:
            return None
    with few_threads(m**3):
        factor, info = torch.linalg.cholesky_ex(torch.from_numpy(matrix))
    return factor.numpy() if int(info) == 0 else None


def project_weights(
    targets: Tensor,
    gramian: Tensor,
    *,
    reg_eps: float = 0.0,
    tol: float = DEFAULT_TOL,
    max_iters: int = _MAX_ITERS,
) -> Tensor:
    """Project each target weight vector onto the dual cone, in weight space.

    For each row ``u`` of ``targets`` return ``v = argmin_{v ≥ u} vᵀ G v``, so that ``vᵀ J`` is
    the Euclidean projection of ``uᵀ J`` onto ``{x : J x ≥ 0}`` (Quinton & Rey 2024,
    arXiv:2406.16232), where ``G = J Jᵀ``.

    Parameters
    ----------
    targets
        Tensor of shape ``[k, m]`` (or ``[m]`` for one target): weights of the vectors to project.
    gramian
        Positive semi-definite Gramian of shape ``[m, m]``.
    reg_eps
        Added to the diagonal of the Gramian (see :func:`regularize_gramian` for the fallback
        when that is not enough).
    tol
        Relative tolerance of the KKT conditions that every answer satisfies.
    max_iters
        Maximum number of pivoting iterations before the ``quadprog`` fallback.

    Returns
    -------
    Tensor
        The projected weights ``v``, same shape, dtype and device as ``targets``.

    Raises
    ------
    ValueError
        If the shapes do not match, ``tol`` is not in ``(0, 1)``, ``max_iters`` is not a positive
        integer or ``reg_eps`` is negative or not finite.
    TypeError
        If ``reg_eps`` is not a number.
    """
    _check_inputs(targets, gramian)
    if not isinstance(tol, (int, float)) or not 0 < tol < 1:
        raise ValueError(f"tol must be a number in (0, 1), got {tol!r}.")
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters must be a positive integer, got {max_iters!r}.")
    reg_eps = check_non_negative_number(reg_eps, "reg_eps")
    squeeze = targets.dim() == 1
    u = targets.reshape(1, -1) if squeeze else targets
    u64 = u.detach().to(device="cpu", dtype=torch.float64).numpy()
    gramian64 = gramian.detach().to(device="cpu", dtype=torch.float64).numpy()
    matrix, factor = _regularize(gramian64, reg_eps)
    # Rows (G u)ᵀ, G symmetric. UPGrad's targets are a diagonal matrix: scaling the rows of G
    # gives the same numbers as the product, for a fraction of its cost.
    if u64.shape[0] == u64.shape[1] and np.array_equal(u64, np.diag(u64.diagonal())):
        q = matrix * u64.diagonal()[:, None]
    else:
        q = u64 @ matrix
    v = torch.from_numpy(u64 + _solve(matrix, q, tol, max_iters, factor))
    v = v.to(dtype=targets.dtype, device=targets.device)
    return v.reshape(-1) if squeeze else v


def _solve(
    matrix: np.ndarray, q: np.ndarray, tol: float, max_iters: int, factor: np.ndarray | None = None
) -> np.ndarray:
    """:func:`~hf_jd.aggregation._lcp.solve_lcp` of float64 arrays (``matrix`` positive definite,
    ``factor`` its lower Cholesky factor if known): in NumPy where that solver would use its NumPy
    path, else through it on one thread."""
    k, m = q.shape
    if uses_small_solver(k, m):
        return solve_small(matrix, q, tol)
    with few_threads(m * m * k):
        return _solve_torch(matrix, q, tol, max_iters, factor).numpy()


def _solve_torch(
    matrix: np.ndarray, q: np.ndarray, tol: float, max_iters: int, factor: np.ndarray | None
) -> Tensor:
    """:func:`~hf_jd.aggregation._lcp.solve_lcp_unchecked` of float64 arrays."""
    return solve_lcp_unchecked(
        torch.from_numpy(matrix),
        torch.from_numpy(q),
        tol,
        max_iters,
        factor=None if factor is None else torch.from_numpy(factor),
    )


def _project_diagonal(
    matrix: np.ndarray,
    pref: np.ndarray,
    tol: float,
    max_iters: int,
    *,
    uniform: bool = False,
    factor: np.ndarray | None = None,
) -> np.ndarray:
    """``Σᵢ vᵢ`` over the projections ``vᵢ`` of the targets ``pᵢ eᵢ`` (``pᵢ > 0``): UPGrad's weights.

    ``uniform`` says that every ``pᵢ`` is positive (skips looking for zeros); ``factor`` is the
    lower Cholesky factor of ``matrix`` if known (reused by the solver of large problems).

    ``matrix`` is positive definite. With ``M`` scaled to unit diagonal (``S = D⁻¹ M D⁻¹``), the
    right-hand side of target ``pᵢ eᵢ`` is ``pᵢ dᵢ`` times row ``i`` of ``S``: the rows of ``S``
    are solved as they are, and the answers scaled (the solution is positively homogeneous in
    ``q``). Rows of ``S`` without a negative entry (nothing conflicts with that row) need nothing.
    """
    m = matrix.shape[0]
    support = None if uniform else pref > 0
    k = m if support is None else int(np.count_nonzero(support))
    if not uses_small_solver(k, m):
        q = matrix * pref[:, None] if support is None else matrix[support] * pref[support, None]
        with few_threads(m * m * k):
            z = _solve_torch(matrix, q, tol, max_iters, factor)
        return pref + z.sum(dim=0).numpy()
    d = np.sqrt(matrix.diagonal())
    scaled = matrix / (d[:, None] * d)
    conflicted = (scaled < 0).any(axis=1)
    if support is not None:
        conflicted &= support
    count = np.count_nonzero(conflicted)
    if count == 0:
        return pref.copy()
    # The rows of the unit-diagonal, positive definite ``scaled`` have unit max-norm.
    if count == m:  # typical of per-example gradients: no indexing needed
        total = (pref * d) @ solve_unit_rows(scaled, scaled, tol, unit=True)
    else:
        todo = np.flatnonzero(conflicted)
        total = (pref[todo] * d[todo]) @ solve_unit_rows(scaled, scaled[todo], tol, unit=True)
    total /= d
    total += pref
    return total


def _check_inputs(targets: Tensor, gramian: Tensor) -> None:
    for name, tensor in (("targets", targets), ("gramian", gramian)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}.")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must have a floating dtype, got {tensor.dtype}.")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} has non-finite entries (inf or nan).")
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1] or gramian.shape[0] == 0:
        raise ValueError(f"gramian must be a non-empty square matrix, got shape {tuple(gramian.shape)}.")
    m = gramian.shape[0]
    if targets.dim() not in (1, 2) or targets.shape[-1] != m:
        raise ValueError(
            f"targets must have shape [k, {m}] or [{m}] to match the Gramian's size {m}, "
            f"got shape {tuple(targets.shape)}."
        )

def normalize_gramian(gramian: Tensor, norm_eps: float) -> Tensor:
    """Divide the Gramian by its trace ``‖J‖_F²``; return zeros when the trace is at most ``norm_eps``
    (in particular when it is zero).

    The dual-cone projection is invariant to this scaling; it keeps the numbers of the projection
    problems of order one whatever the size of the Jacobian (Quinton & Rey 2024).

    Parameters
    ----------
    gramian
        The Gramian ``J Jᵀ``, shape ``[m, m]``.
    norm_eps
        Threshold on the trace at or below which the Gramian is treated as zero.

    Returns
    -------
    Tensor
        ``G / trace(G)``, or zeros, with the shape, dtype and device of ``gramian``.
    """
    trace = gramian.diagonal().sum()
    if float(trace) <= norm_eps:
        return torch.zeros_like(gramian)
    return gramian / trace


def add_relative_ridge(gramian: Tensor, reg_eps: float) -> Tensor:
    """Multiply each diagonal entry ``Gᵢᵢ`` by ``1 + m · reg_eps``: a ridge relative to each row.

    For a row of average squared norm this is the ridge ``reg_eps · trace(G)`` that ``reg_eps · I``
    adds to the trace-normalised Gramian (same conditioning, hence the same solver cost); a row ``c``
    times smaller in norm gets a ridge ``c²`` times smaller, so that the slack of its constraint,
    ``(G v)ᵢ ≥ −m · reg_eps · Gᵢᵢ vᵢ``, stays relative to its own norm. Rows of norm zero (which no
    update can conflict with) get the average ridge.

    Parameters
    ----------
    gramian
        The (trace-normalised) Gramian, shape ``[m, m]``.
    reg_eps
        Relative ridge, ``≥ 0``; ``0`` returns ``gramian`` itself.

    Returns
    -------
    Tensor
        The Gramian with its diagonal scaled, shape ``[m, m]``.
    """
    if reg_eps == 0:
        return gramian
    diagonal = gramian.diagonal()
    m = diagonal.numel()
    mean = float(diagonal.sum()) / max(1, m)
    ridge = torch.where(diagonal > 0, diagonal, torch.full_like(diagonal, mean if mean > 0 else 1.0))
    return gramian + torch.diag(reg_eps * m * ridge)


def _add_relative_ridge(matrix: np.ndarray, reg_eps: float, *, inplace: bool) -> np.ndarray:
    """NumPy :func:`add_relative_ridge` (``reg_eps > 0``) of a C-contiguous float64 ``matrix``;
    ``inplace`` overwrites and returns ``matrix``, else a new array."""
    result = matrix if inplace else matrix.copy()
    diagonal = _diagonal_view(result)
    m = diagonal.shape[0]
    if diagonal.min() > 0:
        diagonal *= 1.0 + reg_eps * m
    else:
        mean = float(diagonal.sum()) / m
        diagonal += np.where(diagonal > 0, diagonal, mean if mean > 0 else 1.0) * (reg_eps * m)
    return result


def check_non_negative_number(value: object, name: str) -> float:
    """Return ``value`` as a float, or raise ``ValueError`` unless it is a finite number ``≥ 0``.

    Parameters
    ----------
    value
        The value to check.
    name
        Its name, for the error messages.

    Returns
    -------
    float
        ``value`` as a float.

    Raises
    ------
    TypeError
        If ``value`` is not an ``int`` or ``float`` (``bool`` excluded).
    ValueError
        If it is negative, infinite or nan.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}.")
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    return float(value)


class DualConeWeighting(ArrayWeighting):
    """Shared parameters of the weightings that project onto the dual cone (UPGrad, DualProj).

    Subclasses implement :meth:`compute_array` with :meth:`_preference` and :meth:`_definite`.

    Parameters
    ----------
    pref_vector
        Non-negative preference weights, shape ``[m]``; ``None`` means ``1/m`` for every objective.
    norm_eps
        Threshold on the trace of the Gramian at or below which it is treated as zero (the weights
        are then the preference weights); ``0`` by default: only an all-zero Jacobian. A positive
        value also turns the projection off for small but non-zero gradients (late in training).
    reg_eps
        Relative regularisation: each diagonal entry ``Gᵢᵢ`` of the Gramian becomes
        ``(1 + m · reg_eps) Gᵢᵢ`` (see :func:`add_relative_ridge`; for a row of average norm, the
        ridge ``reg_eps`` on the trace-normalised Gramian); the update may then conflict with row
        ``i`` by at most ``m · reg_eps · wᵢ ‖gᵢ‖²`` (``0`` for the exact projection).
    """

    def __init__(
        self,
        pref_vector: Tensor | Sequence[float] | None = None,
        norm_eps: float = 0.0,
        reg_eps: float = 1e-4,
    ) -> None:
        self._pref_vector = check_pref_vector(pref_vector, non_negative=True)
        self.norm_eps = check_non_negative_number(norm_eps, "norm_eps")
        self.reg_eps = check_non_negative_number(reg_eps, "reg_eps")

    @property
    def pref_vector(self) -> Tensor | None:
        """The preference vector (float64), or ``None`` for uniform weights."""
        return None if self._pref_vector is None else self._pref_vector.clone()

    def _preference(self, m: int) -> np.ndarray:
        """The float64 preference weights for ``m`` objectives (a new array)."""
        return resolve_pref_array(self._pref_vector, m, 1.0 / m)

    def _definite(self, gramian: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The symmetrised Gramian divided by its trace (zeros if that is at most ``norm_eps``),
        with the relative ridge, made numerically positive definite (float64), and its lower
        Cholesky factor."""
        trace = float(gramian.trace())
        if trace <= self.norm_eps:
            normalized = np.zeros_like(gramian)
        else:
            normalized = gramian / (2.0 * trace)
            normalized += normalized.T
        if self.reg_eps > 0:
            return _make_definite(_add_relative_ridge(normalized, self.reg_eps, inplace=True), 0.0)
        factor = _definite_factor(normalized)
        if factor is not None:
            return normalized, factor
        # Singular Gramian and no regularisation asked for: the smallest relative ridge that
        # makes it numerically definite (an absolute one would swamp the rows of small norm).
        matrix = normalized
        ridge = 1e-10
        while ridge < 1.0:
            matrix = _add_relative_ridge(normalized, ridge, inplace=False)
            factor = _definite_factor(matrix)
            if factor is not None:
                return matrix, factor
            ridge *= 10.0
        return _make_definite(matrix, 0.0)

    def __repr__(self) -> str:
        pref = None if self._pref_vector is None else self._pref_vector.tolist()
        return (
            f"{type(self).__name__}(pref_vector={pref}, norm_eps={self.norm_eps}, "
            f"reg_eps={self.reg_eps})"
        )


class DualConeAggregator(GramianWeightedAggregator):
    """Shared constructor of the aggregators built on a :class:`DualConeWeighting`.

    Subclasses set ``weighting_class``; the parameters are those of that weighting.

    Parameters
    ----------
    pref_vector, norm_eps, reg_eps
        Passed to ``weighting_class`` (see :class:`DualConeWeighting`).
    """

    weighting_class: type[DualConeWeighting]

    def __init__(
        self,
        pref_vector: Tensor | Sequence[float] | None = None,
        norm_eps: float = 0.0,
        reg_eps: float = 1e-4,
    ) -> None:
        super().__init__(self.weighting_class(pref_vector, norm_eps, reg_eps))

    def __repr__(self) -> str:
        return repr(self.weighting).replace(type(self.weighting).__name__, type(self).__name__, 1)
