"""Record of ``nn.GroupNorm`` calls, in closed form.

``y = γ ⊙ x̂ + β`` with ``x̂`` the input normalised per sample and group of channels, and ``γ``, ``β``
one entry per channel; row ``r = (e, k)`` has gradients ``Σ_s g_{ekcs} x̂_{ecs}`` for ``γ_c`` and
``Σ_s g_{ekcs}`` for ``β_c`` (sums over the spatial positions ``s``). ``x̂`` is recomputed from the
captured input (a normalisation only, the module itself is not re-run). This also avoids the batched
vector-Jacobian products of the generic path, which cost a backward pass per example and which vmap
does not support for channels-last inputs.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ._conv import check_samples_first
from ._layout import RowLayout
from ._record import Record, compute_dtype

__all__ = ["GroupNormRecord", "is_group_norm"]


def is_group_norm(module: nn.Module) -> bool:
    """Whether ``module`` is an affine ``nn.GroupNorm`` with the stock forward.

    Parameters
    ----------
    module
        The module.

    Returns
    -------
    bool
        ``True`` for a stock affine ``nn.GroupNorm``.
    """
    return isinstance(module, nn.GroupNorm) and type(module).forward is nn.GroupNorm.forward and module.affine


class GroupNormRecord(Record):
    """One call of an ``nn.GroupNorm`` on inputs ``[N, C, *spatial]``.

    Parameters
    ----------
    module
        The module that was called.
    module_name
        Its qualified name (for error messages).
    params
        Its direct trainable parameters at call time, by attribute name.
    args
        The call's positional arguments (the input first).
    output
        The call's output.
    """

    def __init__(
        self,
        module: nn.Module,
        module_name: str,
        params: dict[str, nn.Parameter],
        args: tuple[Any, ...],
        output: Tensor,
    ) -> None:
        super().__init__(module, module_name, params)
        self.inputs = args[0].detach()

    def _bind(self, grads: list[Tensor | None], layout: RowLayout) -> None:
        (grad,) = grads
        assert grad is not None
        norm = self.module
        assert isinstance(norm, nn.GroupNorm)
        check_samples_first(self, layout)
        self.check_batch(self.inputs, layout, "input")
        dtype = compute_dtype(next(iter(self.params.values())))
        channels = norm.num_channels
        normalised = F.group_norm(self.inputs.to(dtype), norm.num_groups, None, None, norm.eps)
        del self.inputs
        # [E, n, C, S]: n samples per row group (1 when split by example), S spatial positions.
        positions = normalised[0, 0].numel()
        self.normalised = layout.input_to_rows(normalised).reshape(layout.num_examples, -1, channels, positions)
        rows = layout.grad_to_rows(grad).to(dtype)
        self.rows = rows.reshape(layout.num_examples, layout.num_tasks, -1, channels, self.normalised.shape[-1])

    def release(self) -> None:
        """Drop the factors and the kept rows once the record's contributions are added."""
        super().release()
        self.rows = self.normalised = None  # type: ignore[assignment]

    def compact(self) -> None:
        """Drop the factors :meth:`weighted_grad` no longer needs once every parameter's rows are kept."""
        if set(self.kept_rows) >= set(self.params):
            self.rows = self.normalised = None  # type: ignore[assignment]

    def per_row(self, name: str) -> Tensor:
        """Per-row gradients of ``weight`` (``Σ g ⊙ x̂`` per channel) or ``bias`` (``Σ g``).

        Parameters
        ----------
        name
            The parameter's name in ``params``.

        Returns
        -------
        Tensor
            Shape ``[R, numel]``.
        """
        num_rows = self.rows.shape[0] * self.rows.shape[1]
        if name == "weight":
            return (self.rows * self.normalised.unsqueeze(1)).sum(dim=(2, 4)).reshape(num_rows, -1)
        return self.rows.sum(dim=(2, 4)).reshape(num_rows, -1)
