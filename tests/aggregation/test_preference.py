"""Tests of the validation of per-objective vectors (hf_jd.aggregation._preference)."""

from __future__ import annotations

import pytest
import torch

from hf_jd.aggregation._preference import check_pref_vector, check_vector, resolve_pref_vector


@pytest.mark.parametrize("value", [[1, 2, 3], (0.5, 1.5), torch.tensor([1.0, 2.0], dtype=torch.float32)])
def test_check_vector_converts_to_float64_copy(value: object) -> None:
    vector = check_vector(value, "weights")
    assert vector.dtype == torch.float64 and vector.device.type == "cpu"
    torch.testing.assert_close(vector, torch.as_tensor(value, dtype=torch.float64))
    if isinstance(value, torch.Tensor):
        vector[0] = 100.0
        assert float(value[0]) != 100.0, "the caller's tensor must not be aliased"


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ("abc", TypeError, "leak must be a 1-D tensor"),
        (object(), TypeError, "leak must be a 1-D tensor"),
        ([[1.0, 2.0]], ValueError, "non-empty 1-D"),
        ([], ValueError, "non-empty 1-D"),
        ([1.0, float("nan")], ValueError, "finite"),
    ],
)
def test_check_vector_errors_name_the_parameter(value: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        check_vector(value, "leak")


def test_check_pref_vector_signs() -> None:
    assert check_pref_vector(None) is None
    torch.testing.assert_close(check_pref_vector([-1.0, 2.0]), torch.tensor([-1.0, 2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=">= 0"):
        check_pref_vector([-1.0, 2.0], non_negative=True)
    with pytest.raises(ValueError, match="positive"):
        check_pref_vector([0.0, 0.0], non_negative=True)


def test_resolve_pref_vector() -> None:
    torch.testing.assert_close(resolve_pref_vector(None, 4, 0.25), torch.full((4,), 0.25, dtype=torch.float64))
    pref = torch.tensor([1.0, 3.0], dtype=torch.float64)
    resolved = resolve_pref_vector(pref, 2, 0.5)
    torch.testing.assert_close(resolved, pref)
    resolved[0] = 7.0
    assert float(pref[0]) == 1.0
    with pytest.raises(ValueError, match="pref_vector has 2 entries but the Jacobian has 3 rows"):
        resolve_pref_vector(pref, 3, 1.0)


def test_python_numbers_are_not_rounded_through_float32() -> None:
    assert check_vector([0.1, 0.9], "weights").tolist() == [0.1, 0.9]
