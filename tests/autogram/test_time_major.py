"""Calls whose tensors are split by example along another dimension than ``batch_dim`` (time-major
``[T, B, d]`` layouts): verified, then handled by the closed forms and batched paths in their own layout
instead of one backward pass per loss row."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import Tensor, nn

from hf_jd.autogram import Engine

from ._reference import assert_exact_step, trainable


class _TimeMajorEncoder(nn.Module):
    """Batch-first ids, a time-major ``nn.TransformerEncoder`` (``batch_first=False``), a batch-first head."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(40, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=False)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.encoder(self.embedding(ids.T)).mean(0))


class _Recurrent(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.embedding = nn.Embedding(30, 8)
        self.rnn = getattr(nn, kind)(8, 6)  # time-major by default
        self.head = nn.Linear(6, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.rnn(self.embedding(ids.T))[0][-1])


def _losses(model: nn.Module, batch: int, length: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 30, (batch, length), generator=generator)
    labels = torch.randint(0, 3, (batch,), generator=generator)
    return nn.functional.cross_entropy(model(ids), labels, reduction="none")


@pytest.mark.parametrize(("batch", "length"), [(5, 7), (4, 8)])  # 8 = 2 x 4: also a [k B, ...] candidate
@pytest.mark.parametrize("single_backward", [False, True])
def test_time_major_transformer_encoder_is_exact_without_per_row_passes(
    batch: int, length: int, single_backward: bool, per_row_calls: list[str]
) -> None:
    torch.manual_seed(0)
    model = _TimeMajorEncoder().train()
    engine = Engine(model, single_backward=single_backward)
    params = trainable(model)
    for step in range(2):
        for param in params:
            param.grad = None
        assert_exact_step(engine, _losses(model, batch, length, step), params, single_backward)
    assert per_row_calls == []


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_time_major_recurrent_layers_are_exact_without_per_row_passes(kind: str, per_row_calls: list[str]) -> None:
    torch.manual_seed(1)
    model = _Recurrent(kind)
    engine = Engine(model)
    assert_exact_step(engine, _losses(model, 3, 6, 0), trainable(model), False)
    assert per_row_calls == []


@pytest.mark.parametrize("single_backward", [False, True])
def test_xlnet_is_exact_without_per_row_passes(single_backward: bool, per_row_calls: list[str]) -> None:
    """XLNet runs its layers on [T, B, d] tensors."""
    torch.manual_seed(2)
    config = tf.XLNetConfig(vocab_size=30, d_model=16, n_layer=2, n_head=2, d_inner=32, num_labels=3)
    model = tf.XLNetForSequenceClassification(config).train()
    engine = Engine(model, single_backward=single_backward)
    ids = torch.randint(0, 30, (5, 7))
    losses = nn.functional.cross_entropy(model(input_ids=ids).logits, torch.tensor([0, 1, 2, 1, 0]), reduction="none")
    assert_exact_step(engine, losses, trainable(model), single_backward)
    assert per_row_calls == []


def test_a_dimension_of_the_batch_size_that_is_not_the_batch_is_not_taken_for_it() -> None:
    """A table [4, K, 4] with K = B computed from the grid of its K positions, which every example's loss
    reads whole: the candidate dimension fails the identity, and the Gramian is exact."""

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 4)
            self.outer = nn.Linear(4, 1)

        def forward(self, x: Tensor) -> Tensor:  # x [B, 4]
            grid = torch.linspace(0, 1, x.shape[0]).view(1, -1, 1).expand(4, x.shape[0], 4)
            table = torch.tanh(self.inner(grid))  # [4, B, 4]: its second dimension is not the batch
            return self.outer(table).sum() * x.sum(1, keepdim=True) + x[:, :1]

    torch.manual_seed(3)
    model = Shared()
    for single_backward in (False, True):
        engine = Engine(model, single_backward=single_backward)
        for param in model.parameters():
            param.grad = None
        losses = model(torch.randn(3, 4)).squeeze(1) ** 2
        assert_exact_step(engine, losses, trainable(model), single_backward)
        engine.remove()


