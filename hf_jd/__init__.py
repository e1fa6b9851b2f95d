"""hf_jd: Jacobian descent for the Hugging Face Trainer.

Sub-packages, in order of dependency: :mod:`hf_jd.aggregation`, :mod:`hf_jd.autojac`,
:mod:`hf_jd.autogram` and :mod:`hf_jd.trainer`. The Trainer classes are importable from the top
level (``from hf_jd import JDTrainer, JDTrainingArguments``); they are loaded on first use so that
``import hf_jd`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_TRAINER_NAMES = {"JDTrainer", "JDTrainingArguments", "MultiHeadModel", "NonFiniteLossError"}
_SUBPACKAGES = {"aggregation", "autojac", "autogram", "trainer"}


def __getattr__(name: str) -> Any:
    if name in _TRAINER_NAMES:
        from . import trainer

        return getattr(trainer, name)
    if name in _SUBPACKAGES:  # (hf_jd.autojac works after a bare ``import hf_jd``, as the README writes it)
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_TRAINER_NAMES, *_SUBPACKAGES})


__all__ = ["__version__", *sorted(_TRAINER_NAMES)]
