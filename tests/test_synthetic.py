"""Tests of the generated datasets used by the demo and the examples."""

import numpy as np
import pytest

from hf_jd.synthetic import (
    CLS_ID,
    PAD_ID,
    MULTITASK_TASKS,
    make_classification_text_dataset,
    make_multitask_text_dataset,
)


def test_multitask_dataset_labels_follow_their_rules() -> None:
    data = make_multitask_text_dataset(300, 60, vocab_size=32, seed=3)
    assert data["train"].num_rows == 300 and data["eval"].num_rows == 60
    third = (32 - 2) // 3
    for row in data["train"].select(range(50)):
        ids = np.array(row["input_ids"])[np.array(row["attention_mask"]) == 1]
        assert len(row["input_ids"]) == 24 and set(np.array(row["input_ids"])[len(ids):]) <= {PAD_ID}
        assert ids[0] == CLS_ID and ids.max() < 32 and ids.min() >= 2 - 1
        content = ids[1:]
        count_a = int(((content >= 2) & (content < 2 + third)).sum())
        count_b = int(((content >= 2 + third) & (content < 2 + 2 * third)).sum())
        assert row["labels_balance"] == int(count_a > count_b)
        assert row["labels_opening"] == (content[0] - 2) // third
        assert sum(row["attention_mask"]) == len(ids)
    assert set(MULTITASK_TASKS) == {c[len("labels_") :] for c in data["train"].column_names if c.startswith("labels_")}


def test_unpadded_sequences_keep_their_length() -> None:
    data = make_multitask_text_dataset(50, 10, min_length=5, max_length=9, pad=False)
    lengths = {len(ids) for ids in data["train"]["input_ids"]}
    assert min(lengths) >= 5 and max(lengths) <= 9 and len(lengths) > 1


def test_multitask_dataset_is_deterministic_and_seeded() -> None:
    first = make_multitask_text_dataset(40, 10, seed=1)
    again = make_multitask_text_dataset(40, 10, seed=1)
    other = make_multitask_text_dataset(40, 10, seed=2)
    assert first["train"]["input_ids"] == again["train"]["input_ids"]
    assert first["train"]["input_ids"] != other["train"]["input_ids"]


def test_score_scale_controls_regression_spread() -> None:
    small = np.std(make_multitask_text_dataset(400, 10, score_scale=1.0)["train"]["labels_score"])
    large = np.std(make_multitask_text_dataset(400, 10, score_scale=10.0)["train"]["labels_score"])
    assert large == pytest.approx(10 * small, rel=1e-6)


def test_classification_dataset_has_a_hard_minority() -> None:
    data = make_classification_text_dataset(1000, 100, hard_fraction=0.2, seed=0)
    hard = np.mean(data["train"]["is_hard"])
    assert 0.15 < hard < 0.25
    assert set(data["train"]["labels"]) == {0, 1}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"vocab_size": 4}, "vocab_size"), ({"min_length": 10, "max_length": 5}, "min_length")],
)
def test_bad_arguments_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_multitask_text_dataset(10, 2, **kwargs)


def test_bad_hard_fraction_is_rejected() -> None:
    with pytest.raises(ValueError, match="hard_fraction"):
        make_classification_text_dataset(10, 2, hard_fraction=1.5)
