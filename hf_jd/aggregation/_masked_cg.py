"""Batched (preconditioned) conjugate gradients on principal submatrices of one shared matrix.

The LCP solver (:mod:`hf_jd.aggregation._lcp`) solves, for each of ``k`` rows, a system
``M_FF x_F = b_F`` on the row's own index set ``F`` (its *mask*). :func:`masked_cg` runs conjugate
gradients on all of them at once, so that a step is one matrix-matrix product with the shared
``M``.

On ill-conditioned matrices (Gramians of per-example gradients, low-rank Jacobians) plain CG
needs many steps. :class:`SpectralPreconditioner` then approximates ``M`` by
``P = U Λ' Uᵀ + σ I``, from its ``r`` largest eigenpairs (``Λ' = Λ_r − σ``, ``σ`` the largest
eigenvalue left out). ``M − P`` is negative semi-definite with norm at most ``σ − λ_min``, and so
is ``M_FF − P_FF`` for every ``F``: the preconditioned systems have condition number at most
``σ / λ_min``, which ``r`` is chosen to keep below ``_TARGET_CONDITION``. By the Woodbury
identity,

    P_FF⁻¹ = (I − U_F C_F⁻¹ U_Fᵀ) / σ,   C_F = σ Λ'⁻¹ + U_Fᵀ U_F   (r × r),

and the ``C_F`` of all rows come from one matrix product: ``U_Fᵀ U_F = Σ_{j ∈ F} u_j u_jᵀ`` is the
mask times the ``[m, r²]`` matrix of the outer products ``u_j u_jᵀ``. This is a deflation of the
largest eigenvalues (see e.g. Saad, "Iterative Methods for Sparse Linear Systems", 2003, §9 on
preconditioned CG, and Nicolaides 1987 on deflation) restricted to each row's free set.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["masked_cg", "SpectralPreconditioner", "RestrictedPreconditioner"]

# Largest condition number of the preconditioned systems that the choice of r aims for.
_TARGET_CONDITION = 8.0
# Most eigenpairs kept (the cost of C_F grows as k m r² and k r³).
_MAX_RANK = 48
# The preconditioner is only built when some Cholesky pivot of the unit-diagonal matrix is below
# this (the squared sine of the angle between a row and the previous ones): otherwise the
# matrix is well conditioned enough for plain CG.
_PIVOT_THRESHOLD = 0.05
# A row's C_F⁻¹ is recomputed when its mask has changed in more than this many places.
_STALE_ENTRIES = 4

# Maps a residual [k, m] (zero off each row's mask) to the preconditioned residual.
Preconditioner = Callable[[Tensor], Tensor]


def masked_cg(
    matrix: Tensor,
    rhs: Tensor,
    x: Tensor,
    mask: Tensor,
    tol: Tensor | float,
    max_iters: int,
    preconditioner: Preconditioner | None = None,
) -> tuple[Tensor, Tensor]:
    """(Preconditioned) conjugate gradients on every row's masked system, all rows at once.

    Solves ``(D M D) x = rhs`` on the support of ``D = diag(mask)`` for each row (``rhs`` and
    ``x`` must vanish off it): one product with the shared ``M`` per iteration. A row stops when
    ``‖r‖₂ ≤ tol · ‖rhs‖₂``; once a quarter of the rows still iterating have stopped, they are
    dropped from the batch (when the preconditioner is ``None`` or a
    :class:`RestrictedPreconditioner`, which can be narrowed to the remaining rows). Returns ``x``
    (updated in place) and a converged flag per row.

    Parameters
    ----------
    matrix
        Symmetric positive definite ``M``, shape ``[m, m]``.
    rhs, x
        Right-hand sides and starting points, shape ``[k, m]``, zero off the mask.
    mask
        ``1`` on each row's index set, ``0`` elsewhere (same dtype as ``rhs``).
    tol
        Relative residual to reach (a number or one per row).
    max_iters
        Maximum number of iterations.
    preconditioner
        Applies ``P_FF⁻¹`` to a batch of residuals (symmetric positive definite on each mask).

    Returns
    -------
    tuple of Tensor
        ``x`` (shape ``[k, m]``) and the boolean converged flags (shape ``[k]``).
    """
    k = rhs.shape[0]
    out, converged_out = x, torch.zeros(k, dtype=torch.bool)
    rows = torch.arange(k)
    residual = torch.mm(x, matrix)
    residual.mul_(mask).neg_().add_(rhs)
    tol_sq = tol**2 if isinstance(tol, float) else tol.square()
    threshold = torch.linalg.vecdot(rhs, rhs).mul_(tol_sq)
    tiny = torch.finfo(x.dtype).tiny
    compactable = preconditioner is None or isinstance(preconditioner, RestrictedPreconditioner)
    preconditioned = residual if preconditioner is None else preconditioner(residual)
    direction = preconditioned.clone()
    rz = torch.linalg.vecdot(residual, preconditioned)
    product = torch.empty_like(direction)
    converged = torch.linalg.vecdot(residual, residual) <= threshold
    for _ in range(max_iters):
        done = int(converged.sum())
        if done == rows.numel():
            break
        if compactable and 4 * done >= rows.numel():
            # Drop the finished rows: the remaining iterations only pay for the others.
            if x is not out:
                out[rows] = x
            converged_out[rows[converged]] = True
            keep = ~converged
            rows, x, residual, direction = rows[keep], x[keep], residual[keep], direction[keep]
            mask, threshold, rz = mask[keep], threshold[keep], rz[keep]
            product = torch.empty_like(direction)
            converged = converged[keep]
            if isinstance(preconditioner, RestrictedPreconditioner):  # else None (compactable)
                preconditioner = preconditioner.subset(keep)
        torch.mm(direction, matrix, out=product)
        product.mul_(mask)
        curvature = torch.linalg.vecdot(direction, product).clamp_min_(tiny)
        alpha = (rz / curvature).unsqueeze(1)
        x.addcmul_(direction, alpha)
        residual.addcmul_(product, alpha, value=-1)
        converged = torch.linalg.vecdot(residual, residual) <= threshold
        preconditioned = residual if preconditioner is None else preconditioner(residual)
        rz_new = torch.linalg.vecdot(residual, preconditioned)
        beta = (rz_new / rz.clamp_min(tiny)).unsqueeze(1)
        rz = rz_new
        direction = torch.addcmul(preconditioned, direction, beta)
    if x is not out:
        out[rows] = x
    converged_out[rows] = converged
    return out, converged_out


class RestrictedPreconditioner:
    """``P_FF⁻¹`` of a batch of rows (see :meth:`SpectralPreconditioner.restrict`).

    Calling it on residuals ``[k, m]`` (zero off each row's mask) returns the preconditioned
    residuals; :meth:`subset` gives the same preconditioner for some of the rows.

    Parameters
    ----------
    preconditioner
        The :class:`SpectralPreconditioner` it restricts.
    inverses
        The rows' ``C_F⁻¹``, shape ``[k, r, r]``.
    built
        The masks the ``inverses`` were computed for, shape ``[k, m]``.
    mask
        The rows' current masks, shape ``[k, m]``.
    """

    def __init__(
        self, preconditioner: SpectralPreconditioner, inverses: Tensor, built: Tensor, mask: Tensor
    ) -> None:
        self._parent = preconditioner
        self._inverses = inverses
        self._built = built
        self._mask = mask
        # The stored C_F⁻¹ are those of the current masks: no need to re-mask the residual.
        self._exact = bool(torch.equal(built, mask))

    def __call__(self, residual: Tensor) -> Tensor:
        parent = self._parent
        source = residual if self._exact else residual * self._built
        projected = torch.mm(source, parent.eigenvectors).unsqueeze(2)
        correction = torch.mm(torch.bmm(self._inverses, projected).squeeze(2), parent._transposed)
        scale = 1.0 / parent.sigma
        if self._exact:
            return torch.addcmul(residual, correction, self._mask, value=-1.0).mul_(scale)
        return residual.sub(correction.mul_(self._built)).mul_(self._mask).mul_(scale)

    def subset(self, keep: Tensor) -> RestrictedPreconditioner:
        """The preconditioner of the rows selected by the boolean ``keep``.

        Parameters
        ----------
        keep
            Boolean, shape ``[k]``.

        Returns
        -------
        RestrictedPreconditioner
            The preconditioner of the kept rows.
        """
        return RestrictedPreconditioner(
            self._parent, self._inverses[keep], self._built[keep], self._mask[keep]
        )


class SpectralPreconditioner:
    """Deflation of the ``r`` largest eigenvalues of ``M``, restricted to each row's mask.

    Build it with :meth:`build` for the ``k`` rows of a problem; :meth:`restrict` returns the
    preconditioner of some of these rows for their current masks. The ``r × r`` matrices
    ``C_F⁻¹`` are kept per row and only recomputed when a row's mask has changed in more than
    ``_STALE_ENTRIES`` places since they were computed: an out-of-date ``C_{F'}`` still gives a
    valid (symmetric positive definite) preconditioner, the restriction to ``F`` of
    ``blockdiag(P_{F'F'}⁻¹, I / σ)``, only a slightly less effective one.

    Parameters
    ----------
    eigenvectors
        ``U``, the ``r`` eigenvectors kept, shape ``[m, r]`` (float32).
    shifted
        ``Λ' = Λ_r − σ > 0``, shape ``[r]``.
    sigma
        ``σ``, the largest eigenvalue left out.
    rows
        Number ``k`` of rows of the problem.
    condition
        Condition number of ``M``.
    smallest_eigenvalue
        Smallest eigenvalue of ``M`` (float32 estimate, at least ``eps₃₂`` times the largest).
    """

    def __init__(
        self,
        eigenvectors: Tensor,
        shifted: Tensor,
        sigma: float,
        rows: int,
        condition: float,
        smallest_eigenvalue: float,
    ) -> None:
        m, r = eigenvectors.shape
        self.eigenvectors = eigenvectors
        self.sigma = sigma
        self.condition = condition
        self.smallest_eigenvalue = smallest_eigenvalue
        self._transposed = eigenvectors.T.contiguous()
        self._outer = (eigenvectors.unsqueeze(2) * eigenvectors.unsqueeze(1)).reshape(m, r * r)
        self._ridge = torch.diag(sigma / shifted)
        self._inverses = torch.zeros(rows, r, r)
        self._masks = torch.zeros(rows, m)
        self._stale = torch.ones(rows, dtype=torch.bool)

    @classmethod
    def build(
        cls, matrix: Tensor, rows: int, factor: Tensor | None = None
    ) -> SpectralPreconditioner | None:
        """Return the preconditioner of a unit-diagonal ``matrix``, or ``None`` if not worth it.

        ``None`` when the matrix is well conditioned (no small Cholesky pivot), when its
        eigenvalues are within ``_TARGET_CONDITION`` of the smallest one, or when more than
        ``_MAX_RANK`` of them are far from it. ``factor``: the lower Cholesky factor of
        ``matrix`` if known (else it is computed).

        Parameters
        ----------
        matrix
            Unit-diagonal symmetric positive definite matrix, shape ``[m, m]``.
        rows
            Number ``k`` of rows of the problem (the per-row ``C_F⁻¹`` are allocated for them).
        factor
            Lower Cholesky factor of ``matrix``, or ``None``.

        Returns
        -------
        SpectralPreconditioner or None
            The preconditioner, or ``None`` as above.
        """
        info = 0
        if factor is None:
            factor, info = torch.linalg.cholesky_ex(matrix)
        if int(info) == 0 and float(factor.diagonal().square().min()) >= _PIVOT_THRESHOLD:
            return None
        eigenvalues, eigenvectors = torch.linalg.eigh(matrix.float())
        largest = float(eigenvalues[-1])
        smallest = max(float(eigenvalues[0]), torch.finfo(torch.float32).eps * largest)
        rank = int((eigenvalues > _TARGET_CONDITION * smallest).sum())
        m = matrix.shape[0]
        if rank == 0 or rank > min(_MAX_RANK, m - 1):
            return None
        sigma = float(eigenvalues[m - rank - 1])
        shifted = (eigenvalues[m - rank :] - sigma).clamp_min_(sigma * 1e-6)
        vectors = eigenvectors[:, m - rank :].contiguous()
        return cls(vectors, shifted, sigma, rows, largest / smallest, smallest)

    def restrict(self, rows: Tensor, mask: Tensor) -> RestrictedPreconditioner:
        """The preconditioner ``P_FF⁻¹`` of the given rows for their float32 masks ``[len(rows), m]``.

        Parameters
        ----------
        rows
            Indices of the rows among the ``k`` of :meth:`build`, shape ``[n]``.
        mask
            Their current masks, float32, shape ``[n, m]``.

        Returns
        -------
        RestrictedPreconditioner
            The preconditioner of these rows.
        """
        stale = self._stale[rows]
        if not bool(stale.all()):
            stale = stale | ((mask != self._masks[rows]).sum(dim=1) > _STALE_ENTRIES)
        if bool(stale.any()):
            update = rows[stale]
            self._inverses[update] = self._capacitance_inverses(mask[stale])
            self._masks[update] = mask[stale]
            self._stale[update] = False
        return RestrictedPreconditioner(self, self._inverses[rows], self._masks[rows], mask)

    def _capacitance_inverses(self, mask: Tensor) -> Tensor:
        """``C_F⁻¹ = (σ Λ'⁻¹ + U_Fᵀ U_F)⁻¹`` for each row of ``mask``."""
        k = mask.shape[0]
        r = self.eigenvectors.shape[1]
        capacitance = torch.mm(mask, self._outer).view(k, r, r).add_(self._ridge)
        factor, info = torch.linalg.cholesky_ex(capacitance)
        eye = torch.eye(r, dtype=mask.dtype).expand(k, r, r)
        inverse_factor = torch.linalg.solve_triangular(factor, eye, upper=False)
        inverse = torch.bmm(inverse_factor.transpose(1, 2), inverse_factor)
        # C_F ⪰ σ Λ'⁻¹ is positive definite; should float32 still fail to factorise it, that row
        # gets P = σ I: still a valid preconditioner.
        failed = info != 0
        if bool(failed.any()):
            inverse[failed] = 0.0
        return inverse
