"""The engine on LoRA adapters (PEFT): only the adapters are trainable, the frozen base layers are
passed through; exact against the explicit Jacobian of the adapters' parameters."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from peft import LoraConfig, get_peft_model
from torch import nn

from hf_jd.autogram import Engine

from ._reference import trainable
from .test_zoo import ENC, V, _check, _text

BASES = {
    "bert": (lambda: tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=V, max_position_embeddings=16, num_labels=2, **ENC)), ["query", "value"], False),
    "llama": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=V, max_position_embeddings=16, num_key_value_heads=1, **ENC)), ["q_proj", "v_proj", "down_proj"], False),
    # GPT-2's Conv1D stores its weight [d_in, d_out]: LoRA needs fan_in_fan_out there.
    "gpt2": (lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2)), ["c_attn"], True),
}


def _lora(name: str, dropout: float = 0.1) -> nn.Module:
    build, targets, fan_in_fan_out = BASES[name]
    model = get_peft_model(build(), LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout, fan_in_fan_out=fan_in_fan_out))
    for param_name, param in model.named_parameters():
        if "lora_B" in param_name:  # PEFT starts B at zero; make every adapter parameter matter
            nn.init.normal_(param, std=0.1)
    return model


@pytest.mark.parametrize("name", sorted(BASES))
@pytest.mark.parametrize("single_backward", [False, True])
def test_lora_adapters_exact(name: str, single_backward: bool) -> None:
    torch.manual_seed(0)
    model = _lora(name).train()  # LoRA dropout on: the same masks in the Gramian and the update
    params = trainable(model)
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    _check(model, _text()(3, 6, True), 3, single_backward=single_backward)


def test_engine_covers_only_the_adapters() -> None:
    model = _lora("bert", dropout=0.0)
    engine = Engine(model)
    covered = {id(p) for p in engine.parameters()}
    assert covered == {id(p) for p in trainable(model)}


@pytest.mark.parametrize("method", ["prompt", "p_tuning"])
@pytest.mark.parametrize("single_backward", [False, True])
def test_prompt_learning(method: str, single_backward: bool) -> None:
    """PEFT prompt tuning / P-tuning embed the virtual tokens once, [1, n, d], then repeat them over the
    batch: the engine must not expand that output to [B, n, d] (the repeat then crashed the forward);
    the per-example gradients come from the repeat instead."""
    from peft import PromptEncoderConfig, PromptTuningConfig, TaskType

    torch.manual_seed(0)
    base = tf.BertForSequenceClassification(tf.BertConfig(vocab_size=V, max_position_embeddings=32, num_labels=2, **ENC))
    if method == "prompt":
        config = PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4)
    else:
        config = PromptEncoderConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4, encoder_hidden_size=16)
    model = get_peft_model(base, config).train()
    inputs = _text()(3, 6, True)
    _check(model, inputs, 3, single_backward)
