"""Tests of Aligned-MTL against the SVD of the Jacobian."""

import pytest
import torch

from hf_jd.aggregation import AlignedMTL, AlignedMTLWeighting


def _svd_weights(matrix: torch.Tensor, preference: torch.Tensor) -> torch.Tensor:
    """B w with B = σ_min U Σ⁻¹ Uᵀ from the SVD J = U Σ Vᵀ (non-zero singular values only)."""
    left, singular, _ = torch.linalg.svd(matrix, full_matrices=False)
    keep = singular > 1e-10 * singular.max()
    left, singular = left[:, keep], singular[keep]
    balance = singular.min() * left @ torch.diag(1 / singular) @ left.T
    return balance @ preference


@pytest.mark.parametrize("m", [2, 3, 5])
def test_matches_svd_of_jacobian(m: int) -> None:
    matrix = (
        torch.randn(m, 15, dtype=torch.float64)
        * torch.logspace(0, 1, m, dtype=torch.float64)[:, None]
    )
    weights = AlignedMTLWeighting()(matrix @ matrix.T)
    torch.testing.assert_close(
        weights, _svd_weights(matrix, torch.full((m,), 1 / m, dtype=torch.float64))
    )


def test_aligned_gradients_are_perfectly_conditioned() -> None:
    matrix = torch.randn(4, 10, dtype=torch.float64)
    gramian = matrix @ matrix.T
    # The weights are linear in the preference: their columns for e_i form B.
    balance = torch.stack(
        [
            AlignedMTLWeighting(pref_vector=torch.eye(4, dtype=torch.float64)[i])(gramian)
            for i in range(4)
        ],
        dim=1,
    )
    singular = torch.linalg.svdvals(balance @ matrix)
    torch.testing.assert_close(singular, singular.min().expand(4))
    assert singular.min().item() == pytest.approx(torch.linalg.svdvals(matrix).min().item())


def test_rank_deficient_alignment() -> None:
    base = torch.randn(2, 8, dtype=torch.float64)
    matrix = torch.cat([base, base.sum(dim=0, keepdim=True)])
    preference = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    weights = AlignedMTLWeighting(pref_vector=preference)(matrix @ matrix.T)
    torch.testing.assert_close(weights, _svd_weights(matrix, preference))
    assert torch.isfinite(weights).all()


def test_orthogonal_rows_with_equal_norms_give_mean() -> None:
    matrix = 3.0 * torch.eye(3, 5, dtype=torch.float64)
    torch.testing.assert_close(AlignedMTL()(matrix), matrix.mean(dim=0))


def test_preference_is_linear() -> None:
    matrix = torch.randn(3, 6, dtype=torch.float64)
    gramian = matrix @ matrix.T
    a, b = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.5, 1.0, 0.0])
    combined = AlignedMTLWeighting(pref_vector=a + 2 * b)(gramian)
    separate = AlignedMTLWeighting(pref_vector=a)(gramian) + 2 * AlignedMTLWeighting(pref_vector=b)(
        gramian
    )
    torch.testing.assert_close(combined, separate)


def test_zero_matrix_gives_zero() -> None:
    torch.testing.assert_close(AlignedMTL()(torch.zeros(3, 4)), torch.zeros(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_shape(dtype: torch.dtype) -> None:
    matrix = torch.randn(3, 8, dtype=dtype)
    update = AlignedMTL(pref_vector=[1.0, 2.0, 3.0])(matrix)
    assert update.dtype == dtype and update.shape == (8,)


def test_wrong_preference_length() -> None:
    with pytest.raises(ValueError, match="pref_vector has 2 entries"):
        AlignedMTL(pref_vector=[1.0, 2.0])(torch.randn(3, 4))


@pytest.mark.parametrize(
    ("pref_vector", "error"),
    [
        ([[1.0, 2.0]], ValueError),
        ([], ValueError),
        ([1.0, float("nan")], ValueError),
        ("ab", TypeError),
    ],
)
def test_bad_preference(pref_vector: object, error: type) -> None:
    with pytest.raises(error, match="pref_vector"):
        AlignedMTL(pref_vector=pref_vector)


def test_repr() -> None:
    assert repr(AlignedMTL([1.0, 2.0])) == "AlignedMTL(AlignedMTLWeighting(pref_vector=[1.0, 2.0]))"


def test_negative_diagonal_is_not_a_gramian() -> None:
    with pytest.raises(ValueError, match="negative diagonal"):
        AlignedMTLWeighting()(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))


def test_indefinite_symmetric_matrix_is_not_a_gramian() -> None:
    """A symmetric matrix that passes the cheap checks (non-negative diagonal, Cauchy–Schwarz) but has an eigenvalue far
    below zero is no Gramian: a clear error, not NumPy's reduction error from an empty set of kept directions."""
    matrix = torch.full((3, 3), -0.9, dtype=torch.float64).fill_diagonal_(1.0)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        AlignedMTLWeighting()(matrix)
