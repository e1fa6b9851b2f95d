"""In-place changes of the tensors a captured call keeps (its input, an embedding's ids) after the call: detected by
their version counters, as autograd detects them for the tensors it saved, instead of silently wrong Gramians and
gradients; no false alarm for in-place operations that autograd allows (on outputs, before the call, on the input of a
Linear layer whose weight is frozen)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hf_jd.autogram import Engine

from ._reference import assert_exact_step, trainable

B, T, D = 4, 3, 5


class _ChangesInputAfterCall(nn.Module):
    """Doubles the first layer's input in place after calling it (autograd's backward raises for this model)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(D, 6)
        self.head = nn.Linear(6, 1)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.first(x)
        x.mul_(2.0)
        return self.head(torch.tanh(hidden)).squeeze(-1)


class _ChangesIdsAfterLookup(nn.Module):
    """Shifts the looked-up ids in place after the lookup (autograd's backward raises for this model)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, D)
        self.head = nn.Linear(D, 1)

    def forward(self, ids: Tensor) -> Tensor:
        embedded = self.emb(ids)
        ids.add_(1)
        return self.head(torch.tanh(embedded)).squeeze(-1).pow(2).mean(-1)


class _ChangesOutputInPlace(nn.Module):
    """ReLU in place on a Linear layer's output, and a scaling in place of the input before the first call."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(D, 6)
        self.second = nn.Linear(6, 6)
        self.head = nn.Linear(6, 1)

    def forward(self, x: Tensor) -> Tensor:
        x.mul_(2.0)  # (before the call: the captured input is the scaled one)
        hidden = self.first(x)
        hidden.relu_()
        hidden = self.second(hidden)
        hidden[..., 0] = 0.0
        return self.head(torch.tanh(hidden)).squeeze(-1).pow(2).mean(-1)


def test_autograd_itself_rejects_the_model_that_changes_its_input() -> None:
    model = _ChangesInputAfterCall()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        model(torch.randn(B, D)).sum().backward()


@pytest.mark.parametrize("single_backward", [False, True])
def test_input_changed_in_place_after_the_call_is_rejected(single_backward: bool) -> None:
    model = _ChangesInputAfterCall()
    engine = Engine(model, single_backward=single_backward)
    losses = model(torch.randn(B, D))
    with pytest.raises(RuntimeError, match=r"Module first \(Linear\): its input, .* in-place operation after the call"
                                           r" \(it is at version 1; the engine captured it at version 0\)"):
        engine.compute_gramian(losses)
    engine.remove()


@pytest.mark.parametrize("single_backward", [False, True])
def test_ids_changed_in_place_after_the_lookup_are_rejected(single_backward: bool) -> None:
    model = _ChangesIdsAfterLookup()
    engine = Engine(model, single_backward=single_backward)
    losses = model(torch.randint(0, 10, (B, T)))
    with pytest.raises(RuntimeError, match=r"Module emb \(Embedding\): its input ids, .*x = x \* 2"):
        engine.compute_gramian(losses)
    engine.remove()


def test_input_changed_in_place_between_the_gramian_and_the_single_backward_is_rejected() -> None:
    model = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, 1))
    engine = Engine(model, single_backward=True)
    x = torch.randn(B, T, D)
    losses = model(x).squeeze(-1).pow(2).mean(-1)
    engine.compute_gramian(losses)
    x.mul_(2.0)  # (the first layer's factors are views of x: its weighted gradient would read the new values)
    with pytest.raises(RuntimeError, match=r"Module 0 \(Linear\): its input, .*version 1"):
        engine.backward(torch.ones(B))
    assert all(param.grad is None for param in model.parameters())
    engine.remove()


def test_a_later_call_of_the_same_module_is_named() -> None:
    layer = nn.Linear(D, D)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, x: Tensor) -> Tensor:
            hidden = self.layer(x) + 0.0
            out = self.layer(hidden)
            hidden.mul_(2.0)  # the second call's input
            return out.pow(2).sum(-1)

    model = Twice()
    engine = Engine(model)
    with pytest.raises(RuntimeError, match=r"layer \(Linear\) \(call 2 of the module in the forward pass\): its input"):
        engine.compute_gramian(model(torch.randn(B, D)))
    engine.remove()


@pytest.mark.parametrize("single_backward", [False, True])
def test_in_place_operations_on_outputs_and_before_the_call_stay_exact(single_backward: bool) -> None:
    torch.manual_seed(0)
    model = _ChangesOutputInPlace()
    engine = Engine(model, single_backward=single_backward)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        losses = model(torch.randn(B, T, D))
        assert_exact_step(engine, losses, trainable(model), single_backward)
    engine.remove()


