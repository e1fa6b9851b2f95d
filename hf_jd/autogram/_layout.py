"""Row layout of the Gramian: how loss rows map to examples and tasks.

The engine supports three shapes of losses:

* ``[B]`` with ``batch_dim`` set: one loss per example (instance-wise risk minimisation);
* ``[m]`` with ``batch_dim=None``: ``m`` tasks, the whole batch acts as a single "example";
* ``[B, m]`` with ``batch_dim`` set: ``m`` tasks per example, rows flattened example-major
  (row ``i * m + k`` is task ``k`` of example ``i``).

All three are described by ``E`` examples times ``m`` tasks (``E = 1`` in the second case).
Captured module tensors are brought to a common "rows" layout: inputs ``[E, *rest]`` and output
gradients ``[E, m, *rest]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RowLayout", "layout_of_losses"]


@dataclass(frozen=True)
class RowLayout:
    """Mapping between captured tensors and the rows of the Gramian.

    Parameters
    ----------
    batch_dim
        Batch dimension of the captured module tensors, or ``None`` when the batch is not split
        into examples.
    num_examples
        ``E``: the batch size when ``batch_dim`` is set, else 1.
    num_tasks
        ``m``: the number of losses per example.
    """

    batch_dim: int | None
    num_examples: int
    num_tasks: int

    @property
    def num_rows(self) -> int:
        """Number of rows ``E * m`` of the Gramian."""
        return self.num_examples * self.num_tasks

    @property
    def batched(self) -> bool:
        """Whether the rows are split by example."""
        return self.batch_dim is not None

    def input_to_rows(self, tensor: Tensor) -> Tensor:
        """Move the batch dimension of a captured module tensor to the front: ``[E, *rest]``.

        Parameters
        ----------
        tensor
            A captured tensor, batch dimension at ``batch_dim`` (none if ``batch_dim`` is ``None``).

        Returns
        -------
        Tensor
            ``[E, *rest]`` (``E = 1`` without batch dimension).
        """
        if self.batch_dim is None:
            return tensor.unsqueeze(0)
        return tensor.movedim(self.batch_dim, 0)

    def grad_to_rows(self, grad: Tensor) -> Tensor:
        """Bring a batched output gradient ``[m, *shape]`` to ``[E, m, *rest]``.

        Parameters
        ----------
        grad
            A batched output gradient, shape ``[m, *shape]``.

        Returns
        -------
        Tensor
            ``[E, m, *rest]``.
        """
        if self.batch_dim is None:
            return grad.unsqueeze(0)
        return grad.movedim(self.batch_dim + 1, 0)

    def rows_to_grad_outputs(self, grad_rows: Tensor, examples: slice | None = None) -> Tensor:
        """Per-row output gradients in the module's own layout: ``[E * m, *shape]``.

        Row ``(e, k)`` holds task ``k``'s gradient restricted to example ``e`` (zero elsewhere),
        which is what a batched vector-Jacobian product needs to give per-row parameter gradients.
        With ``examples``, only the rows of those examples are built.

        Parameters
        ----------
        grad_rows
            Output gradients ``[E, m, *rest]`` (see :meth:`grad_to_rows`).
        examples
            The examples whose rows to build (default: all).

        Returns
        -------
        Tensor
            ``[E' * m, *shape]`` for the ``E'`` examples built.
        """
        if self.batch_dim is None:
            return grad_rows[0]
        num_examples = grad_rows.shape[0]
        part = grad_rows if examples is None else grad_rows[examples]
        count, num_tasks = part.shape[:2]
        rest = grad_rows.shape[2:]
        first = 0 if examples is None else examples.start
        eye = torch.eye(num_examples, dtype=grad_rows.dtype, device=grad_rows.device)[first : first + count]
        mask = eye.view(count, 1, num_examples, *([1] * len(rest)))
        spread = part.unsqueeze(2) * mask  # [count, m, E, *rest]
        spread = spread.reshape(count * num_tasks, num_examples, *rest)
        return spread.movedim(1, self.batch_dim + 1)

    def weighted_grad_output(self, grad_rows: Tensor, weights: Tensor) -> Tensor:
        """Output gradient of the weighted loss ``Σ_r w_r L_r`` in the module's own layout.

        ``weights`` has shape ``[E, m]``.

        Parameters
        ----------
        grad_rows
            Output gradients ``[E, m, *rest]``.
        weights
            The loss weights, shape ``[E, m]``.

        Returns
        -------
        Tensor
            The weighted output gradient, in the module output's shape.
        """
        shape = (*weights.shape, *([1] * (grad_rows.dim() - 2)))
        combined = (grad_rows * weights.view(shape).to(grad_rows.dtype)).sum(1)  # [E, *rest]
        if self.batch_dim is None:
            return combined[0]
        return combined.movedim(0, self.batch_dim)


def layout_of_losses(
    losses: Tensor, batch_dim: int | None, batch_size: int, batch_source: str
) -> tuple[RowLayout, Tensor, bool]:
    """Validate the losses; return their row layout, the vectors to back-propagate, and whether
    those are batched (one per task).

    ``batch_size`` is the number of examples the forward pass saw (0 if unknown), in
    ``batch_source``.

    Parameters
    ----------
    losses
        The losses: ``[m]`` (tasks) without batch dimension, else ``[E]`` or ``[E, m]``.
    batch_dim
        The engine's batch dimension, or ``None``.
    batch_size
        Number of examples of the forward pass, 0 if unknown.
    batch_source
        Where ``batch_size`` comes from (for the error messages).

    Returns
    -------
    tuple
        The :class:`RowLayout`, the vectors to back-propagate, and whether they are batched.

    Raises
    ------
    TypeError
        If ``losses`` is not a tensor.
    ValueError
        If the losses are not floating, do not require grad, or their shape does not match
        ``batch_dim`` and ``batch_size``.
    """
    if not isinstance(losses, Tensor):
        raise TypeError(f"losses must be a torch.Tensor, got {type(losses).__name__}.")
    if not losses.is_floating_point():
        raise ValueError(f"losses must have a floating dtype, got {losses.dtype}.")
    if not losses.requires_grad:
        raise ValueError(
            "losses do not require grad: compute them from the model's outputs in grad mode."
        )
    bd = batch_dim
    if bd is None:
        if losses.dim() > 1 or losses.numel() == 0:
            raise ValueError(
                f"With batch_dim=None the losses must have shape [m] (one per task), got "
                f"{tuple(losses.shape)}."
            )
        num_tasks = losses.numel()
        eye = torch.eye(num_tasks, dtype=losses.dtype, device=losses.device)
        return RowLayout(None, 1, num_tasks), eye.view(num_tasks, *losses.shape), True
    if losses.dim() not in (1, 2) or losses.numel() == 0:
        raise ValueError(
            f"With batch_dim={bd} the losses must have shape [B] (one per example, e.g. "
            f"reduction='none') or [B, m], got {tuple(losses.shape)}. For m task losses that "
            "each depend on the whole batch use Engine(..., batch_dim=None)."
        )
    num_examples = losses.shape[0]
    if batch_size and num_examples != batch_size:
        raise ValueError(
            f"The losses have {num_examples} rows but the forward pass saw a batch of "
            f"{batch_size} examples along batch_dim={bd} (in {batch_source}); pass "
            "one loss per example, or use batch_dim=None if the modules' tensors are not split by "
            "example along that dimension. The batch size is read from the inputs of the modules given to the "
            "engine (their first positional tensor, else the largest size along batch_dim): if those inputs are "
            "not split by example (e.g. a flat list of token ids with offsets for nn.EmbeddingBag), pass them "
            "split by example (for nn.EmbeddingBag, [B, L] ids padded with its padding_idx)."
            + (
                " Here the size comes from a tensor in a list: give the model its examples stacked into one "
                "[B, ...] tensor instead of a list of per-example tensors (TimesFM's past_values takes either)."
                if batch_source.startswith("an element of a list")
                else ""
            )
            + (
                f" The batch holds {batch_size // num_examples} rows per loss: for a model whose inputs fold several "
                "rows into each example (MusicGen's [B * codebooks, T] ids), give one loss per input row, or give "
                "the engine the modules inside the model that see one row per example (e.g. MusicGen's "
                "Engine(*model.model.decoder.children(), *model.lm_heads))."
                if num_examples and batch_size > num_examples and batch_size % num_examples == 0
                else ""
            )
        )
    if losses.dim() == 1:
        return RowLayout(bd, num_examples, 1), torch.ones_like(losses), False
    num_tasks = losses.shape[1]
    eye = torch.eye(num_tasks, dtype=losses.dtype, device=losses.device)
    grad_outputs = eye.unsqueeze(1).expand(num_tasks, num_examples, num_tasks)
    return RowLayout(bd, num_examples, num_tasks), grad_outputs, True
