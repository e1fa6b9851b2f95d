"""Independent reference: the explicit Jacobian, one autograd.grad call per loss row."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from hf_jd.autogram import Engine


def trainable(*modules: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters of the modules, each shared parameter once."""
    seen: set[int] = set()
    params = []
    for module in modules:
        for param in module.parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    return params


def jacobian(losses: Tensor, params: list[nn.Parameter]) -> Tensor:
    """``[R, n]`` Jacobian of ``losses.flatten()`` on the existing graph (same dropout masks)."""
    rows = []
    for loss in losses.reshape(-1):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat([torch.zeros(p.numel(), device=p.device) if g is None else g.reshape(-1)
                       for p, g in zip(params, grads)])
        )
    return torch.stack(rows)


def assert_gramian_matches(gramian: Tensor, jac: Tensor, rtol: float = 1e-4, atol: float = 1e-12) -> None:
    """Compare with ``J Jᵀ`` relative to the Gramian's scale."""
    expected = jac.to(gramian.dtype) @ jac.to(gramian.dtype).T
    assert gramian.shape == expected.shape
    assert not gramian.requires_grad
    scale = expected.abs().max().item()
    torch.testing.assert_close(gramian, expected, rtol=rtol, atol=atol + rtol * scale)


def assert_update_matches(actual: Tensor, expected: Tensor) -> None:
    """Compare with ``wᵀ J`` relative to the update's scale (an absolute tolerance would accept anything of small
    gradients)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-12 + 1e-5 * scale)


def grads_of(params: list[nn.Parameter]) -> Tensor:
    return torch.cat(
        [torch.zeros(p.numel(), device=p.device) if p.grad is None else p.grad.reshape(-1) for p in params]
    )


def assert_exact_step(
    engine: Engine, losses: Tensor, params: list[nn.Parameter], single_backward: bool, weights: Tensor | None = None
) -> None:
    """The engine's Gramian equals J Jᵀ, and its weighted update (``engine.backward`` with the single
    backward, ``losses.backward`` otherwise) equals wᵀ J, both against the explicit Jacobian."""
    jac = jacobian(losses, params)
    assert_gramian_matches(engine.compute_gramian(losses, retain_graph=True), jac)
    weights = torch.linspace(0.5, 1.5, losses.numel()) if weights is None else weights
    if single_backward:
        engine.backward(weights)
    else:
        losses.backward(weights.view(losses.shape))
    assert_update_matches(grads_of(params), weights @ jac)


def assert_exact_step_with_freed_graph(
    engine: Engine, model: nn.Module, losses: Tensor, single_backward: bool
) -> None:
    """As :func:`assert_exact_step`, but ``compute_gramian`` keeps its default ``retain_graph`` (the single backward
    may free the graph during the Gramian pass): the explicit Jacobian is taken first."""
    params = trainable(model)
    jac = jacobian(losses, params)
    assert_gramian_matches(engine.compute_gramian(losses), jac)
    weights = torch.linspace(0.5, 1.5, losses.numel())
    model.zero_grad(set_to_none=True)
    if single_backward:
        engine.backward(weights)
    else:
        losses.backward(weights.view(losses.shape))
    assert_update_matches(grads_of(params), weights @ jac)


def count_started_at_uses(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record, on each step, the generic calls whose products start at their parameters' uses (module names)."""
    from hf_jd.autogram import engine as engine_module

    started: list[list[str]] = []
    original = engine_module.start_at_uses

    def spied(*args, **kwargs):  # type: ignore[no-untyped-def]
        changed = original(*args, **kwargs)
        started.append([record.module_name for record in changed])
        return changed

    monkeypatch.setattr(engine_module, "start_at_uses", spied)
    return started


def count_unattributed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the engine's batched passes over the loss rows for parameters used outside their modules' calls."""
    from hf_jd.autogram import engine as engine_module

    calls: list[int] = []
    original = engine_module.unattributed_gram

    def counted(*args):  # type: ignore[no-untyped-def]
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(engine_module, "unattributed_gram", counted)
    return calls


def count_per_row(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record the calls sent to the engine's per-row pass: one list of module descriptions per pass."""
    from hf_jd.autogram import _accumulate
    from hf_jd.autogram import engine as engine_module

    calls: list[list[str]] = []
    original = _accumulate.grads_per_row

    def counted(*args):  # type: ignore[no-untyped-def]
        calls.append([record.describe() for record in args[2]])
        return original(*args)

    monkeypatch.setattr(engine_module, "grads_per_row", counted)
    return calls
