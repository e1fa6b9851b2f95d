"""Examples without any labelled target (every label -100) in ``jd_mode="iwrm"``: loss 0, a zero row of the
Jacobian, never NaN; a whole batch of them leaves the parameters unchanged; and an aggregator whose update a
zero row cancels (MGDA: the smallest vector of the convex hull of the rows is then 0) is warned about."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from datasets import Dataset
from transformers import BertConfig, BertForTokenClassification

from hf_jd import JDTrainer

from jd_trainer_helpers import make_args, trainable


def _model() -> BertForTokenClassification:
    torch.manual_seed(0)
    config = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        vocab_size=50, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=3)  # fmt: skip
    return BertForTokenClassification(config)


def _data(unlabelled: list[int]) -> Dataset:
    input_ids = torch.randint(1, 50, (4, 6), generator=torch.Generator().manual_seed(0))
    labels = input_ids % 3
    labels[:, 0] = -100
    labels[unlabelled] = -100
    return Dataset.from_dict({"input_ids": input_ids.tolist(), "labels": labels.tolist()})


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in trainable(model)])


def _train(tmp_path, aggregator: str, unlabelled: list[int], engine: str = "autogram"):
    model = _model()
    before = _flat(model)
    args = make_args(tmp_path, jd_aggregator=aggregator, jd_engine=engine, max_steps=1, learning_rate=1.0, optim="sgd")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = JDTrainer(model=model, args=args, train_dataset=_data(unlabelled))
        trainer.train()
    log = next(entry for entry in trainer.state.log_history if "loss" in entry)
    messages = [str(w.message) for w in record if "no labelled target" in str(w.message)]
    return (_flat(model) - before).norm().item(), log, messages


@pytest.mark.parametrize("aggregator", ["upgrad", "mgda", "mean"])
def test_a_batch_without_any_label_is_a_zero_step_with_finite_logs(tmp_path, aggregator):
    moved, log, _ = _train(tmp_path, aggregator, unlabelled=[0, 1, 2, 3])
    assert moved == 0.0
    assert log["loss"] == 0.0
    assert all(math.isfinite(value) for value in log.values() if isinstance(value, float))


@pytest.mark.parametrize("engine", ["autogram", "autojac"])
def test_an_unlabelled_example_that_cancels_the_update_is_warned_about(tmp_path, engine):
    moved, _, messages = _train(tmp_path / "mgda", "mgda", unlabelled=[3], engine=engine)
    assert moved < 1e-6  # MGDA's update with a zero row among the rows (a labelled batch moves by ~1)
    assert len(messages) == 1 and "MGDA" in messages[0] and "[3]" in messages[0]
    moved, _, messages = _train(tmp_path / "upgrad", "upgrad", unlabelled=[3], engine=engine)
    assert moved > 0 and not messages  # UPGrad only drops that row
    moved, _, messages = _train(tmp_path / "labelled", "mgda", unlabelled=[], engine=engine)
    assert moved > 0 and not messages
