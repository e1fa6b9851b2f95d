"""Dense NumPy solver of small linear complementarity problems, and the quadprog fallback.

Solves ``w = M z + q, z ≥ 0, w ≥ 0, zᵀw = 0`` for every row ``q`` of a ``[k, m]`` array, with
``M`` symmetric positive definite (see :mod:`hf_jd.aggregation._lcp`). For small ``m`` the cost is
dominated by per-call overheads, so everything here works on whole NumPy arrays:

* :func:`solve_small` rescales ``M`` to unit diagonal and each row to unit max-norm, then runs
  block principal pivoting (Júdice & Pires 1994; Kim & Park 2011) on all rows at once, each
  iteration solving the free-set system of every row not yet finished exactly with one batched
  ``numpy.linalg.solve`` of the masked matrices ``D M D + (I − D)``. Rows not solved in
  ``_SMALL_PIVOT_ITERS`` iterations (cycling is possible without the backup rule) go to
  quadprog.
* :func:`quadprog_rows` solves rows with quadprog (Goldfarb & Idnani's dual method), sharing one
  factorisation of ``M``, and :func:`polish` re-solves its answers exactly on the free sets they
  identify (quadprog loses accuracy on ill-conditioned ``M``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["DEFAULT_TOL", "solve_small", "solve_unit_rows", "polish", "quadprog_rows"]

DEFAULT_TOL = 1e-10
# Pivoting iterations of solve_small before the remaining rows go to quadprog.
_SMALL_PIVOT_ITERS = 12


def solve_small(
    matrix: np.ndarray, q: np.ndarray, tol: float, free: np.ndarray | None = None
) -> np.ndarray:
    """Solve the LCP of every row of ``q`` (``[k, m]``) for a small positive definite ``matrix``.

    Returns ``z`` (``[k, m]``, ``z ≥ 0``) satisfying the KKT conditions to the relative
    tolerance ``tol`` in the unit-diagonal scaling of ``matrix``. ``free`` (boolean, ``[k, m]``)
    is a guess of the variables that are positive at the solution (default: ``q < 0``).

    Parameters
    ----------
    matrix
        Symmetric positive definite float64 array, shape ``[m, m]``.
    q
        Right-hand sides, float64, shape ``[k, m]``.
    tol
        Relative KKT tolerance.
    free
        Guessed free sets, boolean, shape ``[k, m]``, or ``None``.

    Returns
    -------
    numpy.ndarray
        ``z``, float64, shape ``[k, m]``.
    """
    d = np.sqrt(matrix.diagonal())
    scaled = matrix / (d[:, None] * d)
    q_scaled = q / d
    z = np.zeros_like(q_scaled)
    todo = np.flatnonzero((q_scaled < 0).any(axis=1))
    if todo.size > 0:
        z[todo] = solve_unit_rows(scaled, q_scaled[todo], tol, free=None if free is None else free[todo])
    z /= d
    return z


def solve_unit_rows(
    scaled: np.ndarray, q: np.ndarray, tol: float, *, unit: bool = False, free: np.ndarray | None = None
) -> np.ndarray:
    """:func:`solve_small` for a unit-diagonal ``scaled`` and rows ``q`` that each have a negative
    entry (so a non-zero answer): pivoting on rows of unit max-norm, quadprog for the rest.

    ``unit`` says that the rows of ``q`` already have unit max-norm (up to rounding), e.g. rows
    of ``scaled`` itself, whose diagonal is 1 and off-diagonal entries below 1 in magnitude.
    ``free``: the first free sets (default: ``q < 0``). Returns a new array.

    Parameters
    ----------
    scaled
        Unit-diagonal positive definite float64 array, shape ``[m, m]``.
    q
        Right-hand sides, each with a negative entry, shape ``[k, m]``.
    tol
        Relative KKT tolerance.
    unit
        Whether the rows of ``q`` already have unit max-norm.
    free
        First free sets, boolean, shape ``[k, m]``, or ``None``.

    Returns
    -------
    numpy.ndarray
        ``z``, float64, shape ``[k, m]``.
    """
    if unit:
        row_scale, qt = None, q
    else:
        row_scale = np.abs(q).max(axis=1, keepdims=True)
        qt = q / row_scale
    zt, done = _pivoting(scaled, qt, tol, free)
    if done is not None:
        bad = np.flatnonzero(~done)
        zt[bad] = polish(scaled, qt[bad], quadprog_rows(scaled, qt[bad]), tol)
    if row_scale is not None:
        zt *= row_scale
    return zt


def _pivoting(
    matrix: np.ndarray, q: np.ndarray, tol: float, free: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Block principal pivoting on all rows of ``q`` (unit max-norm) at once, with exact solves.

    Each iteration solves the free-set systems of the rows not yet finished (one batched
    ``numpy.linalg.solve`` of ``D M D + (I − D)``), then keeps only the rows that still have an
    infeasible variable or an inaccurate solve, with those variables exchanged. Returns ``z`` and
    ``None`` when every row finished, else ``z`` and the flags of the finished rows. ``free``:
    the first free sets (default: ``q < 0``).
    """
    k, m = q.shape
    eye = _identity(m)
    if free is None:
        free = q < 0
    neg_q = -q
    z: np.ndarray | None = None
    # Set with z, on the first iteration that leaves rows unfinished.
    done: np.ndarray
    rows: np.ndarray
    for _ in range(_SMALL_PIVOT_ITERS):
        # Rows and columns off the free set are those of the identity: z = 0 there.
        system = np.where(free[:, :, None] & free[:, None, :], matrix, eye)
        try:
            solution = np.linalg.solve(system, (neg_q * free)[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            break
        w = solution @ matrix
        w -= neg_q
        # KKT tolerance of each row (its q has unit max-norm); inf or nan for a non-finite solution.
        scale = np.abs(solution).max(axis=1)
        scale += 1.0
        scale *= tol
        unfinished = ~(scale < np.inf)
        scale = scale[:, None]
        infeasible = np.where(free, solution, w) < -scale
        # The exact solve must also make w vanish on the free set (it does unless singular).
        unfinished |= (infeasible | (free & (np.abs(w) > scale))).any(axis=1)
        if z is None:
            if not unfinished.any():
                return np.maximum(solution, 0.0, out=solution), None
            z = np.zeros_like(q)
            done = np.zeros(k, dtype=bool)
            rows = np.arange(k)
        finished = ~unfinished
        z[rows[finished]] = np.maximum(solution[finished], 0.0)
        done[rows[finished]] = True
        if not unfinished.any():
            return z, None
        rows = rows[unfinished]
        free = (free ^ infeasible)[unfinished]
        neg_q = neg_q[unfinished]
    if z is None:
        return np.zeros_like(q), np.zeros(k, dtype=bool)
    return z, done


def _identity(m: int) -> np.ndarray:
    """The ``m × m`` identity (float64), cached: read only."""
    eye = _IDENTITIES.get(m)
    if eye is None:
        eye = np.eye(m)
        eye.flags.writeable = False
        if m <= 64:
            _IDENTITIES[m] = eye
    return eye


_IDENTITIES: dict[int, np.ndarray] = {}


def polish(matrix: np.ndarray, q: np.ndarray, z: np.ndarray, tol: float) -> np.ndarray:
    """Re-solve exactly, on the free set it found, each row of an approximate solution.

    quadprog's accuracy degrades with the conditioning of ``M``; one direct solve on the free
    set it found (``z > w``) removes that error whenever the free set is right (the re-solved
    row is kept only if it satisfies the KKT conditions to ``tol``). Rows that already satisfy
    them to the default tolerance are kept as they are.

    Parameters
    ----------
    matrix
        Symmetric positive definite float64 array, shape ``[m, m]``.
    q
        Right-hand sides, shape ``[k, m]``.
    z
        Approximate solutions, shape ``[k, m]`` (not modified).
    tol
        Relative KKT tolerance a re-solved row must satisfy.

    Returns
    -------
    numpy.ndarray
        A new array of solutions, shape ``[k, m]``.
    """
    z = z.copy()
    w = z @ matrix + q
    scales = min(tol, DEFAULT_TOL) * (np.abs(q).max(axis=1) + np.abs(z).max(axis=1))[:, None]
    satisfied = ((w >= -scales) & (np.minimum(z, w) <= scales)).all(axis=1)
    for row in np.flatnonzero(~satisfied):
        free = z[row] > w[row]
        candidate = np.zeros_like(z[row])
        if free.any():
            try:
                candidate[free] = np.linalg.solve(matrix[np.ix_(free, free)], -q[row, free])
            except np.linalg.LinAlgError:
                continue
        w_candidate = candidate @ matrix + q[row]
        scale = tol * (np.abs(q[row]).max() + np.abs(candidate).max())
        if (candidate[free] >= -scale).all() and (w_candidate[~free] >= -scale).all():
            z[row] = np.maximum(candidate, 0.0)
    return z


def quadprog_rows(matrix: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Solve ``min ½ zᵀMz + qᵀz, z ≥ 0`` per row with quadprog, sharing one factorisation.

    Parameters
    ----------
    matrix
        Symmetric positive definite float64 array, shape ``[m, m]``.
    q
        Right-hand sides, shape ``[k, m]``.

    Returns
    -------
    numpy.ndarray
        The minimisers, clipped at ``0``, shape ``[k, m]``.
    """
    import quadprog

    m = matrix.shape[0]
    # quadprog accepts R⁻¹ with M = RᵀR (R upper triangular) to skip its own factorisation.
    upper = np.linalg.cholesky(matrix).T
    r_inv = np.linalg.solve(upper, np.eye(m))
    constraints = np.eye(m)
    zeros = np.zeros(m)
    rows = [quadprog.solve_qp(r_inv, -row, constraints, zeros, 0, True)[0] for row in q]
    return np.maximum(np.stack(rows), 0.0)
