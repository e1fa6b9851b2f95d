"""Small models and independent reference Jacobians for the autojac tests."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4), nn.ReLU(), nn.Linear(4, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, kernel_size=3),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 3),
    )


def tiny_bert(num_labels: int = 3) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()


def per_example_loss_fn(model: nn.Module, inputs: Tensor, targets: Tensor) -> Callable[..., Tensor]:
    """Return ``params -> per-example cross-entropy losses`` (shape ``[B]``) of ``model``."""

    def losses(params: dict[str, Tensor]) -> Tensor:
        logits = functional_call(model, params, (inputs,))
        return nn.functional.cross_entropy(logits, targets, reduction="none")

    return losses


def bert_loss_fn(model: nn.Module, ids: Tensor, mask: Tensor, labels: Tensor) -> Callable[..., Tensor]:
    def losses(params: dict[str, Tensor]) -> Tensor:
        logits = functional_call(model, params, (ids,), {"attention_mask": mask}).logits
        return nn.functional.cross_entropy(logits, labels, reduction="none")

    return losses


def bert_batch(batch: int = 4, length: int = 8, num_labels: int = 3) -> tuple[Tensor, Tensor, Tensor]:
    ids = torch.randint(0, 100, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2 :] = 0
    labels = torch.randint(0, num_labels, (batch,))
    return ids, mask, labels


def reference_jacobians(
    model: nn.Module, loss_fn: Callable[[dict[str, Tensor]], Tensor]
) -> dict[str, Tensor]:
    """Jacobians of ``loss_fn`` w.r.t. every trainable parameter, from ``torch.func.jacrev``."""
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        return jacrev(loss_fn)(params)


def assert_close(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


class NoBatchingRule(torch.autograd.Function):
    """Doubles its input; its backward uses data-dependent control flow, which vmap rejects."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        return 2 * x

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        if bool((grad == 0).all()):
            return torch.zeros_like(grad)
        return 2 * grad
