"""The rows' examples that the products' path finds for a generic call (one batched pass over three vectors) are
remembered by the structure of the call's graph: later calls of the same structure take them from there with one
ordinary pass over the plain vector, and calls whose rows move by the data (an index that changes between steps) find
them again."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from hf_jd.autogram import Engine, _matmul_uses

from ._reference import assert_exact_step, trainable


@pytest.fixture
def remembered(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Per generic call on the products' path (tried whatever the number of rows): whether it took remembered rows."""
    monkeypatch.setattr(_matmul_uses, "FEW_ROWS", 0)
    calls: list[bool] = []
    original_known, original_found = _matmul_uses._rows_from_known, _matmul_uses._rows_found

    def known(*args):  # type: ignore[no-untyped-def]
        rows = original_known(*args)
        if rows is not None:
            calls.append(True)
        return rows

    def found(*args):  # type: ignore[no-untyped-def]
        calls.append(False)
        return original_found(*args)

    monkeypatch.setattr(_matmul_uses, "_rows_from_known", known)
    monkeypatch.setattr(_matmul_uses, "_rows_found", found)
    return calls


class _Attention(nn.Module):
    """Ids → time-major ``nn.MultiheadAttention`` with a key padding mask → per-example losses."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(30, 8)
        self.attention = nn.MultiheadAttention(8, 2)
        self.head = nn.Linear(8, 2)

    def forward(self, ids: Tensor, padding: Tensor) -> Tensor:
        """Per-example losses ``[B, 2]`` (two tasks)."""
        states = self.embedding(ids).transpose(0, 1)
        outputs, _ = self.attention(states, states, states, key_padding_mask=padding, need_weights=False)
        return self.head(outputs.transpose(0, 1)).pow(2).mean(1)


@pytest.mark.parametrize("tasks", [False, True])
@pytest.mark.parametrize("single_backward", [False, True])
def test_attention_takes_remembered_rows_whatever_the_padding(
    single_backward: bool, tasks: bool, remembered: list[bool]
) -> None:
    """Batches padded differently (the key padding mask is data, not structure) take the rows remembered from the first
    one: time-major rows, example ``r mod B``; per-example and per-example-per-task losses."""
    torch.manual_seed(0)
    model = _Attention()
    engine = Engine(model, single_backward=single_backward)
    generator = torch.Generator().manual_seed(0)
    for step in range(4):
        model.zero_grad(set_to_none=True)
        ids = torch.randint(0, 30, (5, 6), generator=generator)
        padding = torch.zeros(5, 6, dtype=torch.bool)
        padding[step % 5, 6 - (step + 1):] = True  # a different example and length on each step
        losses = model(ids, padding)
        assert_exact_step(engine, losses if tasks else losses.sum(1), trainable(model), single_backward)
    assert remembered == [False, True, True, True]


class _Permuted(nn.Module):
    """A product on the batch's rows sorted by their first feature (the order changes with the data), put back."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 6) / 3)

    def forward(self, inputs: Tensor) -> Tensor:
        order = inputs[:, 0].argsort()
        return (inputs[order] @ self.weight)[order.argsort()]


class _PermutedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 6)
        self.permuted = _Permuted()
        self.head = nn.Linear(6, 1)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.head(torch.tanh(self.permuted(torch.tanh(self.first(inputs))))).squeeze(1).pow(2)


@pytest.mark.parametrize("single_backward", [False, True])
def test_rows_moved_by_the_data_are_found_again(single_backward: bool, remembered: list[bool]) -> None:
    """Same shapes and operations on every step, rows in another order: the lookup's index is part of the structure."""
    torch.manual_seed(1)
    model = _PermutedNet()
    engine = Engine(model, single_backward=single_backward)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(6, 4, generator=generator)
    batches = [inputs, torch.randn(6, 4, generator=generator), inputs, torch.randn(6, 4, generator=generator)]
    for batch in batches:
        model.zero_grad(set_to_none=True)
        assert_exact_step(engine, model(batch), trainable(model), single_backward)
    assert remembered == [False, False, True, False]  # (the first batch again: its order is remembered)


@pytest.mark.parametrize("single_backward", [False, True])
def test_rows_without_gradient_then_with_some_are_found_again(single_backward: bool, remembered: list[bool]) -> None:
    """An example whose loss does not depend on the call on the first step leaves its rows of no known example (the
    sorted rows fit no pattern); when they have gradient on a later step, the rows are found again."""
    torch.manual_seed(3)
    model = _PermutedNet()
    engine = Engine(model, single_backward=single_backward)
    inputs = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    for scale in (torch.tensor([1.0, 1, 0, 1, 1, 1]), torch.ones(6), torch.ones(6)):
        model.zero_grad(set_to_none=True)
        assert_exact_step(engine, model(inputs) * scale, trainable(model), single_backward)
    assert remembered == [False, False, True]


def test_modules_whose_rows_always_move_stop_remembering(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_matmul_uses, "FEW_ROWS", 0)
    monkeypatch.setattr(_matmul_uses, "UNSTABLE_AFTER", 3)
    torch.manual_seed(2)
    model = _PermutedNet()
    engine = Engine(model)
    generator = torch.Generator().manual_seed(2)
    for _ in range(4):
        model.zero_grad(set_to_none=True)
        assert_exact_step(engine, model(torch.randn(6, 4, generator=generator)), trainable(model), False)
    memory = _matmul_uses._MEMORY[model.permuted]
    assert memory.unstable and not memory.structures


@pytest.mark.parametrize(
    ("examples", "completed"),
    [
        ([0, -1, 1, 1, -1, 2], [0, 0, 1, 1, 2, 2]),  # e-major, 2 blocks per example
        ([0, 1, -1, 0, -1, 2], [0, 1, 2, 0, 1, 2]),  # e-minor (time-major rows)
        ([0, -1, 2, 1, -1, 0], [0, -1, 2, 1, -1, 0]),  # neither: unchanged
        ([-1, -1, -1, -1, -1, -1], [-1, -1, -1, -1, -1, -1]),  # nothing known
        ([0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2]),
    ],
)
def test_blocks_without_gradient_take_the_pattern_of_the_others(examples: list[int], completed: list[int]) -> None:
    assert _matmul_uses._completed(torch.tensor(examples), 3).tolist() == completed


def test_the_oldest_structure_is_forgotten_first(monkeypatch: pytest.MonkeyPatch, remembered: list[bool]) -> None:
    """Dynamic padding: one structure per sequence length, the last KNOWN_STRUCTURES of them kept."""
    monkeypatch.setattr(_matmul_uses, "KNOWN_STRUCTURES", 2)
    torch.manual_seed(4)
    model = _Attention()
    engine = Engine(model)
    generator = torch.Generator().manual_seed(4)
    for length in (4, 5, 6, 6, 5, 4):
        model.zero_grad(set_to_none=True)
        ids = torch.randint(0, 30, (5, length), generator=generator)
        losses = model(ids, torch.zeros(5, length, dtype=torch.bool)).sum(1)
        assert_exact_step(engine, losses, trainable(model), single_backward=False)
    assert remembered == [False, False, False, True, True, False]
