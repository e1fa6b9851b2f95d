"""TF32 products on CUDA (cuDNN's default for float32 convolutions and recurrent layers; matrix products when asked):
the engine's grouping checks compare two backward passes of the same graph, which then agree to TF32's rounding
(about 1e-3) only, and must not take that for examples mixed by the model.

The rounding is emulated on the CPU by a layer whose backward pass rounds its gradient to TF32's 10-bit mantissa."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from hf_jd.autogram import Engine
from hf_jd.autogram import engine as engine_module
from hf_jd.autogram._precision import full_float32_precision, tf32_in_graph

from ._reference import assert_gramian_matches, grads_of, jacobian, trainable

CUDA = torch.device("cuda")  # (the flags are read without a device)


@pytest.fixture
def flags() -> Iterator[None]:
    """Restore torch's TF32 flags after the test."""
    matmul = torch.backends.cuda.matmul.fp32_precision
    conv, rnn = torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision
    precision = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(precision)
    torch.backends.cuda.matmul.fp32_precision = matmul
    torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision = conv, rnn


def _conv_nodes() -> list[Any]:
    output = nn.Conv2d(1, 1, 3)(torch.randn(1, 1, 5, 5))
    return [output.grad_fn]


def _linear_nodes() -> list[Any]:
    return [nn.Linear(3, 3)(torch.randn(2, 3)).grad_fn]


def test_cudnn_tf32_counts_only_for_graphs_with_convolutions(flags: None) -> None:
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.cudnn.conv.fp32_precision = "tf32"  # torch's default
    assert tf32_in_graph(CUDA, _conv_nodes())
    assert not tf32_in_graph(CUDA, _linear_nodes())
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    assert not tf32_in_graph(CUDA, _conv_nodes())


def test_tf32_matrix_products_count_for_every_graph(flags: None) -> None:
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.set_float32_matmul_precision("high")  # what the Trainer's tf32=True does
    assert tf32_in_graph(CUDA, _linear_nodes())
    torch.set_float32_matmul_precision("highest")
    assert not tf32_in_graph(CUDA, _linear_nodes())


def test_not_on_the_cpu(flags: None) -> None:
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    assert not tf32_in_graph(torch.device("cpu"), _conv_nodes())


class _TF32Gradient(torch.autograd.Function):
    """The identity, whose backward pass rounds the gradient to TF32's 10-bit mantissa."""

    @staticmethod
    def forward(ctx: Any, inputs: Tensor) -> Tensor:
        return inputs.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        mantissa, exponent = torch.frexp(grad)
        return torch.ldexp(torch.round(mantissa * 2.0**11) / 2.0**11, exponent)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(20, 8)
        self.first = nn.Linear(8, 8)
        self.second = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, ids: Tensor) -> Tensor:
        hidden = _TF32Gradient.apply(torch.tanh(self.first(self.embedding(ids))))
        return self.head(torch.tanh(self.second(hidden))).squeeze(2).pow(2).mean(1)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.filterwarnings("ignore:hf_jd.autogram")  # (frexp has no batching rule: vmap's fallback)
@pytest.mark.parametrize("tf32", [True, False])
def test_rounding_is_not_taken_for_mixed_examples(
    tf32: bool, monkeypatch: pytest.MonkeyPatch, per_row_calls: list[str]
) -> None:
    monkeypatch.setattr(engine_module, "tf32_in_graph", lambda device, nodes: tf32)
    torch.manual_seed(0)
    model = _Model()
    engine = Engine(model, batch_dim=0)
    params = trainable(model)
    ids = torch.randint(0, 20, (6, 5), generator=torch.Generator().manual_seed(0))
    losses = model(ids)
    jac = jacobian(losses, params)
    gramian = engine.compute_gramian(losses, retain_graph=True)
    assert_gramian_matches(gramian, jac)
    weights = torch.linspace(0.5, 1.5, 6)
    losses.backward(weights)
    # (the weighted pass rounds w_i · g_i, not g_i: to TF32's precision)
    expected = weights @ jac
    assert (grads_of(params) - expected).norm() <= 3e-3 * expected.norm()
    # Checked to float32's precision, the rounding looked like examples mixed (the exact but slow per-row path, before
    # the nineteenth session); the check now measures the rounding of its own pass and takes it for what it is.
    assert per_row_calls == []
    if tf32:
        losses = model(ids)
        assert engine.check_gramian(losses, engine.compute_gramian(losses, retain_graph=True))



@pytest.mark.parametrize("matmul", [True, False])
def test_full_float32_precision_sets_and_restores_the_flags(flags: None, matmul: bool) -> None:
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = torch.backends.cudnn.rnn.fp32_precision = "tf32"
    with full_float32_precision(CUDA, matmul=matmul):
        assert torch.backends.cudnn.conv.fp32_precision == torch.backends.cudnn.rnn.fp32_precision == "ieee"
        assert torch.backends.cuda.matmul.fp32_precision == ("ieee" if matmul else "tf32")
    assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "tf32"
    assert torch.backends.cudnn.rnn.fp32_precision == "tf32"
    with full_float32_precision(torch.device("cpu")):
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"  # (nothing changes off CUDA)


def test_rows_of_the_products_path_are_found_in_full_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batched pass whose rows are compared at float32's precision runs with TF32 off (else, under the Trainer's
    tf32=True, every such call would fail the check and leave the path)."""
    from contextlib import contextmanager

    from hf_jd.autogram import _matmul_uses

    active: list[bool] = []
    inside: list[bool] = []

    @contextmanager
    def spy(device: torch.device, matmul: bool = True) -> Iterator[None]:
        active.append(True)
        try:
            yield
        finally:
            active.pop()

    original = _matmul_uses._use_grads

    def use_grads(*args: Any) -> Any:
        inside.append(bool(active))
        return original(*args)

    monkeypatch.setattr(_matmul_uses, "full_float32_precision", spy)
    monkeypatch.setattr(_matmul_uses, "_use_grads", use_grads)
    monkeypatch.setattr(_matmul_uses, "FEW_ROWS", 0)
    torch.manual_seed(5)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.Embedding(20, 8), layer, nn.Linear(8, 1))
    engine = Engine(model)
    ids = torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(5))
    losses = model(ids).pow(2).mean((1, 2))
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))
    assert inside and all(inside)  # (one pass: the rows found on this first call)
