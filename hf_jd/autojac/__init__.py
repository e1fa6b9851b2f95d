"""Jacobians with an API like ``torch.autograd``: the building blocks of Jacobian descent.

* :func:`jac` returns the Jacobian of a vector of objectives w.r.t. some tensors,
* :func:`backward` accumulates it into the ``.jac`` attribute of leaf tensors,
* :func:`mtl_backward` does the multi-task variant (task gradients into the heads' ``.grad``,
  a Jacobian into the shared parameters' ``.jac``),
* :func:`jac_to_grad` aggregates the ``.jac`` of parameters into their ``.grad`` with an
  aggregator of :mod:`hf_jd.aggregation`.

A step of Jacobian descent (Quinton & Rey, arXiv:2406.16232) with per-example losses is then::

    params = [p for p in model.parameters() if p.requires_grad]  # (frozen ones have no Jacobian)
    losses = loss_fn(model(inputs), targets)          # shape [B], reduction="none"
    backward(losses, params)
    jac_to_grad(params, UPGrad())
    optimizer.step()
    optimizer.zero_grad()

``backward`` gives every tensor of ``params`` a ``.jac`` (zeros for one the losses do not reach), so that
``jac_to_grad`` finds one on each; a model with frozen parameters needs them left out of ``params``, as above.
"""

from __future__ import annotations

from ._backward import backward
from ._jac import jac
from ._jac_to_grad import jac_to_grad
from ._mtl_backward import mtl_backward

__all__ = ["backward", "jac", "jac_to_grad", "mtl_backward"]
