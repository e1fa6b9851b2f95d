"""A model changed after its Engine was created: modules added or replaced (rejected, since they have no hooks),
pruning (``torch.nn.utils.prune`` swaps ``weight`` for ``weight_orig`` and a mask), Linear and Embedding subclasses
whose output stops matching their closed form (a weight mask pruned during training). Also the batch size read from
a root module's inputs, and two single-backward engines sharing losses with a module neither covers."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch import nn

from hf_jd.autogram import Engine

from ._reference import assert_exact_step, grads_of, jacobian, trainable


class _Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def _losses(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), torch.arange(x.shape[0]) % 3, reduction="none")


def test_a_trainable_module_added_after_the_engine_is_rejected_by_name() -> None:
    torch.manual_seed(0)
    model = _Classifier()
    engine = Engine(model)
    model.head = nn.Linear(8, 3)  # e.g. a new head for a new task
    with pytest.raises(RuntimeError, match=r"Module head \(Linear\) has trainable parameters but joined the model"):
        _losses(model, torch.randn(4, 5))
    with engine.disabled():  # nothing is checked while the engine does not capture
        _losses(model, torch.randn(4, 5))
    engine.remove()
    engine = Engine(model)  # the documented way out
    assert_exact_step(engine, _losses(model, torch.randn(4, 5)), trainable(model), single_backward=False)


def test_a_parametrization_registered_after_the_engine_is_rejected() -> None:
    torch.manual_seed(0)
    model = _Classifier()
    Engine(model)
    nn.utils.parametrizations.weight_norm(model.body)
    with pytest.raises(RuntimeError, match="joined the model after the autogram Engine was created"):
        _losses(model, torch.randn(4, 5))


def test_frozen_or_parameter_free_modules_added_after_the_engine_are_fine() -> None:
    torch.manual_seed(0)
    model = _Classifier()
    engine = Engine(model)
    model.body = nn.Sequential(model.body, nn.Dropout(0.0))  # a wrapper without parameters around a hooked module
    frozen = nn.Linear(8, 8)
    frozen.requires_grad_(False)
    model.head = nn.Sequential(frozen, model.head)
    assert_exact_step(engine, _losses(model, torch.randn(4, 5)), trainable(model), single_backward=False)


@pytest.mark.parametrize("single_backward", [False, True])
def test_pruning_after_the_engine_is_exact(single_backward: bool) -> None:
    torch.manual_seed(0)
    model = _Classifier()
    engine = Engine(model, single_backward=single_backward)
    assert_exact_step(engine, _losses(model, torch.randn(4, 5)), trainable(model), single_backward)
    prune.l1_unstructured(model.body, "weight", amount=0.5)  # weight_orig (trainable) * weight_mask
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        assert_exact_step(engine, _losses(model, torch.randn(4, 5)), trainable(model), single_backward)


class _MaskedLinear(nn.Linear):
    """Movement-pruning style: ``F.linear(x, W * mask, b)`` with a mask buffer."""

    def __init__(self, *args: int) -> None:
        super().__init__(*args)
        self.register_buffer("mask", torch.ones_like(self.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


@pytest.mark.parametrize("single_backward", [False, True])
def test_a_linear_subclass_is_checked_on_every_call(single_backward: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_MaskedLinear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    engine = Engine(model, single_backward=single_backward)
    for step in range(3):  # the mask is all ones on the first call, which verifies the closed form
        if step == 1:
            model[0].mask[:, ::2] = 0.0
        model.zero_grad(set_to_none=True)
        losses = model(torch.randn(5, 6)).squeeze(-1).pow(2)
        assert_exact_step(engine, losses, trainable(model), single_backward)


class _MaskedEmbedding(nn.Embedding):
    def __init__(self, *args: int) -> None:
        super().__init__(*args)
        self.register_buffer("mask", torch.ones(self.weight.shape[0], 1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight * self.mask)


def test_an_embedding_subclass_is_checked_on_all_the_ids_of_every_call(recwarn: pytest.WarningsRecorder) -> None:
    torch.manual_seed(0)
    embedding, head = _MaskedEmbedding(10, 6), nn.Linear(6, 1)
    engine = Engine(embedding, head)
    ids = torch.tensor([[3, 9, 3, 9], [0, 2, 4, 1], [5, 6, 7, 8]])  # the first example uses no even id
    for step in range(3):
        if step == 1:
            embedding.mask[::2] = 0.0
        embedding.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        losses = head(embedding(ids).tanh()).squeeze(-1).sum(1).pow(2)
        assert_exact_step(engine, losses, trainable(embedding, head), single_backward=False)
    # (a root module itself: from the step after the change on, its calls are captured on the generic path)
    assert not [w for w in recwarn if "outside the calls of the modules that own them" in str(w.message)]


def test_the_first_positional_input_of_the_root_gives_the_batch_size() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
    head = nn.Linear(16, 1)
    engine = Engine(encoder, head)
    for length in (3, 6):  # a [T, T] mask larger than the batch of 4 is not the batch
        x = torch.randn(4, length, 16)
        mask = nn.Transformer.generate_square_subsequent_mask(length)
        encoder.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        losses = head(encoder(x, mask=mask, is_causal=True)).squeeze(-1).pow(2).mean(1)
        assert_exact_step(engine, losses, trainable(encoder, head), single_backward=False)


def test_two_single_backward_engines_share_the_parameters_neither_covers() -> None:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
    adapter = nn.Linear(8, 8)  # trainable, in neither engine
    decoder = nn.Sequential(nn.Tanh(), nn.Linear(8, 2))
    first, second = Engine(encoder, single_backward=True), Engine(decoder, single_backward=True)
    losses = decoder(adapter(encoder(torch.randn(5, 6)))).pow(2).sum(1)
    params = trainable(encoder, adapter, decoder)
    jac = jacobian(losses, params)
    gramian = first.compute_gramian(losses) + second.compute_gramian(losses)
    weights = torch.linspace(0.5, 1.5, 5)
    first.backward(weights)
    second.backward(weights)
    torch.testing.assert_close(grads_of(params), weights @ jac, rtol=1e-4, atol=1e-6)
    # (the Gramians of the two engines add up to the Gramian of the parameters they cover)
    covered = trainable(encoder, decoder)
    covered_ids = {id(p) for p in covered}
    columns = torch.cat([torch.full((p.numel(),), id(p) in covered_ids) for p in params])
    torch.testing.assert_close(gramian, jac[:, columns] @ jac[:, columns].T, rtol=1e-4, atol=1e-6)


def _masked_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, self.weight * self.mask, self.bias)


def _squared_weight_conv_forward(self: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    return F.conv1d(x, self.weight**2, self.bias, padding=1)


@pytest.mark.parametrize("single_backward", [False, True])
def test_a_forward_replaced_on_the_instance_takes_the_exact_generic_path(single_backward: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    engine = Engine(model, single_backward=single_backward)
    model[0].register_buffer("mask", (torch.rand(8, 6) > 0.5).float())
    model[0].forward = types.MethodType(_masked_linear_forward, model[0])  # after the engine: checked on each call
    with pytest.warns(RuntimeWarning, match=r"module 0 \(Linear\) has a forward replaced on the instance"):
        assert_exact_step(engine, model(torch.randn(5, 6)).squeeze(-1).pow(2), trainable(model), single_backward)
    assert bool((model[0].weight.grad * (1 - model[0].mask) == 0).all())


def test_a_convolution_with_a_forward_replaced_on_the_instance_is_exact() -> None:
    torch.manual_seed(0)
    conv, head = nn.Conv1d(2, 3, 3, padding=1), nn.Linear(3 * 5, 1)
    conv.forward = types.MethodType(_squared_weight_conv_forward, conv)
    engine = Engine(conv, head)
    with pytest.warns(RuntimeWarning, match="forward replaced on the instance"):
        losses = head(torch.tanh(conv(torch.randn(4, 2, 5))).flatten(1)).squeeze(-1).pow(2)
        assert_exact_step(engine, losses, trainable(conv, head), single_backward=False)


def test_a_penalty_computed_before_the_forward_pass_is_rejected_with_the_way_out() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    engine = Engine(model)
    penalty = sum(param.pow(2).sum() for param in model.parameters())
    losses = model(torch.randn(5, 6)).squeeze(-1).pow(2) + 1e-3 * penalty
    with pytest.raises(RuntimeError, match="a penalty on the weights added to the losses: compute it after the"):
        engine.compute_gramian(losses)
    with pytest.warns(RuntimeWarning, match="penalty"):  # the way out: computed after the forward pass
        outputs = model(torch.randn(5, 6)).squeeze(-1).pow(2)
        losses = outputs + 1e-3 * sum(param.pow(2).sum() for param in model.parameters())
        assert_exact_step(engine, losses, trainable(model), single_backward=False)


def test_a_batch_norm_without_running_statistics_in_eval_mode_is_rejected_as_such() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False), nn.Flatten())
    model.eval()
    Engine(model)
    with pytest.raises(RuntimeError, match=r"also in eval mode, since it keeps no running statistics"):
        model(torch.randn(3, 1, 5, 5))


def test_a_torchscript_submodule_is_rejected_by_name() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), torch.jit.script(nn.Linear(8, 1)))
    with pytest.raises(TypeError, match=r"Module 2 \(RecursiveScriptModule\) is a TorchScript module"):
        Engine(model)


def test_a_flat_root_input_that_is_not_the_batch_is_explained() -> None:
    class _Bags(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bag = nn.EmbeddingBag(20, 4)
            self.head = nn.Linear(4, 1)

        def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
            return self.head(self.bag(ids, offsets)).squeeze(-1)

    model = _Bags()
    engine = Engine(model)
    losses = model(torch.randint(0, 20, (11,)), torch.tensor([0, 3, 7])).pow(2)
    with pytest.raises(ValueError, match=r"for nn.EmbeddingBag, \[B, L\] ids padded with its padding_idx"):
        engine.compute_gramian(losses)


def test_get_peft_model_after_the_engine_is_rejected_by_name() -> None:
    """LoRA adapters added by PEFT after the engine was created have no hooks: their parameters would be missing."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        vocab_size=50, max_position_embeddings=32, num_labels=2)  # fmt: skip
    bert = BertForSequenceClassification(config)
    Engine(bert)
    model = get_peft_model(bert, LoraConfig(r=4, target_modules=["query", "value"]))
    with pytest.raises(RuntimeError, match=r"query\.lora_A\.default \(Linear\) has trainable parameters but joined"):
        model(input_ids=torch.randint(0, 50, (4, 7)))
