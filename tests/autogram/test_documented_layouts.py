"""torch modules whose outputs hold the batch along different dimensions, as their documentation gives: the
recurrent layers (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``: ``[B, T, h]`` outputs with ``batch_first``, ``[T, B, h]``
without, ``[layers, B, h]`` final states either way) and ``nn.MultiheadAttention`` returning its weights
(``[T, B, d]`` outputs without ``batch_first``, ``[B, (heads,) T, S]`` weights). Their calls take the generic path
in that layout, without the per-row pass or a grouping check on every step."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from hf_jd.autogram import Engine
from hf_jd.autogram import engine as engine_module

from ._reference import assert_exact_step, trainable


class _Tagger(nn.Module):
    """Ids ``[B, T]`` → a recurrent layer → per-example losses from the outputs and the final states."""

    def __init__(self, kind: str, batch_first: bool, **options: int | bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embedding = nn.Embedding(30, 6)
        self.rnn = getattr(nn, kind)(6, 5, batch_first=batch_first, **options)
        directions = 2 if options.get("bidirectional") else 1
        state = options.get("proj_size") or 5
        self.tokens = nn.Linear(state * directions, 2)
        self.final = nn.Linear(state, 2)

    def forward(self, ids: Tensor) -> Tensor:
        inputs = self.embedding(ids) if self.batch_first else self.embedding(ids).transpose(0, 1)
        outputs, states = self.rnn(inputs)
        hidden = states[0] if isinstance(states, tuple) else states  # [layers * directions, B, state]
        if not self.batch_first:
            outputs = outputs.transpose(0, 1)
        return self.tokens(outputs).pow(2).mean((1, 2)) + self.final(hidden[-1]).pow(2).sum(1)


def _steps(model: nn.Module, engine: Engine, shapes: list[tuple[int, int]], single_backward: bool) -> None:
    params = trainable(model)
    generator = torch.Generator().manual_seed(0)
    for batch, length in shapes:
        for param in params:
            param.grad = None
        ids = torch.randint(0, 30, (batch, length), generator=generator)
        assert_exact_step(engine, model(ids), params, single_backward)


# Batch sizes equal to the states' first size (2 layers x 2 directions = 4) and to the length (T = B = 4).
_SHAPES = [(3, 5), (4, 5), (4, 4), (2, 6), (1, 3)]


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("single_backward", [False, True])
def test_batch_first_layers_are_exact_without_per_row_passes(
    kind: str, single_backward: bool, per_row_calls: list[str]
) -> None:
    torch.manual_seed(0)
    model = _Tagger(kind, batch_first=True, num_layers=2, bidirectional=True)
    engine = Engine(model, single_backward=single_backward)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (the per-row path warns)
        _steps(model, engine, _SHAPES, single_backward)
    assert per_row_calls == []


@pytest.mark.parametrize("single_backward", [False, True])
def test_per_example_task_losses(single_backward: bool, per_row_calls: list[str]) -> None:
    """``[B, m]`` losses: the pass over the tasks takes the states' gradients in their own layout too."""
    torch.manual_seed(6)
    model = _Tagger("GRU", batch_first=True, num_layers=2)
    engine = Engine(model, single_backward=single_backward)
    params = trainable(model)
    generator = torch.Generator().manual_seed(1)
    for batch in (3, 4, 2):
        for param in params:
            param.grad = None
        ids = torch.randint(0, 30, (batch, 5), generator=generator)
        embedded = model.embedding(ids)
        outputs, hidden = model.rnn(embedded)
        losses = torch.stack([model.tokens(outputs).pow(2).mean((1, 2)), model.final(hidden[-1]).pow(2).sum(1)], 1)
        assert_exact_step(engine, losses, params, single_backward)
    assert per_row_calls == []


