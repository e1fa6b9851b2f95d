"""Tests of the Gramian checks and conversions of hf_jd.aggregation._base.

``checked_gramian_array`` validates a Gramian with one fused NumPy pass and falls back to the
checks one by one when that pass fails: its verdict must be exactly the documented rule of
``check_gramian``, which ``documented_verdict`` below implements independently (PyTorch, float64,
each condition as the docstring states it).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from hf_jd.aggregation import MGDAWeighting, UPGradWeighting, check_gramian
from hf_jd.aggregation._base import checked_gramian_array, float64_array, weights_tensor

DT = torch.float64
EPS = {torch.float16: 9.765625e-04, torch.bfloat16: 7.8125e-03, torch.float32: 1.1920929e-07, torch.float64: 2.22e-16}


def documented_verdict(gramian: torch.Tensor) -> str | None:
    """The first problem ``check_gramian``'s docstring names for ``gramian``, or ``None``."""
    work = gramian.double()
    if not bool(torch.isfinite(work).all()):
        return "non-finite"
    if work.shape[0] != work.shape[1]:
        return "square"
    diagonal = work.diagonal()
    largest = float(diagonal.abs().max())
    if bool((diagonal < -1e-5 * largest).any()):
        return "negative diagonal"
    norms = diagonal.clamp_min(0).sqrt()
    bound = torch.outer(norms, norms)
    allowed = max(1e-3, 100 * EPS[gramian.dtype]) * bound + 1e-6 * largest
    if bool(((work - work.T).abs() > allowed).any()):
        return "not symmetric"
    if bool((work.abs() > bound + allowed).any()):
        return "not positive semi-definite"
    m = work.shape[0]
    tol = max(1e-3, 100 * EPS[gramian.dtype])
    if m > 2 and largest > 0 and float(torch.linalg.eigvalsh((work + work.T) / 2)[0]) < -min(0.1, m * tol) * largest:
        return "not positive semi-definite"
    return None


def verdict(gramian: torch.Tensor) -> str | None:
    try:
        checked_gramian_array(gramian)
    except ValueError as error:
        for name in ("non-finite", "square", "negative diagonal", "not symmetric", "not positive semi-definite"):
            if name in str(error):
                return name
        raise
    return None


def gramian_of(m: int, n: int, seed: int, dtype: torch.dtype = DT) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    jac = torch.randn(m, n, generator=generator, dtype=DT)
    return (jac @ jac.T).to(dtype)


def perturbed_cases() -> list[tuple[str, torch.Tensor]]:
    """Gramians on both sides of every tolerance, zero rows, non-finite entries, low precision."""
    cases: list[tuple[str, torch.Tensor]] = []
    base = gramian_of(6, 4, seed=0)  # rank 4: singular, |Gᵢⱼ| close to the bound for some pairs
    norms = base.diagonal().sqrt()
    bound = torch.outer(norms, norms)
    largest = float(base.diagonal().max())
    for factor in (0.5, 0.99, 1.01, 2.0):
        # Asymmetry at `factor` times the allowed amount, on one pair.
        skew = base.clone()
        allowed = 1e-3 * float(bound[1, 3]) + 1e-6 * largest
        skew[1, 3] += factor * allowed
        cases.append((f"asymmetry x{factor}", skew))
        # Cauchy–Schwarz excess at `factor` times the allowed amount, symmetric.
        excess = base.clone()
        allowed = 1e-3 * float(bound[2, 4]) + 1e-6 * largest
        value = (float(bound[2, 4]) + factor * allowed) * (1 if float(base[2, 4]) >= 0 else -1)
        excess[2, 4] = excess[4, 2] = value
        cases.append((f"Cauchy-Schwarz x{factor}", excess))
        # Slightly negative diagonal entry, relative to the largest one.
        negative = base.clone()
        negative[5, 5] = -factor * 1e-5 * largest
        negative[5, :5] = negative[:5, 5] = 0.0
        cases.append((f"negative diagonal x{factor}", negative))
        # |G55| ≤ 1e-6 max Gᵢᵢ passes Cauchy–Schwarz on the diagonal itself (rounding of a zero row).
        rounding = negative.clone()
        rounding[5, 5] = -factor * 1e-6 * largest
        cases.append((f"rounding-size negative diagonal x{factor}", rounding))
        # A zero row with inner products of rounding size (only the absolute tolerance allows them).
        orphan = base.clone()
        orphan[0, :] = orphan[:, 0] = 0.0
        orphan[0, 2] = orphan[2, 0] = factor * 1e-6 * float(orphan.diagonal().max())
        cases.append((f"zero row x{factor}", orphan))
    for name, position in (("nan", (0, 0)), ("nan", (1, 2)), ("inf", (3, 3)), ("-inf", (4, 1))):
        bad = base.clone()
        bad[position] = float(name)
        cases.append((f"{name} at {position}", bad))
    cases.append(("non-square", torch.ones(3, 4, dtype=DT)))
    nan_rectangle = torch.ones(3, 4, dtype=DT)
    nan_rectangle[0, 0] = float("nan")
    cases.append(("non-square with nan", nan_rectangle))  # non-finite is reported first
    cases.append(("zero", torch.zeros(4, 4, dtype=DT)))
    cases.append(("one by one", torch.tensor([[2.0]], dtype=DT)))
    cases.append(("one by one negative", torch.tensor([[-2.0]], dtype=DT)))
    cases.append(("huge", base * 1e300))  # beyond the fused pass's range: checked one by one
    huge_skew = base * (1.5e308 / float(base.abs().max()))
    huge_skew[0, 1] = -huge_skew[0, 1]  # |G01 − G10| overflows float64
    cases.append(("huge asymmetric", huge_skew))
    cases.append(("tiny", base * 1e-300))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        low = gramian_of(5, 40, seed=1, dtype=dtype)
        cases.append((f"{dtype} rounded", low))
        skewed = low.clone()
        skewed[0, 1] = skewed[0, 1] * 1.6 + 0.2 * float(low.diagonal().max())
        cases.append((f"{dtype} skewed", skewed))
    return cases


