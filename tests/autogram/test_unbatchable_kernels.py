"""Backward kernels that vmap cannot batch (cuDNN's fused recurrent layers on a GPU: "Batching rule not implemented
for aten::_cudnn_rnn_backward. We could not generate a fallback."). The engine's vmapped passes then go one vector
at a time: found out when a pass fails (redone at once, graph kept), or known beforehand from the node's type.

On the CPU the failure is reproduced by a layer whose backward kernel calls ``torch._foreach_mul``, which returns a
list of tensors and therefore has neither a batching rule nor vmap's fallback: the same error from torch itself."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from hf_jd.autogram import Engine
from hf_jd.autogram import _batched_grad
from hf_jd.autogram._batched_grad import VmapFailure, batched_grad, has_unbatchable_nodes

from ._reference import assert_exact_step, trainable


class _ForeachScale(torch.autograd.Function):
    """``x * scale`` whose backward kernel computes both gradients with one ``torch._foreach_mul`` call."""

    @staticmethod
    def forward(ctx: Any, inputs: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(inputs, scale)
        return inputs * scale

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        inputs, scale = ctx.saved_tensors
        grad_inputs, grad_scale = torch._foreach_mul([grad, grad], [scale, inputs])
        return grad_inputs, grad_scale.reshape(-1, scale.numel()).sum(0)


class _Scaled(nn.Module):
    """A layer with its own parameter (the engine's generic path) and that kernel."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, inputs: Tensor) -> Tensor:
        return _ForeachScale.apply(inputs, self.scale)


class _Model(nn.Module):
    """Embedding → Linear → the unbatchable layer → one head per task."""

    def __init__(self, num_tasks: int = 1) -> None:
        super().__init__()
        self.embedding = nn.Embedding(20, 6)
        self.linear = nn.Linear(6, 6)
        self.scaled = _Scaled(6)
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(num_tasks))

    def forward(self, ids: Tensor) -> Tensor:
        hidden = self.scaled(torch.tanh(self.linear(self.embedding(ids)))).mean(1)
        return torch.cat([head(hidden).pow(2) for head in self.heads], dim=1)  # [B, tasks]


def _ids(batch: int, step: int) -> Tensor:
    return torch.randint(0, 20, (batch, 5), generator=torch.Generator().manual_seed(step))


def test_the_kernel_really_has_no_batching_rule() -> None:
    inputs = torch.randn(3, 4, requires_grad=True)
    output = _Scaled(4)(inputs)
    with pytest.raises(RuntimeError, match="Batching rule not implemented"):
        torch.autograd.grad(output, inputs, torch.randn(2, 3, 4), is_grads_batched=True)


@pytest.mark.parametrize("single_backward", [False, True])
def test_per_example_losses_fall_back_once_and_stay_exact(single_backward: bool) -> None:
    torch.manual_seed(0)
    model = _Model()
    engine = Engine(model, batch_dim=0, single_backward=single_backward)
    params = trainable(model)
    with pytest.warns(RuntimeWarning, match="cannot batch"):
        assert_exact_step(engine, model(_ids(4, 0)).squeeze(1), params, single_backward)
    assert engine._vmap_failed
    for step, batch in enumerate([4, 3], start=1):
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # shown once per engine; the later steps do not try vmap again
            assert_exact_step(engine, model(_ids(batch, step)).squeeze(1), params, single_backward)


@pytest.mark.parametrize("single_backward", [False, True])
def test_task_losses_through_the_kernel(single_backward: bool) -> None:
    """Per-task losses ``[m]``: the pass over the tasks' vectors itself crosses the kernel."""
    torch.manual_seed(1)
    model = _Model(num_tasks=3)
    engine = Engine(model, batch_dim=None, single_backward=single_backward)
    with pytest.warns(RuntimeWarning, match="cannot batch"):
        assert_exact_step(engine, model(_ids(4, 0)).mean(0), trainable(model), single_backward)


def test_per_example_task_losses_through_the_kernel() -> None:
    torch.manual_seed(2)
    model = _Model(num_tasks=2)
    engine = Engine(model, batch_dim=0)
    with pytest.warns(RuntimeWarning, match="cannot batch"):
        assert_exact_step(engine, model(_ids(3, 0)), trainable(model), single_backward=False)


def test_known_kernels_go_one_vector_at_a_time_from_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes named in the list (cuDNN's recurrent layers) never reach vmap: no failed pass, no warning."""
    monkeypatch.setattr(_batched_grad, "_UNBATCHABLE_NODES", frozenset({"_ForeachScaleBackward"}))
    torch.manual_seed(3)
    model = _Model()
    engine = Engine(model, batch_dim=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_exact_step(engine, model(_ids(4, 0)).squeeze(1), trainable(model), single_backward=False)
    assert not engine._vmap_failed


def test_cudnn_recurrent_nodes_are_known_to_be_unbatchable() -> None:
    node_type = type("CudnnRnnBackward0", (), {})
    assert has_unbatchable_nodes([object(), node_type()])
    output = nn.LSTM(3, 4)(torch.randn(5, 2, 3))[0]  # on the CPU: a kernel that vmap batches
    assert not has_unbatchable_nodes([output.grad_fn])


def test_a_failure_after_the_graph_was_freed_says_what_to_do() -> None:
    inputs = torch.randn(3, 4, requires_grad=True)
    output = _Scaled(4)(torch.tanh(inputs))
    with pytest.raises(VmapFailure, match="cannot be vmapped .*run the step again"):
        batched_grad([output], [inputs], torch.randn(2, 3, 4), retain_graph=False)


def test_other_errors_are_not_taken_for_vmap_failures() -> None:
    class _Broken(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, inputs: Tensor) -> Tensor:
            return inputs.clone()

        @staticmethod
        def backward(ctx: Any, grad: Tensor) -> Tensor:
            raise RuntimeError("something else went wrong")

    inputs = torch.randn(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="something else"):
        batched_grad([_Broken.apply(inputs)], [inputs], torch.randn(2, 3))
