"""Tests of ConFIG: equal positive cosines with every row and the paper's rescaling."""

import pytest
import torch

from hf_jd.aggregation import ConFIG, ConFIGWeighting, get_weighting, is_gramian_based


def _cosines(matrix: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    return matrix @ update / (matrix.norm(dim=1) * update.norm())


@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_equal_positive_cosines(m: int) -> None:
    matrix = (
        torch.randn(m, 20, dtype=torch.float64)
        * torch.logspace(-2, 2, m, dtype=torch.float64)[:, None]
    )
    if m > 1:  # a strongly conflicting first row
        matrix[0] = 0.2 * matrix[0] - matrix[1:].sum(dim=0)
    cosines = _cosines(matrix, ConFIG()(matrix))
    assert (cosines > 0).all()
    torch.testing.assert_close(cosines, cosines[0].expand(m))


def test_matches_paper_formula() -> None:
    """g_v = Uᵀ(UUᵀ)⁻¹w (min-norm solution of U x = w), g_u = g_v/|g_v|, scaled by Σ g_iᵀg_u."""
    matrix = torch.randn(3, 7, dtype=torch.float64)
    units = matrix / matrix.norm(dim=1, keepdim=True)
    preference = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    direction = units.T @ torch.linalg.solve(units @ units.T, preference)
    unit = direction / direction.norm()
    expected = (matrix @ unit).sum() * unit
    torch.testing.assert_close(ConFIG(pref_vector=preference)(matrix), expected)


def test_preference_sets_cosine_ratios() -> None:
    matrix = torch.randn(3, 9, dtype=torch.float64)
    preference = torch.tensor([1.0, 2.0, 3.0])
    cosines = _cosines(matrix, ConFIG(pref_vector=preference)(matrix))
    torch.testing.assert_close(cosines / cosines[0], preference.double())


def test_invariant_to_preference_scale() -> None:
    matrix = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(ConFIG(pref_vector=[2.0, 2.0, 2.0])(matrix), ConFIG()(matrix))


def test_non_conflicting_orthogonal_rows() -> None:
    matrix = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    unit = torch.tensor([1.0, 1.0], dtype=torch.float64) / 2**0.5
    torch.testing.assert_close(ConFIG()(matrix), (3.0 / 2**0.5) * unit)


def test_opposite_rows_give_zero() -> None:
    matrix = torch.tensor([[1.0, 2.0], [-2.0, -4.0]], dtype=torch.float64)
    torch.testing.assert_close(ConFIG()(matrix), torch.zeros(2, dtype=torch.float64))


def test_zero_rows() -> None:
    matrix = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert torch.isfinite(ConFIG()(matrix)).all()
    torch.testing.assert_close(ConFIG()(torch.zeros(2, 3)), torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_shape(dtype: torch.dtype) -> None:
    matrix = torch.randn(4, 10, dtype=dtype)
    update = ConFIG()(matrix)
    assert update.dtype == dtype and update.shape == (10,)
    torch.testing.assert_close(update.double(), ConFIG()(matrix.double()), rtol=1e-4, atol=1e-4)


def _pinv_formula(matrix: torch.Tensor, preference: torch.Tensor) -> torch.Tensor:
    """The paper's update from the Jacobian itself: g_v = U⁺w by least squares on the unit rows."""
    units = matrix / matrix.norm(dim=1, keepdim=True)
    direction = torch.linalg.lstsq(units, preference[:, None].to(matrix.dtype), driver="gelsd").solution[:, 0]
    unit = direction / direction.norm()
    return (matrix @ unit).sum() * unit


def test_gramian_based_weighting_matches_the_jacobian_formula() -> None:
    """The weights come from G = J Jᵀ alone: βᵀJ equals the update computed from U⁺ on J, also when the
    rows are linearly dependent (m > n) and for an orthogonal change of the columns (J Q)."""
    assert is_gramian_based("config")
    assert isinstance(get_weighting("config"), ConFIGWeighting)
    generator = torch.Generator().manual_seed(0)
    for m, n in [(3, 7), (5, 3), (6, 40)]:
        matrix = torch.randn(m, n, generator=generator, dtype=torch.float64)
        preference = torch.rand(m, generator=generator, dtype=torch.float64) + 0.5
        aggregator = ConFIG(pref_vector=preference)
        weights = aggregator.weighting(matrix @ matrix.T)
        torch.testing.assert_close(weights @ matrix, _pinv_formula(matrix, preference))
        torch.testing.assert_close(aggregator(matrix), weights @ matrix)
        rotation = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))[0]
        torch.testing.assert_close(aggregator(matrix @ rotation), aggregator(matrix) @ rotation)


def test_float32_with_many_columns_keeps_every_direction() -> None:
    """A float32 Jacobian with many columns is as accurate as in float64 (torch.linalg.pinv on the [m, n] unit
    rows would have cut every singular value below max(m, n)·eps ≈ 12% of the largest at n = 1e6)."""
    generator = torch.Generator().manual_seed(1)
    matrix = torch.randn(4, 1_000_000, generator=generator)
    matrix[0] = 0.1 * matrix[0] + matrix[1]  # cosine ~0.995 with row 1: a singular value of U ~7% of the largest
    update = ConFIG()(matrix)
    cosines = _cosines(matrix.double(), update.double())
    assert float((cosines.max() - cosines.min()) / cosines.mean()) < 1e-5  # pinv on U: 2.4e-4


def test_weighting_repr_and_wrong_preference_length() -> None:
    assert repr(ConFIGWeighting([1.0, 2.0])) == "ConFIGWeighting(pref_vector=[1.0, 2.0])"
    with pytest.raises(ValueError, match="pref_vector has 2 entries"):
        ConFIGWeighting(pref_vector=[1.0, 1.0])(torch.eye(3))


def test_wrong_preference_length() -> None:
    with pytest.raises(ValueError, match="pref_vector has 2 entries"):
        ConFIG(pref_vector=[1.0, 1.0])(torch.randn(3, 4))


@pytest.mark.parametrize(
    ("pref_vector", "error"),
    [([[1.0]], ValueError), ([float("inf")], ValueError), (object(), TypeError)],
)
def test_bad_preference(pref_vector: object, error: type) -> None:
    with pytest.raises(error, match="pref_vector"):
        ConFIG(pref_vector=pref_vector)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        ConFIG()(torch.tensor([[float("inf"), 1.0]]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_computed_in_float32(dtype: torch.dtype) -> None:
    """torch.linalg.pinv has no bf16/fp16 kernel: the update is computed in float32 and cast back."""
    jac = torch.randn(3, 5)
    update = ConFIG()(jac.to(dtype))
    assert update.dtype == dtype
    torch.testing.assert_close(update.float(), ConFIG()(jac.to(dtype).float()), rtol=1e-2, atol=1e-2)
