"""Per-example task losses ``[B, m]`` on models that regroup their examples (OPT's ``[B * T, d]`` rows, XLNet's
time-major layers, Swin's windows, tokens routed to experts): the grouping is verified in the pass that checks the
other calls, and the confirmed calls take the pass over the tasks in that grouping (no per-row pass)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import transformers as tf
from torch import Tensor, nn

from hf_jd.autogram import Engine

from ._reference import assert_exact_step_with_freed_graph, count_per_row

V = 50
_CE = nn.functional.cross_entropy


def _two_tasks(token: Tensor) -> Tensor:
    """``[B, T]`` token losses -> ``[B, 2]``: the mean over the first three tokens and over the others."""
    return torch.stack([token[:, :3].mean(1), token[:, 3:].mean(1)], 1)


def _lm_losses(model: nn.Module, batch: int) -> Tensor:
    ids = torch.randint(1, V, (batch, 7))
    logits = model(input_ids=ids).logits
    return _two_tasks(_CE(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"))


def _swin_losses(model: nn.Module, batch: int) -> Tensor:
    logits = model(pixel_values=torch.randn(batch, 3, 16, 16)).logits  # [B, 2 labels]: one loss per label
    return nn.functional.binary_cross_entropy_with_logits(logits, torch.rand(batch, 2), reduction="none")


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module, int], Tensor]]] = {
    "opt": (lambda: tf.OPTForCausalLM(tf.OPTConfig(
        vocab_size=V, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=16,
        max_position_embeddings=32)), _lm_losses),
    "xlnet": (lambda: tf.XLNetLMHeadModel(tf.XLNetConfig(vocab_size=V, d_model=16, n_layer=1, n_head=2, d_inner=32)),
              _lm_losses),
    "mixtral": (lambda: tf.MixtralForCausalLM(tf.MixtralConfig(
        vocab_size=V, hidden_size=16, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)), _lm_losses),
    "swin": (lambda: tf.SwinForImageClassification(tf.SwinConfig(
        image_size=16, patch_size=4, embed_dim=8, depths=[2], num_heads=[2], window_size=2, num_labels=2)),
        _swin_losses),
}


@pytest.mark.parametrize("single_backward", [False, True])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_task_losses_per_example_without_per_row_pass(name: str, single_backward: bool, monkeypatch) -> None:
    per_row = count_per_row(monkeypatch)
    torch.manual_seed(2)
    build, losses_of = MODELS[name]
    model = build()
    engine = Engine(model, single_backward=single_backward)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (a per-row pass would warn)
        for batch in (3, 2, 3):
            model.zero_grad(set_to_none=True)
            assert_exact_step_with_freed_graph(engine, model, losses_of(model, batch), single_backward)
    assert per_row == []


@pytest.mark.parametrize("single_backward", [False, True])
def test_task_losses_that_mix_the_examples_take_the_per_row_pass(single_backward: bool, monkeypatch) -> None:
    """Losses normalised by their sum over the batch mix the examples: the grouping checks fail, the calls take the
    exact per-row pass."""
    per_row = count_per_row(monkeypatch)
    torch.manual_seed(3)
    build, losses_of = MODELS["opt"]
    model = build()
    engine = Engine(model, single_backward=single_backward)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the engine says the losses mix the examples
        for batch in (3, 2):
            model.zero_grad(set_to_none=True)
            losses = losses_of(model, batch)
            assert_exact_step_with_freed_graph(engine, model, losses / losses.sum(0).detach() * losses.sum(0),
                                               single_backward)
    assert per_row


class TimeMajorAttention(nn.Module):
    """``nn.MultiheadAttention`` without ``batch_first``: its tensors are ``[T, B, d]``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.attention = nn.MultiheadAttention(8, 2)
        self.out = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, 3] -> [B, 2]
        h = self.inp(x).transpose(0, 1)
        h, _ = self.attention(h, h, h, need_weights=False)
        return self.out(h.transpose(0, 1)).pow(2).mean(1)


@pytest.mark.parametrize("single_backward", [False, True])
def test_time_major_layer_with_task_losses(single_backward: bool, monkeypatch) -> None:
    per_row = count_per_row(monkeypatch)
    torch.manual_seed(4)
    model = TimeMajorAttention()
    engine = Engine(model, single_backward=single_backward)
    for batch in (4, 3, 4):
        model.zero_grad(set_to_none=True)
        assert_exact_step_with_freed_graph(engine, model, model(torch.randn(batch, 5, 3)), single_backward)
    assert per_row == []
