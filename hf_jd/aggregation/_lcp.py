"""Solver of the linear complementarity problems (LCP) behind the dual-cone projection.

For a symmetric positive definite ``M`` (shape ``[m, m]``) and many right-hand sides ``q`` (rows
of a ``[k, m]`` tensor), :func:`solve_lcp` finds ``z`` with

    w = M z + q,   z ≥ 0,   w ≥ 0,   zᵢ wᵢ = 0,

i.e. the minimiser of ``½ zᵀ M z + qᵀ z`` over ``z ≥ 0``. Every row shares the same ``M``, which
is what makes a vectorised solver fast. :mod:`hf_jd.aggregation._dual_cone` uses it to project
onto the dual cone of the rows of a Jacobian (Quinton & Rey 2024, "Jacobian Descent For
Multi-Objective Optimization", arXiv:2406.16232, Proposition 1).

Algorithm
---------
:func:`solve_lcp` solves ``w = M z + q`` for many right-hand sides ``q`` (rows of a ``[k, m]``
tensor) at once, ``M`` symmetric positive definite. It rescales ``M`` to unit diagonal (an exact
change of variables, so rows whose norms differ by orders of magnitude cost nothing), skips the
rows whose answer is ``z = 0`` (``q ≥ 0``: nothing conflicts), then:

* ``m ≤ 16``, or few rows (``k · m³ ≤ 1.5·10⁵``): the dense NumPy solver of
  :mod:`hf_jd.aggregation._lcp_small` (the same pivoting with exact batched solves, quadprog for
  the rows it does not finish): at these sizes per-call overhead dominates.
* otherwise, *block principal pivoting* (primal-dual active set) on all rows together (Júdice &
  Pires 1994; Kim & Park 2011, "Fast nonnegative matrix factorization: an active-set-like method
  and comparisons", with their backup rule against cycling: after ten exchanges that do not
  reduce a row's number of infeasible variables, only its infeasible variable of largest index is
  exchanged). Each iteration solves, for every row, the equality-constrained problem on its free
  set ``F``: ``M_FF z_F = −q_F``.

  - When ``k · m³`` is small (or ``k ≤ 4`` rows with ``m ≤ 512``), by batched Cholesky of each
    row's masked system ``D M D + (I − D)``: exact.
  - Otherwise by conjugate gradients on all rows at once, so that a step is one matrix-matrix
    product with the shared ``M`` (fast BLAS) instead of one factorisation per row. The first
    free sets come from over-relaxed ADMM on all rows together (:mod:`hf_jd.aggregation._admm`:
    one product with the shared inverse ``(M + ρI)⁻¹`` per iteration, float32 until the free
    sets settle, then a few float64 iterations), which finds the exact free sets of almost every
    row and a close estimate of its solution: most rows need a single linear solve, and no
    pivoting. The systems are solved by iterative refinement: float64 residuals, float32 CG
    corrections on unit-scaled right-hand sides, each correction asked for the relative accuracy
    that brings its row to a tenth of the KKT tolerance (but not below ``10⁻⁶``, what float32 CG
    reliably reaches). Rows where CG stalls (too ill-conditioned for float32) go to the direct
    method.

    On ill-conditioned ``M`` (Gramians of per-example gradients, low-rank Jacobians) the CG is
    preconditioned by deflating the largest eigenvalues of ``M``, restricted to each row's free
    set (:class:`hf_jd.aggregation._masked_cg.SpectralPreconditioner`), whose eigendecomposition
    also gives the smallest eigenvalue that sets ``ρ``; on well-conditioned ``M`` that eigenvalue
    is estimated by inverse iteration.

  Since ``z`` is positively homogeneous in ``q``, every row is first scaled to unit max-norm.

* Every row is checked against the KKT conditions (``z ≥ 0``, ``w ≥ 0``, ``|w| ≤ tol·s`` on the
  free set); rows that fail go to ``quadprog``, whose answers are then "polished" by one exact
  solve on the free set they identify (quadprog loses accuracy on ill-conditioned ``M``).

Threads
-------
For problems of up to ``2²⁶`` multiply-adds per product (e.g. ``m = k = 256``), the solver sets
``torch.set_num_threads(1)`` while it runs and restores the previous value afterwards: its
operations are too small to gain from threads, and on a busy machine the thread hand-offs made it
up to 50 times slower.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from ._admm import admm_free_sets, estimate_smallest_eigenvalue
from ._lcp_small import DEFAULT_TOL, polish, quadprog_rows, solve_small
from ._masked_cg import SpectralPreconditioner, masked_cg

__all__ = ["solve_lcp", "solve_lcp_unchecked", "uses_small_solver", "few_threads", "DEFAULT_TOL"]

# Below this many multiply-adds per iteration, batched direct factorisation beats CG; so it does
# for a few rows of moderate size (the CG path's set-up, an m × m inverse, would dominate).
_DIRECT_COST_LIMIT = 3.0e6
_DIRECT_MAX_ROWS = 4
_DIRECT_MAX_M = 512
_BACKUP_STEPS = 10
# Up to this size the NumPy solver (one pivoting loop over all rows, quadprog for stragglers) is
# faster than the batched torch solvers (measured: 1.8 vs 2.7 ms at m = 32 on per-example BERT
# Gramians, 0.8 vs 1.0 ms on random ones; slower from m = 48 on random Gramians).
_SMALL_MAX_M = 32
# The NumPy solver also for few rows of moderate size (e.g. one row up to m = 52): fewer steps.
_SMALL_COST_LIMIT = 1.5e5
# Smallest relative residual asked of one float32 CG correction (float32 reaches it reliably on
# the preconditioned systems; asking for less wastes iterations on rounding noise).
_CG_FLOOR = 1e-6
# A row's refinement stops at this fraction of its KKT tolerance (margin for the final check).
_REFINEMENT_TARGET = 0.1
_REFINEMENT_ROUNDS = 12
_STALL_RATIO = 0.5
# Work (m²·k multiply-adds per product) up to which the solver runs on one thread.
_SINGLE_THREAD_WORK = 1 << 26

def solve_lcp(
    matrix: Tensor, q: Tensor, *, tol: float = DEFAULT_TOL, max_iters: int = 100
) -> Tensor:
    """Solve the LCP ``w = M z + q, z ≥ 0, w ≥ 0, zᵀw = 0`` for every row ``q`` of ``q``.

    Parameters
    ----------
    matrix
        Symmetric positive definite ``M`` of shape ``[m, m]`` (float64, CPU).
    q
        One right-hand side per row, shape ``[k, m]``.
    tol
        Relative KKT tolerance, in the unit-diagonal scaling of ``M``: ``w ≥ −tol·s`` and
        ``|wᵢ| ≤ tol·s`` where ``zᵢ > 0``, with ``s = ‖q‖∞ + ‖z‖∞``.
    max_iters
        Maximum number of pivoting iterations before the ``quadprog`` fallback.

    Returns
    -------
    Tensor
        ``z`` of shape ``[k, m]``, float64, with ``z ≥ 0`` exactly.

    Raises
    ------
    ValueError
        If the shapes do not match, the tensors are not float64 on the CPU, or the diagonal of
        ``matrix`` is not positive.
    """
    square = matrix.dim() == 2 and matrix.shape[0] == matrix.shape[1]
    if not square or q.dim() != 2 or q.shape[1] != matrix.shape[0]:
        raise ValueError(
            f"solve_lcp needs a square matrix [m, m] and right-hand sides [k, m], got shapes "
            f"{tuple(matrix.shape)} and {tuple(q.shape)}."
        )
    if matrix.dtype != torch.float64 or q.dtype != torch.float64 or matrix.device.type != "cpu":
        raise ValueError("solve_lcp works on float64 CPU tensors; convert them first.")
    if not bool((matrix.diagonal() > 0).all()):
        raise ValueError(
            "solve_lcp needs a positive definite matrix but its diagonal has entries <= 0; "
            "regularise it first (see regularize_gramian)."
        )
    with few_threads(q.numel() * q.shape[1]):
        return solve_lcp_unchecked(matrix, q, tol, max_iters)


@contextmanager
def few_threads(work: int) -> Iterator[None]:
    """Run small problems on one intra-op thread.

    The solver's operations act on at most a few hundred thousand numbers; splitting them over
    threads gains little and, on a busy machine, the thread hand-offs cost far more than the
    work (measured: 50x slower with 2 threads under load). The previous setting is restored.

    Parameters
    ----------
    work
        Size of the work (number of multiply-adds, roughly): above a threshold nothing changes.

    Yields
    ------
    None
        Within the block, PyTorch uses one intra-op thread.
    """
    threads = torch.get_num_threads()
    if threads == 1 or work > _SINGLE_THREAD_WORK:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def uses_small_solver(k: int, m: int) -> bool:
    """Whether :func:`solve_lcp` solves ``k`` rows of size ``m`` with the NumPy solver
    (:func:`hf_jd.aggregation._lcp_small.solve_small`) rather than the batched PyTorch ones.

    Parameters
    ----------
    k, m
        Number of right-hand sides and size of the matrix.

    Returns
    -------
    bool
        ``True`` for the NumPy solver.
    """
    return m <= _SMALL_MAX_M or k * m**3 <= _SMALL_COST_LIMIT


def solve_lcp_unchecked(
    matrix: Tensor, q: Tensor, tol: float, max_iters: int, factor: Tensor | None = None
) -> Tensor:
    """:func:`solve_lcp` without the input checks (float64 CPU, positive definite ``matrix``).

    ``factor``: the lower Cholesky factor of ``matrix``, if the caller has it (the regularisation
    computes it); the conjugate-gradient path then factorises nothing but ``M + ρI``.

    Parameters
    ----------
    matrix, q, tol, max_iters
        As :func:`solve_lcp`.
    factor
        Lower Cholesky factor of ``matrix``, or ``None``.

    Returns
    -------
    Tensor
        ``z`` of shape ``[k, m]``, float64.
    """
    k, m = q.shape
    if uses_small_solver(k, m):
        return torch.from_numpy(solve_small(matrix.numpy(), q.numpy(), tol))
    d = matrix.diagonal().sqrt()
    scaled = matrix / d.unsqueeze(1) / d.unsqueeze(0)
    q_scaled = q / d
    z = torch.zeros_like(q_scaled)
    todo = torch.nonzero((q_scaled < 0).any(dim=1)).flatten()
    if todo.numel() == 0:
        return z
    # The solution is positively homogeneous in q: solve for rows of unit max-norm (keeps the
    # float32 stages far from underflow) and scale back.
    row_scale = q_scaled[todo].abs().amax(dim=1, keepdim=True)
    qt = q_scaled[todo] / row_scale
    rows = qt.shape[0]
    few_rows = rows <= _DIRECT_MAX_ROWS and m <= _DIRECT_MAX_M
    if rows * m**3 <= _DIRECT_COST_LIMIT or few_rows:
        zt, ok = _pivoting(scaled, qt, _direct_solver(scaled), tol, max_iters)
    else:
        # The factor of D⁻¹ M D⁻¹ is D⁻¹ L.
        scaled_factor = None if factor is None else factor / d.unsqueeze(1)
        preconditioner = SpectralPreconditioner.build(scaled, qt.shape[0], factor=scaled_factor)
        if preconditioner is None:
            smallest = estimate_smallest_eigenvalue(scaled, factor=scaled_factor)
        else:
            smallest = preconditioner.smallest_eigenvalue
        start = admm_free_sets(scaled, qt, smallest)
        zt, ok = _pivoting(scaled, qt, _cg_solver(scaled, preconditioner), tol, max_iters, start)
        bad = torch.nonzero(~ok).flatten()
        if bad.numel() > 0:
            zb, okb = _pivoting(scaled, qt[bad], _direct_solver(scaled), tol, max_iters)
            zt[bad] = zb
            ok[bad] = okb
    bad = torch.nonzero(~ok).flatten()
    if bad.numel() > 0:
        scaled_np, q_bad = scaled.numpy(), qt[bad].numpy()
        zt[bad] = torch.from_numpy(polish(scaled_np, q_bad, quadprog_rows(scaled_np, q_bad), tol))
    z[todo] = zt * row_scale
    return z / d


# A solver maps (q [k, m], free mask [k, m] bool, warm start z [k, m], tolerance per row [k],
# indices of these rows in the problem [k]) to (z with z = 0 off the free set, converged [k]).
_Solver = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def _pivoting(
    matrix: Tensor,
    q: Tensor,
    solver: _Solver,
    tol: float,
    max_iters: int,
    start: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Block principal pivoting on all rows of ``q`` at once (unit-diagonal ``matrix``).

    Each iteration solves every row's equality-constrained problem on its free set, then moves
    the infeasible variables (``z < 0`` on the free set, ``w < 0`` off it) to the other set.
    ``start`` gives the first free sets and a warm start of ``z`` (default: ``q < 0`` and zero).
    Returns ``z`` and a flag per row telling whether it satisfies the KKT conditions to ``tol``.
    """
    k, m = q.shape
    if start is None:
        free, z = q < 0, torch.zeros_like(q)
    else:
        free, z = start[0].clone(), start[1].clone()
    done = torch.zeros(k, dtype=torch.bool)
    best = torch.full((k,), m + 1, dtype=torch.long)
    backup = torch.full((k,), _BACKUP_STEPS, dtype=torch.long)
    columns = torch.arange(m)
    active = torch.arange(k)
    everything = True
    for _ in range(max_iters):
        if everything:
            fa, qa, za0 = free, q, z
        else:
            fa, qa, za0 = free[active], q[active], z[active]
        row_tol = torch.full((qa.shape[0],), tol, dtype=q.dtype)
        za, converged = solver(qa, fa, za0, row_tol, active)
        w = torch.mm(za, matrix).add_(qa)
        scale = (qa.abs().amax(dim=1) + za.abs().amax(dim=1)).mul_(tol).unsqueeze(1)
        negative_scale = -scale
        # Check the true residual on the free set (CG's recursive residual can drift).
        converged &= ~(fa & (w.abs() > scale)).any(dim=1)
        infeasible = torch.where(fa, za < negative_scale, w < negative_scale)
        count = infeasible.sum(dim=1)
        finished = (count == 0) & converged
        z[active] = za.clamp_min_(0)
        done[active[finished]] = True
        # Exchange rule (Kim & Park's backup rule against cycling): exchange every infeasible
        # variable while that keeps reducing their number (or for a few more tries), else only
        # the one of largest index.
        improved = count < best[active]
        use_full = improved | (backup[active] > 0)
        best[active] = torch.where(improved, count, best[active])
        backup[active] = torch.where(
            improved, _BACKUP_STEPS, torch.where(use_full, backup[active] - 1, backup[active])
        )
        if bool(use_full.all()):
            flip = infeasible
        else:
            largest = torch.where(infeasible, columns, -1).amax(dim=1, keepdim=True)
            flip = torch.where(use_full.unsqueeze(1), infeasible, infeasible & (columns == largest))
        free[active] = fa ^ flip
        # Rows whose linear solve did not converge stop here, reported as not done (the caller
        # retries them with a direct method, then quadprog).
        keep = ~finished & converged
        if bool(keep.all()):
            continue
        active = active[keep]
        everything = False
        if active.numel() == 0:
            break
    return z, done


