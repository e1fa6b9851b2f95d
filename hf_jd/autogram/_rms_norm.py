"""Closed form for RMSNorm-like modules (torch's ``nn.RMSNorm``, LLaMA's / T5's / Mistral's ...).

Such a module computes ``y = w ⊙ x̂`` (or ``(1 + w) ⊙ x̂``, as Gemma's) with
``x̂ = x / sqrt(mean(x²) + eps)`` (in float32, cast back to the input dtype; for float64 inputs some
classes compute only the mean square in float32), so row ``r = (e, k)`` has the gradient
``Σ_t g_{ekt} ⊙ x̂_{et}`` for ``w`` either way. Since the exact formula of a custom class cannot be known from
its name (T5's is ``T5LayerNorm``), the record first checks on the captured tensors that the output equals
one of these forms (to float64's precision for float64 outputs); if not, it falls back to the generic
vector-Jacobian products, which are always exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ._generic import GenericRecord
from ._layer_norm import epsilon_of
from ._layout import RowLayout
from ._record import Record, compute_dtype, reproduces_output

__all__ = ["RMSNormRecord", "is_rms_norm_like"]


def is_rms_norm_like(module: nn.Module) -> bool:
    """Whether the module may be an RMSNorm: a norm by its name, one 1-D ``weight``, an epsilon.

    Parameters
    ----------
    module
        The module.

    Returns
    -------
    bool
        ``True`` for a candidate.
    """
    params = dict(module.named_parameters(recurse=False))
    return (
        "norm" in type(module).__name__.lower()
        and list(params) == ["weight"]
        and params["weight"].dim() == 1
        and (epsilon_of(module) is not None or isinstance(module, nn.RMSNorm))
    )


def _normalised_candidates(inputs: Tensor, eps: float) -> Iterator[Tensor]:
    """``x̂`` as RMS norms compute it: in float32 cast back (LLaMA's), then, for float64 inputs, with the mean
    square in float32 and the product in float64 (T5's, CPM-Ant's), and all in float64 (``nn.RMSNorm``)."""
    hidden = inputs.float()
    mean_square = hidden.pow(2).mean(-1, keepdim=True)
    yield (hidden * torch.rsqrt(mean_square + eps)).to(inputs.dtype)
    if inputs.dtype == torch.float64:
        yield inputs * torch.rsqrt(mean_square + eps)
        yield inputs * torch.rsqrt(inputs.pow(2).mean(-1, keepdim=True) + eps)


class RMSNormRecord(GenericRecord):
    """One call of an RMSNorm-like module: closed form when verified, else generic.

    Parameters
    ----------
    module
        The module that was called.
    module_name
        Its qualified name (for error messages).
    params
        Its direct trainable parameters at call time, by name.
    aliases
        The aliases the call used in place of ``params``.
    outputs
        The tensors of the call's output.
    args
        The call's positional arguments (the input first).
    """

    def __init__(
        self,
        module: nn.Module,
        module_name: str,
        params: dict[str, nn.Parameter],
        aliases: dict[str, Tensor],
        outputs: list[Tensor],
        args: tuple[Any, ...],
    ) -> None:
        super().__init__(module, module_name, params, aliases, outputs)
        inputs = args[0] if args and isinstance(args[0], Tensor) else None
        self.inputs = inputs.detach() if inputs is not None else None
        self.closed_form = False

    def _bind(self, grads: list[Tensor | None], layout: RowLayout) -> None:
        outputs = self.outputs
        super()._bind(grads, layout)
        inputs, self.inputs = self.inputs, None
        if inputs is None or len(outputs) != 1 or len(self.grad_rows) != 1:
            return
        if self.row_examples is not None:  # (rows picked by the data, see _gathered: the products from the output)
            return
        output = outputs[0].detach()
        if self._grouped_dim is not None:  # (regrouped [..., E, k, ...] as the inputs: see split_batch)
            output = output.unflatten(self._grouped_dim, (layout.num_examples, -1))
        if output.shape != inputs.shape:
            return
        weight = self.params.get("weight")
        if weight is None or weight.shape[0] != inputs.shape[-1]:
            return
        eps = epsilon_of(self.module)
        if eps is None:
            eps = torch.finfo(inputs.dtype).eps
        for normalised in _normalised_candidates(inputs, eps):
            if reproduces_output(weight.detach() * normalised, output, atol=1e-6) or reproduces_output(
                (1.0 + weight.detach().float()) * normalised, output, atol=1e-6
            ):
                break
        else:
            return
        dtype = compute_dtype(weight)
        size = inputs.shape[-1]
        self.normalised = layout.input_to_rows(normalised.to(dtype)).reshape(layout.num_examples, -1, size)
        _, rows = self.grad_rows[0]
        self.rows = rows.to(dtype).reshape(layout.num_examples, layout.num_tasks, -1, size)
        self.closed_form = True
        del self.grad_rows

    def per_row(self, name: str) -> Tensor:
        """Per-row gradients of ``weight``: closed form ``Σ_t g ⊙ x̂`` when verified, else generic.

        Parameters
        ----------
        name
            The parameter's name in ``params``.

        Returns
        -------
        Tensor
            Shape ``[R, numel]``.
        """
        if not self.closed_form:
            return super().per_row(name)
        num_rows = self.rows.shape[0] * self.rows.shape[1]
        return (self.rows * self.normalised.unsqueeze(1)).sum(dim=2).reshape(num_rows, -1)

    def can_split_batch(self, batch_dim: int) -> bool:
        """Whether :meth:`split_batch` applies: along a dimension of the rows, not the normalised features (a
        multiple-choice model's ``[B * C, T, d]`` hidden states).

        Parameters
        ----------
        batch_dim
            The engine's batch dimension.

        Returns
        -------
        bool
            ``True`` when the call's outputs can be regrouped (see :meth:`GenericRecord.can_split_batch`) and
            ``batch_dim`` is not the captured input's last dimension.
        """
        # (the outputs' condition, GenericRecord's; the captured input's, that of the position-wise closed forms)
        return super().can_split_batch(batch_dim) and (self.inputs is None or Record.can_split_batch(self, batch_dim))

    def split_batch(self, num_examples: int, batch_dim: int) -> None:
        """Take the ``E * k`` entries along ``batch_dim`` as ``k`` consecutive ones per example (a batch-major
        grouping the engine verified), in the captured input as in the output gradients, so that the closed form
        sums each example's ``k`` rows.

        Parameters
        ----------
        num_examples
            ``E``.
        batch_dim
            The engine's batch dimension.
        """
        super().split_batch(num_examples, batch_dim)  # (the outputs: GenericRecord's)
        if self.inputs is not None:
            Record.split_batch(self, num_examples, batch_dim)  # (the captured input, as the position-wise closed forms)

    def compact(self) -> None:
        """Drop the factors :meth:`weighted_grad` no longer needs once every parameter's rows are kept."""
        if self.closed_form and set(self.kept_rows) >= set(self.params):
            self.rows = self.normalised = None  # type: ignore[assignment]

    def release(self) -> None:
        """Drop the factors and the kept rows once the record's contributions are added."""
        super().release()
        self.rows = self.normalised = None  # type: ignore[assignment]
