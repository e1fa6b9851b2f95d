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
holds the inner products of the projection with the rows. Every target shares the same matrix
``G``, which is what makes a vectorised solver fast.

Algorithm
---------
:func:`solve_lcp` solves ``w = M z + q`` for many right-hand sides ``q`` (rows of a ``[k, m]``
tensor) at once, ``M`` symmetric positive definite. It rescales ``M`` to unit diagonal (an exact
change of variables, so rows whose norms differ by orders of magnitude cost nothing), skips the
rows whose answer is ``z = 0`` (``q ≥ 0``: nothing conflicts), then:

* ``m ≤ 16``, or few rows (``k · m³ ≤ 1.5·10⁵``): ``quadprog`` (Goldfarb & Idnani's dual method)
  per row, sharing one factorisation of ``M``: the fastest option at these sizes.
* otherwise, *block principal pivoting* (primal-dual active set) on all rows together (Júdice &
  Pires 1994; Kim & Park 2011, "Fast nonnegative matrix factorization: an active-set-like method
  and comparisons", with their backup rule against cycling: after ten exchanges that do not
  reduce a row's number of infeasible variables, only its infeasible variable of largest index is
  exchanged). Each iteration solves, for every row, the equality-constrained problem on its free
  set ``F``: ``M_FF z_F = −q_F``.

  - When ``k · m³`` is small, by batched Cholesky of each row's masked system
    ``D M D + (I − D)``: exact.
  - Otherwise by conjugate gradients on all rows at once, so that a step is one matrix-matrix
    product with the shared ``M`` (fast BLAS) instead of one factorisation per row. The free sets
    are first guessed by cheap float32 iterations; the systems are then solved by iterative
    refinement (float64 residuals, float32 CG corrections on unit-scaled right-hand sides), first
    to a loose tolerance and, once a row's free set stops changing, to the tight one. Rows where
    CG stalls (too ill-conditioned for float32) go to the direct method.

  Since ``z`` is positively homogeneous in ``q``, every row is first scaled to unit max-norm.

* Every row is checked against the KKT conditions (``z ≥ 0``, ``w ≥ 0``, ``|w| ≤ tol·s`` on the
  free set); rows that fail go to ``quadprog``, whose answers are then "polished" by one exact
  solve on the free set they identify (quadprog loses accuracy on ill-conditioned ``M``).

Regularisation
--------------
The problem has a unique solution only when ``G`` is positive definite. :func:`project_weights`
adds ``reg_eps · I`` to ``G``; if the result is still numerically singular (a Cholesky
factorisation fails, or a row lies within about 1e-5 radians of the span of the previous ones:
duplicate, parallel or zero rows, rank ``< m``), it adds ``δ · I`` instead, with
``δ = max(10⁻¹² · trace(G) / m, 10 · reg_eps)`` multiplied by 10 until that is no longer the case.
The answer is the exact solution for the regularised Gramian.

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

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "project_weights",
    "solve_lcp",
    "regularize_gramian",
    "normalize_gramian",
    "to_pref_vector",
    "resolve_pref_vector",
    "check_non_negative_number",
]

