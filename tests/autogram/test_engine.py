"""Engine on small MLPs: the three loss shapes, the weighted backward, state and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_jd.autogram import Engine

from ._reference import assert_exact_step, assert_gramian_matches, grads_of, jacobian, trainable


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.LayerNorm(8), nn.Dropout(0.3), nn.Linear(8, 3))


def test_per_example_losses_3d_inputs() -> None:
    model = _mlp()
    engine = Engine(model)
    x = torch.randn(4, 6, 5)
    losses = model(x).pow(2).mean(dim=(1, 2))
    gramian = engine.compute_gramian(losses)
    assert gramian.dtype == torch.float32
    assert_gramian_matches(gramian, jacobian(losses, trainable(model)))


def test_per_example_losses_2d_inputs() -> None:
    model = _mlp()
    engine = Engine(model)
    x = torch.randn(3, 5)
    losses = nn.functional.cross_entropy(model(x), torch.tensor([0, 2, 1]), reduction="none")
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


def test_inputs_with_several_middle_dims() -> None:
    model = _mlp()
    engine = Engine(model)
    losses = model(torch.randn(2, 3, 4, 5)).sum(dim=(1, 2, 3))
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


def test_task_losses_without_batch_dim() -> None:
    model = _mlp()
    engine = Engine(model, batch_dim=None)
    out = model(torch.randn(4, 5))
    losses = torch.stack([out[:, 0].pow(2).mean(), out[:, 1:].abs().mean(), out.sum()])
    gramian = engine.compute_gramian(losses)
    assert gramian.shape == (3, 3)
    assert_gramian_matches(gramian, jacobian(losses, trainable(model)))


def test_scalar_loss_without_batch_dim() -> None:
    model = _mlp()
    engine = Engine(model, batch_dim=None)
    loss = model(torch.randn(4, 5)).pow(2).mean()
    gramian = engine.compute_gramian(loss)
    assert gramian.shape == (1, 1)
    assert_gramian_matches(gramian, jacobian(loss, trainable(model)))


def test_per_example_task_losses_are_example_major() -> None:
    model = _mlp()
    engine = Engine(model)
    out = model(torch.randn(3, 2, 5))
    losses = torch.stack([out[..., 0].pow(2).mean(1), out[..., 1:].sum((1, 2))], dim=1)  # [3, 2]
    gramian = engine.compute_gramian(losses)
    assert gramian.shape == (6, 6)
    assert_gramian_matches(gramian, jacobian(losses, trainable(model)))


def test_batch_dim_one() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    engine = Engine(model, batch_dim=1)
    out = model(torch.randn(6, 3, 5))  # [T, B, d]
    losses = out.pow(2).sum(dim=(0, 2))
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


def test_float64_parameters_give_float64_gramian() -> None:
    model = _mlp().double()
    engine = Engine(model)
    losses = model(torch.randn(3, 5, dtype=torch.float64)).sum(1)
    gramian = engine.compute_gramian(losses)
    assert gramian.dtype == torch.float64
    assert_gramian_matches(gramian, jacobian(losses, trainable(model)), rtol=1e-10)


def test_weighted_backward_after_gramian_matches_weights_times_jacobian() -> None:
    model = _mlp()
    engine = Engine(model)
    losses = model(torch.randn(4, 5)).pow(2).sum(1)
    params = trainable(model)
    jac = jacobian(losses, params)
    gramian = engine.compute_gramian(losses)
    weights = torch.softmax(gramian.diagonal(), 0)
    losses.backward(weights)
    torch.testing.assert_close(grads_of(params), weights @ jac, rtol=1e-5, atol=1e-6)


def test_disabled_engine_gives_plain_gradient_and_stores_nothing() -> None:
    model = _mlp().eval()
    x = torch.randn(4, 5)
    expected = torch.autograd.grad(model(x).sum(), trainable(model))
    engine = Engine(model)
    engine.enabled = False
    model(x).sum().backward()
    for param, grad in zip(trainable(model), expected):
        torch.testing.assert_close(param.grad, grad)
    assert engine._capture.records == []
    with pytest.raises(RuntimeError, match="captured no module call"):
        engine.compute_gramian(model(x).sum(1))


def test_disabled_context_manager_restores_state() -> None:
    model = _mlp()
    engine = Engine(model)
    with engine.disabled():
        assert not engine.enabled
        model(torch.randn(2, 5))
    assert engine.enabled
    assert engine._capture.records == []
    engine.enabled = False
    with engine.disabled():
        pass
    assert not engine.enabled


def test_no_capture_under_no_grad() -> None:
    model = _mlp()
    engine = Engine(model)
    with torch.no_grad():
        model(torch.randn(2, 5))
    assert engine._capture.records == []


def test_new_forward_resets_and_gramian_resets() -> None:
    model = _mlp()
    engine = Engine(model)
    model(torch.randn(7, 5))
    losses = model(torch.randn(3, 5)).sum(1)  # the first forward's captures are dropped
    assert len(engine._capture.records) == 3
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))
    assert engine._capture.records == []


def test_several_root_modules() -> None:
    encoder = nn.Sequential(nn.Linear(5, 6), nn.ReLU())
    head = nn.Linear(6, 2)
    engine = Engine(encoder, head)
    losses = head(encoder(torch.randn(4, 5))).sum(1)
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(encoder, head)))


def test_module_outside_engine_is_not_covered() -> None:
    encoder = nn.Sequential(nn.Linear(5, 6), nn.ReLU())
    head = nn.Linear(6, 2)
    engine = Engine(encoder)
    losses = head(encoder(torch.randn(4, 5))).sum(1)
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(encoder)))


def test_record_not_reached_from_the_sources_is_done_afterwards() -> None:
    outside = nn.Linear(3, 3)  # trainable but not covered: the layer after it is no source
    after = nn.Linear(3, 2)
    source = nn.Linear(3, 2)
    engine = Engine(after, source)
    x = torch.randn(4, 3)
    losses = (after(outside(x)) * source(x)).sum(1)
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(after, source)))


def test_frozen_parameters_are_excluded() -> None:
    model = _mlp()
    model[0].weight.requires_grad_(False)
    model[2].requires_grad_(False)
    engine = Engine(model)
    assert len(engine.parameters()) == 3
    losses = model(torch.randn(4, 5)).sum(1)
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


class _TimeMajorHead(nn.Module):
    """A batch-major layer followed by one applied to the time-major ``[T, B, d]`` layout."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)).transpose(0, 1)).transpose(0, 1)