class _ReusesAndViews(nn.Module):
    """A module called twice, its first output changed in place before the second call; inputs that are views of a
    larger tensor, which is changed in place before the views are taken; inference under no_grad in between."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 1)

    def forward(self, x: Tensor) -> Tensor:
        wide = torch.cat([x, x], dim=-1)
        wide[..., :D].mul_(0.5)
        hidden = self.shared(wide[..., :D]) + self.shared(wide[..., D:])
        hidden.mul_(0.5)
        hidden = self.shared(hidden)
        with torch.no_grad():
            self.shared(hidden).relu_()
        return self.head(self.norm(hidden)).squeeze(-1).pow(2).mean(-1)


@pytest.mark.parametrize("single_backward", [False, True])
def test_reused_modules_views_and_no_grad_inference_stay_exact(single_backward: bool) -> None:
    torch.manual_seed(0)
    model = _ReusesAndViews()
    engine = Engine(model, single_backward=single_backward)
    losses = model(torch.randn(B, T, D))
    with torch.no_grad():  # (inference of the same modules on the same kind of inputs before the step)
        model(torch.randn(B, T, D))
    assert_exact_step(engine, losses, trainable(model), single_backward)
    engine.remove()


@pytest.mark.parametrize("single_backward", [False, True])
def test_input_of_a_linear_layer_with_a_frozen_weight_may_change(single_backward: bool) -> None:
    """BitFit: autograd saves no input for a frozen weight, so it allows the change; the bias needs none either."""
    torch.manual_seed(0)
    model = _ChangesInputAfterCall()
    model.first.weight.requires_grad_(False)
    engine = Engine(model, single_backward=single_backward)
    losses = model(torch.randn(B, D))
    assert_exact_step(engine, losses, trainable(model), single_backward)
    engine.remove()


@pytest.mark.parametrize("single_backward", [False, True])
def test_checkpointed_block_with_in_place_operations_on_outputs_stays_exact(single_backward: bool) -> None:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(D, 6), nn.ReLU(inplace=True), nn.Linear(6, 6), nn.ReLU(inplace=True))
    head = nn.Linear(6, 1)

    def run(x: Tensor) -> Tensor:
        hidden = checkpoint(block, x, use_reentrant=False)
        return head(hidden).squeeze(-1).pow(2).mean(-1)

    engine = Engine(block, head, single_backward=single_backward)
    for _ in range(2):
        block.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        assert_exact_step(engine, run(torch.randn(B, T, D)), trainable(block, head), single_backward)
    engine.remove()


def test_single_backward_keeps_no_input_that_its_factors_do_not_hold() -> None:
    """A LayerNorm's factors are computed from its input (a copy): the version check does not keep the input alive
    until Engine.backward (nor does it when the graph is freed)."""
    model = nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 1))
    engine = Engine(model, single_backward=True)
    seen: list[weakref.ref[torch.UntypedStorage]] = []  # (the memory, shared by the engine's detached aliases)
    model[2].register_forward_hook(lambda module, args, output: seen.append(weakref.ref(args[0].untyped_storage())))
    losses = model(torch.randn(B, T, D)).squeeze(-1).pow(2).mean(-1)
    gc.collect()
    assert seen[0]() is not None
    engine.compute_gramian(losses)
    del losses
    gc.collect()
    assert seen[0]() is None
    engine.backward(torch.ones(B))
    engine.remove()


class _FunctionalLinear(nn.Module):
    """A generic call whose weight meets its ``[B * T, d]`` input rows in a matrix product (``F.linear``)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, D) / 3)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)


def test_operand_of_a_generic_calls_products_changed_before_the_single_backward_is_rejected(
    taken: list[tuple[str, bool]],
) -> None:
    """The products' operands (saved by autograd) are read again by the weighted gradient of Engine.backward."""
    model = nn.Sequential(_FunctionalLinear(), nn.Tanh(), nn.Linear(6, 1))
    engine = Engine(model, single_backward=True)
    x = torch.randn(B, T, D, requires_grad=True).clone()  # (a hidden state: the products' operand is a view of it)
    engine.compute_gramian(model(x).squeeze(-1).pow(2).mean(-1))
    assert taken == [("_FunctionalLinear", True)]
    x.mul_(2.0)
    with pytest.raises(RuntimeError, match=r"Module 0 \(_FunctionalLinear\): an operand of its matrix products, .*"
                                           r"version 1"):
        engine.backward(torch.ones(B))
    engine.remove()