@pytest.mark.parametrize("single_backward", [False, True])
def test_bert_with_length_equal_to_batch_from_the_first_step_broadcasts_its_positions_later(
    single_backward: bool, per_row_calls: list[str]
) -> None:
    """[1, T, d] position embeddings with T = B look like a time-major [T = 1, B, d] call: the first step takes
    the exact per-row path for them; once the other calls are verified batch-major, later steps broadcast them
    over the batch (they took the per-row path on every step, ~25x a plain step at B = T = 32)."""
    torch.manual_seed(4)
    config = tf.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=3,
    )
    model = tf.BertForSequenceClassification(config).train()
    engine = Engine(model, single_backward=single_backward)
    params = trainable(model)
    for step in range(3):
        for param in params:
            param.grad = None
        generator = torch.Generator().manual_seed(step)
        ids = torch.randint(0, 40, (5, 5), generator=generator)
        labels = torch.randint(0, 3, (5,), generator=generator)
        losses = nn.functional.cross_entropy(model(input_ids=ids).logits, labels, reduction="none")
        assert_exact_step(engine, losses, params, single_backward)
        if step == 0:
            assert per_row_calls == ["bert.embeddings.position_embeddings"]
    assert per_row_calls == ["bert.embeddings.position_embeddings"]


class _Regrouped(nn.Module):
    """Rows [B * T, d] for the middle Linear layer: batch-major (reshape), or picked by an index."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 5)
        self.middle = nn.Linear(5, 5)
        self.last = nn.Linear(5, 1)
        self.order: Tensor | None = None  # an attribute: an input would be taken for a batch of its size

    def forward(self, x: Tensor) -> Tensor:  # x [B, T, 3]
        batch, length = x.shape[:2]
        order = self.order
        rows = torch.tanh(self.first(x)).reshape(batch * length, 5)
        if order is not None:
            rows = rows[order]
        rows = torch.tanh(self.middle(rows))
        if order is not None:
            rows = rows[torch.argsort(order)]
        return self.last(rows.reshape(batch, length, 5)).sum(dim=(1, 2))


@pytest.fixture
def identity_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from hf_jd.autogram import _regroup

    checks: list[int] = []
    original = _regroup._grouped_by_example

    def counting(*args: object) -> bool:
        checks.append(1)
        return original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(_regroup, "_grouped_by_example", counting)
    return checks


@pytest.mark.parametrize("single_backward", [False, True])
def test_a_verified_regrouping_is_trusted_in_later_steps_of_the_same_structure(
    single_backward: bool, identity_checks: list[int]
) -> None:
    torch.manual_seed(5)
    model = _Regrouped()
    engine = Engine(model, single_backward=single_backward)
    params = trainable(model)
    counts = []
    for _ in range(3):
        for param in params:
            param.grad = None
        losses = model(torch.randn(4, 3, 3)) ** 2
        assert_exact_step(engine, losses, params, single_backward)
        counts.append(len(identity_checks))
    assert counts[0] > 0 and counts[2] == counts[1] == counts[0]  # checked on the first step only


def test_rows_picked_by_an_index_are_verified_on_every_step(identity_checks: list[int]) -> None:
    """The first step's index keeps the examples' rows in order (the grouping holds), the second mixes them:
    a grouping verified once must not be trusted there."""
    torch.manual_seed(6)
    model = _Regrouped()
    engine = Engine(model)
    params = trainable(model)
    orders = [torch.arange(12), torch.randperm(12, generator=torch.Generator().manual_seed(0))]
    counts = []
    for order in orders:
        for param in params:
            param.grad = None
        model.order = order
        losses = model(torch.randn(4, 3, 3)) ** 2
        assert_exact_step(engine, losses, params, False)
        counts.append(len(identity_checks))
    assert counts[1] > counts[0]


@pytest.mark.parametrize("single_backward", [False, True])
def test_rows_picked_by_the_same_index_are_trusted_after_one_check(
    single_backward: bool, identity_checks: list[int]
) -> None:
    """An index with the same values on every step (XLNet's relative shift: ``index_select`` of an ``arange``) moves
    the same rows: the grouping verified on the first step is trusted (its values are part of the structure)."""
    torch.manual_seed(8)
    model = _Regrouped()
    model.order = torch.arange(12)  # (a permutation would mix the examples' rows: checked and failed every step)
    engine = Engine(model, single_backward=single_backward)
    params = trainable(model)
    counts = []
    for _ in range(3):
        for param in params:
            param.grad = None
        model.order = model.order.clone()  # (a new tensor with the same values)
        assert_exact_step(engine, model(torch.randn(4, 3, 3)) ** 2, params, single_backward)
        counts.append(len(identity_checks))
    assert counts[0] > 0 and counts[2] == counts[1] == counts[0]


def test_xlnet_relative_shift_is_checked_once(identity_checks: list[int]) -> None:
    torch.manual_seed(9)
    config = tf.XLNetConfig(vocab_size=30, d_model=16, n_layer=2, n_head=2, d_inner=32, num_labels=3)
    model = tf.XLNetForSequenceClassification(config).train()
    engine = Engine(model)
    params = trainable(model)
    counts = []
    for step in range(3):
        for param in params:
            param.grad = None
        ids = torch.randint(0, 30, (4, 6), generator=torch.Generator().manual_seed(step))
        logits = model(input_ids=ids).logits
        losses = nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0]), reduction="none")
        assert_exact_step(engine, losses, params, False)
        counts.append(len(identity_checks))
    assert counts[0] > 0 and counts[2] == counts[1] == counts[0]


def test_rows_picked_one_by_one_in_another_order_are_verified_again(identity_checks: list[int]) -> None:
    """``torch.stack([rows[i] for i in order])`` with Python ints: the same node types in every step, but the
    picked positions are part of the structure, so a new order is checked (and the Gramian stays exact)."""

    class Picked(_Regrouped):
        def forward(self, x: Tensor) -> Tensor:
            batch, length = x.shape[:2]
            rows = torch.tanh(self.first(x)).reshape(batch * length, 5)
            order = self.order.tolist() if self.order is not None else list(range(batch * length))
            rows = torch.tanh(self.middle(torch.stack([rows[i] for i in order])))
            inverse = sorted(range(len(order)), key=order.__getitem__)
            rows = torch.stack([rows[i] for i in inverse])
            return self.last(rows.reshape(batch, length, 5)).sum(dim=(1, 2))

    torch.manual_seed(7)
    model = Picked()
    engine = Engine(model)
    params = trainable(model)
    for order in (torch.arange(12), torch.arange(12), torch.randperm(12, generator=torch.Generator().manual_seed(1))):
        for param in params:
            param.grad = None
        model.order = order
        assert_exact_step(engine, model(torch.randn(4, 3, 3)) ** 2, params, False)


@pytest.mark.parametrize("kind", ["groupnorm", "depthwise_conv"])
def test_channels_of_the_batch_size_are_not_taken_for_the_batch(kind: str) -> None:
    """A GroupNorm or depthwise convolution on [1, C, L] with C = B, loss j reading channel j: the channel
    dimension passes the grouping identity, but these closed forms need their samples along batch_dim; the exact
    per-row path is taken (it raised that the engine had batch_dim=1)."""

    class Channels(nn.Module):
        def __init__(self, batch: int) -> None:
            super().__init__()
            self.first = nn.Linear(3, 3)
            self.conv = nn.Conv1d(3, batch, 1)
            depthwise = nn.Conv1d(batch, batch, 3, padding=1, groups=batch)
            self.norm = nn.GroupNorm(batch, batch) if kind == "groupnorm" else depthwise

        def forward(self, x: Tensor) -> Tensor:  # x [B, 3]
            return self.norm(self.conv(self.first(x).T.unsqueeze(0)))[0].pow(2).mean(1)

    torch.manual_seed(11)
    model = Channels(4).double()  # a per-channel norm over 4 positions: float32 rounding shows in its gradients
    engine = Engine(model)
    weights = torch.linspace(0.5, 1.5, 4, dtype=torch.float64)
    assert_exact_step(engine, model(torch.randn(4, 3, dtype=torch.float64)), trainable(model), False, weights)
