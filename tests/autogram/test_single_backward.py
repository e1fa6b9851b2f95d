"""Engine.backward: the weighted gradient written from the captured factors (no second pass)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification

from hf_jd.autogram import Engine

from ._reference import assert_gramian_matches, grads_of, jacobian, trainable


def _check(model: nn.Module, engine: Engine, losses: torch.Tensor, params: list[nn.Parameter]) -> None:
    jac = jacobian(losses, params)
    gramian = engine.compute_gramian(losses)
    assert_gramian_matches(gramian, jac)
    weights = torch.linspace(0.5, 1.5, losses.numel())
    engine.backward(weights)
    torch.testing.assert_close(grads_of(params), weights @ jac, rtol=1e-4, atol=1e-6)


def test_gpt2_tied_embeddings() -> None:
    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    engine = Engine(model, single_backward=True)
    ids = torch.randint(0, 40, (3, 6))
    logits = model(input_ids=ids).logits
    losses = nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none").mean(1)
    _check(model, engine, losses, trainable(model))


def test_vit_generic_and_conv() -> None:
    config = ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, num_labels=2)
    model = ViTForImageClassification(config)
    engine = Engine(model, single_backward=True)
    losses = model(pixel_values=torch.randn(2, 3, 8, 8)).logits.pow(2).sum(1)
    _check(model, engine, losses, trainable(model))


@pytest.mark.parametrize("batch_dim", [0, None])
def test_tasks(batch_dim: int | None) -> None:
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    engine = Engine(model, batch_dim=batch_dim, single_backward=True)
    out = model(torch.randint(0, 10, (3, 4)))
    if batch_dim is None:
        losses = torch.stack([out[..., 0].mean(), out[..., 1].pow(2).mean()])
    else:
        losses = torch.stack([out[..., 0].mean(1), out[..., 1].pow(2).mean(1)], dim=1)
    _check(model, engine, losses, trainable(model))


def test_uncovered_parameters_get_their_gradient_by_fallback() -> None:
    encoder = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
    head = nn.Linear(5, 2)
    engine = Engine(encoder, single_backward=True)
    losses = head(encoder(torch.randn(3, 4))).pow(2).sum(1)
    params = trainable(encoder, head)
    jac = jacobian(losses, params)
    engine.compute_gramian(losses)
    weights = torch.tensor([1.0, 2.0, 0.5])
    engine.backward(weights)
    torch.testing.assert_close(grads_of(params), weights @ jac, rtol=1e-4, atol=1e-6)


def test_gradient_hooks_fire_and_gradients_accumulate() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))
    fired: list[int] = []
    for param in model.parameters():
        param.register_post_accumulate_grad_hook(lambda p: fired.append(id(p)))
    engine = Engine(model, single_backward=True)
    x = torch.randn(3, 4)
    losses = model(x).squeeze(1)
    expected = jacobian(losses, trainable(model)).sum(0)
    engine.compute_gramian(losses)
    engine.backward(torch.ones(3, 1).squeeze(1))
    assert sorted(fired) == sorted(id(p) for p in model.parameters())
    losses = model(x).squeeze(1)
    engine.compute_gramian(losses)
    engine.backward(torch.ones(3))
    torch.testing.assert_close(grads_of(trainable(model)), 2 * expected, rtol=1e-5, atol=1e-6)


def test_backward_errors() -> None:
    model = nn.Linear(3, 2)
    plain = Engine(model)
    losses = model(torch.randn(2, 3)).sum(1)
    plain.compute_gramian(losses)
    with pytest.raises(RuntimeError, match="single_backward=True"):
        plain.backward(torch.ones(2))
    plain.remove()
    engine = Engine(model, single_backward=True)
    with pytest.raises(RuntimeError, match="must follow compute_gramian"):
        engine.backward(torch.ones(2))
    losses = model(torch.randn(2, 3)).sum(1)
    engine.compute_gramian(losses)
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        engine.backward(torch.ones(3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        engine.backward([1.0, 1.0])  # type: ignore[arg-type]


@pytest.mark.parametrize(("length", "kept"), [(20, True), (1, False)])
def test_rows_kept_only_when_no_larger_than_output_gradients(length: int, kept: bool) -> None:
    # Per-example weight gradients [E, 4*3] vs output gradients [E, T, 4]: kept (and the factors
    # dropped) for long sequences, recomputed as (diag(w) G)ᵀ A from the factors for short ones.
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 2))
    engine = Engine(model, single_backward=True)
    losses = model(torch.randn(2, length, 3)).pow(2).sum((1, 2))
    params = trainable(model)
    jac = jacobian(losses, params)
    assert_gramian_matches(engine.compute_gramian(losses), jac)
    assert engine._bound is not None
    first = next(record for uses in engine._bound.uses.values() for record, _ in uses if record.module is model[0])
    assert first.factors is not None
    assert (first.factors._rows is not None) == kept
    assert (first.factors.grads is None) == kept  # kept rows replace the output gradients
    weights = torch.tensor([0.3, 1.7])
    engine.backward(weights)
    torch.testing.assert_close(grads_of(params), weights @ jac, rtol=1e-4, atol=1e-6)


def test_weighted_gradient_with_tasks_and_wide_outputs() -> None:
    # Several tasks per example (einsum combination) and d_out > d_in (the inputs are scaled).
    model = nn.Sequential(nn.Linear(2, 9), nn.Tanh(), nn.Linear(9, 3))
    engine = Engine(model, single_backward=True)
    out = model(torch.randn(3, 2, 2))
    losses = torch.stack([out[..., 0].sum(1), out[..., 1:].pow(2).sum((1, 2))], dim=1)
    params = trainable(model)
    jac = jacobian(losses, params)
    engine.compute_gramian(losses)
    weights = torch.tensor([[0.5, 1.0], [2.0, 0.1], [1.0, 1.0]])
    engine.backward(weights)
    torch.testing.assert_close(grads_of(params), weights.reshape(-1) @ jac, rtol=1e-4, atol=1e-6)


def test_sparse_embedding_gets_a_sparse_gradient() -> None:
    """nn.Embedding(sparse=True): the ordinary backward writes a sparse .grad (for SparseAdam); so does
    Engine.backward, with the same values."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 4, sparse=True), nn.Tanh(), nn.Flatten(), nn.Linear(12, 1))
    dense = nn.Sequential(nn.Embedding(20, 4), nn.Tanh(), nn.Flatten(), nn.Linear(12, 1))
    dense.load_state_dict(model.state_dict())  # the reference Jacobian with dense gradients
    engine = Engine(model, single_backward=True)
    ids = torch.randint(0, 20, (3, 3))
    losses = model(ids).squeeze(1).pow(2)
    params = trainable(model)
    jac = jacobian(dense(ids).squeeze(1).pow(2), trainable(dense))
    assert_gramian_matches(engine.compute_gramian(losses), jac)
    weights = torch.tensor([0.5, 1.0, 1.5])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "sparse invariant checks are implicitly disabled" warning
        engine.backward(weights)
    assert model[0].weight.grad.is_sparse
    torch.optim.SparseAdam(list(model[0].parameters())).step()  # accepted
    grads = torch.cat([p.grad.to_dense().reshape(-1) for p in params])
    torch.testing.assert_close(grads, weights @ jac, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("single_backward", [False, True])
def test_sparse_embedding_bag_is_exact_with_a_sparse_gradient(single_backward: bool) -> None:
    """nn.EmbeddingBag(sparse=True) takes the generic path: its aliases were views, whose backward cannot reshape
    a sparse gradient (the weighted backward failed), its per-row gradients were sparse (compute_gramian failed on
    a vmapped pass's fallback) and Engine.backward wrote a dense .grad (rejected by SparseAdam)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(20, 4, sparse=True), nn.Tanh(), nn.Linear(4, 1))
    dense = nn.Sequential(nn.EmbeddingBag(20, 4), nn.Tanh(), nn.Linear(4, 1))
    dense.load_state_dict(model.state_dict())
    engine = Engine(model, single_backward=single_backward)
    ids = torch.randint(0, 20, (3, 5))
    jac = jacobian(dense(ids)[:, 0].pow(2), trainable(dense))
    for _ in range(2):  # (the second step after the vmapped pass's failure: one vector at a time)
        model.zero_grad(set_to_none=True)
        losses = model(ids)[:, 0].pow(2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the vmapped pass's fallback)
            gramian = engine.compute_gramian(losses)
        assert_gramian_matches(gramian, jac)
        weights = torch.tensor([0.5, 1.0, 1.5])
        engine.backward(weights) if single_backward else losses.backward(weights)
        assert model[0].weight.grad.is_sparse
        grads = torch.cat([p.grad.to_dense().reshape(-1) for p in trainable(model)])
        torch.testing.assert_close(grads, weights @ jac, rtol=1e-4, atol=1e-6)
    torch.optim.SparseAdam(list(model[0].parameters())).step()  # accepted


def test_second_gramian_on_the_same_forward_pass_is_explained() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    engine = Engine(model)
    losses = model(torch.randn(2, 4)).squeeze(1)
    engine.compute_gramian(losses)
    with pytest.raises(RuntimeError, match="already called on those of the last forward pass run with the engine"):
        engine.compute_gramian(losses)


def test_forward_pass_with_the_engine_disabled_after_a_step_is_explained() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    engine = Engine(model)
    losses = model(torch.randn(2, 4)).squeeze(1)
    losses.backward(engine.compute_gramian(losses).diagonal())
    with engine.disabled():
        losses = model(torch.randn(2, 4)).squeeze(1)
    with pytest.raises(RuntimeError, match=r"engine disabled, e.g. under engine.disabled\(\), captures nothing"):
        engine.compute_gramian(losses)


class _OptionalEmbedding(nn.Module):
    """A module with a parameter of its own that its forward uses only sometimes (like Wav2Vec2's mask
    embedding when nothing is masked)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.mask_embedding = nn.Parameter(torch.randn(3))
        self.masked = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.linear(x)
        return hidden + self.mask_embedding if self.masked else hidden


@pytest.mark.parametrize("single_backward", [False, True])
def test_unreached_parameter_keeps_no_gradient(single_backward: bool) -> None:
    """As in an ordinary backward pass, a parameter the losses do not reach keeps .grad None (a zero
    gradient would still move it under weight decay and momentum)."""
    model = _OptionalEmbedding()
    engine = Engine(model, single_backward=single_backward)
    losses = model(torch.randn(4, 3)).pow(2).sum(1)
    engine.compute_gramian(losses)
    if single_backward:
        engine.backward(torch.ones(4))
    else:
        losses.backward(torch.ones(4))
    assert model.mask_embedding.grad is None
    assert model.linear.weight.grad is not None
    model.masked = True
    losses = model(torch.randn(4, 3)).pow(2).sum(1)
    engine.compute_gramian(losses)
    if single_backward:
        engine.backward(torch.ones(4))
    else:
        losses.backward(torch.ones(4))
    assert model.mask_embedding.grad is not None and model.mask_embedding.grad.abs().sum() > 0


@pytest.mark.parametrize("layout", ["summed", "stacked"])
def test_two_single_backward_engines_each_write_their_own_gradients(layout: str) -> None:
    """Two models, one engine each: each backward() writes the gradients of its own parameters only
    (the first one used to write the other model's too, doubling them or freeing the graph)."""
    torch.manual_seed(0)
    first, second = nn.Sequential(nn.Linear(3, 4), nn.Tanh()), nn.Sequential(nn.Linear(4, 2), nn.Tanh())
    engines = [Engine(first, single_backward=True), Engine(second, single_backward=True)]
    x = torch.randn(5, 3)
    if layout == "summed":
        losses = first(x).pow(2).sum(1) + second(torch.randn(5, 4)).pow(2).sum(1)
    else:
        losses = second(first(x)).pow(2).sum(1)
    params = trainable(first, second)
    jac = jacobian(losses, params)
    weights = torch.linspace(0.5, 1.5, 5)
    for engine in engines:
        engine.compute_gramian(losses, retain_graph=True)
    for engine in engines:
        engine.backward(weights)
    torch.testing.assert_close(grads_of(params), weights @ jac, rtol=1e-4, atol=1e-6)


def test_a_disabled_engine_does_not_take_over_other_parameters() -> None:
    """A disabled single-backward engine (e.g. an earlier JDTrainer's, between its steps) writes nothing,
    so the parameters it covers outside another engine's modules still get their gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    idle = Engine(model, single_backward=True)
    idle.enabled = False
    engine = Engine(model[0], single_backward=True)
    losses = model(torch.randn(5, 3)).pow(2).sum(1)
    params = trainable(model)
    jac = jacobian(losses, params)
    engine.compute_gramian(losses)
    weights = torch.linspace(0.5, 1.5, 5)
    engine.backward(weights)
    torch.testing.assert_close(grads_of(params), weights @ jac, rtol=1e-4, atol=1e-6)


def test_graph_freed_once_the_position_table_plan_is_known() -> None:
    """BERT's ``[1, T, d]`` position table is planned at the broadcasting addition. The first step keeps the graph
    for the exact fallback; once plans of that structure succeeded, the Gramian pass frees the graph as it goes (the
    peak memory of the single backward), and the steps stay exact."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    model = BertForSequenceClassification(config).train()
    engine = Engine(model, single_backward=True)
    params = trainable(model)
    for step in range(3):
        ids, labels = torch.randint(1, 50, (3, 6)), torch.randint(0, 2, (3,))
        losses = nn.functional.cross_entropy(model(input_ids=ids).logits, labels, reduction="none")
        jac = jacobian(losses, params)
        assert_gramian_matches(engine.compute_gramian(losses), jac)
        freed = False
        try:
            torch.autograd.grad(losses.sum(), params[0], retain_graph=True)
        except RuntimeError:
            freed = True
        assert freed == (step > 0)
        weights = torch.linspace(0.5, 1.5, 3)
        model.zero_grad(set_to_none=True)
        engine.backward(weights)
        torch.testing.assert_close(grads_of(params), weights @ jac, rtol=1e-4, atol=1e-6)
