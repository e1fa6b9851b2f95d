"""A full IWRM step: the engine's update equals autojac's ``backward`` + ``jac_to_grad`` (UPGrad, and ConFIG,
whose weights also depend on the Gramian only)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from hf_jd.aggregation import get_aggregator, get_weighting
from hf_jd.autogram import Engine
from hf_jd.autojac import backward, jac_to_grad


@pytest.mark.parametrize("name", ["upgrad", "config"])
@pytest.mark.parametrize("single_backward", [False, True])
def test_engine_step_equals_autojac_step(single_backward: bool, name: str) -> None:
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config)
    reference = copy.deepcopy(model)
    ids = torch.randint(1, 40, (4, 6))
    labels = torch.tensor([0, 1, 1, 0])

    losses = nn.functional.cross_entropy(reference(ids).logits, labels, reduction="none")
    backward(losses, reference.parameters())
    jac_to_grad(reference.parameters(), get_aggregator(name))

    engine = Engine(model, single_backward=single_backward)
    losses = nn.functional.cross_entropy(model(ids).logits, labels, reduction="none")
    weights = get_weighting(name)(engine.compute_gramian(losses))
    if single_backward:
        engine.backward(weights)
    else:
        losses.backward(weights)
    for (name, param), expected in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.grad, expected.grad, rtol=1e-4, atol=1e-6, msg=name)
