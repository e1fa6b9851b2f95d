"""``compute_losses`` for a model of your own: JDTrainer on a plain ``torch.nn.Module``.

The model is a small MLP with a shared trunk and two regression heads: ``sum`` (the sum of the first
four features) and ``product`` (five times the product of the first two), targets of different
scales that want different features from the shared layers. ``compute_losses(model, inputs) ->
(losses, outputs)`` returns the vector of losses in the shape of ``jd_mode`` (here ``mtl``: one loss
per task, shape ``[2]`` in ``jd_task_names`` order); JDTrainer computes their Jacobian, aggregates
it (UPGrad by default, Quinton & Rey, arXiv 2406.16232) and steps the Trainer's optimizer. The same
function gives the per-task evaluation losses (``eval_loss_sum``, ``eval_loss_product``).

Run: ``python examples/custom_losses.py [--max_steps 400] [--aggregator upgrad]``.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from transformers import HfArgumentParser, default_data_collator, set_seed

from hf_jd import JDTrainer, JDTrainingArguments
from hf_jd.aggregation import get_aggregator

TASKS = ("sum", "product")
NUM_FEATURES = 8


class TwoTaskMLP(nn.Module):
    """A shared trunk and one linear head per task of :data:`TASKS`."""

    def __init__(self, in_features: int = NUM_FEATURES, hidden: int = 32) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.heads = nn.ModuleDict({task: nn.Linear(hidden, 1) for task in TASKS})

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        shared = self.trunk(features)
        return {task: head(shared).squeeze(-1) for task, head in self.heads.items()}


def compute_losses(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
    """One mean-squared error per task: a tensor of shape ``[2]`` in :data:`TASKS` order.

    Parameters
    ----------
    model
        The (possibly wrapped) :class:`TwoTaskMLP`.
    inputs
        The collated batch: ``features`` ``[B, 8]`` and one ``target_<task>`` ``[B]`` per task.

    Returns
    -------
    tuple[torch.Tensor, Any]
        The losses ``[2]`` and the model outputs.
    """
    outputs = model(inputs["features"])
    losses = torch.stack([nn.functional.mse_loss(outputs[task], inputs[f"target_{task}"]) for task in TASKS])
    return losses, outputs


def make_data(num_examples: int, seed: int) -> Dataset:
    """Gaussian features and the two targets of :class:`TwoTaskMLP`."""
    if num_examples < 1:
        raise ValueError(f"num_examples must be at least 1, got {num_examples}.")
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(num_examples, NUM_FEATURES, generator=generator)
    return Dataset.from_dict(
        {
            "features": features.tolist(),
            "target_sum": features[:, :4].sum(1).tolist(),
            "target_product": (5 * features[:, 0] * features[:, 1]).tolist(),
        }
    )


@dataclass
class CustomArguments:
    """Options of the example."""

    output_dir: str = field(default="out/custom_losses", metadata={"help": "Output folder."})
    aggregator: str = field(default="upgrad", metadata={"help": "Aggregator of the [2, n] Jacobian."})
    aggregator_kwargs: str = field(
        default="{}", metadata={"help": 'Keyword arguments of the aggregator, as JSON, e.g. \'{"reg_eps": 0}\'.'}
    )
    max_steps: int = field(default=400, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=64, metadata={"help": "Examples per step."})
    learning_rate: float = field(default=1e-2, metadata={"help": "AdamW learning rate."})
    num_train: int = field(default=2048, metadata={"help": "Generated training examples."})
    num_eval: int = field(default=512, metadata={"help": "Generated evaluation examples."})
    logging_steps: int = field(default=20, metadata={"help": "Log every this many steps."})
    seed: int = field(default=0, metadata={"help": "Seed."})
    cpu_threads: int = field(
        default=1,
        metadata={"help": "torch CPU threads; 1 is fastest for this tiny model (more only add synchronisation)."},
    )

    def __post_init__(self) -> None:
        for name in ("cpu_threads", "max_steps", "batch_size", "num_train", "num_eval", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        try:
            kwargs = json.loads(self.aggregator_kwargs)
            if not isinstance(kwargs, dict):
                raise TypeError(f"a JSON object is needed, got {type(kwargs).__name__}")
            get_aggregator(self.aggregator, **kwargs)
        except (TypeError, ValueError) as error:
            hint = (
                " Give the aggregator's keyword arguments with --aggregator_kwargs (JSON)."
                if self.aggregator_kwargs.strip() in ("", "{}")
                else ""
            )
            raise ValueError(
                f"--aggregator {self.aggregator} --aggregator_kwargs {self.aggregator_kwargs!r}: "
                f"{str(error).rstrip('.')}.{hint}"
            ) from error


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train :class:`TwoTaskMLP` by Jacobian descent and print the per-task evaluation losses.

    Returns
    -------
    dict
        ``before`` and ``after``: per-task evaluation MSE (``{"sum": ..., "product": ...}``);
        ``history``: the Trainer's training log entries.
    """
    (args,) = HfArgumentParser(CustomArguments).parse_args_into_dataclasses(args=argv)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.cpu_threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(previous_threads)


def run(args: CustomArguments) -> dict[str, Any]:
    """Everything :func:`main` does, with parsed arguments."""
    set_seed(args.seed)
    model = TwoTaskMLP()
    training_args = JDTrainingArguments(
        output_dir=args.output_dir,
        jd_mode="mtl",
        jd_task_names=list(TASKS),
        jd_aggregator=args.aggregator,
        jd_aggregator_kwargs=json.loads(args.aggregator_kwargs),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=256,
        learning_rate=args.learning_rate,
        logging_steps=args.logging_steps,
        seed=args.seed,
        save_strategy="no",
        report_to="none",
        dataloader_pin_memory=torch.cuda.is_available(),
        # The Trainer would drop the columns that a plain module's forward does not name.
        remove_unused_columns=False,
        # Which inputs are labels: evaluation then computes the losses with compute_losses.
        label_names=[f"target_{task}" for task in TASKS],
    )
    trainer = JDTrainer(
        model=model,
        args=training_args,
        train_dataset=make_data(args.num_train, args.seed),
        eval_dataset=make_data(args.num_eval, args.seed + 1),
        data_collator=default_data_collator,
        compute_losses=compute_losses,
    )

    def task_losses() -> dict[str, float]:
        metrics = trainer.evaluate()
        return {task: metrics[f"eval_loss_{task}"] for task in TASKS}

    before = task_losses()
    trainer.train()
    after = task_losses()
    history = [entry for entry in trainer.state.log_history if "loss" in entry and "eval_loss" not in entry]
    print(f"\n{'task':<10}{'eval MSE before':>18}{'eval MSE after':>18}")
    for task in TASKS:
        print(f"{task:<10}{before[task]:>18.4f}{after[task]:>18.4f}")
    if not all(math.isfinite(value) for value in after.values()):
        raise RuntimeError(f"Training diverged: final evaluation losses {after}. Lower --learning_rate.")
    return {"before": before, "after": after, "history": history}


if __name__ == "__main__":
    main(sys.argv[1:])
