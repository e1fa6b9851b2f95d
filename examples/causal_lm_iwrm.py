"""A tiny causal language model trained with one loss per sequence through the autogram engine.

Instance-wise risk minimisation (IWRM, Quinton & Rey, arXiv 2406.16232): each sequence's loss is
the mean next-token cross-entropy over its non-padding tokens (labels ``-100`` are ignored, shifted
by one as in causal LM training), and UPGrad weights the B sequence losses from their Gramian
``J Jᵀ``, which the autogram engine computes during the backward pass without forming the Jacobian
— the tied input/output embeddings of GPT-2 included. The model is a two-layer GPT-2 built from a
config; the sequences are walks on a sparse Markov chain (:func:`hf_jd.synthetic.make_markov_text_dataset`),
so the attainable loss, about ``log(successors)`` per token, is far below that of an untrained model.

Run: ``python examples/causal_lm_iwrm.py [--max_steps 50] [--aggregator upgrad]``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, HfArgumentParser, default_data_collator, set_seed

from _aggregator_options import aggregator_kwargs, canonical_aggregator, check_aggregator

from hf_jd import JDTrainer, JDTrainingArguments
from hf_jd.aggregation import (
    available_weightings,
    is_gramian_based,
)
from hf_jd.synthetic import PAD_ID, make_markov_text_dataset

VOCAB_SIZE = 64
#: Length of the shortest generated sequence (make_markov_text_dataset's min_length).
MIN_LENGTH = 8


@dataclass
class CausalLMArguments:
    """Options of the example."""

    output_dir: str = field(default="out/causal_lm_iwrm", metadata={"help": "Output folder."})
    aggregator: str = field(
        default="upgrad", metadata={"help": "Gramian-based aggregator of the sequence losses (any case)."}
    )
    aggregator_kwargs: str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments of --aggregator as a JSON object, e.g. '{\"n_byzantine\": 0}' for krum "
            "(checked on a Jacobian of --batch_size rows before training)."
        },
    )
    max_steps: int = field(default=50, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per step (= rows of the Jacobian)."})
    learning_rate: float = field(default=5e-3, metadata={"help": "AdamW learning rate."})
    num_train: int = field(default=512, metadata={"help": "Generated training sequences."})
    num_eval: int = field(default=64, metadata={"help": "Generated evaluation sequences."})
    max_length: int = field(default=24, metadata={"help": "Longest sequence (tokens)."})
    successors: int = field(default=4, metadata={"help": "Possible next tokens of each token in the generated chain."})
    hidden_size: int = field(default=64, metadata={"help": "Width of the GPT-2 model."})
    num_layers: int = field(default=2, metadata={"help": "Transformer blocks of the GPT-2 model."})
    logging_steps: int = field(default=10, metadata={"help": "Log every this many steps."})
    seed: int = field(default=0, metadata={"help": "Seed."})
    cpu_threads: int = field(
        default=1,
        metadata={"help": "torch CPU threads; 1 is fastest for this tiny model (more only add synchronisation)."},
    )

    def __post_init__(self) -> None:
        positive = ("cpu_threads", "max_steps", "batch_size", "num_train", "num_eval", "hidden_size", "num_layers")
        for name in (*positive, "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.hidden_size % 2:
            raise ValueError(f"--hidden_size must be even (two attention heads), got {self.hidden_size}.")
        if self.max_length < MIN_LENGTH:
            raise ValueError(
                f"--max_length must be at least {MIN_LENGTH} (the shortest generated sequence), got {self.max_length}."
            )
        self.aggregator = canonical_aggregator(self.aggregator)  # rejects unknown names, before any data is made
        if not is_gramian_based(self.aggregator):
            raise ValueError(
                f"--aggregator {self.aggregator} is not Gramian-based, and this example trains with the autogram "
                f"engine: use one of {', '.join(available_weightings())}."
            )
        check_aggregator(
            self.aggregator, aggregator_kwargs(self.aggregator_kwargs), self.batch_size,
            f"the {self.batch_size} sequence losses of a step (--batch_size)",
        )





def language_modelling_data(args: CausalLMArguments) -> tuple[Dataset, Dataset]:
    """Markov-chain token sequences with ``labels`` equal to the ids, ``-100`` on padding."""
    data = make_markov_text_dataset(
        args.num_train,
        args.num_eval,
        vocab_size=VOCAB_SIZE,
        successors=args.successors,
        min_length=MIN_LENGTH,
        max_length=args.max_length,
        seed=args.seed,
    )

    def add_labels(row: dict[str, list[int]]) -> dict[str, list[int]]:
        return {"labels": [t if m == 1 else -100 for t, m in zip(row["input_ids"], row["attention_mask"])]}

    return tuple(data[split].map(add_labels) for split in ("train", "eval"))  # type: ignore[return-value]


@torch.no_grad()
def mean_token_loss(model: GPT2LMHeadModel, dataset: Dataset, batch_size: int) -> float:
    """Next-token cross-entropy averaged over every predicted (non-padding) token of ``dataset``.

    Computed here rather than with ``Trainer.evaluate``, whose loss divides by the number of labels
    before the causal shift (one more per sequence than the tokens actually predicted).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = default_data_collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        labels = batch.pop("labels").to(device)
        logits = model(**{key: value.to(device) for key, value in batch.items()}).logits
        targets = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            targets.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += float(losses)
        count += int((targets != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


def attainable_loss(dataset: Dataset, successors: int) -> float:
    """Mean next-token cross-entropy of a model that knows the chain: the best any model can do.

    The first content token is uniform over the ``VOCAB_SIZE - 2`` content tokens; every later token
    is uniform over the ``successors`` of the previous one.
    """
    first, later = 0, 0
    for labels in dataset["labels"]:
        predicted = sum(label != -100 for label in labels[1:])
        first += min(predicted, 1)
        later += max(predicted - 1, 0)
    return (first * math.log(VOCAB_SIZE - 2) + later * math.log(successors)) / max(first + later, 1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train the tiny GPT-2 by IWRM with UPGrad; print the evaluation loss before and after.

    Returns
    -------
    dict
        ``before`` and ``after``: evaluation loss (mean token cross-entropy); ``attainable``: the
        loss of a model that knows the chain (the lowest expected value); ``history``: the
        training log entries (they hold ``jd/weight_min``/``max``/``mean`` of the sequence weights).
    """
    (args,) = HfArgumentParser(CausalLMArguments).parse_args_into_dataclasses(args=argv)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.cpu_threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(previous_threads)


def run(args: CausalLMArguments) -> dict[str, Any]:
    """Everything :func:`main` does, with parsed arguments."""
    set_seed(args.seed)
    train, evaluation = language_modelling_data(args)
    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=args.max_length,
        n_embd=args.hidden_size,
        n_layer=args.num_layers,
        n_head=2,
        pad_token_id=PAD_ID,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    training_args = JDTrainingArguments(
        output_dir=args.output_dir,
        jd_mode="iwrm",
        jd_aggregator=args.aggregator,
        jd_aggregator_kwargs=aggregator_kwargs(args.aggregator_kwargs),
        jd_engine="autogram",
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        logging_steps=args.logging_steps,
        seed=args.seed,
        save_strategy="no",
        report_to="none",
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    trainer = JDTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        data_collator=default_data_collator,
    )
    before = mean_token_loss(model, evaluation, args.batch_size)
    trainer.train()
    after = mean_token_loss(model, evaluation, args.batch_size)
    history = [entry for entry in trainer.state.log_history if "loss" in entry and "eval_loss" not in entry]
    floor = attainable_loss(evaluation, args.successors)
    print(
        f"eval loss (mean next-token cross-entropy): {before:.4f} before, {after:.4f} after training "
        f"(a model that knows the chain: {floor:.4f})"
    )
    if not math.isfinite(after):
        raise RuntimeError(f"Training diverged (eval loss {after}). Lower --learning_rate.")
    return {"before": before, "after": after, "attainable": floor, "history": history}


if __name__ == "__main__":
    main(sys.argv[1:])
