"""Forward hooks that change a module's output before the engine's hook sees it: global hooks always run before a
module's own, and a hook registered with ``prepend=True`` after the engine runs before its hook. The closed forms
assume the module's own output; such a module takes the generic path, exact whatever the hooks return."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_jd.autogram import Engine

from ._reference import assert_exact_step, trainable


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1))


def _affine(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output * 3 - 1


@pytest.mark.parametrize("single_backward", [False, True])
def test_prepended_hook_registered_after_the_engine(single_backward: bool) -> None:
    model = _mlp()
    engine = Engine(model, single_backward=single_backward)
    model[2].register_forward_hook(_affine, prepend=True)
    with pytest.warns(RuntimeWarning, match=r"module 2 \(Linear\) has forward hooks that run before the engine's"):
        losses = model(torch.randn(3, 5))[:, 0].pow(2)
    # (before, the Gramian was off by 3e-1 and the single backward's gradient by 5e-1)
    assert_exact_step(engine, losses, trainable(model), single_backward)


@pytest.mark.parametrize("single_backward", [False, True])
def test_global_hook_changing_an_output(single_backward: bool) -> None:
    model = _mlp()
    engine = Engine(model, single_backward=single_backward)
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, args, output: _affine(module, args, output) if module is model[2] else None
    )
    try:
        with pytest.warns(RuntimeWarning, match="global hooks"):
            losses = model(torch.randn(3, 5))[:, 0].pow(2)
        assert_exact_step(engine, losses, trainable(model), single_backward)
    finally:
        handle.remove()


def test_hooks_registered_the_usual_way_keep_the_closed_forms(recwarn: pytest.WarningsRecorder) -> None:
    """Registered before the engine, or after it without prepend: they run after the engine's hook."""
    model = _mlp()
    model[0].register_forward_hook(_affine)
    engine = Engine(model)
    model[2].register_forward_hook(_affine)
    losses = model(torch.randn(3, 5))[:, 0].pow(2)
    assert_exact_step(engine, losses, trainable(model), single_backward=False)
    assert not [w for w in recwarn if "forward hooks that run before" in str(w.message)]
    assert all(not info.kind.is_generic for info in engine._capture.infos.values())
