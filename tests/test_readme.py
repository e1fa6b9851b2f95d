"""Every ``python`` code block of README.md is executed, in order, in one namespace.

Blocks fenced as ```` ```python ```` run; other languages (bash, text) are documentation only. This
keeps the README's examples from rotting.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _python_blocks() -> list[str]:
    return BLOCK.findall(README.read_text(encoding="utf-8"))


def test_readme_has_python_examples() -> None:
    assert len(_python_blocks()) >= 3


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for index, block in enumerate(_python_blocks()):
        try:
            exec(compile(block, f"README.md[python block {index}]", "exec"), namespace)
        except Exception as error:  # pragma: no cover - the message is what matters
            raise AssertionError(f"README python block {index} failed:\n{block}") from error
