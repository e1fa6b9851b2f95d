"""Fixtures shared by the autogram tests."""

from __future__ import annotations

import pytest
from torch import Tensor

from hf_jd.autogram import _generic, _matmul_uses
from hf_jd.autogram import engine as engine_module


@pytest.fixture()
def taken(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """(module class, whether the products' path applied) for each generic call whose rows were computed; the path
    is tried whatever the number of rows (the tiny cases of the tests have few)."""
    monkeypatch.setattr(_matmul_uses, "FEW_ROWS", 0)
    calls: list[tuple[str, bool]] = []
    original = _generic.matmul_factors

    def counted(record, *args):  # type: ignore[no-untyped-def]
        found = original(record, *args)
        calls.append((type(record.module).__name__, found is not None))
        return found

    monkeypatch.setattr(_generic, "matmul_factors", counted)
    return calls


@pytest.fixture
def per_row_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the module calls that take the exact per-row path."""
    names: list[str] = []
    original = engine_module.grads_per_row

    def spy(losses: Tensor, layout: object, records: list, accumulator: object) -> None:
        names.extend(record.module_name for record in records)
        original(losses, layout, records, accumulator)

    monkeypatch.setattr(engine_module, "grads_per_row", spy)
    return names
