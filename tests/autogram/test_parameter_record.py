"""Parameters read outside the calls of their modules and only broadcast over the batch further on (DeBERTa's
relative-position table): per-example gradients from the ordinary pass, exact against the explicit Jacobian."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as tf
from torch import Tensor, nn

from hf_jd.autogram import Engine

from ._reference import assert_gramian_matches, count_per_row, count_unattributed, grads_of, jacobian, trainable

T, HEADS = 5, 2


def _assert_step(model: nn.Module, losses_of, single_backward: bool, steps: int = 2) -> None:
    """``steps`` steps: the Gramian and the weighted update match the explicit Jacobian, without warnings."""
    engine = Engine(model, single_backward=single_backward)
    params = trainable(model)
    for step in range(steps):
        torch.manual_seed(step)
        losses = losses_of(model)
        jac = jacobian(losses, params)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            gramian = engine.compute_gramian(losses, retain_graph=not single_backward or None)
        assert_gramian_matches(gramian, jac)
        weights = torch.linspace(0.5, 1.5, jac.shape[0])
        model.zero_grad(set_to_none=True)
        if single_backward:
            engine.backward(weights)
        else:
            losses.backward(weights.view(losses.shape))
        torch.testing.assert_close(grads_of(params), weights @ jac, rtol=1e-4, atol=1e-6)
    engine.remove()


def _deberta(max_relative_positions: int = 4) -> nn.Module:
    config = tf.DebertaConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, relative_attention=True, max_relative_positions=max_relative_positions,
        pos_att_type=["c2p", "p2c"], num_labels=3,
    )
    torch.manual_seed(0)
    return tf.DebertaForSequenceClassification(config).train()


def _deberta_losses(batch: int, tasks: int = 0):
    def losses_of(model: nn.Module) -> Tensor:
        ids = torch.randint(3, 40, (batch, 7))
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        logits = model(input_ids=ids, attention_mask=mask).logits
        per_example = nn.functional.cross_entropy(logits, torch.arange(batch) % 3, reduction="none")
        if tasks:  # [B, m]: one loss per example and task
            return torch.stack([per_example, logits.pow(2).sum(1)][:tasks], dim=1)
        return per_example

    return losses_of


@pytest.mark.parametrize("single_backward", [False, True])
@pytest.mark.parametrize("batch", [3, 8])  # (8: as many examples as relative positions, 2 * 4)
def test_deberta_relative_table_read_outside_its_embedding_uses_the_ordinary_pass(
    single_backward: bool, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeBERTa (v1) reads ``encoder.rel_embeddings.weight`` without calling its Embedding, drops it out and projects
    it in each layer; its per-row gradients came from a batched backward pass over the loss rows (and a warning)."""
    unattributed = count_unattributed(monkeypatch)
    _assert_step(_deberta(), _deberta_losses(batch), single_backward)
    assert unattributed == []


