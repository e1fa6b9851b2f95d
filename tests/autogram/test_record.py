"""``reproduces_output``: the check of a closed form's recomputation of a call's output."""

from __future__ import annotations

import pytest
import torch

from hf_jd.autogram._record import reproduces_output


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("relative_error", [0.0, 1e-13, 1e-11, 1e-9, 3e-5, 9e-5, 2e-4, 1e-2])
def test_agrees_with_allclose(dtype: torch.dtype, relative_error: float) -> None:
    generator = torch.Generator().manual_seed(0)
    output = torch.randn(4, 6, 8, generator=generator, dtype=torch.float64).to(dtype)
    noise = torch.randn(output.shape, generator=generator, dtype=torch.float64)
    expected = (output.double() * (1 + relative_error * noise)).to(dtype)
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (1e-4, 1e-5)
    assert reproduces_output(expected, output) == torch.allclose(expected, output, rtol=rtol, atol=atol)


def test_entrywise_tolerance() -> None:
    # One small entry off by far more than its own tolerance, though little beside the largest entry: rejected.
    output = torch.tensor([1000.0, 1e-3, 2.0])
    expected = output.clone()
    expected[1] = 2e-3
    assert not reproduces_output(expected, output)
    expected[1] = 1e-3 + 5e-6  # within atol
    assert reproduces_output(expected, output)


def test_shapes_and_special_values() -> None:
    output = torch.ones(3, 2)
    assert not reproduces_output(torch.ones(2, 3), output)
    assert reproduces_output(torch.ones(0, 2), torch.ones(0, 2))
    with_nan = output.clone()
    with_nan[1, 1] = float("nan")
    assert not reproduces_output(with_nan, output)
    assert not reproduces_output(with_nan, with_nan)  # (NaN is never taken for a match)
    assert reproduces_output(output.double(), output)  # (compared in the output's dtype)


def test_does_not_modify_its_arguments() -> None:
    output = torch.randn(5, 7, requires_grad=True) * 1
    expected = output.detach() * (1 + 1e-6)
    before = output.detach().clone(), expected.clone()
    assert reproduces_output(expected, output)
    assert torch.equal(output.detach(), before[0]) and torch.equal(expected, before[1])
