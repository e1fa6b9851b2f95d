"""The examples in the autojac docstrings run and give the documented output."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["_jac", "_backward", "_mtl_backward", "_jac_to_grad"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(f"hf_jd.autojac.{name}")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0


def test_public_api() -> None:
    import hf_jd.autojac as autojac

    assert sorted(autojac.__all__) == ["backward", "jac", "jac_to_grad", "mtl_backward"]
    for name in autojac.__all__:
        assert callable(getattr(autojac, name))