def _cg_solver(matrix: Tensor, preconditioner: SpectralPreconditioner | None = None) -> _Solver:
    """Masked CG in mixed precision: float64 residuals, float32 CG corrections.

    Each round computes the float64 residual of every row's system (one product with the shared
    matrix) and solves for a correction with float32 CG (iterative refinement). Each correction
    is asked for the relative accuracy that brings its row's residual to ``_REFINEMENT_TARGET``
    times the row's KKT tolerance ``tol · (‖q‖∞ + ‖z‖∞)``, but not below ``_CG_FLOOR``: from a
    good start one round is enough, otherwise a second one finishes. Float32 products cost about
    a quarter of float64 ones, and the float64 residual makes the final accuracy independent of
    float32 rounding. ``preconditioner`` (for ill-conditioned ``matrix``) preconditions the CG.
    """
    m = matrix.shape[0]
    matrix32 = matrix.float()
    inner_iters = m + 50

    def solve(
        q: Tensor, free: Tensor, z: Tensor, row_tol: Tensor, rows: Tensor
    ) -> tuple[Tensor, Tensor]:
        mask = free.to(q.dtype)
        mask32 = free.float()
        apply = None if preconditioner is None else preconditioner.restrict(rows, mask32)
        x = z * mask
        q_free = q * mask
        q_norm = q.abs().amax(dim=1)
        residual = torch.empty_like(q)
        converged = torch.zeros(q.shape[0], dtype=torch.bool)
        stalled = torch.zeros(q.shape[0], dtype=torch.bool)
        previous = torch.full((q.shape[0],), float("inf"), dtype=q.dtype)
        for _ in range(_REFINEMENT_ROUNDS):
            torch.mm(x, matrix, out=residual)
            residual.add_(q_free).mul_(mask).neg_()
            size = residual.abs().amax(dim=1)
            # The row's KKT tolerance (as checked by the caller), with a margin.
            target = (q_norm + x.abs().amax(dim=1)).mul_(row_tol * _REFINEMENT_TARGET)
            converged = size <= target
            # A round that does not halve the residual means float32 CG cannot handle the
            # conditioning: give up on the row (the caller then uses a direct method).
            stalled |= ~converged & (size > _STALL_RATIO * previous)
            previous = size
            finished = converged | stalled
            if bool(finished.all()):
                break
            # Unit-size right-hand sides keep float32 away from underflow (and denormals).
            # Finished rows get a zero right-hand side, hence no correction. CG's tolerance
            # bounds the 2-norm of the residual, which bounds its largest entry.
            size = size.clamp_min_(torch.finfo(q.dtype).tiny)
            norm = torch.linalg.vector_norm(residual, dim=1).clamp_min_(torch.finfo(q.dtype).tiny)
            inner_tol = (target / norm).clamp_(_CG_FLOOR, 0.5).float()
            size = size.unsqueeze(1)
            rhs = (residual / size).masked_fill_(finished.unsqueeze(1), 0.0).float()
            correction, inner_converged = masked_cg(
                matrix32, rhs, torch.zeros_like(rhs), mask32, inner_tol, inner_iters, apply
            )
            x.add_(correction.double().mul_(size))
            # CG needing more than m + 50 steps means too ill-conditioned for float32: give up.
            stalled |= ~inner_converged
        return x, converged

    return solve


def _direct_solver(matrix: Tensor) -> _Solver:
    """Exact solves by batched Cholesky of each row's masked system ``D M D + (I − D)``."""
    m = matrix.shape[0]
    chunk = max(1, (1 << 22) // (m * m))

    def solve(
        q: Tensor, free: Tensor, z: Tensor, row_tol: Tensor, rows: Tensor
    ) -> tuple[Tensor, Tensor]:
        k = q.shape[0]
        out = torch.empty_like(q)
        ok = torch.ones(k, dtype=torch.bool)
        for start in range(0, k, chunk):
            stop = min(k, start + chunk)
            mask = free[start:stop].to(q.dtype)  # [c, m]
            system = matrix * (mask.unsqueeze(2) * mask.unsqueeze(1)) + torch.diag_embed(1 - mask)
            rhs = (-q[start:stop] * mask).unsqueeze(2)
            factor, info = torch.linalg.cholesky_ex(system)
            solution = torch.cholesky_solve(rhs, factor).squeeze(2)
            out[start:stop] = solution * mask
            ok[start:stop] = (info == 0) & torch.isfinite(solution).all(dim=1)
        return out, ok

    return solve
