"""The autogram engine: the Gramian ``J Jᵀ`` of the losses' Jacobian without ever forming ``J``.

Algorithm 3 of Quinton & Rey, "Jacobian Descent For Multi-Objective Optimization" (arXiv
2406.16232): forward hooks on every module with direct trainable parameters capture what that
module saw (its input, its output's gradient edge); :meth:`Engine.compute_gramian` back-propagates
the losses to those module outputs only (no parameter gradient is computed) and adds each
parameter's contribution in closed form (Linear, Conv1D, Conv2d, Embedding, RMSNorm,
LayerNorm) or by batched vector-Jacobian products on the existing graph (any other module).
Parameters used by several modules (tied embeddings) get their cross terms.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._accumulate import Accumulator, grads_at_once, grads_streamed, uncovered_parameters
from ._capture import Capture
from ._deliver import deliver_gradients
from ._layout import RowLayout, layout_of_losses
from ._record import Record

__all__ = ["Engine"]


@dataclass
class _Bound:
    """What :meth:`Engine.compute_gramian` keeps for :meth:`Engine.backward`."""

    layout: RowLayout
    losses: Tensor
    uses: dict[int, list[tuple[Record, str]]]
    params: dict[int, nn.Parameter]
    uncovered: list[Tensor]


class Engine:
    """Computes the Gramian of the Jacobian of a vector of losses w.r.t. the trainable parameters
    of the given modules, during a backward pass that never holds the Jacobian.

    Algorithm 3 of Quinton & Rey, "Jacobian Descent For Multi-Objective Optimization"
    (arXiv 2406.16232), with closed forms per module type (see the module docstring).

    Parameters
    ----------
    *modules
        Modules whose trainable parameters (those of all their submodules, each shared parameter
        once) define the Jacobian. Hooks are put on the modules themselves, so wrappers such as
        DDP or Accelerate do not matter.
    batch_dim
        Batch dimension of the module inputs and outputs, when the losses have one row per example
        (shape ``[B]``) or per example and task (shape ``[B, m]``). ``None`` when the losses are
        ``m`` task losses (shape ``[m]``) each depending on the whole batch.
    single_backward
        Keep what :meth:`compute_gramian` computed so that :meth:`backward` can write the weighted
        gradient directly from the captured factors, without a second backward pass through the
        network ("book-keeping", Bu et al., ICML 2023). Faster, but keeps per-example gradients of
        the layers for which they were materialised (memory ~ ``R`` times those layers' size).

    Notes
    -----
    Usage::

        engine = Engine(model)
        losses = loss_fn(model(x), y)             # shape [B], reduction="none"
        gramian = engine.compute_gramian(losses)  # [B, B]; the autograd graph is retained
        weights = weighting(gramian)              # [B]
        losses.backward(weights)                  # or engine.backward(weights) (single_backward)

    For ``[B, m]`` losses, reshape the weights to ``[B, m]`` before ``losses.backward``.

    * Requirements: with ``batch_dim`` set, example ``i``'s losses must depend on example ``i``
      only (BatchNorm in training mode raises a ``RuntimeError``). Module outputs of size 1 along
      ``batch_dim`` while the batch is larger (e.g. BERT's default ``position_ids`` of shape
      ``[1, T]``) are expanded to the batch size by the hook (same values), so that their
      gradients are per example.
    * State: captured tensors are dropped after :meth:`compute_gramian` (after :meth:`backward`
      with ``single_backward``), by :meth:`reset`, and when a module given to the engine starts a
      new forward pass after having completed one. A model called several times before one
      ``compute_gramian`` (siamese set-ups) must therefore be called inside one module's forward.
    * Not supported, with a ``RuntimeError`` naming the cause: gradient checkpointing (forward
      passes re-run inside the backward pass), ``Embedding(scale_grad_by_freq=True)``, and a
      module with parameters of its own that uses a submodule's parameters without calling it
      (``nn.MultiheadAttention`` is handled). Parameters used outside the forward pass of the
      modules that own them are not attributed.
    * Dtypes: the Gramian is float32 (float64 for float64 parameters), also under autocast.
    """

    def __init__(self, *modules: nn.Module, batch_dim: int | None = 0, single_backward: bool = False) -> None:
        if not modules:
            raise ValueError("Engine needs at least one module, e.g. Engine(model).")
        for module in modules:
            if not isinstance(module, nn.Module):
                raise TypeError(f"Engine expects torch.nn.Module objects, got {type(module).__name__}.")
        if batch_dim is not None and (
            isinstance(batch_dim, bool) or not isinstance(batch_dim, int) or batch_dim < 0
        ):
            raise ValueError(f"batch_dim must be a non-negative int or None, got {batch_dim!r}.")
        self._single_backward = bool(single_backward)
        self._bound: _Bound | None = None
        self._capture = Capture(list(modules), batch_dim, on_new_forward=self.reset)

    # ------------------------------------------------------------------ public API

    @property
    def enabled(self) -> bool:
        """Whether the hooks capture anything (when ``False`` they do nothing, store nothing)."""
        return self._capture.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._capture.enabled = bool(value)

    @property
    def batch_dim(self) -> int | None:
        """The batch dimension of module tensors, or ``None``."""
        return self._capture.batch_dim

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Context manager disabling the engine, restoring the previous state on exit."""
        previous = self.enabled
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = previous

    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters covered by the engine, each once, in module order."""
        return self._capture.parameters()

    def reset(self) -> None:
        """Drop any captured state."""
        self._capture.reset()
        self._bound = None

    def remove(self) -> None:
        """Remove all hooks (the engine captures nothing afterwards) and drop captured state."""
        self._capture.remove()
        self._bound = None

    def compute_gramian(self, losses: Tensor) -> Tensor:
        """Return the Gramian ``J Jᵀ`` of the Jacobian of ``losses.flatten()``.

        Parameters
        ----------
        losses
            Shape ``[B]`` (``batch_dim`` set), ``[m]`` (``batch_dim=None``) or ``[B, m]``
            (``batch_dim`` set; row ``i * m + k`` of the Gramian is task ``k`` of example ``i``).
            Must come from a forward pass run with the engine enabled and grad mode on.

        Returns
        -------
        Tensor
            The ``[R, R]`` Gramian with ``R = losses.numel()``, in float32 (float64 when the
            parameters are float64). The autograd graph is retained so that
            ``losses.backward(weights)`` can follow.
        """
        capture = self._capture
        layout, grad_outputs, batched = layout_of_losses(
            losses, capture.batch_dim, capture.batch_size, capture.batch_source
        )
        capture.check_no_checkpointing()
        records = [record for record in capture.records if record.edges]
        if not records:
            raise RuntimeError(
                "The engine captured no module call: run the forward pass with the engine enabled, "
                "in grad mode, and with trainable parameters in the engine's modules."
            )
        capture.records = []
        counts: dict[int, int] = {}
        for record in records:
            for param in record.params.values():
                counts[id(param)] = counts.get(id(param), 0) + 1
        float64 = any(p.dtype == torch.float64 for record in records for p in record.params.values())
        dtype = torch.float64 if float64 else torch.float32
        accumulator = Accumulator(layout, dtype, losses.device, counts, self._single_backward)
        capture.computing = True
        try:
            if batched:
                grads_at_once(losses, grad_outputs, records, accumulator, batched=True)
            else:
                grads_streamed(losses, grad_outputs, records, accumulator)
        finally:
            capture.computing = False
        del records
        gramian = accumulator.finish()
        if self._single_backward:
            uncovered = uncovered_parameters(losses, accumulator.params)
            self._bound = _Bound(layout, losses, accumulator.uses, accumulator.params, uncovered)
        return gramian

    def backward(self, weights: Tensor) -> None:
        """Accumulate the gradient of ``Σ_r w_r L_r`` into ``.grad`` without a second backward
        through the network (needs ``Engine(..., single_backward=True)`` and a preceding
        :meth:`compute_gramian`).

        Covered parameters get their gradient from the captured factors (e.g. ``(diag(w) G)ᵀ A``
        for a Linear layer), delivered through autograd so that gradient hooks (DDP, Accelerate)
        fire. Trainable parameters that the losses depend on but that the engine does not cover
        get theirs by an ordinary weighted backward restricted to them.

        Parameters
        ----------
        weights
            Shape ``[R]`` (as returned by a weighting) or the shape of the losses.
        """
        if not self._single_backward:
            raise RuntimeError(
                "Engine.backward needs Engine(..., single_backward=True); otherwise call "
                "losses.backward(weights) after compute_gramian."
            )
        bound = self._bound
        if bound is None:
            raise RuntimeError("Engine.backward must follow compute_gramian(losses) on the same forward pass.")
        if not isinstance(weights, Tensor):
            raise TypeError(f"weights must be a torch.Tensor, got {type(weights).__name__}.")
        layout = bound.layout
        if weights.numel() != layout.num_rows or weights.shape not in (
            torch.Size([layout.num_rows]),
            bound.losses.shape,
        ):
            raise ValueError(
                f"weights must have shape [{layout.num_rows}] or the losses' shape "
                f"{tuple(bound.losses.shape)}, got {tuple(weights.shape)}."
            )
        table = weights.detach().reshape(layout.num_examples, layout.num_tasks)
        params: list[Tensor] = []
        grads: list[Tensor] = []
        for key, param_uses in bound.uses.items():
            param = bound.params[key]
            grad = param_uses[0][0].weighted_grad(param_uses[0][1], table)
            for record, name in param_uses[1:]:
                grad = grad + record.weighted_grad(name, table)
            params.append(param)
            grads.append(grad.to(param.dtype))
            del grad
        self._bound = None
        if bound.uncovered:
            torch.autograd.backward(
                bound.losses, weights.detach().reshape(bound.losses.shape).to(bound.losses.dtype),
                inputs=bound.uncovered,
            )
        if params:
            deliver_gradients(params, grads)