@pytest.mark.parametrize("single_backward", [False, True])
def test_deberta_v2_relative_table_without_layer_norm(single_backward: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """DeBERTa-v2 with ``norm_rel_ebd="none"`` reads its table the same way, then projects it with the attention's own
    query and key layers (shared keys)."""
    unattributed = count_unattributed(monkeypatch)
    _assert_step(_deberta_v2("none"), _deberta_losses(4), single_backward)
    assert unattributed == []


def _deberta_v2(norm_rel_ebd: str) -> nn.Module:
    """A tiny DeBERTa-v2 whose relative table is projected by the attention's own query and key layers (shared
    keys), layer-normalised or not (``norm_rel_ebd``)."""
    config = tf.DebertaV2Config(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, relative_attention=True, position_buckets=4, max_relative_positions=8,
        pos_att_type=["p2c", "c2p"], norm_rel_ebd=norm_rel_ebd, share_att_key=True, position_biased_input=False,
        num_labels=3,
    )
    torch.manual_seed(0)
    return tf.DebertaV2ForSequenceClassification(config).train()


@pytest.mark.parametrize("single_backward", [False, True])
def test_deberta_relative_table_with_per_task_losses(single_backward: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``[B, m]`` losses: the pass is batched over the tasks and the plan maps each task's gradients."""
    unattributed = count_unattributed(monkeypatch)
    _assert_step(_deberta(), _deberta_losses(4, tasks=2), single_backward)
    assert unattributed == []


def test_deberta_relative_table_beside_the_classifier_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the table and the classifier trainable (the engine needs a captured call): the table's part of the Gramian
    is a large share of it, a strict check of its mapped per-example gradients."""
    unattributed = count_unattributed(monkeypatch)
    model = _deberta()
    with torch.no_grad():  # (weights far from the tiny initialisation: gradients of the table well above rounding)
        for name, param in model.named_parameters():
            if not name.endswith("LayerNorm.weight"):
                param.normal_(std=0.5)
    model.requires_grad_(False)
    table = model.deberta.encoder.rel_embeddings
    table.requires_grad_(True)
    model.classifier.requires_grad_(True)
    engine = Engine(model)
    losses = _deberta_losses(4)(model)
    jac = jacobian(losses, trainable(model))
    table_part = jacobian(losses, [table.weight])
    assert float(table_part.norm()) > 0.3 * float(jac.norm())
    assert_gramian_matches(engine.compute_gramian(losses), jac)
    assert unattributed == []


class _ReadTable(nn.Module):
    """Per-example scores plus a ``[T, HEADS]`` slice of a child's table read directly (not by calling the child),
    dropped out and projected by a Linear layer, then broadcast over the batch; ``other_use`` also multiplies the
    table with the examples' features (a use that is no broadcast)."""

    def __init__(self, native_dropout: bool = False, other_use: bool = False) -> None:
        super().__init__()
        self.table = nn.Embedding(9, 3)
        self.proj = nn.Linear(3, HEADS * T)
        self.scores = nn.Linear(3, HEADS * T)
        self.native_dropout = native_dropout
        self.other_use = other_use

    def forward(self, x: Tensor) -> Tensor:
        table = self.table.weight[2 : 2 + T].unsqueeze(0)  # [1, T, 3], shared by the examples
        if self.native_dropout:  # (the kernel CUDA runs for nn.Dropout)
            table = torch.native_dropout(table, 0.25, True)[0]
        else:
            table = nn.functional.dropout(table, 0.25, training=True)
        bias = self.proj(table).view(1, T, HEADS, T).permute(0, 2, 1, 3)  # [1, HEADS, T, T]
        scores = self.scores(x).view(-1, HEADS, 1, T) + bias
        out = scores.tanh().flatten(1)
        if self.other_use:
            out = out + (x @ self.table.weight.T).sum(1, keepdim=True)
        return out


def _read_table_losses(model: nn.Module) -> Tensor:
    out = model(torch.randn(6, 3))
    return out.pow(2).mean(1) + out[:, :3].sum(1)


@pytest.mark.parametrize("single_backward", [False, True])
@pytest.mark.parametrize("native_dropout", [False, True])
def test_table_read_directly_and_broadcast(
    single_backward: bool, native_dropout: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    unattributed = count_unattributed(monkeypatch)
    torch.manual_seed(0)
    _assert_step(_ReadTable(native_dropout=native_dropout), _read_table_losses, single_backward)
    assert unattributed == []


def test_table_read_directly_with_another_use_keeps_the_per_row_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The table takes the batched pass over the loss rows; the Linear layer that projects it is still planned (its
    broadcasting node computes its share in the ordinary pass, although the projection's input is no data)."""
    unattributed = count_unattributed(monkeypatch)
    per_row = count_per_row(monkeypatch)
    torch.manual_seed(0)
    model = _ReadTable(other_use=True)
    engine = Engine(model)
    losses = _read_table_losses(model)
    with pytest.warns(RuntimeWarning, match=r"table\.weight.*outside the calls of the modules that own them"):
        gramian = engine.compute_gramian(losses)
    assert_gramian_matches(gramian, jacobian(losses, trainable(model)))
    assert unattributed == [1]
    assert per_row == []


@pytest.mark.parametrize("single_backward", [False, True])
def test_deberta_v3_layer_normalised_table_is_normalised_once(
    single_backward: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeBERTa-v3 layer-normalises its relative table (``norm_rel_ebd="layer_norm"``) and projects it with the
    attention's query and key layers, shared over the batch: exact, with the table normalised once per step and not
    once per example (its per-example output gradients come with a stride-0 repetition of the table)."""
    from hf_jd.autogram import _layer_norm

    repeated: list[tuple[int, ...]] = []  # shapes of the normalised tensors that repeat entries (stride 0)
    original = _layer_norm.F.layer_norm

    def spied(inputs: Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        if any(stride == 0 and size > 1 for size, stride in zip(inputs.shape, inputs.stride())):
            repeated.append(tuple(inputs.shape))
        return original(inputs, *args, **kwargs)

    monkeypatch.setattr(_layer_norm.F, "layer_norm", spied)
    _assert_step(_deberta_v2("layer_norm"), _deberta_losses(4), single_backward)
    assert repeated == []
