"""Generic calls from whose inside a tensor reaches the losses otherwise than through their outputs (a forward hook
keeping a child's output, as transformers records router logits): their parameters stay exact on every step."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import Tensor, nn

from hf_jd.autogram import Engine
from hf_jd.autojac._utils import graph_nodes
from hf_jd.autogram._escapes import escaping_calls
from hf_jd.autogram._generic import GenericRecord

from ._reference import assert_gramian_matches, grads_of, jacobian, trainable

B, T, D = 3, 5, 8


class _Router(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, 4, bias=False)
        self.up = nn.Linear(D, D)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.up(x), self.gate(x)


class _Layer(nn.Module):
    """A layer with a parameter of its own (a generic call) applied before a child whose second output the layer
    drops; a hook keeps it instead."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.eye(D) + 0.3 * torch.randn(D, D))
        self.router = _Router()

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(x @ self.mix)  # (a product with the data: no broadcast plan for this parameter)
        out, _ = self.router(h)
        return h + out


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = _Layer()
        self.head = nn.Linear(D, 3)
        self.recorded: list[Tensor] = []
        self.layer.router.register_forward_hook(lambda module, args, output: self.recorded.append(output[1]))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.recorded.clear()
        return self.head(self.layer(x)), self.recorded[0]


def _losses(model: nn.Module, batch_term: bool) -> Tensor:
    out, logits = model(torch.randn(B, T, D))
    per_example = out.pow(2).mean(dim=(1, 2))
    probabilities = logits.softmax(-1)
    if batch_term:  # a load-balancing term over the whole batch, added to every row
        return per_example + 0.5 * probabilities.mean(dim=(0, 1)).pow(2).sum()
    return per_example + probabilities.pow(2).mean(dim=(1, 2))  # the recorded logits, example by example


@pytest.mark.parametrize("single_backward", [False, True])
@pytest.mark.parametrize("batch_term", [False, True])
def test_a_tensor_kept_by_a_hook_inside_a_generic_call(single_backward: bool, batch_term: bool) -> None:
    torch.manual_seed(0)
    model = _Model()
    engine = Engine(model, single_backward=single_backward)
    params = trainable(model)
    for step in range(3):  # (the products of the layer used to start at its outputs from the second step on)
        torch.manual_seed(10 + step)
        losses = _losses(model, batch_term)
        jac = jacobian(losses, params)
        assert_gramian_matches(engine.compute_gramian(losses, retain_graph=True), jac)
        weights = torch.linspace(0.5, 1.5, B)
        model.zero_grad(set_to_none=True)
        if single_backward:
            engine.backward(weights)
        else:
            losses.backward(weights)
        torch.testing.assert_close(grads_of(params), weights @ jac, rtol=1e-4, atol=1e-6)


def _generic_records(model: nn.Module, hooked: bool) -> tuple[list[GenericRecord], Tensor]:
    engine = Engine(model)
    if not hooked:
        model.recorded.append(torch.zeros(()))  # (a stale entry: the hook's output is not used)
    losses = _losses(model, batch_term=True) if hooked else model(torch.randn(B, T, D))[0].pow(2).mean(dim=(1, 2))
    records = [record for record in engine._capture.records if isinstance(record, GenericRecord)]
    return records, losses


def test_escaping_calls_finds_the_hooked_path_only() -> None:
    torch.manual_seed(0)
    records, losses = _generic_records(_Model(), hooked=True)
    assert [record.module_name for record in escaping_calls(records, list(graph_nodes([losses.grad_fn])))] == ["layer"]
    torch.manual_seed(0)
    records, losses = _generic_records(_Model(), hooked=False)
    assert records and escaping_calls(records, list(graph_nodes([losses.grad_fn]))) == []


@pytest.mark.slow
def test_doge_router_logits_in_the_losses_single_backward() -> None:
    """Doge's decoder layers scale their input by a parameter of their own (``input_residual``, a generic call) before
    the router, whose logits transformers records with a hook for the load-balancing loss: the update of the
    single-backward mode missed that loss's part from the second step on."""
    torch.manual_seed(0)
    config = tf.DogeConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0, num_key_value_heads=1, keep_window_size=4, is_moe=True,
        num_experts=4, num_experts_per_tok=2,
    )
    model = tf.DogeForCausalLM(config).train()
    engine = Engine(model, single_backward=True)
    params = trainable(model)
    ids = torch.randint(3, 64, (B, 10))
    for _ in range(3):
        out = model(input_ids=ids, output_router_logits=True)
        tokens = nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        losses = tokens.view(B, -1).mean(1) + 0.05 * out.aux_loss
        jac = jacobian(losses, params)
        assert_gramian_matches(engine.compute_gramian(losses), jac)
        weights = torch.linspace(0.5, 1.5, B)
        model.zero_grad(set_to_none=True)
        engine.backward(weights)
        torch.testing.assert_close(grads_of(params), weights @ jac, rtol=1e-4, atol=1e-6)
