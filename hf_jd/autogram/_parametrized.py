"""Closed forms for modules whose weight a parametrisation computes (``torch.nn.utils.parametrize``).

A stock ``Linear`` / ``Conv1d`` / ``Conv2d`` whose ``weight`` is parametrised (weight normalisation,
as in the positional convolution of Wav2Vec2, HuBERT, WavLM, ...; spectral normalisation; any
``register_parametrization``) computes ``W = f(θ)`` from its original tensors ``θ`` (``g`` and ``v``
for weight normalisation) inside its call, through its ``ParametrizationList``. The per-row gradients
of ``W`` are those of the module's closed form, as for a plain weight (the unfolded convolution, a
Linear's outer products); ``f`` depends on the parameters only, not on the examples, so the per-row
gradients of the originals are their images by its vector-Jacobian product,

    ∂L_r/∂θ = (∂W/∂θ)ᵀ ∂L_r/∂W,

one backward pass over the ``R`` rows at once through the parametrisation's small graph (kept from the
forward pass: nothing is re-run). Without this, ``W`` is an output shared by all the examples and its
originals take the per-row pass (a batched backward pass through the whole network).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._batched_grad import batched_grad
from ._record import Record, compute_dtype

__all__ = [
    "ParametrizedTensor",
    "cached_tensor",
    "keep_fully_covered",
    "originals_of",
    "parametrization_lists",
    "parametrized_record",
]


def parametrization_lists(module: nn.Module) -> dict[str, nn.Module]:
    """The ``ParametrizationList`` of each parametrised tensor of a module, by tensor name.

    Parameters
    ----------
    module
        A module (``{}`` when it has no parametrisation).

    Returns
    -------
    dict
        ``{"weight": ParametrizationList, ...}``.
    """
    lists = getattr(module, "parametrizations", None)
    return dict(lists.items()) if isinstance(lists, nn.ModuleDict) else {}


def originals_of(module: nn.Module, tensor_name: str) -> dict[str, nn.Parameter]:
    """The trainable original tensors of a parametrised tensor, by their qualified names in ``module``.

    Parameters
    ----------
    module
        A parametrised module.
    tensor_name
        The parametrised tensor (``"weight"``).

    Returns
    -------
    dict
        ``{"parametrizations.weight.original0": g, ...}``: trainable leaves only.
    """
    plist = parametrization_lists(module)[tensor_name]
    return {
        f"parametrizations.{tensor_name}.{name}": param
        for name, param in plist._parameters.items()
        if param is not None and param.requires_grad and param.is_leaf
    }


def cached_tensor(module: nn.Module, tensor_name: str) -> Tensor | None:
    """The value of a parametrised tensor in ``parametrize.cached()``'s cache, if caching is on and it holds one.

    Parameters
    ----------
    module
        A parametrised module.
    tensor_name
        The parametrised tensor.

    Returns
    -------
    Tensor or None
        The cached tensor (which a call reusing it computed with).
    """
    if not getattr(parametrize, "_cache_enabled", 0):
        return None
    cache: dict[tuple[int, str], Tensor] = getattr(parametrize, "_cache", {})
    return cache.get((id(module), tensor_name))


class ParametrizedTensor:
    """A parametrised tensor as one call computed it, and the originals it was computed from.

    Parameters
    ----------
    name
        The tensor's attribute name in the module (``"weight"``).
    tensor
        Its value in the call (output of the module's ``ParametrizationList``), with its autograd graph.
    originals
        The trainable originals, by qualified name (see :func:`originals_of`).
    """

    def __init__(self, name: str, tensor: Tensor, originals: dict[str, nn.Parameter]) -> None:
        self.name = name
        self.tensor = tensor
        self.originals = originals

    def pull_back_rows(self, rows: Tensor) -> dict[str, Tensor]:
        """Per-row gradients of the originals from those of the tensor (one batched backward pass).

        Parameters
        ----------
        rows
            Per-row gradients of the tensor, ``[R, numel]``.

        Returns
        -------
        dict
            ``[R, numel]`` per original, in ``rows``' dtype (zeros for an original the tensor does not
            depend on).
        """
        names = list(self.originals)
        vectors = rows.reshape(rows.shape[0], *self.tensor.shape).to(self.tensor.dtype)
        grads = batched_grad([self.tensor], [self.originals[name] for name in names], vectors)
        pulled = {}
        for name, grad in zip(names, grads):
            original = self.originals[name]
            if grad is None:
                pulled[name] = rows.new_zeros(rows.shape[0], original.numel())
            else:
                pulled[name] = grad.reshape(rows.shape[0], -1).to(rows.dtype)
        return pulled

    def pull_back(self, grad: Tensor) -> dict[str, Tensor]:
        """Gradients of the originals from one gradient of the tensor.

        Parameters
        ----------
        grad
            Shaped as the tensor.

        Returns
        -------
        dict
            Per original, shaped as it (zeros for one the tensor does not depend on).
        """
        names = list(self.originals)
        grads = torch.autograd.grad(
            [self.tensor],
            [self.originals[name] for name in names],
            grad_outputs=[grad.reshape(self.tensor.shape).to(self.tensor.dtype)],
            retain_graph=True,
            allow_unused=True,
        )
        return {
            name: torch.zeros_like(self.originals[name]) if value is None else value
            for name, value in zip(names, grads)
        }


class _ParametrizedMixin:
    """Turns a closed-form record of a module with a parametrised ``weight`` into one whose parameters
    are the originals: the closed form computes with the tensor (``params`` then holds it, see
    :meth:`_closed_form_view`), the engine sees the originals."""

    params: dict[str, Any]
    keep_rows: bool
    kept_rows: dict[str, Tensor]
    tensor_params: dict[str, Any]
    parametrized: dict[str, ParametrizedTensor]
    _origin: dict[str, str]  # original's qualified name -> parametrised tensor's name
    _rows: dict[str, Tensor]
    _weighted: tuple[Tensor, dict[str, Tensor]] | None

    @contextmanager
    def _closed_form_view(self) -> Iterator[None]:
        """Within the block, ``params`` is what the closed form computes with (the parametrised tensors)."""
        outer = self.params
        self.params = self.tensor_params
        try:
            yield
        finally:
            self.params = outer

    def bind(self, grads: list[Tensor | None], layout: Any, shaped: bool = False) -> bool:
        with self._closed_form_view():
            return super().bind(grads, layout, shaped)  # type: ignore[misc]

    def _original_rows(self) -> dict[str, Tensor]:
        if not self._rows:
            for tensor in self.parametrized.values():
                with self._closed_form_view():
                    rows = super().per_row(tensor.name)  # type: ignore[misc]
                self._rows.update(tensor.pull_back_rows(rows))
        return self._rows

    def per_row(self, name: str) -> Tensor:
        if name in self._origin:
            return self._original_rows()[name]
        with self._closed_form_view():
            return super().per_row(name)  # type: ignore[misc]

    def gram(self, name: str) -> Tensor:
        if name in self._origin:
            rows = self.per_row(name)
            if self.keep_rows:
                self.kept_rows[name] = rows
            return rows @ rows.T
        with self._closed_form_view():
            return super().gram(name)  # type: ignore[misc]

    def weighted_grad(self, name: str, weights: Tensor) -> Tensor:
        if name not in self._origin:
            with self._closed_form_view():
                return super().weighted_grad(name, weights)  # type: ignore[misc]
        param = self.params[name]
        rows = self.kept_rows.get(name)
        if rows is not None:
            return (weights.reshape(-1).to(rows.dtype) @ rows).view(param.shape)
        if self._weighted is None or self._weighted[0] is not weights:
            pulled: dict[str, Tensor] = {}
            for tensor in self.parametrized.values():
                with self._closed_form_view():
                    grad = super().weighted_grad(tensor.name, weights)  # type: ignore[misc]
                pulled.update(tensor.pull_back(grad))
            self._weighted = (weights, pulled)
        return self._weighted[1][name].to(compute_dtype(param))

    def release(self) -> None:
        super().release()  # type: ignore[misc]
        self._rows = {}
        self._weighted = None
        self.parametrized = {}

    def uncover_param(self, name: str) -> None:
        """Stop covering parameter ``name``: for an original, every original of its parametrised tensor."""
        tensor_name = self._origin.get(name)
        if tensor_name is not None:
            self.uncover(tensor_name)
        else:
            super().uncover_param(name)  # type: ignore[misc]

    def uncover(self, tensor_name: str) -> None:
        """Stop covering the originals of a parametrised tensor (the closed form still computes with it)."""
        tensor = self.parametrized.pop(tensor_name, None)
        if tensor is None:
            return
        for name in tensor.originals:
            self.params.pop(name, None)
            self._origin.pop(name, None)
        self._rows = {}


_CLASSES: dict[type, type] = {}


def parametrized_record(record: Record, tensors: list[ParametrizedTensor]) -> Record:
    """Make a closed-form record of a module with parametrised tensors cover their originals.

    Parameters
    ----------
    record
        The closed-form record, built with the call's direct trainable parameters (``bias``).
    tensors
        The parametrised tensors the call computed with (``weight``), each with its originals.

    Returns
    -------
    Record
        A copy of the record whose closed form computes with the tensors and whose ``params`` holds the
        originals.
    """
    base = type(record)
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(f"Parametrized{base.__name__}", (_ParametrizedMixin, base), {})
        _CLASSES[base] = cls
    mixed: Any = object.__new__(cls)
    mixed.__dict__.update(record.__dict__)
    mixed.tensor_params = {**record.params, **{tensor.name: tensor.tensor for tensor in tensors}}
    mixed.parametrized = {tensor.name: tensor for tensor in tensors}
    mixed._origin = {name: tensor.name for tensor in tensors for name in tensor.originals}
    mixed._rows = {}
    mixed._weighted = None
    mixed.params = {**record.params, **{name: p for tensor in tensors for name, p in tensor.originals.items()}}
    return mixed


def keep_fully_covered(records: list[Record], nodes: list[Any]) -> None:
    """Stop covering the originals of a parametrised tensor that the losses also use outside the calls covering it
    (under ``parametrize.cached()``, the tensor one call computed is reused as it is: by a tied output projection
    reading ``module.weight``, a penalty on it): those uses would be missing from the Gramian. The originals are then
    left to the engine's exact path for parameters used outside captured calls.

    Parameters
    ----------
    records
        The captured calls.
    nodes
        The autograd nodes of the losses' graph.
    """
    claims: dict[Any, list[tuple[Any, str]]] = {}  # the tensor's node -> (record, tensor name) covering it
    for record in records:
        for tensor in getattr(record, "parametrized", {}).values():
            if tensor.tensor.grad_fn is not None:
                claims.setdefault(tensor.tensor.grad_fn, []).append((record, tensor.name))
    if not claims:
        return
    outside: set[Any] = set()
    for node in nodes:
        for child, _ in node.next_functions:
            owners = claims.get(child)
            if owners is None or child in outside:
                continue
            number = node._sequence_nr()
            if not any(record.nodes is not None and number in record.nodes for record, _ in owners):
                outside.add(child)
    for child in outside:
        for record, name in claims[child]:
            record.uncover(name)
