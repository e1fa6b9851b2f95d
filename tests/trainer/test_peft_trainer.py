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
