"""Independent reference computations shared by the aggregation tests (primal formulations)."""

from __future__ import annotations

import numpy as np
import quadprog
import torch


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
