"""Small generated text datasets whose tasks compete for a shared encoder (no download needed).

The demo, the examples and the tests train on these. Each example is a sequence of token ids drawn
from a small vocabulary split into groups; the labels are functions of group counts and positions,
so that one encoder must serve tasks that want different features, and the regression target has a
much larger scale than the classification losses (the situation in which averaging losses lets one
task dominate the shared parameters).

Token ids: 0 is padding, 1 is the leading ``[CLS]``-like token, 2..``vocab_size``-1 are content tokens
split into three groups ``A``, ``B`` and ``C`` of equal size.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset, DatasetDict

__all__ = [
    "MULTITASK_TASKS",
    "make_multitask_text_dataset",
    "make_classification_text_dataset",
    "make_markov_text_dataset",
]

#: The tasks of :func:`make_multitask_text_dataset`: name → (kind, number of outputs).
MULTITASK_TASKS: dict[str, tuple[str, int]] = {
    "balance": ("classification", 2),
    "opening": ("classification", 3),
    "score": ("regression", 1),
}

PAD_ID = 0
CLS_ID = 1


def _groups(vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if vocab_size < 8:
        raise ValueError(f"vocab_size must be at least 8 to hold three token groups, got {vocab_size}.")
    content = np.arange(2, vocab_size)
    third = len(content) // 3
    return content[:third], content[third : 2 * third], content[2 * third : 3 * third]


def _sample_sequences(
    rng: np.random.Generator, num_examples: int, vocab_size: int, min_length: int, max_length: int
) -> list[np.ndarray]:
    if not 2 <= min_length <= max_length:
        raise ValueError(f"Need 2 <= min_length <= max_length, got {min_length} and {max_length}.")
    group_a, group_b, group_c = _groups(vocab_size)
    sequences = []
    for _ in range(num_examples):
        length = int(rng.integers(min_length, max_length + 1))
        # Each sequence has its own mixture over the groups, so counts vary widely.
        mixture = rng.dirichlet([1.0, 1.0, 1.0])
        group_of_token = rng.choice(3, size=length - 1, p=mixture)
        tokens = np.empty(length - 1, dtype=np.int64)
        for index, group in enumerate((group_a, group_b, group_c)):
            mask = group_of_token == index
            tokens[mask] = rng.choice(group, size=int(mask.sum()))
        sequences.append(np.concatenate([[CLS_ID], tokens]))
    return sequences


def _pad(columns: dict[str, list], max_length: int) -> None:
    """Pad ``input_ids`` with :data:`PAD_ID` and ``attention_mask`` with 0 to ``max_length``."""
    columns["input_ids"] = [ids + [PAD_ID] * (max_length - len(ids)) for ids in columns["input_ids"]]
    columns["attention_mask"] = [mask + [0] * (max_length - len(mask)) for mask in columns["attention_mask"]]


def _split(columns: dict[str, list], num_eval: int, seed: int, pad_to: int | None) -> DatasetDict:
    if pad_to is not None:
        _pad(columns, pad_to)
    data = Dataset.from_dict(columns)
    parts = data.train_test_split(test_size=num_eval, seed=seed, shuffle=True)
    return DatasetDict(train=parts["train"], eval=parts["test"])


def make_multitask_text_dataset(
    num_train: int = 2048,
    num_eval: int = 256,
    *,
    vocab_size: int = 64,
    min_length: int = 8,
    max_length: int = 24,
    score_scale: float = 10.0,
    pad: bool = True,
    seed: int = 0,
) -> DatasetDict:
    """Generate a three-task text dataset: two classifications and one large-scale regression.

    Tasks (see :data:`MULTITASK_TASKS`):

    - ``balance`` (2 classes): whether group ``A`` tokens outnumber group ``B`` tokens;
    - ``opening`` (3 classes): the group of the first content token;
    - ``score`` (regression): ``score_scale`` × (fraction of group ``C`` tokens − 1/3) plus noise.

    Parameters
    ----------
    num_train, num_eval
        Number of training and evaluation examples.
    vocab_size
        Vocabulary size of the model that will read the ids (at least 8).
    min_length, max_length
        Range of sequence lengths, the leading token included.
    score_scale
        Scale of the regression target: larger values make its loss dominate the mean of the losses.
    pad
        Pad every sequence to ``max_length`` (id :data:`PAD_ID`, attention mask 0), so that the
        default data collator can stack them; without padding, use a padding collator.
    seed
        Seed of the generator; the same seed gives the same dataset.

    Returns
    -------
    DatasetDict
        Splits ``train`` and ``eval`` with columns ``input_ids``, ``attention_mask``,
        ``labels_balance`` (int), ``labels_opening`` (int) and ``labels_score`` (float).
    """
    rng = np.random.default_rng(seed)
    group_a, group_b, group_c = _groups(vocab_size)
    sequences = _sample_sequences(rng, num_train + num_eval, vocab_size, min_length, max_length)
    columns: dict[str, list] = {
        "input_ids": [],
        "attention_mask": [],
        "labels_balance": [],
        "labels_opening": [],
        "labels_score": [],
    }
    for sequence in sequences:
        content = sequence[1:]
        count_a = int(np.isin(content, group_a).sum())
        count_b = int(np.isin(content, group_b).sum())
        frac_c = float(np.isin(content, group_c).mean())
        first = content[0]
        opening = 0 if first in group_a else 1 if first in group_b else 2
        columns["input_ids"].append(sequence.tolist())
        columns["attention_mask"].append([1] * len(sequence))
        columns["labels_balance"].append(int(count_a > count_b))
        columns["labels_opening"].append(opening)
        columns["labels_score"].append(float(score_scale * (frac_c - 1 / 3) + rng.normal(0, 0.1 * score_scale)))
    return _split(columns, num_eval, seed, max_length if pad else None)


def make_classification_text_dataset(
    num_train: int = 2048,
    num_eval: int = 256,
    *,
    vocab_size: int = 64,
    min_length: int = 8,
    max_length: int = 24,
    hard_fraction: float = 0.1,
    pad: bool = True,
    seed: int = 0,
) -> DatasetDict:
    """Generate a binary text classification set with a minority of harder examples.

    The label says whether group ``A`` outnumbers group ``B``; for a ``hard_fraction`` of the
    examples it is instead whether group ``C`` tokens are a majority, a rule that the bulk of the
    data does not teach. Averaging per-example losses tends to neglect that minority, which is what
    instance-wise risk minimisation with Jacobian descent is meant to address.

    Parameters
    ----------
    num_train, num_eval
        Number of training and evaluation examples.
    vocab_size
        Vocabulary size of the model that will read the ids (at least 8).
    min_length, max_length
        Range of sequence lengths, the leading token included.
    hard_fraction
        Fraction of the examples labelled by the minority rule, in ``[0, 1)``.
    pad
        Pad every sequence to ``max_length`` (id :data:`PAD_ID`, attention mask 0).
    seed
        Seed of the sequences, the labels and the split.

    Returns
    -------
    DatasetDict
        Splits ``train`` and ``eval`` with columns ``input_ids``, ``attention_mask``, ``labels``
        and ``is_hard`` (whether the example follows the minority rule).

    Raises
    ------
    ValueError
        If ``hard_fraction`` is outside ``[0, 1)``, ``vocab_size < 8`` or the lengths are not
        ``2 ≤ min_length ≤ max_length``.
    """
    if not 0.0 <= hard_fraction < 1.0:
        raise ValueError(f"hard_fraction must be in [0, 1), got {hard_fraction}.")
    rng = np.random.default_rng(seed)
    group_a, group_b, group_c = _groups(vocab_size)
    sequences = _sample_sequences(rng, num_train + num_eval, vocab_size, min_length, max_length)
    columns: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "is_hard": []}
    for sequence in sequences:
        content = sequence[1:]
        hard = bool(rng.random() < hard_fraction)
        if hard:
            label = int(np.isin(content, group_c).mean() > 0.5)
        else:
            label = int(np.isin(content, group_a).sum() > np.isin(content, group_b).sum())
        columns["input_ids"].append(sequence.tolist())
        columns["attention_mask"].append([1] * len(sequence))
        columns["labels"].append(label)
        columns["is_hard"].append(hard)
    return _split(columns, num_eval, seed, max_length if pad else None)


def make_markov_text_dataset(
    num_train: int = 512,
    num_eval: int = 64,
    *,
    vocab_size: int = 64,
    successors: int = 4,
    min_length: int = 8,
    max_length: int = 24,
    pad: bool = True,
    seed: int = 0,
) -> DatasetDict:
    """Generate token sequences from a sparse Markov chain, for (tiny) causal language modelling.

    Every content token has ``successors`` possible next tokens, drawn once per dataset; a sequence
    is the leading token, a uniformly drawn content token, then a walk that picks each next token
    uniformly among the successors of the current one. A model that has learned the chain predicts
    every token after the first content token with cross-entropy ``log(successors)``, far below the
    ``log(vocab_size)`` of an untrained model, so a few steps of training visibly lower the loss.

    Parameters
    ----------
    num_train, num_eval
        Number of training and evaluation sequences.
    vocab_size
        Vocabulary size of the model that will read the ids (at least 8).
    successors
        Number of possible next tokens of each content token (between 1 and ``vocab_size - 2``).
    min_length, max_length
        Range of sequence lengths, the leading token included.
    pad
        Pad every sequence to ``max_length`` (id :data:`PAD_ID`, attention mask 0).
    seed
        Seed of the chain and of the walks.

    Returns
    -------
    DatasetDict
        Splits ``train`` and ``eval`` with columns ``input_ids`` and ``attention_mask``.

    Raises
    ------
    ValueError
        If ``vocab_size < 8``, ``successors`` is outside ``[1, vocab_size - 2]`` or the lengths are
        not ``2 ≤ min_length ≤ max_length``.
    """
    _groups(vocab_size)  # validates vocab_size
    content = np.arange(2, vocab_size)
    if not 1 <= successors <= len(content):
        raise ValueError(f"successors must be between 1 and vocab_size - 2 = {len(content)}, got {successors}.")
    if not 2 <= min_length <= max_length:
        raise ValueError(f"Need 2 <= min_length <= max_length, got {min_length} and {max_length}.")
    rng = np.random.default_rng(seed)
    # next_tokens[i] lists the successors of content token content[i].
    next_tokens = np.stack([rng.choice(content, size=successors, replace=False) for _ in content])
    columns: dict[str, list] = {"input_ids": [], "attention_mask": []}
    for _ in range(num_train + num_eval):
        length = int(rng.integers(min_length, max_length + 1))
        tokens = [CLS_ID, int(rng.choice(content))]
        while len(tokens) < length:
            tokens.append(int(rng.choice(next_tokens[tokens[-1] - 2])))
        columns["input_ids"].append(tokens[:length])
        columns["attention_mask"].append([1] * length)
    return _split(columns, num_eval, seed, max_length if pad else None)
