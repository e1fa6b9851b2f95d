"""Record of ``nn.GroupNorm`` and ``nn.BatchNorm1d/2d/3d`` calls, and of layer norms over the channels of
``[N, C, *spatial]`` inputs (ConvNeXt's ``channels_first`` ``ConvNextLayerNorm``, verified on the module's first call),
in closed form.

``y = γ ⊙ x̂ + β`` with ``x̂`` the input normalised per sample and group of channels (GroupNorm), per sample and
position over the channels (a channels-first layer norm), or per channel with the running statistics (a batch norm in
evaluation mode, as when fine-tuning a convolutional backbone; in training mode, allowed with ``batch_dim=None`` only,
with the batch's statistics), and ``γ``, ``β`` one entry per channel; row ``r = (e, k)``
has gradients ``Σ_s g_{ekcs} x̂_{ecs}`` for ``γ_c`` and ``Σ_s g_{ekcs}`` for ``β_c`` (sums over the spatial positions
``s``). ``x̂`` is recomputed from the captured input (a normalisation only, the module itself is not re-run). This also
avoids the batched vector-Jacobian products of the generic path, which cost a backward pass per example and which
vmap does not support for channels-last inputs (GroupNorm).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._conv import check_samples_first
from ._layout import RowLayout
from ._record import Record, compute_dtype, reproduces_output

from ._layer_norm import epsilon_of, norm_call_parts

__all__ = ["GroupNormRecord", "computes_channel_norm", "is_batch_norm", "is_group_norm"]


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


def is_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` is an affine ``nn.BatchNorm1d``, ``2d`` or ``3d`` with the stock forward (not
    ``SyncBatchNorm``, whose forward gathers statistics across processes).

    Parameters
    ----------
    module
        The module.

    Returns
    -------
    bool
        ``True`` for a stock affine batch norm.
    """
    stock = nn.modules.batchnorm._BatchNorm
    return isinstance(module, stock) and type(module).forward is stock.forward and module.affine


def _channel_norm(inputs: Tensor, eps: float) -> Tensor:
    """``inputs [N, C, *spatial]`` normalised over the channels at each sample and position."""
    channels = inputs.shape[1]
    return F.layer_norm(inputs.movedim(1, -1), (channels,), None, None, eps).movedim(-1, 1)


def computes_channel_norm(module: nn.Module, args: tuple[Any, ...], output: Any) -> bool:
    """Whether a call of a layer-norm look-alike normalises dimension 1 (the channels) of its ``[N, C, *spatial]``
    input and scales and shifts it by its 1-D ``weight`` and ``bias`` (ConvNeXt's ``channels_first`` layer norm).

    Parameters
    ----------
    module
        The module that was called.
    args
        The call's positional arguments.
    output
        The call's output.

    Returns
    -------
    bool
        ``True`` when the output matches (relative tolerance ``1e-4``).
    """
    parts = norm_call_parts(module, args, output)
    if parts is None:
        return False
    inputs, weight, bias, eps = parts
    channels = (inputs.shape[1],) if inputs.dim() >= 3 else ()
    if not channels or weight.shape != channels or bias.shape != channels:
        return False
    with torch.no_grad():
        shape = (-1,) + (1,) * (inputs.dim() - 2)
        dtype = torch.promote_types(inputs.dtype, torch.float32)
        expected = _channel_norm(inputs.to(dtype), eps) * weight.to(dtype).view(shape) + bias.to(dtype).view(shape)
        return reproduces_output(expected, output)


class GroupNormRecord(Record):
    """One call of an ``nn.GroupNorm``, a batch norm, or a verified channels-first layer norm, on inputs
    ``[N, C, *spatial]`` (``[N, C]`` for a batch norm too).

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
        self.samples_per_example = 1  # k consecutive samples per example when regrouped (see split_batch)
        # A batch norm's statistics as its forward used them: the running ones (evaluation mode), copied at call
        # time, or None for the batch's own (training mode, or no running statistics kept).
        self.running: tuple[Tensor, Tensor] | None = None
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.training:
            mean, var = module.running_mean, module.running_var
            if mean is not None and var is not None:
                self.running = (mean.detach().clone(), var.detach().clone())

    def _bind(self, grads: list[Tensor | None], layout: RowLayout) -> None:
        (grad,) = grads
        assert grad is not None
        norm = self.module
        check_samples_first(self, layout)
        if self.samples_per_example == 1:
            self.check_batch(self.inputs, layout, "input")
        dtype = compute_dtype(next(iter(self.params.values())))
        channels = self.inputs.shape[1]
        if isinstance(norm, nn.GroupNorm):
            normalised = F.group_norm(self.inputs.to(dtype), norm.num_groups, None, None, norm.eps)
        elif isinstance(norm, nn.modules.batchnorm._BatchNorm):
            # The running statistics, or the batch's own (batch_dim=None: mixing samples is allowed).
            mean, var = (None, None) if self.running is None else (stat.to(dtype) for stat in self.running)
            normalised = F.batch_norm(self.inputs.to(dtype), mean, var, training=self.running is None, eps=norm.eps)
        else:  # a layer norm over the channels (verified by computes_channel_norm)
            eps = epsilon_of(norm)
            assert eps is not None
            normalised = _channel_norm(self.inputs.to(dtype), eps)
        del self.inputs
        # [E, n, C, S]: n samples per row group (1 when split by example), S spatial positions.
        positions = normalised[0, 0].numel()
        self.normalised = layout.input_to_rows(normalised).reshape(layout.num_examples, -1, channels, positions)
        rows = layout.grad_to_rows(grad).to(dtype)
        self.rows = rows.reshape(layout.num_examples, layout.num_tasks, -1, channels, self.normalised.shape[-1])

    def can_split_batch(self, batch_dim: int) -> bool:
        """Whether :meth:`split_batch` applies: along dimension 0, that of the samples.

        Parameters
        ----------
        batch_dim
            The engine's batch dimension.

        Returns
        -------
        bool
            ``True`` for ``batch_dim=0``.
        """
        return batch_dim == 0

    def split_batch(self, num_examples: int, batch_dim: int) -> None:
        """Take the ``E * k`` samples along dimension 0 as ``k`` consecutive ones per example (a batch-major
        grouping the engine verified: LeViT's batch norms of ``[B * T, C]`` tokens, PatchTST's of
        ``[B * channels, d, patches]``); the per-row sums then run over each example's ``k`` samples too.

        Parameters
        ----------
        num_examples
            ``E``.
        batch_dim
            The engine's batch dimension (0).
        """
        self.samples_per_example = self.inputs.shape[0] // num_examples

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
