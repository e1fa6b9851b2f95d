"""Record of ``nn.LayerNorm`` calls, in closed form.

With ``x̂`` the normalised input, ``y = γ ⊙ x̂ + β``, so row ``r = (e, k)`` has gradients
``Σ_t g_{ekt} ⊙ x̂_{et}`` for ``γ`` and ``Σ_t g_{ekt}`` for ``β``. ``x̂`` is recomputed from the
captured input (a normalisation only, the module itself is not re-run).

When the input is itself a trainable parameter (DeBERTa-v2/v3 layer-normalise their relative-position
table, ``rel_embeddings.weight``, without calling its module), its per-row gradient is the layer
norm's input gradient ``σ⁻¹ (h − mean(h) − x̂ · mean(h ⊙ x̂))`` with ``h = γ ⊙ g`` (means over the
normalised entries), so that parameter is covered too (under the name :data:`INPUT_PARAMETER`).
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._layout import RowLayout
from ._record import Record, compute_dtype, reproduces_output

__all__ = [
    "INPUT_PARAMETER",
    "LayerNormRecord",
    "computes_layer_norm",
    "epsilon_of",
    "is_layer_norm",
    "is_layer_norm_like",
    "norm_call_parts",
]

# Name, in a record's ``params``, of a trainable parameter passed as the layer norm's input.
INPUT_PARAMETER = "<input>"


def is_layer_norm(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.LayerNorm`` with the stock forward.

    Parameters
    ----------
    module
        The module.

    Returns
    -------
    bool
        ``True`` for a stock ``nn.LayerNorm``.
    """
    return isinstance(module, nn.LayerNorm) and type(module).forward is nn.LayerNorm.forward


def epsilon_of(module: nn.Module) -> float | None:
    """A norm module's epsilon, from the first float among its attributes ``variance_epsilon``,
    ``eps`` and ``epsilon``, or ``None``.

    Parameters
    ----------
    module
        The norm module.

    Returns
    -------
    float or None
        The epsilon.
    """
    for attribute in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, attribute, None)
        if isinstance(value, float):
            return value
    return None


def is_layer_norm_like(module: nn.Module) -> bool:
    """Whether ``module`` may be a layer norm over its last dimension without being a stock
    ``nn.LayerNorm`` (a subclass with its own forward, ConvNeXt's ``ConvNextLayerNorm``): a norm by its
    name, 1-D ``weight`` and ``bias`` of one size, an epsilon. A candidate verified by
    :func:`computes_layer_norm` on its first call.

    Parameters
    ----------
    module
        The module.

    Returns
    -------
    bool
        ``True`` for a candidate.
    """
    if is_layer_norm(module) or "norm" not in type(module).__name__.lower() or epsilon_of(module) is None:
        return False
    params = dict(module.named_parameters(recurse=False))
    return (
        set(params) == {"weight", "bias"}
        and params["weight"].dim() == 1
        and params["bias"].shape == params["weight"].shape
    )


def norm_call_parts(
    module: nn.Module, args: tuple[Any, ...], output: Any
) -> tuple[Tensor, Tensor, Tensor, float] | None:
    """The input, ``weight``, ``bias`` and epsilon of a call of a norm look-alike with one tensor input and output of
    the same shape, or ``None`` when the call is not of that form.

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
    tuple or None
        ``(inputs, weight, bias, eps)``.
    """
    if len(args) != 1 or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
        return None
    inputs, weight, bias, eps = args[0], module.weight, module.bias, epsilon_of(module)
    if not isinstance(weight, Tensor) or not isinstance(bias, Tensor) or eps is None or inputs.shape != output.shape:
        return None
    return inputs, weight, bias, eps


def computes_layer_norm(module: nn.Module, args: tuple[Any, ...], output: Any) -> bool:
    """Whether a call's output is the layer norm of its first input over the last dimension.

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
        ``True`` when the output matches ``F.layer_norm`` (relative tolerance ``1e-4``).
    """
    parts = norm_call_parts(module, args, output)
    if parts is None:
        return False
    inputs, weight, bias, eps = parts
    if inputs.dim() < 1 or inputs.shape[-1] != weight.shape[0]:
        return False
    with torch.no_grad():
        dtype = torch.promote_types(inputs.dtype, torch.float32)
        return reproduces_output(F.layer_norm(inputs.to(dtype), weight.shape, weight.to(dtype), bias.to(dtype), eps),
                                 output)