_DEFAULT_TOL = 1e-10
# Below this many multiply-adds per iteration, batched direct factorisation beats CG.
_DIRECT_COST_LIMIT = 3.0e6
_WARM_START_MIN_M = 48
_PIVOT_RATIO = 1e-10
_BACKUP_STEPS = 10
_LOOSE_TOL = 1e-6
_QUADPROG_MAX_M = 16
# quadprog also for few rows of moderate size (e.g. one row up to m = 52): fewer Python steps.
_QUADPROG_COST_LIMIT = 1.5e5
_WARM_START_ITERS = 12
_WARM_START_CG_ITERS = 20
_WARM_START_CG_TOL = 1e-3
_INNER_TOL = 1e-4
_REFINEMENT_ROUNDS = 12
_STALL_RATIO = 0.5
# Work (m²·k multiply-adds per product) up to which the solver runs on one thread.
_SINGLE_THREAD_WORK = 1 << 26


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
    """
    reg_eps = check_non_negative_number(reg_eps, "reg_eps")
    with _few_threads(gramian.shape[0] ** 3):
        return _regularize(gramian, reg_eps)


def _regularize(gramian: Tensor, reg_eps: float) -> Tensor:
    matrix = gramian.to(dtype=torch.float64)
    matrix = (matrix + matrix.T) / 2
    m = matrix.shape[0]
    eye = torch.eye(m, dtype=matrix.dtype, device=matrix.device)
    regularized = matrix + reg_eps * eye if reg_eps > 0 else matrix
    if _is_positive_definite(regularized):
        return regularized
    mean_diagonal = float(matrix.diagonal().sum()) / m
    scale = mean_diagonal if mean_diagonal > 0 else 1.0
    delta = max(1e-12 * scale, 10.0 * reg_eps)
    for _ in range(40):
        regularized = matrix + delta * eye
        if _is_positive_definite(regularized):
            return regularized
        delta *= 10.0
    raise RuntimeError(
        "Could not make the Gramian positive definite by adding a multiple of the identity; "
        "it is probably not symmetric positive semi-definite. Pass J @ J.T."
    )


def _is_positive_definite(matrix: Tensor) -> bool:
    """Cholesky succeeds and no row is within ~1e-5 radians of the span of the previous ones."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        return False
    diagonal = matrix.diagonal()
    if not bool((diagonal > 0).all()):
        return False
    # factor[i, i]² / matrix[i, i] is the squared sine of the angle between row i and the span
    # of the previous rows (scale-invariant): near zero means numerically singular.
    return bool((factor.diagonal() ** 2 >= _PIVOT_RATIO * diagonal).all())


