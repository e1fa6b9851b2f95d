"""``row_products``: the split of the inner dimension gives the plain product."""

from __future__ import annotations

import pytest
import torch

from hf_jd.autogram._products import SPLIT_SLICE, row_products


@pytest.mark.parametrize("inner", [1, 3, 2 * SPLIT_SLICE, 2 * SPLIT_SLICE + 5, 5 * SPLIT_SLICE - 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_split_equals_plain_product(inner: int, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(inner)
    rows = torch.randn(5, inner, generator=generator, dtype=dtype)
    other = torch.randn(5, inner, generator=generator, dtype=dtype)
    expected = rows.double() @ other.double().T
    # float32 rounding of sums of `inner` products of unit normals: absolute error ~ eps * inner.
    tolerance = {"rtol": 1e-5, "atol": 1e-6 * inner} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-10}
    for split in (True, False, None):
        torch.testing.assert_close(row_products(rows, other, split=split).double(), expected, **tolerance)
    gram = row_products(rows, split=True)
    torch.testing.assert_close(gram.double(), rows.double() @ rows.double().T, **tolerance)
    assert gram.dtype == dtype and gram.shape == (5, 5)


def test_split_with_non_contiguous_rows() -> None:
    rows = torch.randn(3 * SPLIT_SLICE, 4).T  # [4, n], column-major
    torch.testing.assert_close(row_products(rows, split=True), rows @ rows.T, rtol=1e-5, atol=1e-3)


def test_default_keeps_the_plain_product_on_cpu() -> None:
    rows = torch.randn(2, 4 * SPLIT_SLICE)
    assert torch.equal(row_products(rows), rows @ rows.T)