@pytest.mark.parametrize(("name", "gramian"), perturbed_cases(), ids=[name for name, _ in perturbed_cases()])
def test_verdict_is_the_documented_rule(name: str, gramian: torch.Tensor) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from inf or huge entries either
        assert verdict(gramian) == documented_verdict(gramian)


def test_the_cases_exercise_every_verdict() -> None:
    """Guards the test above: each outcome occurs (else a broken case generator could hide bugs)."""
    verdicts = {documented_verdict(gramian) for _, gramian in perturbed_cases()}
    expected = {None, "non-finite", "square", "negative diagonal", "not symmetric", "not positive semi-definite"}
    assert verdicts == expected


def test_random_gramians_and_random_corruptions_agree_with_the_rule() -> None:
    generator = torch.Generator().manual_seed(5)
    for trial in range(200):
        m = int(torch.randint(1, 9, (1,), generator=generator))
        gramian = gramian_of(m, int(torch.randint(1, 12, (1,), generator=generator)), seed=trial)
        if trial % 2:  # corrupt one entry by a random relative amount around the tolerance
            i, j = (int(x) for x in torch.randint(0, m, (2,), generator=generator))
            gramian[i, j] *= 1 + float(10 ** (-4 + 3 * torch.rand(1, generator=generator)))
        assert verdict(gramian) == documented_verdict(gramian), trial


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_checked_array_is_a_float64_copy(dtype: torch.dtype) -> None:
    gramian = gramian_of(5, 7, seed=2).to(dtype)
    array = checked_gramian_array(gramian)
    assert array.dtype == np.float64 and array.flags.c_contiguous and array.flags.writeable
    np.testing.assert_array_equal(array, gramian.double().numpy())
    array[:] = 0.0  # owned by the caller: the tensor is untouched
    assert bool((gramian.double() == gramian_of(5, 7, seed=2).to(dtype).double()).all())


def test_float64_array_of_transposed_and_grad_tensors() -> None:
    gramian = gramian_of(4, 6, seed=3).requires_grad_()
    transposed = gramian.T  # not contiguous, and part of an autograd graph
    array = float64_array(transposed)
    assert array.flags.c_contiguous
    np.testing.assert_array_equal(array, transposed.detach().numpy())
    check_gramian(transposed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_weights_tensor_takes_the_dtype_of_the_gramian(dtype: torch.dtype) -> None:
    weights = np.array([0.25, 0.75, 1.0 / 3.0])
    result = weights_tensor(weights, torch.zeros(3, 3, dtype=dtype))
    assert result.dtype == dtype and result.device.type == "cpu"
    torch.testing.assert_close(result, torch.from_numpy(weights).to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        ([[1.0, 0.0], [0.0, 1.0]], TypeError, "must be a torch.Tensor"),
        (torch.ones(2, 2, 2), ValueError, "must be 2-D"),
        (torch.ones(0, 0), ValueError, "is empty"),
        (torch.ones(2, 2, dtype=torch.long), ValueError, "floating dtype"),
        (torch.ones(2, 3), ValueError, "must be square"),
        (torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), ValueError, "non-finite"),
    ],
)
@pytest.mark.parametrize("weighting", [UPGradWeighting(), MGDAWeighting()], ids=["upgrad", "mgda"])
def test_layout_errors_name_the_problem(bad: object, error: type, match: str, weighting: object) -> None:
    with pytest.raises(error, match=match):
        check_gramian(bad)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        weighting(bad)  # type: ignore[operator]