@pytest.mark.parametrize("single_backward", [False, True])
def test_only_trainable_calls_not_split_by_example(single_backward: bool) -> None:
    """With the batch-major layers frozen, every trainable call is not split by example (nothing
    to verify): the exact per-row path alone gives the Gramian (MoE experts trained alone)."""
    model = _TimeMajorHead()
    model.first.requires_grad_(False)
    engine = Engine(model, single_backward=single_backward)
    losses = model(torch.randn(3, 5, 4)).pow(2).sum((1, 2))
    assert_exact_step(engine, losses, trainable(model), single_backward, torch.tensor([0.5, 1.0, 1.5]))


class _TablePositions(nn.Module):
    """Position embeddings looked up as a ``[T, d]`` table (no batch dimension) and added to the
    ``[B, T, d]`` token embeddings, as in Blenderbot or Perceiver."""

    def __init__(self) -> None:
        super().__init__()
        self.positions = nn.Embedding(16, 4)
        self.tokens = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))))


@pytest.mark.parametrize("length", [1, 3])
def test_table_output_of_one_row_is_not_taken_for_a_batch_broadcast(length: int) -> None:
    """With T = 1 the ``[1, d]`` table looked like an output broadcast over the batch and was expanded
    to ``[B, d]``, which turned the model's ``[B, 1, d]`` activations into ``[B, B, d]``."""
    model = _TablePositions()
    ids = torch.randint(0, 10, (3, length))
    expected_shape = model(ids).shape
    engine = Engine(model)
    out = model(ids)
    assert out.shape == expected_shape == (3, length, 2)
    losses = out.pow(2).sum((1, 2))
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


