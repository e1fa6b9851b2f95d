"""Independent reference computations shared by the aggregation tests (primal formulations)."""

from __future__ import annotations

import itertools

import numpy as np
import quadprog
import torch
from scipy.optimize import nnls

DT = torch.float64


def project_onto_dual_cone_primal(jacobian: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """argmin_x ‖x − vector‖² subject to J x ≥ 0, solved in the primal (n-dimensional) space."""
    jac = jacobian.double().numpy()
    n = jac.shape[1]
    x = quadprog.solve_qp(np.eye(n), vector.double().numpy(), jac.T, np.zeros(jac.shape[0]))[0]
    return torch.from_numpy(x)


def upgrad_primal(jacobian: torch.Tensor, pref: torch.Tensor | None = None) -> torch.Tensor:
    """Σᵢ pᵢ π_J(gᵢ) with each projection computed in the primal."""
    m = jacobian.shape[0]
    weights = torch.full((m,), 1.0 / m, dtype=torch.float64) if pref is None else pref.double()
    projections = torch.stack([project_onto_dual_cone_primal(jacobian, row) for row in jacobian])
    return weights @ projections


N_ROWS = 5
"""Number of rows of the Jacobians used by the registry-wide tests."""

CONSTRUCTOR_DEFAULTS: dict[str, dict] = {
    "constant": {"weights": [0.1, 0.2, 0.3, 0.2, 0.2]},
    "krum": {"n_byzantine": 1},
    "trimmed_mean": {"trim_number": 1},
}
"""Constructor arguments for the registered aggregators that have required parameters."""


def brute_force(gramian: np.ndarray, u: np.ndarray) -> np.ndarray:
    """argmin_{v ≥ u} vᵀGv by enumerating every free set (exact for small m, G positive definite)."""
    m = len(u)
    q = gramian @ u
    best = None
    for size in range(m + 1):
        for free in itertools.combinations(range(m), size):
            z = np.zeros(m)
            if free:
                idx = list(free)
                z[idx] = np.linalg.solve(gramian[np.ix_(idx, idx)], -q[idx])
            w = gramian @ z + q
            scale = 1e-9 * (np.abs(q).max() + np.abs(z).max() + 1e-300)
            if (z >= -scale).all() and (w >= -scale).all():
                candidate = u + np.clip(z, 0, None)
                if best is None or candidate @ gramian @ candidate < best @ gramian @ best - 1e-14:
                    best = candidate
    assert best is not None
    return best


def scipy_nnls(gramian: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Same problem as NNLS: with G = L Lᵀ, minimise ‖Lᵀ z + Lᵀ u‖ over z ≥ 0 (SciPy)."""
    lower = np.linalg.cholesky(gramian)
    z, _ = nnls(lower.T, -lower.T @ u, maxiter=50 * len(u))
    return u + z


def quadprog_reference(gramian: np.ndarray, u: np.ndarray) -> np.ndarray:
    m = len(u)
    return quadprog.solve_qp(gramian, np.zeros(m), np.eye(m), u)[0]


def random_gramian(m: int, n: int, shift: float = 0.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    jac = torch.randn(m, n, generator=generator, dtype=DT)
    jac += shift * torch.randn(n, generator=generator, dtype=DT)
    gram = jac @ jac.T
    return gram / gram.trace()


def assert_kkt(gramian: torch.Tensor, targets: torch.Tensor, result: torch.Tensor, tol: float = 1e-8) -> None:
    """v ≥ u, G v ≥ 0 and (v − u)ᵢ (G v)ᵢ = 0, relative to the problem's scale."""
    w = result @ gramian  # rows: (G v)ᵀ since G is symmetric
    z = result - targets
    scale = (targets.abs() @ gramian.abs()).amax(dim=1, keepdim=True) + result.abs().amax(dim=1, keepdim=True)
    assert bool((z >= -tol * scale).all()), "v >= u is violated"
    assert bool((w >= -tol * scale).all()), "G v >= 0 is violated"
    assert bool(((z.abs() * w.abs()) <= tol * scale**2).all()), "complementarity is violated"


def masked_solutions(matrix: torch.Tensor, rhs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Row ``r``: the solution of ``matrix`` restricted to ``masks[r]`` (zero elsewhere), by a dense solve."""
    out = torch.zeros_like(rhs)
    for row, mask in enumerate(masks):
        index = torch.nonzero(mask).flatten()
        out[row, index] = torch.linalg.solve(matrix[index][:, index], rhs[row, index])
    return out