def project_weights(
    targets: Tensor,
    gramian: Tensor,
    *,
    reg_eps: float = 0.0,
    tol: float = _DEFAULT_TOL,
    max_iters: int = 100,
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
    """
    _check_inputs(targets, gramian)
    if not isinstance(tol, (int, float)) or not 0 < tol < 1:
        raise ValueError(f"tol must be a number in (0, 1), got {tol!r}.")
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters must be a positive integer, got {max_iters!r}.")
    squeeze = targets.dim() == 1
    u = targets.reshape(1, -1) if squeeze else targets
    m = gramian.shape[0]
    with _few_threads(m * m * u.shape[0]):
        matrix = regularize_gramian(gramian.detach().cpu(), reg_eps)
        u64 = u.detach().to(device="cpu", dtype=torch.float64)
        q = u64 @ matrix  # rows (G u)ᵀ, G symmetric
        z = solve_lcp(matrix, q, tol=tol, max_iters=max_iters)
    v = (u64 + z).to(dtype=targets.dtype, device=targets.device)
    return v.reshape(-1) if squeeze else v


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


def solve_lcp(
    matrix: Tensor, q: Tensor, *, tol: float = _DEFAULT_TOL, max_iters: int = 100
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
    with _few_threads(q.numel() * q.shape[1]):
        return _solve_lcp(matrix, q, tol, max_iters)


@contextmanager
def _few_threads(work: int) -> Iterator[None]:
    """Run small problems on one intra-op thread.

    The solver's operations act on at most a few hundred thousand numbers; splitting them over
    threads gains little and, on a busy machine, the thread hand-offs cost far more than the
    work (measured: 50x slower with 2 threads under load). The previous setting is restored.
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


def _solve_lcp(matrix: Tensor, q: Tensor, tol: float, max_iters: int) -> Tensor:
    k, m = q.shape
    if m <= _QUADPROG_MAX_M or k * m**3 <= _QUADPROG_COST_LIMIT:
        return torch.from_numpy(_solve_small(matrix.numpy(), q.numpy(), tol))
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
    if qt.shape[0] * m**3 <= _DIRECT_COST_LIMIT:
        zt, ok = _pivoting(scaled, qt, _direct_solver(scaled), tol, max_iters)
    else:
        zt, ok = _pivoting(
            scaled, qt, _cg_solver(scaled), tol, max_iters, _LOOSE_TOL, m >= _WARM_START_MIN_M
        )
        bad = torch.nonzero(~ok).flatten()
        if bad.numel() > 0:
            zb, okb = _pivoting(scaled, qt[bad], _direct_solver(scaled), tol, max_iters)
            zt[bad] = zb
            ok[bad] = okb
    bad = torch.nonzero(~ok).flatten()
    if bad.numel() > 0:
        scaled_np, q_bad = scaled.numpy(), qt[bad].numpy()
        zt[bad] = torch.from_numpy(_polish(scaled_np, q_bad, _quadprog_rows(scaled_np, q_bad), tol))
    z[todo] = zt * row_scale
    return z / d


def _solve_small(matrix: np.ndarray, q: np.ndarray, tol: float) -> np.ndarray:
    """The same steps as the torch path, in NumPy with quadprog: cheapest for small problems."""
    d = np.sqrt(np.diag(matrix))
    scaled = matrix / np.outer(d, d)
    q_scaled = q / d
    z = np.zeros_like(q_scaled)
    todo = np.flatnonzero((q_scaled < 0).any(axis=1))
    if todo.size > 0:
        row_scale = np.abs(q_scaled[todo]).max(axis=1, keepdims=True)
        qt = q_scaled[todo] / row_scale
        z[todo] = _polish(scaled, qt, _quadprog_rows(scaled, qt), tol) * row_scale
    return z / d


# A solver maps (q [k, m], free mask [k, m] bool, warm start z [k, m], tolerance per row [k])
# to (z with z = 0 off the free set, converged [k]).
_Solver = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def _pivoting(
    matrix: Tensor,
    q: Tensor,
    solver: _Solver,
    tol: float,
    max_iters: int,
    loose_tol: float | None = None,
    warm_start: bool = False,
) -> tuple[Tensor, Tensor]:
    """Block principal pivoting on all rows of ``q`` at once (unit-diagonal ``matrix``).

    Each iteration solves every row's equality-constrained problem on its free set, then moves
    the infeasible variables (``z < 0`` on the free set, ``w < 0`` off it) to the other set.
    With an iterative ``solver``, a row's systems are first solved to ``loose_tol``; once its
    solution is feasible at that level, it is solved to ``tol`` and checked again. Returns ``z``
    and a flag per row telling whether it satisfies the KKT conditions to ``tol``.
    """
    k, m = q.shape
    loose = tol if loose_tol is None else max(loose_tol, tol)
    free = q < 0
    z = torch.zeros_like(q)
    if warm_start:
        free, z = _float32_warm_start(matrix, q, free)
    done = torch.zeros(k, dtype=torch.bool)
    tight = torch.full((k,), loose == tol, dtype=torch.bool)
    best = torch.full((k,), m + 1, dtype=torch.long)
    backup = torch.full((k,), _BACKUP_STEPS, dtype=torch.long)
    columns = torch.arange(m)
    active = torch.arange(k)
    everything = True
    for _ in range(max_iters):
        if everything:
            fa, qa, za0, ta = free, q, z, tight
        else:
            fa, qa, za0, ta = free[active], q[active], z[active], tight[active]
        row_tol = torch.full(ta.shape, loose, dtype=q.dtype).masked_fill_(ta, tol)
        za, converged = solver(qa, fa, za0, row_tol)
        w = torch.mm(za, matrix).add_(qa)
        scale = (qa.abs().amax(dim=1) + za.abs().amax(dim=1)).mul_(row_tol).unsqueeze(1)
        negative_scale = -scale
        # Check the true residual on the free set (CG's recursive residual can drift).
        converged &= ~(fa & (w.abs() > scale)).any(dim=1)
        infeasible = torch.where(fa, za < negative_scale, w < negative_scale)
        count = infeasible.sum(dim=1)
        feasible = (count == 0) & converged
        finished = feasible & ta
        z[active] = za.clamp_min_(0)
        done[active[finished]] = True
        tight[active[feasible]] = True  # feasible at the loose level: confirm with a tight solve
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


def _float32_warm_start(matrix: Tensor, q: Tensor, free: Tensor) -> tuple[Tensor, Tensor]:
    """Guess the free sets with a few cheap float32 pivoting iterations (loose CG solves).

    Only the rows whose free set changed at the previous iteration are solved again.
    """
    matrix32, q32 = matrix.float(), q.float()
    z = torch.zeros_like(q32)
    free = free.clone()
    active = torch.arange(q.shape[0])
    for _ in range(_WARM_START_ITERS):
        fa, qa = free[active], q32[active]
        mask = fa.float()
        rhs = (qa * mask).neg_()
        start = z[active].mul_(mask)
        za, _ = _masked_cg(matrix32, rhs, start, mask, _WARM_START_CG_TOL, _WARM_START_CG_ITERS)
        w = torch.mm(za, matrix32).add_(qa)
        new_free = za > w
        changed = (new_free != fa).any(dim=1)
        z[active] = za
        free[active] = new_free
        active = active[changed]
        if active.numel() == 0:
            break
    # Float32 may overflow on ill-conditioned problems: such rows just start from zero.
    z = torch.nan_to_num(z.mul_(free.float()), nan=0.0, posinf=0.0, neginf=0.0)
    return free, z.double()


def _masked_cg(
    matrix: Tensor,
    rhs: Tensor,
    x: Tensor,
    mask: Tensor,
    tol: Tensor | float,
    max_iters: int,
    floor: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Conjugate gradients on every row's system restricted to its mask, all rows at once.

    Solves ``(D M D) x = rhs`` on the support of ``D = diag(mask)`` for each row (``rhs`` and
    ``x`` must vanish off it): one product with the shared ``M`` per iteration. Stops when every
    row has ``‖r‖₂ ≤ tol · (‖rhs‖₂ + floor)``. Returns ``x`` and a converged flag per row.
    In-place operations avoid reallocating ``[k, m]`` buffers at each step.
    """
    residual = torch.mm(x, matrix)
    residual.mul_(mask).neg_().add_(rhs)
    reference = torch.linalg.vecdot(rhs, rhs).sqrt_()
    if floor is not None:
        reference = reference + floor
    threshold = (reference * tol).square_()
    direction = residual.clone()
    rs = torch.linalg.vecdot(residual, residual)
    product = torch.empty_like(direction)
    tiny = torch.finfo(x.dtype).tiny
    converged = rs <= threshold
    for _ in range(max_iters):
        if bool(converged.all()):
            break
        torch.mm(direction, matrix, out=product)
        product.mul_(mask)
        curvature = torch.linalg.vecdot(direction, product).clamp_min_(tiny)
        alpha = (rs / curvature).unsqueeze(1)
        x.addcmul_(direction, alpha)
        residual.addcmul_(product, alpha, value=-1)
        rs_new = torch.linalg.vecdot(residual, residual)
        beta = (rs_new / rs.clamp_min(tiny)).unsqueeze(1)
        rs = rs_new
        direction.mul_(beta).add_(residual)
        converged = rs <= threshold
    return x, converged


def _cg_solver(matrix: Tensor) -> _Solver:
    """Masked CG in mixed precision: float64 residuals, float32 CG corrections.

    Each round computes the float64 residual of every row's system (one product with the shared
    matrix) and solves for a correction with float32 CG to a relative residual of ``_INNER_TOL``
    (iterative refinement). Float32 products cost about a quarter of float64 ones, and the
    float64 residual makes the final accuracy independent of float32 rounding.
    """
    m = matrix.shape[0]
    matrix32 = matrix.float()
    inner_iters = m + 50

    def solve(q: Tensor, free: Tensor, z: Tensor, row_tol: Tensor) -> tuple[Tensor, Tensor]:
        mask = free.to(q.dtype)
        mask32 = free.float()
        x = z * mask
        q_free = q * mask
        # KKT scale: ‖q_F‖∞ plus ‖z‖∞ (from the warm start; it only sets the tolerance).
        threshold = (q_free.abs().amax(dim=1) + x.abs().amax(dim=1)).mul_(0.1 * row_tol)
        residual = torch.empty_like(q)
        converged = torch.zeros(q.shape[0], dtype=torch.bool)
        stalled = torch.zeros(q.shape[0], dtype=torch.bool)
        previous = torch.full((q.shape[0],), float("inf"), dtype=q.dtype)
        for _ in range(_REFINEMENT_ROUNDS):
            torch.mm(x, matrix, out=residual)
            residual.add_(q_free).mul_(mask).neg_()
            size = residual.abs().amax(dim=1)
            converged = size <= threshold
            # A round that does not halve the residual means float32 CG cannot handle the
            # conditioning: give up on the row (the caller then uses a direct method).
            stalled |= ~converged & (size > _STALL_RATIO * previous)
            previous = size
            finished = converged | stalled
            if bool(finished.all()):
                break
            # Unit-size right-hand sides keep float32 away from underflow (and denormals).
            # Finished rows get a zero right-hand side, hence no correction.
            size = size.clamp_min_(torch.finfo(q.dtype).tiny).unsqueeze(1)
            rhs = (residual / size).masked_fill_(finished.unsqueeze(1), 0.0).float()
            correction, inner_converged = _masked_cg(
                matrix32, rhs, torch.zeros_like(rhs), mask32, _INNER_TOL, inner_iters
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

    def solve(q: Tensor, free: Tensor, z: Tensor, row_tol: Tensor) -> tuple[Tensor, Tensor]:
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


def _polish(matrix: np.ndarray, q: np.ndarray, z: np.ndarray, tol: float) -> np.ndarray:
    """Re-solve exactly, on the free set it found, each row of an approximate solution.

    quadprog's accuracy degrades with the conditioning of ``M``; one direct solve on the free
    set it found (``z > w``) removes that error whenever the free set is right (the re-solved
    row is kept only if it satisfies the KKT conditions to ``tol``). Rows that already satisfy
    them to the default tolerance are kept as they are.
    """
    z = z.copy()
    w = z @ matrix + q
    scales = min(tol, _DEFAULT_TOL) * (np.abs(q).max(axis=1) + np.abs(z).max(axis=1))[:, None]
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


def _quadprog_rows(matrix: np.ndarray, q: np.ndarray) -> np.ndarray:
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


def normalize_gramian(gramian: Tensor, norm_eps: float) -> Tensor:
    """Divide the Gramian by its trace ``‖J‖_F²``; return zeros when the trace is below ``norm_eps``.

    The dual-cone projection is invariant to this scaling; it only makes the absolute
    regularisation ``reg_eps · I`` relative to the size of the Jacobian (Quinton & Rey 2024).
    """
    trace = gramian.diagonal().sum()
    if float(trace) < norm_eps:
        return torch.zeros_like(gramian)
    return gramian / trace


def check_non_negative_number(value: object, name: str) -> float:
    """Return ``value`` as a float, or raise ``ValueError`` unless it is a finite number ``≥ 0``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}.")
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    return float(value)


