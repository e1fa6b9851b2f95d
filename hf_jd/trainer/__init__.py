"""Jacobian descent in the Hugging Face Trainer.

:class:`JDTrainer` and :class:`JDTrainingArguments` run Jacobian descent (Quinton & Rey,
arXiv 2406.16232) with the Trainer's optimizer, scheduler, mixed precision, logging and
checkpoints. :class:`MultiHeadModel` (a backbone with named task heads), ``per_example_losses``
(one loss per example from a HF task model's outputs), ``build_multitask_dataset`` and
``MultiTaskSampler`` (every batch holds every task) are the data side.

Names are imported on first use, so ``import hf_jd.trainer`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "JDTrainer": "trainer",
    "JD_STATE_NAME": "trainer",
    "JDTrainingArguments": "arguments",
    "MultiHeadModel": "multi_head",
    "MultiHeadConfig": "multi_head",
    "MultiHeadOutput": "multi_head",
    "per_example_losses": "losses",
    "MultiTaskSampler": "multitask_data",
    "build_multitask_dataset": "multitask_data",
    "NonFiniteLossError": "_step",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
