"""Packaging facts a user relies on: the version and the PEP 561 typing marker."""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path

import hf_jd


def test_version_matches_pyproject() -> None:
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, flags=re.MULTILINE)
    assert version is not None
    assert hf_jd.__version__ == version.group(1)


def test_typing_marker_is_shipped() -> None:
    """Type checkers only read the annotations of an installed package that has ``py.typed``."""
    assert importlib.resources.files("hf_jd").joinpath("py.typed").is_file()
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert 'hf_jd = ["py.typed"]' in pyproject


def test_subpackages_are_reachable_from_a_bare_import() -> None:
    """``import hf_jd`` then ``hf_jd.autojac.jac``, as the README writes them."""
    import subprocess
    import sys

    code = (
        "import hf_jd; print(hf_jd.autojac.jac.__name__, hf_jd.aggregation.UPGrad.__name__, 'JDTrainer' in dir(hf_jd))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["jac", "UPGrad", "True"]


def test_dir_lists_the_lazy_names() -> None:
    import hf_jd.aggregation

    assert {"UPGrad", "UPGradWeighting", "canonical_name"} <= set(dir(hf_jd.aggregation))
    assert {"autogram", "trainer", "JDTrainer", "__version__"} <= set(dir(hf_jd))
