"""Parameters read outside their module's calls and first used by operations split by example (a convolution's weight
passed to ``F.conv1d`` by a parent without parameters of its own): products started at those operations, exact."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as tf
from torch import Tensor, nn

from hf_jd.autogram import Engine

from ._reference import assert_exact_step, count_unattributed, trainable


class _ShortConv(nn.Module):
    """A depthwise causal convolution whose weight the parent passes to ``F.conv1d`` (the child is never called), as
    ``causal_conv1d_fn``'s reference implementation does; ``penalised`` also adds the weight's norm to the output."""

    def __init__(self, penalised: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.conv = nn.Conv1d(6, 6, 3, groups=6, padding=2)
        self.head = nn.Linear(6, 2)
        self.penalised = penalised

    def forward(self, x: Tensor) -> Tensor:  # [B, T, 4] -> [B, 2]
        h = self.proj(x).transpose(1, 2)
        weight = self.conv.weight.view(6, 1, 3)  # (an operation on the weight alone first)
        h = nn.functional.conv1d(h, weight, self.conv.bias, padding=2, groups=6)[..., : x.shape[1]]
        out = self.head(torch.tanh(h).transpose(1, 2)).mean(1)
        return out + self.conv.weight.pow(2).sum() if self.penalised else out


class _FlatRouter(nn.Module):
    """A router that scores the flattened ``[B * T, d]`` tokens with its classifier's weight through ``F.linear`` (as
    LongCat-Flash's does; the classifier is never called), then weights an MLP's output per token."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.classifier = nn.Linear(6, 3, bias=False)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, 4] -> [B, 2]
        h = torch.tanh(self.proj(x))
        scores = nn.functional.linear(h.reshape(-1, 6).float(), self.classifier.weight.float()).softmax(-1)
        gate = scores.view(*h.shape[:2], 3).max(-1).values.unsqueeze(-1)
        return self.head(h * gate).mean(1)


@pytest.mark.parametrize("single_backward", [False, True])
@pytest.mark.parametrize("build", [_ShortConv, _FlatRouter], ids=["convolution", "flattened-tokens"])
def test_a_weight_used_by_operations_split_by_example(
    build: type[nn.Module], single_backward: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Uses with one row per example (a convolution of the examples' features), or ``T`` (``[B * T, d]`` tokens, as
    LongCat-Flash's router has): their grouping by example is verified, then the products start there."""
    unattributed = count_unattributed(monkeypatch)
    torch.manual_seed(0)
    model = build()
    engine = Engine(model, single_backward=single_backward)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for per_task in (False, True, False):
            model.zero_grad(set_to_none=True)
            out = model(torch.randn(5, 7, 4))
            assert_exact_step(engine, out if per_task else out.sum(1), trainable(model), single_backward)
    assert unattributed == []


def test_a_weight_also_used_by_a_penalty_keeps_the_per_row_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    unattributed = count_unattributed(monkeypatch)
    torch.manual_seed(0)
    model = _ShortConv(penalised=True)
    engine = Engine(model)
    out = model(torch.randn(5, 7, 4))
    with pytest.warns(RuntimeWarning, match="outside the calls"):
        assert_exact_step(engine, out.sum(1), trainable(model), False)
    assert unattributed == [1]


@pytest.mark.parametrize("single_backward", [False, True])
def test_lfm2_short_convolutions(single_backward: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """LFM2's short-convolution blocks hand ``conv.weight`` to ``causal_conv1d_fn`` (its reference implementation
    without the kernel package): the weight took the batched pass over the loss rows with a warning (about 9x a plain
    step at B=16 instead of 2.5x)."""
    unattributed = count_unattributed(monkeypatch)
    torch.manual_seed(0)
    config = tf.Lfm2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_key_value_heads=1, conv_L_cache=3, layer_types=["conv", "full_attention"],
        pad_token_id=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (transformers: the reference kernel of the short convolution)
        model = tf.Lfm2ForCausalLM(config).train()
    engine = Engine(model, single_backward=single_backward)
    ids = torch.randint(3, 64, (4, 9))
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits[:, :-1]
        losses = nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(4, -1)
        assert_exact_step(engine, losses.mean(1), trainable(model), single_backward)
    assert unattributed == []