class LayerNormRecord(Record):
    """One call of an ``nn.LayerNorm``.

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

    inverse_std: Tensor | None = None  # [E, 1, N, 1], only when the input is a trainable parameter

    inserts_batch = True

    def __init__(
        self,
        module: nn.Module,
        module_name: str,
        params: dict[str, nn.Parameter],
        args: tuple[Any, ...],
        output: Tensor,
    ) -> None:
        leaf = args[0]
        if isinstance(leaf, nn.Parameter) and leaf.requires_grad and INPUT_PARAMETER not in params:
            params = {**params, INPUT_PARAMETER: leaf}
        super().__init__(module, module_name, params)
        self.inputs = args[0].detach()

    def _bind(self, grads: list[Tensor | None], layout: RowLayout) -> None:
        (grad,) = grads
        assert grad is not None
        norm = self.module
        # A look-alike verified by computes_layer_norm normalises its last dimension.
        if isinstance(norm, nn.LayerNorm):
            shape = tuple(norm.normalized_shape)
        else:
            shape = tuple(cast(Tensor, norm.weight).shape)
        eps = norm.eps if isinstance(norm, nn.LayerNorm) else epsilon_of(norm)
        assert eps is not None
        dtype = compute_dtype(next(iter(self.params.values())))
        self.check_batch(self.inputs, layout, "input")
        size = math.prod(shape)
        inputs = self.inputs.to(dtype)
        del self.inputs
        # A table shared by all the examples (broadcast over the batch, repeated per example as a stride-0 view, e.g.
        # DeBERTa's relative-position embeddings): normalised once.
        bd = layout.batch_dim
        shared = bd is not None and inputs.shape[bd] > 1 and inputs.stride(bd) == 0
        table = inputs.narrow(bd, 0, 1) if shared and bd is not None else inputs
        normalised = F.layer_norm(table, shape, None, None, eps).expand_as(inputs)
        if INPUT_PARAMETER in self.params:  # its per-row gradients need 1/σ of each normalised row
            inverse_std = torch.rsqrt(table.reshape(-1, size).var(dim=-1, unbiased=False) + eps)
            leading = inputs.shape[: inputs.dim() - len(shape)]
            inverse_std = inverse_std.reshape(table.shape[: table.dim() - len(shape)]).expand(leading)
            self.inverse_std = layout.input_to_rows(inverse_std).reshape(layout.num_examples, 1, -1, 1)
        self.normalised = layout.input_to_rows(normalised).reshape(layout.num_examples, -1, size)
        rows = layout.grad_to_rows(grad).to(dtype)
        self.rows = rows.reshape(layout.num_examples, layout.num_tasks, -1, size)

    def compact(self) -> None:
        """Drop the factors :meth:`weighted_grad` no longer needs once every parameter's rows are kept."""
        if set(self.kept_rows) >= set(self.params):  # weighted_grad uses the kept [R, d] rows
            self.rows = self.normalised = self.inverse_std = None  # type: ignore[assignment]

    def release(self) -> None:
        """Drop the factors and the kept rows once the record's contributions are added."""
        super().release()
        self.rows = self.normalised = self.inverse_std = None  # type: ignore[assignment]

    def per_row(self, name: str) -> Tensor:
        """Per-row gradients of ``weight`` (``Σ_t g ⊙ x̂``), ``bias`` (``Σ_t g``) or of the input
        parameter (:data:`INPUT_PARAMETER`).

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
        if name == INPUT_PARAMETER:
            # (1/σ) (ĝ - mean(ĝ) - x̂ mean(ĝ ⊙ x̂)) with ĝ = g ⊙ weight, built in place in one buffer of the rows'
            # size: a table as large as DeBERTa's relative embeddings otherwise held five such buffers at once.
            weight = self.params.get("weight", cast("Tensor | None", self.module.weight))
            grads = self.rows.clone() if weight is None else self.rows * weight.detach().to(self.rows.dtype).reshape(-1)
            normalised = self.normalised.unsqueeze(1)
            # (one example at a time: the product of all of them would be another buffer of the rows' size)
            projection = torch.stack(
                [(example * table).mean(dim=-1, keepdim=True) for example, table in zip(grads, normalised)]
            )
            grads.sub_(grads.mean(dim=-1, keepdim=True)).addcmul_(normalised, projection, value=-1)
            assert self.inverse_std is not None  # set by _bind when INPUT_PARAMETER is a parameter
            return grads.mul_(self.inverse_std).reshape(num_rows, -1)
        if name == "weight":
            return (self.rows * self.normalised.unsqueeze(1)).sum(dim=2).reshape(num_rows, -1)
        return self.rows.sum(dim=2).reshape(num_rows, -1)
