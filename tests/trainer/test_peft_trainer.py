"""JDTrainer on LoRA-adapted models (PEFT), the usual way to fine-tune large models: the first
update equals UPGrad of the explicit Jacobian of the adapters' parameters, in every engine."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from hf_jd.aggregation import get_aggregator

from jd_trainer_helpers import GradCapture, collate, explicit_jacobian, trainable
from test_zoo_trainer import NUM_LABELS, assert_trained, snapshot, text_dataset, tiny_config, train


def _lora_classifier():
    base = AutoModelForSequenceClassification.from_config(tiny_config("bert", num_labels=NUM_LABELS))
    # SEQ_CLS keeps the classification head trainable next to the adapters.
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return model


@pytest.mark.parametrize(
    "options",
    [{}, {"jd_single_backward": True}, {"jd_engine": "autojac"}],
    ids=["autogram", "single-backward", "autojac"],
)
def test_lora_first_step_equals_hand_computation(tmp_path, options):
    torch.manual_seed(0)
    model = _lora_classifier()
    reference = copy.deepcopy(model)
    dataset = text_dataset("single")
    capture = GradCapture()
    train(tmp_path, model, dataset, max_steps=1, callbacks=[capture], **options)

    batch = collate(dataset, 0, 4)
    logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    losses = F.cross_entropy(logits, batch["labels"], reduction="none")
    params = trainable(reference)
    assert any("classifier" in n for n, p in reference.named_parameters() if p.requires_grad)
    jacobian = explicit_jacobian(losses, params)
    expected = get_aggregator("upgrad")(jacobian)
    assert not torch.allclose(expected, jacobian.mean(dim=0), rtol=1e-3, atol=1e-6)  # JD differs from the mean
    torch.testing.assert_close(capture.grads[0], expected, rtol=1e-4, atol=1e-6)


def test_lora_causal_lm_trains(tmp_path):
    base = AutoModelForCausalLM.from_config(tiny_config("llama"))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    before = snapshot(model)
    trainer, logs = train(tmp_path, model, text_dataset("causal"), max_steps=3, jd_single_backward=True)
    assert trainer.jd_step.engine_kind == "autogram"
    assert_trained(before, model, logs, steps=3)
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert all(p.grad is None for p in frozen)


def _multi_head_model():
    from transformers import BertConfig

    from hf_jd import MultiHeadModel

    torch.manual_seed(0)
    backbone = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                          vocab_size=40, max_position_embeddings=16)  # fmt: skip
    return MultiHeadModel.from_backbone(
        backbone, {"topic": {"kind": "classification", "num_labels": 2}, "score": {"kind": "regression"}}
    )


def _multi_task_data():
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (8, 6), generator=generator)
    columns = {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    labels = {"labels_topic": (ids[:, 0] % 2).tolist(), "labels_score": (ids[:, 1] / 40).tolist()}
    return Dataset.from_dict({**columns, **labels})


@pytest.mark.parametrize("heads_saved", [False, True])
def test_lora_on_a_multi_head_model_trains_its_heads_when_listed(tmp_path, heads_saved):
    """get_peft_model freezes a MultiHeadModel's randomly initialised heads with the rest of the base model: JDTrainer
    says so (naming modules_to_save) instead of training the adapters under random heads in silence."""
    import warnings

    from hf_jd import JDTrainer

    from jd_trainer_helpers import make_args

    model = _multi_head_model()
    saved = ["topic", "score"] if heads_saved else None
    lora = LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=saved)
    model = get_peft_model(model, lora)
    heads_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".heads." in n}
    args = make_args(tmp_path, jd_mode="mtl", jd_task_names=["topic", "score"],
                     label_names=["labels_topic", "labels_score"], max_steps=2)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = JDTrainer(model=model, args=args, train_dataset=_multi_task_data())
    messages = [str(w.message) for w in caught if "no trainable parameters" in str(w.message)]
    if heads_saved:
        assert not messages
    else:
        assert len(messages) == 1
        assert "['topic', 'score']" in messages[0] and "modules_to_save" in messages[0]
    trainer.train()
    changed = [n for n, p in model.named_parameters() if ".heads." in n and not torch.equal(p, heads_before[n])]
    assert bool(changed) == heads_saved


def test_frozen_heads_of_a_multi_head_model_are_named_without_peft(tmp_path):
    from hf_jd import JDTrainer

    from jd_trainer_helpers import make_args

    model = _multi_head_model()
    model.heads["score"].requires_grad_(False)
    args = make_args(tmp_path, jd_mode="mtl", jd_task_names=["topic", "score"],
                     label_names=["labels_topic", "labels_score"])  # fmt: skip
    with pytest.warns(UserWarning, match=r"tasks \['score'\] have no trainable parameters.*requires_grad=True"):
        JDTrainer(model=model, args=args, train_dataset=_multi_task_data())