class _PermutedExpert(nn.Module):
    """A mixture-of-experts layer whose expert receives all B rows, picked in another order by an index
    (NLLB-MoE with one token per example), then scattered back."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.expert_in = nn.Linear(4, 6)
        self.expert_out = nn.Linear(6, 4)
        self.last = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        hidden = self.first(x)
        picked = hidden[None, order].reshape(-1, hidden.shape[-1])
        expert = self.expert_out(torch.relu(self.expert_in(picked)))
        mixed = torch.zeros_like(hidden).index_add(0, order, expert)
        return self.last(torch.tanh(hidden + mixed)).squeeze(1)


@pytest.mark.parametrize("order", [[2, 0, 1, 3], [0, 1, 2, 3]])
@pytest.mark.parametrize("single_backward", [False, True])
def test_rows_picked_by_an_index_are_verified(order: list[int], single_backward: bool) -> None:
    """B rows picked by an index look like the batch but need not be in example order: the grouping of
    the expert's calls is verified (a permutation takes the exact per-row path), and the Gramian is
    exact either way."""
    torch.manual_seed(0)
    model = _PermutedExpert()
    engine = Engine(model, single_backward=single_backward)
    losses = model(torch.randn(4, 4), torch.tensor(order)).pow(2)
    assert_exact_step(engine, losses, trainable(model), single_backward, torch.tensor([0.5, 1.0, 1.5, 2.0]))


def test_parameters_lists_shared_parameters_once() -> None:
    first = nn.Linear(4, 4)
    second = nn.Linear(4, 4)
    second.weight = first.weight
    engine = Engine(nn.Sequential(first, second))
    assert len(engine.parameters()) == 3


def test_module_called_twice_and_shared_linear() -> None:
    layer = nn.Linear(4, 4)
    other = nn.Linear(4, 4)
    other.weight = layer.weight
    model = nn.ModuleList([layer, other])
    engine = Engine(model)
    x = torch.randn(3, 2, 4)
    losses = other(torch.tanh(layer(torch.tanh(layer(x))))).pow(2).sum((1, 2))
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


def test_output_modified_in_place_afterwards() -> None:
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 2), nn.ReLU(inplace=True))
    engine = Engine(model)
    losses = model(torch.randn(5, 5)).sum(1)
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


def test_remove_detaches_hooks() -> None:
    model = _mlp()
    engine = Engine(model)
    engine.remove()
    model(torch.randn(2, 5))
    assert engine._capture.records == []


@pytest.mark.parametrize("part", [False, True])
def test_two_enabled_engines_on_the_same_modules_are_rejected(part: bool) -> None:
    """A second engine on modules that another enabled engine hooks (a notebook cell run again) would capture every
    forward pass twice: a clear error naming the module, and the earlier engine keeps working. Beside a disabled
    engine it may be created, and that one then cannot be enabled while the new one is; once one is removed, the
    other may be enabled."""
    model = _mlp()
    engine = Engine(model)
    with pytest.raises(RuntimeError, match=r"also given to another autogram Engine, which is enabled.*remove\(\)"):
        Engine(model[2] if part else model)
    losses = model(torch.randn(4, 5)).sum(1)
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))
    # (leaving engine.disabled() would enable it again beside the second engine)
    with pytest.raises(RuntimeError, match="also given to another autogram Engine"), engine.disabled():
        second = Engine(model[2] if part else model)
    assert not engine.enabled
    with pytest.raises(RuntimeError, match="also given to another autogram Engine"):
        engine.enabled = True
    second.remove()
    engine.enabled = True
    losses = model(torch.randn(4, 5)).sum(1)
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


def test_errors_name_a_root_among_several_by_its_position() -> None:
    model = _mlp()
    engine = Engine(model[0])
    with pytest.raises(RuntimeError, match=r"Module Linear \(module 1 of those given to the engine\) is also given"):
        Engine(model[4], model[0])
    engine.remove()


@pytest.mark.parametrize("batch_dim", [-1, 1.5, True])
def test_invalid_batch_dim(batch_dim: object) -> None:
    with pytest.raises(ValueError, match="batch_dim"):
        Engine(_mlp(), batch_dim=batch_dim)  # type: ignore[arg-type]


def test_invalid_modules() -> None:
    with pytest.raises(ValueError, match="at least one module"):
        Engine()
    with pytest.raises(TypeError, match="nn.Module"):
        Engine(torch.zeros(2))  # type: ignore[arg-type]


def test_invalid_losses() -> None:
    model = _mlp()
    engine = Engine(model)
    out = model(torch.randn(4, 5))
    with pytest.raises(TypeError, match="torch.Tensor"):
        engine.compute_gramian([out.sum()])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="require grad"):
        engine.compute_gramian(out.detach().sum(1))
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        engine.compute_gramian(out.sum())
    with pytest.raises(ValueError, match="4 examples"):
        engine.compute_gramian(out.sum(1)[:3])
    with pytest.raises(ValueError, match="floating"):
        engine.compute_gramian(torch.zeros(4, dtype=torch.long))
    task_engine = Engine(_mlp(), batch_dim=None)
    with pytest.raises(ValueError, match=r"shape \[m\]"):
        task_engine.compute_gramian(out)


def test_batch_norm_in_training_mode_is_rejected() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    engine = Engine(model)
    with pytest.raises(RuntimeError, match=r"1 \(BatchNorm1d\)"):
        model(torch.randn(4, 5))
    model.eval()  # running statistics: examples are independent
    losses = model(torch.randn(4, 5)).sum(1)
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


def test_batch_norm_without_batch_dim_is_allowed() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 2))
    engine = Engine(model, batch_dim=None)
    out = model(torch.randn(4, 5))
    losses = torch.stack([out[:, 0].mean(), out[:, 1].pow(2).mean()])
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


def test_batch_mismatch_of_module_tensor_is_reported() -> None:
    class Mixer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x.reshape(-1, 3)).reshape(x.shape)  # 2 examples x 2 rows -> 4 rows

    model = Mixer()
    engine = Engine(model.inner)
    losses = model(torch.randn(2, 2, 3)).sum((1, 2))
    with pytest.raises(ValueError, match=r"batch of 4 examples along batch_dim=0 \(in an input of Linear"):
        engine.compute_gramian(losses)


def test_failing_forward_restores_parameters_and_state() -> None:
    class Failing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))

        def forward(self, x: torch.Tensor, fail: bool = False) -> torch.Tensor:
            if fail:
                raise KeyError("boom")
            return x * self.weight

    model = Failing()
    engine = Engine(model)
    with pytest.raises(KeyError, match="boom"):
        model(torch.randn(2, 3), fail=True)
    assert isinstance(model.weight, nn.Parameter)
    assert engine._capture.depth == 0
    losses = model(torch.randn(2, 3)).pow(2).sum(1)
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


def test_reset_drops_captures() -> None:
    model = _mlp()
    engine = Engine(model)
    losses = model(torch.randn(2, 5)).sum(1)
    engine.reset()
    with pytest.raises(RuntimeError, match="captured no module call"):
        engine.compute_gramian(losses)


def test_check_gramian_allows_for_rounding_when_the_weighted_gradient_nearly_cancels() -> None:
    """Labels [1, 0, 0, 1] on this batch make Σ w_i g_i nearly cancel under the check's weights linspace(0.5, 1.5):
    wᵀ G w is 1.4e6 times below (Σ |w_i| ‖g_i‖)², so the float32 rounding of the (exact) Gramian is 2% of it. The
    check raised that a parameter was used outside its module, and JDTrainer refused to train on this batch."""
    from transformers import BertConfig, BertForSequenceClassification

    from hf_jd.synthetic import make_classification_text_dataset

    torch.manual_seed(0)
    config = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        vocab_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=2)  # fmt: skip
    model = BertForSequenceClassification(config)
    data = make_classification_text_dataset(num_train=10, num_eval=12, vocab_size=64, max_length=12, seed=1)
    batch = data["train"].select([4, 5, 6, 7])
    ids, mask, labels = (torch.tensor(batch[key]) for key in ("input_ids", "attention_mask", "labels"))
    assert labels.tolist() == [1, 0, 0, 1]
    engine = Engine(model)
    losses = F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels, reduction="none")
    gramian = engine.compute_gramian(losses)
    assert_gramian_matches(gramian, jacobian(losses, trainable(model)))
    assert engine.check_gramian(losses, gramian)