def test_lstm_with_projections_is_exact(per_row_calls: list[str]) -> None:
    """``proj_size``: hidden states ``[layers, B, proj]`` beside cell states ``[layers, B, h]``."""
    torch.manual_seed(1)
    model = _Tagger("LSTM", batch_first=True, num_layers=2, proj_size=3)
    _steps(model, Engine(model), _SHAPES, False)
    assert per_row_calls == []


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_time_major_layers_are_not_checked_on_every_step(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Their ``[T, B, h]`` layout is the module's own: only the first step's check of the loss computation (for
    losses or layers that mix the examples) runs the grouping check."""
    checks: list[int] = []  # the step of each check
    step = [0]
    original = engine_module.grads_verified

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        checks.append(step[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(engine_module, "grads_verified", counted)
    torch.manual_seed(2)
    model = _Tagger(kind, batch_first=False, num_layers=2)
    engine = Engine(model)
    params = trainable(model)
    for index in range(3):
        step[0] = index
        for param in params:
            param.grad = None
        assert_exact_step(engine, model(torch.randint(0, 30, (3, 5))), params, False)
    assert set(checks) == {0}


class _OwnForward(nn.LSTM):
    """A subclass with its own forward pass (time-major output whatever ``batch_first`` says)."""

    def forward(self, inputs: Tensor) -> Tensor:  # type: ignore[override]
        outputs, _ = super().forward(inputs.transpose(0, 1))
        return outputs, outputs[-1:]  # type: ignore[return-value]


def test_subclass_with_its_own_forward_keeps_the_exact_paths() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(30, 6)
            self.rnn = _OwnForward(6, 5, batch_first=True)
            self.head = nn.Linear(5, 1)

        def forward(self, ids: Tensor) -> Tensor:
            outputs, last = self.rnn(self.embedding(ids))
            return self.head(outputs.mean(0) + last[0]).squeeze(1) ** 2

    torch.manual_seed(3)
    model = Model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _steps(model, Engine(model), [(3, 5), (3, 5)], False)


def test_packed_sequences_keep_the_exact_paths() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(30, 6)
            self.rnn = nn.GRU(6, 5, batch_first=True)
            self.head = nn.Linear(5, 1)

        def forward(self, ids: Tensor) -> Tensor:
            lengths = torch.arange(ids.shape[1], ids.shape[1] - ids.shape[0], -1).clamp_min(1)
            packed = nn.utils.rnn.pack_padded_sequence(self.embedding(ids), lengths, batch_first=True)
            _, hidden = self.rnn(packed)
            return self.head(hidden[-1]).squeeze(1) ** 2

    torch.manual_seed(4)
    model = Model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _steps(model, Engine(model), [(3, 5), (2, 4)], False)


@pytest.mark.parametrize("single_backward", [False, True])
@pytest.mark.parametrize("embedded", [True, False])
def test_layer_run_across_the_examples_is_exact(single_backward: bool, embedded: bool) -> None:
    """Batch-major inputs given to a time-major LSTM, with as many examples as positions: the layer's documented
    batch dimension holds the positions and its recurrence runs across the examples. The check of the loss
    computation finds the examples mixed (on the first step; with the embedding, the check of its coincident
    sizes on every step), the calls are checked, and the Gramian stays exact. Without the embedding the LSTM is
    the model's first call and the head reads ``[B, h]`` means, whose sizes show nothing."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(30, 6)
            self.rnn = nn.LSTM(6, 5)  # time-major, given [B, T, d]: its "time" is the batch
            self.head = nn.Linear(5, 1)

        def forward(self, ids: Tensor) -> Tensor:
            if embedded:
                outputs, _ = self.rnn(self.embedding(ids))
                return self.head(outputs).squeeze(2).pow(2).mean(1)
            outputs, _ = self.rnn(torch.sin(ids.float()).unsqueeze(2).expand(-1, -1, 6))
            return self.head(outputs.mean(1)).squeeze(1).pow(2)

    torch.manual_seed(5)
    model = Model()
    if not embedded:
        model.embedding.requires_grad_(False)
    engine = Engine(model, single_backward=single_backward)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _steps(model, engine, [(4, 4), (4, 4), (3, 3)], single_backward)


class _Attention(nn.Module):
    """Ids ``[B, T]`` → time-major ``nn.MultiheadAttention`` that returns its weights → losses from both."""

    def __init__(self, average: bool) -> None:
        super().__init__()
        self.average = average
        self.embedding = nn.Embedding(30, 8)
        self.attention = nn.MultiheadAttention(8, 2)  # batch_first=False, need_weights=True: the defaults
        self.head = nn.Linear(8, 1)

    def forward(self, ids: Tensor) -> Tensor:
        states = self.embedding(ids).transpose(0, 1)
        outputs, weights = self.attention(states, states, states, average_attn_weights=self.average)
        if not self.average:
            weights = weights.mean(1)  # [B, heads, T, S] -> [B, T, S]
        diagonal = weights.diagonal(dim1=1, dim2=2).pow(2).sum(1)  # per example
        return self.head(outputs.transpose(0, 1)).squeeze(2).pow(2).mean(1) + diagonal


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("single_backward", [False, True])
def test_time_major_attention_returning_its_weights_is_exact_without_per_row_passes(
    average: bool, single_backward: bool, per_row_calls: list[str]
) -> None:
    torch.manual_seed(7)
    model = _Attention(average)
    engine = Engine(model, single_backward=single_backward)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (the per-row path warns)
        _steps(model, engine, [(3, 5), (4, 4), (2, 6)], single_backward)
    assert per_row_calls == []


class _TimeMajorEncoder(nn.Module):
    """Ids ``[B, T]`` → ``nn.TransformerEncoder`` in its default time-major layout (its attention called with
    ``need_weights=False``, returning ``[T, B, d]`` outputs and no weights) → per-example losses."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(30, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 1)

    def forward(self, ids: Tensor) -> Tensor:
        states = self.encoder(self.embedding(ids).transpose(0, 1))
        return self.head(states.transpose(0, 1)).squeeze(2).pow(2).mean(1)


@pytest.mark.parametrize("single_backward", [False, True])
def test_time_major_attention_without_weights_when_the_batch_size_equals_the_width(
    single_backward: bool, per_row_calls: list[str]
) -> None:
    """``[T, B, d]`` attention outputs with ``B = d``: the documented layout settles which dimension holds the
    examples (the sizes alone do not; every step took the per-row pass, 70 times a plain step)."""
    torch.manual_seed(8)
    model = _TimeMajorEncoder()
    engine = Engine(model, single_backward=single_backward)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (the per-row path warns)
        _steps(model, engine, [(8, 5), (8, 3), (3, 5)], single_backward)
    assert per_row_calls == []