def to_pref_vector(pref_vector: object) -> Tensor | None:
    """Validate a preference vector given at construction (``None`` means uniform ``1/m``)."""
    if pref_vector is None:
        return None
    try:
        vector = torch.as_tensor(pref_vector).detach().to(device="cpu", dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(
            f"pref_vector must be a 1-D tensor or sequence of numbers, got {type(pref_vector).__name__}."
        ) from error
    if vector.dim() != 1 or vector.numel() == 0:
        raise ValueError(
            f"pref_vector must be a non-empty 1-D vector (one weight per objective), got shape "
            f"{tuple(vector.shape)}."
        )
    if not bool(torch.isfinite(vector).all()) or bool((vector < 0).any()):
        raise ValueError(f"pref_vector must be finite and >= 0, got {vector.tolist()}.")
    if not bool((vector > 0).any()):
        raise ValueError("pref_vector must have at least one positive entry (it is all zeros).")
    return vector


def resolve_pref_vector(pref_vector: Tensor | None, m: int) -> Tensor:
    """Return the float64 CPU preference vector for ``m`` objectives, checking its length."""
    if pref_vector is None:
        return torch.full((m,), 1.0 / m, dtype=torch.float64)
    if pref_vector.shape[0] != m:
        raise ValueError(
            f"pref_vector has {pref_vector.shape[0]} entries but the Jacobian has {m} rows "
            "(objectives): give one preference per objective."
        )
    return pref_vector
