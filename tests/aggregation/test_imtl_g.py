"""Tests of IMTL-G: equal projections on the unit gradients and the paper's closed form."""

import pytest
import torch

from hf_jd.aggregation import IMTLG, IMTLGWeighting


def _projections(matrix: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    return matrix @ update / matrix.norm(dim=1)


def _paper_closed_form(matrix: torch.Tensor) -> torch.Tensor:
    """α_{2:m} = g_1 Uᵀ (D Uᵀ)^{-1}, α_1 = 1 - Σ α_{2:m} (Liu et al., 2021)."""
    units = matrix / matrix.norm(dim=1, keepdim=True)
    differences = matrix[0] - matrix[1:]
    unit_differences = units[0] - units[1:]
    tail = matrix[0] @ unit_differences.T @ torch.linalg.inv(differences @ unit_differences.T)
    return torch.cat([(1 - tail.sum()).unsqueeze(0), tail])


@pytest.mark.parametrize("m", [2, 3, 4, 6])
def test_equal_projections_and_weights_sum_to_one(m: int) -> None:
    matrix = (
        torch.randn(m, 20, dtype=torch.float64)
        * torch.logspace(0, 2, m, dtype=torch.float64)[:, None]
    )
    weights = IMTLGWeighting()(matrix @ matrix.T)
    projections = _projections(matrix, weights @ matrix)
    torch.testing.assert_close(projections, projections[0].expand(m))
    assert weights.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("m", [2, 3, 5])
def test_matches_paper_closed_form(m: int) -> None:
    matrix = torch.randn(m, 12, dtype=torch.float64)
    torch.testing.assert_close(IMTLGWeighting()(matrix @ matrix.T), _paper_closed_form(matrix))


def test_direction_invariant_to_row_scaling() -> None:
    matrix = torch.randn(3, 10, dtype=torch.float64)
    scaled = matrix * torch.tensor([[10.0], [0.1], [3.0]], dtype=torch.float64)
    first, second = IMTLG()(matrix), IMTLG()(scaled)
    cosine = first @ second / (first.norm() * second.norm())
    assert cosine.item() == pytest.approx(1.0, abs=1e-10)


def test_duplicated_row_rank_deficient() -> None:
    base = torch.randn(3, 10, dtype=torch.float64)
    matrix = torch.cat([base, base[1:2]])
    weights = IMTLGWeighting()(matrix @ matrix.T)
    assert torch.isfinite(weights).all()
    assert weights.sum().item() == pytest.approx(1.0)
    assert weights[1].item() == pytest.approx(weights[3].item())
    projections = _projections(matrix, weights @ matrix)
    torch.testing.assert_close(projections, projections[0].expand(4))
    # Same update as without the duplicate.
    torch.testing.assert_close(weights @ matrix, IMTLG()(base))


def test_more_rows_than_dimensions_is_finite() -> None:
    matrix = torch.randn(5, 3, dtype=torch.float64)
    assert torch.isfinite(IMTLG()(matrix)).all()


def test_zero_row_gets_zero_weight() -> None:
    base = torch.randn(2, 6, dtype=torch.float64)
    matrix = torch.stack([base[0], torch.zeros(6, dtype=torch.float64), base[1]])
    weights = IMTLGWeighting()(matrix @ matrix.T)
    assert weights[1].item() == 0.0
    torch.testing.assert_close(weights[[0, 2]], IMTLGWeighting()(base @ base.T))


def test_all_zero_rows_give_zero_weights() -> None:
    torch.testing.assert_close(IMTLGWeighting()(torch.zeros(3, 3)), torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_shape(dtype: torch.dtype) -> None:
    matrix = torch.randn(4, 9, dtype=dtype)
    update = IMTLG()(matrix)
    assert update.dtype == dtype and update.shape == (9,)
    torch.testing.assert_close(update.double(), IMTLG()(matrix.double()), rtol=1e-3, atol=1e-4)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="square"):
        IMTLGWeighting()(torch.ones(2, 3))
    with pytest.raises(ValueError, match="floating"):
        IMTLG()(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError):
        IMTLG(1.0)  # type: ignore[call-arg]


def test_negative_diagonal_is_not_a_gramian() -> None:
    with pytest.raises(ValueError, match="negative diagonal"):
        IMTLGWeighting()(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))


def test_equal_projections_with_norms_differing_by_1e6() -> None:
    matrix = torch.randn(4, 12, dtype=torch.float64)
    matrix *= torch.tensor([[1e-3], [1.0], [1e3], [10.0]], dtype=torch.float64)
    update = IMTLG()(matrix)
    projections = _projections(matrix, update)
    torch.testing.assert_close(projections, projections[0].expand(4), rtol=1e-9, atol=0)
