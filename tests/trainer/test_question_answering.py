"""Extractive question answering (``...ForQuestionAnswering``) in ``jd_mode="iwrm"``: one loss per example
from the start and end logits, checked against the model's own loss on each example alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModelForQuestionAnswering, BertConfig

from hf_jd import JDTrainer
from hf_jd.aggregation import UPGrad
from hf_jd.trainer.losses import detect_model_kind, per_example_losses

from jd_trainer_helpers import GradCapture, explicit_jacobian, make_args, trainable

LENGTH = 6


def _model():
    torch.manual_seed(0)
    config = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        vocab_size=50, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)  # fmt: skip
    return AutoModelForQuestionAnswering.from_config(config)


def _batch(starts, ends):
    input_ids = torch.randint(3, 50, (len(starts), LENGTH), generator=torch.Generator().manual_seed(1))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "start_positions": torch.tensor(starts), "end_positions": torch.tensor(ends)}  # fmt: skip


def _by_hand(start_logits, end_logits, starts, ends):
    """Per example: the mean of its start and end cross-entropies over the positions inside the sequence."""
    losses = []
    for i, (s, e) in enumerate(zip(starts, ends)):
        terms = [F.cross_entropy(logits[i], torch.tensor(p)) for logits, p in ((start_logits, s), (end_logits, e))
                 if 0 <= p < LENGTH]  # fmt: skip
        losses.append(torch.stack(terms).mean() if terms else start_logits.sum() * 0)
    return torch.stack(losses)


def test_kind_is_detected():
    assert detect_model_kind(_model()) == "question_answering"


def test_rows_are_the_models_own_loss_on_each_example():
    model = _model().eval()
    batch = _batch([1, 2, 0, 3], [2, 4, 0, 5])
    labels = (batch["start_positions"], batch["end_positions"])
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    losses = per_example_losses(model, outputs, labels)
    assert losses.shape == (4,) and losses.dtype == torch.float32
    for i in range(4):
        alone = model(**{key: value[i : i + 1] for key, value in batch.items()}).loss
        torch.testing.assert_close(losses[i], alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses.mean(), model(**batch).loss, rtol=1e-5, atol=1e-6)
    # the same from a [B, 2] tensor and from a mapping
    stacked = torch.stack(labels, dim=1)
    torch.testing.assert_close(per_example_losses(model, outputs, stacked), losses)
    mapping = {"start_positions": labels[0], "end_positions": labels[1]}
    torch.testing.assert_close(per_example_losses(model, outputs, mapping), losses)


def test_positions_outside_the_sequence_are_ignored_like_the_model_does():
    model = _model().eval()
    starts, ends = [1, 20, 0, 30], [2, 4, 99, 40]  # the model clamps to LENGTH and ignores that index
    batch = _batch(starts, ends)
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    losses = per_example_losses(model, outputs, (batch["start_positions"], batch["end_positions"]))
    expected = _by_hand(outputs.start_logits, outputs.end_logits, starts, ends)
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-6)
    assert losses[3] == 0  # nothing inside the sequence: a zero row


def test_bad_question_answering_labels_raise():
    model = _model().eval()
    batch = _batch([1, 2], [2, 4])
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with pytest.raises(ValueError, match="start_positions and end_positions"):
        per_example_losses(model, outputs, batch["start_positions"])
    with pytest.raises(ValueError, match="start_logits"):
        per_example_losses(model, {"logits": outputs.start_logits}, (batch["start_positions"], batch["end_positions"]))


@pytest.mark.parametrize("engine", ["autogram", "autojac"])
def test_trainer_first_step_equals_hand_computation(tmp_path, engine):
    model = _model()
    reference = copy.deepcopy(model)
    starts, ends = [1, 2, 20, 3, 0, 5, 1, 2], [2, 4, 5, 5, 0, 5, 3, 99]
    batch = _batch(starts, ends)
    dataset = Dataset.from_dict({key: value.tolist() for key, value in batch.items()})
    capture = GradCapture()
    args = make_args(tmp_path, jd_engine=engine, max_steps=1)
    trainer = JDTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset, callbacks=[capture])
    trainer.train()
    outputs = reference(input_ids=batch["input_ids"][:4], attention_mask=batch["attention_mask"][:4])
    losses = _by_hand(outputs.start_logits, outputs.end_logits, starts[:4], ends[:4])
    expected = UPGrad()(explicit_jacobian(losses, trainable(reference)))
    torch.testing.assert_close(capture.grads[0], expected, rtol=1e-4, atol=1e-6)
    # evaluation is the model's own loss, as with the plain Trainer
    trainer.model.eval()
    with torch.no_grad():
        own = trainer.model(**{key: value[:8] for key, value in batch.items()}).loss
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(float(own), rel=1e-5)


def test_trainer_question_answering_missing_one_position_is_a_clear_error(tmp_path):
    batch = _batch([1, 2, 0, 3], [2, 4, 0, 5])
    dataset = Dataset.from_dict({key: value.tolist() for key, value in batch.items() if key != "end_positions"})
    args = make_args(tmp_path, max_steps=1, label_names=["start_positions"])
    trainer = JDTrainer(model=_model(), args=args, train_dataset=dataset)
    with pytest.raises(ValueError, match="start_positions and end_positions"):
        trainer.train()
