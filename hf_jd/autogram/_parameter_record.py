"""Record of a parameter the model reads directly, outside any call of the module that owns it.

DeBERTa's encoder passes ``rel_embeddings.weight``, its ``[2k, d]`` relative-position table, to every layer without
calling the ``nn.Embedding`` that owns it; each layer slices it, applies dropout and projects it with Linear layers
whose ``[1, 2k, ·]`` outputs are broadcast over the batch in the attention scores. The parameter itself is then the
shared tensor of a broadcast plan (:mod:`._broadcast`): its per-example gradients come from the engine's ordinary
backward pass, mapped back from the broadcasting nodes through the slice, the dropout and the projections, instead
of from a batched backward pass over the loss rows. The per-example gradients are the record's "output gradients"
and, flattened, its per-row gradients.

When the plan does not hold (a use that is no broadcast), the record takes the engine's exact per-row path like any
planned table: its gradient edge is the parameter's own, so a batched backward pass from the losses gives its per-row
gradients.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from ._layout import RowLayout
from ._record import Record, compute_dtype

__all__ = ["ParameterRecord"]


class ParameterRecord(Record):
    """A trainable parameter used outside the calls of its module, as the shared tensor of a broadcast plan.

    Parameters
    ----------
    module
        The module that owns the parameter (named in messages).
    module_name
        Its qualified name.
    name
        The parameter's attribute name in ``module``.
    param
        The parameter.
    """

    inserts_batch = True

    def __init__(self, module: nn.Module, module_name: str, name: str, param: nn.Parameter) -> None:
        super().__init__(module, module_name, {name: param})
        self.name = name
        self.edges = [get_gradient_edge(param)]
        self.batched = False  # (no example index: planned, else per row)
        self.is_source = True  # (no call lies upstream of a parameter)
        self.rows: Tensor | None = None

    def describe(self) -> str:
        """The parameter's qualified name and its module's type, for messages.

        Returns
        -------
        str
            ``module.name (Type's parameter, read outside its calls)``.
        """
        prefix = f"{self.module_name}." if self.module_name else ""
        return f"{prefix}{self.name} ({type(self.module).__name__}'s parameter, read outside its calls)"

    def can_insert_batch(self, batch_dim: int) -> bool:
        """Whether the parameter's per-example gradients can be stacked along ``batch_dim``.

        Parameters
        ----------
        batch_dim
            Where the batch dimension would go.

        Returns
        -------
        bool
            ``True`` when ``batch_dim`` is at most the parameter's number of dimensions.
        """
        return batch_dim <= self.params[self.name].dim()

    def insert_batch(self, num_examples: int, batch_dim: int) -> None:
        """Nothing to repeat: the record keeps no forward tensor.

        Parameters
        ----------
        num_examples
            Number of examples.
        batch_dim
            Position of the batch dimension.
        """

    def _bind(self, grads: list[Tensor | None], layout: RowLayout) -> None:
        (grad,) = grads
        assert grad is not None
        rows = layout.grad_to_rows(grad).to(compute_dtype(self.params[self.name]))
        self.rows = rows.reshape(layout.num_rows, -1)

    def per_row(self, name: str) -> Tensor:
        """The parameter's per-row gradients.

        Parameters
        ----------
        name
            The parameter's name in ``params``.

        Returns
        -------
        Tensor
            Shape ``[R, numel]``.
        """
        assert self.rows is not None
        return self.rows

    def release(self) -> None:
        """Drop the per-row gradients once the record's contributions are added."""
        super().release()
        self.rows = None
