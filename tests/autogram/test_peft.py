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
        vocab_size=V, max_position_embeddings=16, num_key_value_heads=1, **ENC)),
        ["q_proj", "v_proj", "down_proj"], False),
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
    base = tf.BertForSequenceClassification(
        tf.BertConfig(vocab_size=V, max_position_embeddings=32, num_labels=2, **ENC)
    )
    if method == "prompt":
        config = PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4)
    else:
        config = PromptEncoderConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4, encoder_hidden_size=16)
    model = get_peft_model(base, config).train()
    inputs = _text()(3, 6, True)
    _check(model, inputs, 3, single_backward)


def _container_adapter_config(method: str):  # noqa: ANN202 - PEFT config classes
    """PEFT methods whose layers read their adapters from an nn.ParameterDict without calling it."""
    from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, VeraConfig

    return {
        "ia3": lambda: IA3Config(target_modules=["query", "value", "intermediate.dense"],
                                 feedforward_modules=["intermediate.dense"]),
        "adalora": lambda: AdaLoraConfig(r=4, target_modules=["query", "value"], total_step=10),
        "loha": lambda: LoHaConfig(r=4, target_modules=["query", "value"]),
        "lokr": lambda: LoKrConfig(r=4, target_modules=["query", "value"]),
        "vera": lambda: VeraConfig(r=4, target_modules=["query", "value"]),
        "lora_embedding": lambda: LoraConfig(r=4, target_modules=["word_embeddings", "query"]),
    }[method]()


@pytest.mark.parametrize(("method", "single_backward"), [
    ("ia3", False), ("ia3", True), ("adalora", False), ("loha", True), ("lokr", False), ("vera", True),
    ("lora_embedding", False), ("lora_embedding", True),
])
def test_adapters_kept_in_parameter_dicts(method: str, single_backward: bool) -> None:
    """The layer reading a ParameterDict it owns is handled generically, with those parameters."""
    torch.manual_seed(0)
    base = tf.BertForSequenceClassification(
        tf.BertConfig(vocab_size=V, max_position_embeddings=16, num_labels=2, **ENC)
    )
    model = get_peft_model(base, _container_adapter_config(method)).train()
    for param in model.parameters():
        if param.requires_grad:  # PEFT starts some adapters at zero or one: make every one matter
            nn.init.normal_(param, std=0.1)
    engine = Engine(model)
    covered = {id(p) for p in engine.parameters()}
    assert covered == {id(p) for p in trainable(model)}
    engine.remove()
    _check(model, _text()(3, 6, True), 3, single_backward=single_backward)


class _ScaledTable(nn.Module):
    """A layer that reads its own parameter list (not a PEFT adapter): one scale per feature block."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.scales = nn.ParameterList([nn.Parameter(torch.randn(2)), nn.Parameter(torch.randn(2))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * torch.cat(list(self.scales))


@pytest.mark.parametrize("single_backward", [False, True])
def test_a_layer_reading_its_parameter_list(single_backward: bool) -> None:
    from ._reference import assert_exact_step

    torch.manual_seed(0)
    model = nn.Sequential(_ScaledTable(), nn.Tanh(), _ScaledTable())
    engine = Engine(model, single_backward=single_backward)
    losses = model(torch.randn(3, 5, 4)).pow(2).sum((1, 2))
    assert_exact_step(engine, losses, trainable(model), single_backward)
