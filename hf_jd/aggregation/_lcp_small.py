"""Dense NumPy solver of small linear complementarity problems, and the quadprog fallback.

Solves ``w = M z + q, z ≥ 0, w ≥ 0, zᵀw = 0`` for every row ``q`` of a ``[k, m]`` array, with
``M`` symmetric positive definite (see :mod:`hf_jd.aggregation._lcp`). For small ``m`` the cost is
dominated by per-call overheads, so everything here works on whole NumPy arrays:

* :func:`solve_small` rescales ``M`` to unit diagonal and each row to unit max-norm, then runs
  block principal pivoting (Júdice & Pires 1994; Kim & Park 2011) on all rows at once, each
  iteration solving every row's free-set system exactly with one batched
  ``numpy.linalg.solve`` of the masked matrices ``D M D + (I − D)``. Rows not solved in
  ``_SMALL_PIVOT_ITERS`` iterations (cycling is possible without the backup rule) go to
  quadprog.
* :func:`quadprog_rows` solves rows with quadprog (Goldfarb & Idnani's dual method), sharing one
  factorisation of ``M``, and :func:`polish` re-solves its answers exactly on the free sets they
  identify (quadprog loses accuracy on ill-conditioned ``M``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["DEFAULT_TOL", "solve_small", "polish", "quadprog_rows"]

DEFAULT_TOL = 1e-10
# Pivoting iterations of solve_small before the remaining rows go to quadprog.
_SMALL_PIVOT_ITERS = 12


def solve_small(matrix: np.ndarray, q: np.ndarray, tol: float) -> np.ndarray:
    """Solve the LCP of every row of ``q`` (``[k, m]``) for a small positive definite ``matrix``.

    Returns ``z`` (``[k, m]``, ``z ≥ 0``) satisfying the KKT conditions to the relative
    tolerance ``tol`` in the unit-diagonal scaling of ``matrix``.
    """
    d = np.sqrt(np.diag(matrix))
    scaled = matrix / np.outer(d, d)
    q_scaled = q / d
    z = np.zeros_like(q_scaled)
    todo = np.flatnonzero((q_scaled < 0).any(axis=1))
    if todo.size > 0:
        row_scale = np.abs(q_scaled[todo]).max(axis=1, keepdims=True)
        qt = q_scaled[todo] / row_scale
        zt, done = _pivoting(scaled, qt, tol)
        if not done.all():
            bad = np.flatnonzero(~done)
            zt[bad] = polish(scaled, qt[bad], quadprog_rows(scaled, qt[bad]), tol)
        z[todo] = zt * row_scale
    return z / d


def _pivoting(matrix: np.ndarray, q: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Block principal pivoting on all rows at once with exact solves; returns ``z`` and ``done``."""
    k, m = q.shape
    free = q < 0
    z = np.zeros_like(q)
    done = np.zeros(k, dtype=bool)
    eye = np.eye(m, dtype=bool)
    for _ in range(_SMALL_PIVOT_ITERS):
        both = free[:, :, None] & free[:, None, :]
        system = np.where(both, matrix, 0.0) + (eye & ~free[:, :, None])
        try:
            solution = np.linalg.solve(system, np.where(free, -q, 0.0)[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            break
        w = solution @ matrix + q
        scale = tol * (np.abs(q).max(axis=1) + np.abs(solution).max(axis=1))[:, None]
        infeasible = np.where(free, solution < -scale, w < -scale)
        # The exact solve must also make w vanish on the free set (it does unless singular).
        accurate = ~(free & (np.abs(w) > scale)).any(axis=1) & np.isfinite(solution).all(axis=1)
        finished = ~done & accurate & ~infeasible.any(axis=1)
        z[finished] = np.maximum(solution[finished], 0.0)
        done |= finished
        if done.all():
            break
        free = np.where(done[:, None], free, free ^ infeasible)
    return z, done


def polish(matrix: np.ndarray, q: np.ndarray, z: np.ndarray, tol: float) -> np.ndarray:
    """Re-solve exactly, on the free set it found, each row of an approximate solution.

    quadprog's accuracy degrades with the conditioning of ``M``; one direct solve on the free
    set it found (``z > w``) removes that error whenever the free set is right (the re-solved
    row is kept only if it satisfies the KKT conditions to ``tol``). Rows that already satisfy
    them to the default tolerance are kept as they are.
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
    """Solve ``min ½ zᵀMz + qᵀz, z ≥ 0`` per row with quadprog, sharing one factorisation."""
    import quadprog

    m = matrix.shape[0]
    # quadprog accepts R⁻¹ with M = RᵀR (R upper triangular) to skip its own factorisation.
    upper = np.linalg.cholesky(matrix).T
    r_inv = np.linalg.solve(upper, np.eye(m))
    constraints = np.eye(m)
    zeros = np.zeros(m)
    rows = [quadprog.solve_qp(r_inv, -row, constraints, zeros, 0, True)[0] for row in q]
    return np.maximum(np.stack(rows), 0.0)