@pytest.mark.parametrize("weighting", [UPGradWeighting(), MGDAWeighting()], ids=["upgrad", "mgda"])
def test_compute_without_validation_equals_the_call_and_leaves_the_input_alone(weighting: object) -> None:
    gramian = gramian_of(6, 9, seed=4)
    original = gramian.clone()
    called = weighting(gramian)  # type: ignore[operator]
    computed = weighting.compute(gramian)  # type: ignore[attr-defined]
    torch.testing.assert_close(computed, called, rtol=0, atol=0)
    assert torch.equal(gramian, original)
    assert called.dtype == DT


@pytest.mark.parametrize("name", ["upgrad", "dualproj", "pcgrad", "config", "nash_mtl", "fairgrad"])
def test_float16_jacobian_whose_weights_exceed_its_range(name: str) -> None:
    """Weights beyond float16's range (a row 10⁵ times smaller than another; Nash-MTL's and FairGrad's ``1 / |g_i|``)
    whose products with the rows fit it: the update is the float32 Jacobian's, rounded, not inf or NaN."""
    from hf_jd.aggregation import get_aggregator

    if name in ("nash_mtl", "fairgrad"):
        matrix = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)) * 1e-6
    else:
        matrix = torch.tensor([[10.0, 0.0, 0.0, 0.0], [-3e-5, 3e-5, 0.0, 0.0]])
    half = matrix.half()
    update = get_aggregator(name)(half)
    expected = get_aggregator(name)(half.float())
    assert update.dtype == torch.float16
    torch.testing.assert_close(update.float(), expected, rtol=2e-3, atol=1e-3 * float(expected.abs().max()))
    weights = get_aggregator(name).weights(half)
    assert weights.dtype == torch.float32 and bool(torch.isfinite(weights).all())


def test_float16_update_that_overflows_is_an_error() -> None:
    from hf_jd.aggregation import Sum

    with pytest.raises(ValueError, match="does not fit torch.float16"):
        Sum()(torch.full((2, 3), 60000.0, dtype=torch.float16))


@pytest.mark.parametrize("name", ["upgrad", "mgda", "pcgrad", "imtl_g", "nash_mtl", "krum"])
def test_a_symmetric_matrix_with_a_negative_eigenvalue_is_not_a_gramian(name: str) -> None:
    """For m ≥ 3 the diagonal's sign, symmetry and Cauchy–Schwarz do not make a Gramian: this matrix passes them
    with an eigenvalue of -0.8 (the weightings returned weights silently, UPGrad's with wᵀGw = -1.85)."""
    from hf_jd.aggregation import get_weighting

    matrix = torch.tensor([[1.0, -0.9, -0.9], [-0.9, 1.0, -0.9], [-0.9, -0.9, 1.0]], dtype=torch.float64)
    kwargs = {"n_byzantine": 0} if name == "krum" else {}
    with pytest.raises(ValueError, match="not positive semi-definite: its smallest eigenvalue is -0.8"):
        get_weighting(name, **kwargs)(matrix)
    with pytest.raises(ValueError, match="smallest eigenvalue"):
        check_gramian(matrix)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [3, 16, 64])
def test_rank_deficient_gramians_with_rounding_pass(dtype: torch.dtype, m: int) -> None:
    """Gramians of Jacobians of rank below m (duplicated and scaled rows), computed in float32 or float64: their
    smallest eigenvalues are rounding, of either sign, and they pass."""
    generator = torch.Generator().manual_seed(m)
    rows = torch.randn(m // 2 + 1, 3000, generator=generator, dtype=dtype)
    jacobian = torch.cat([rows, 3 * rows[: m - rows.shape[0]]])
    check_gramian(jacobian @ jacobian.T)


def test_a_one_dimensional_gramian_gets_the_gramian_message() -> None:
    with pytest.raises(ValueError, match=r"The Gramian must be 2-D \(shape \[m, m\]"):
        check_gramian(torch.ones(3))


def test_a_float32_row_whose_squared_norm_underflows_is_not_a_zero_row() -> None:
    """A row 1e-25 times smaller than another: its squared norm underflows float32, so the Gramian is computed in
    float64 (it was taken for a zero row, and UPGrad's and MGDA's updates conflicted with it, cosine -0.71)."""
    from hf_jd.aggregation import MGDA, UPGrad
    from hf_jd.aggregation._base import compute_gramian

    jacobian = torch.tensor([[1.0, 0.0], [-1e-25, 1e-25]])
    gramian = compute_gramian(jacobian)
    assert gramian.dtype == torch.float64 and float(gramian[1, 1]) > 0
    row = jacobian.double()[1]
    for aggregator in (UPGrad(), MGDA()):
        update = aggregator(jacobian).double()
        assert float(row @ update) / float(row.norm() * update.norm()) >= -1e-3  # (rounding of the float32 update)
