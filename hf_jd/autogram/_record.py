"""Base class of a *record*: what the engine keeps of one call of one parametrised module.

A record holds the tensors captured in the forward pass (e.g. a Linear layer's input), the
gradient edges of the module's outputs, and, once the engine has back-propagated to those
outputs, the per-row output gradients. From these it yields, for each of the module's direct
trainable parameters, the per-row gradients ``[R, numel]``, their Gram matrix ``[R, R]`` and the
gradient of the weighted loss (used by the single-backward mode).

A record also remembers the version counter of each forward tensor it keeps (see :meth:`Record.watch`) and checks it
before using the tensor (:meth:`Record.check_unmodified`): an in-place operation on a module's input after the call
(``x.mul_(2)``) would otherwise go unnoticed, where autograd raises for the tensors it saved.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from ._layout import RowLayout

__all__ = ["INPUT_FREE_PARAMETERS", "Record", "compute_dtype", "reproduces_output"]

# Parameters whose per-row gradients read no captured forward tensor (a bias's are sums of output gradients). A record
# covering only those does not check its captured tensors, as autograd does not for a Linear layer whose weight is
# frozen (it saves the input only for the weight's gradient): BitFit may change such inputs in place.
INPUT_FREE_PARAMETERS = frozenset({"bias"})


@dataclass(eq=False)
class _Watched:
    """A forward tensor a record keeps, with its version counter when the record captured it."""

    what: str  # how error messages name it ("its input")
    # A weak reference: a tensor nothing else holds any more (the record computed its factors from a float32 copy, or
    # dropped them) cannot reach the record's results, and watching it must not keep its memory.
    tensor: weakref.ref[Tensor]
    version: int
    # One of the call's captured tensors: read for the parameters not in INPUT_FREE_PARAMETERS only.
    captured: bool


def _version(tensor: Tensor) -> int | None:
    """A tensor's version counter, or ``None`` where it has none (inference tensors)."""
    if tensor.is_inference():
        return None
    try:
        return int(tensor._version)
    except RuntimeError:  # pragma: no cover - tensor subclasses without a version counter
        return None


def compute_dtype(param: Tensor) -> torch.dtype:
    """Dtype in which a parameter's Gramian contribution is computed (float64 stays float64).

    Parameters
    ----------
    param
        The parameter.

    Returns
    -------
    torch.dtype
        ``float64`` for a float64 parameter, else ``float32``.
    """
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def reproduces_output(expected: Tensor, output: Tensor, atol: float = 1e-5) -> bool:
    """Whether a closed form's recomputation of a call's output matches it: to ``1e-4`` relative (``atol``
    absolute) for float32 and lower precisions, to float64's precision (``1e-10``, ``1e-12``) for float64
    outputs, so that a float64 model's Gramian is not computed from a form that differs in its last float32 bits
    (e.g. a norm that computes in float32 inside a float64 model; such calls take the exact generic path).

    Parameters
    ----------
    expected
        The recomputed output.
    output
        The call's output.
    atol
        The absolute tolerance below float64.

    Returns
    -------
    bool
        ``True`` when they have the same shape and match.
    """
    rtol, atol = (1e-10, 1e-12) if output.dtype == torch.float64 else (1e-4, atol)
    if expected.shape != output.shape:
        return False
    if output.numel() == 0:
        return True
    # |expected - output| <= atol + rtol |output| entrywise, as torch.allclose tests it, in three passes over the
    # tensors instead of its eight (this check runs on every call of a norm look-alike). A NaN anywhere, or an
    # infinity (inf - inf), fails it: such calls take the exact generic path.
    output = output.detach()
    excess = torch.sub(expected.to(output.dtype), output).abs_().sub_(output.abs().mul_(rtol).add_(atol))
    return bool(excess.max() <= 0)


class Record(ABC):
    """One captured call of a module with direct trainable parameters.

    Subclasses whose contribution is computed from the captured ``inputs`` and the output gradients
    alone set ``inserts_batch = True`` (see :meth:`insert_batch`).

    Parameters
    ----------
    module
        The module that was called.
    module_name
        Its qualified name (for error messages).
    params
        Its direct trainable parameters at call time, by attribute name.
    """

    inserts_batch = False
    # The attributes holding the call's captured tensors (set by the subclasses), and how error messages name them.
    captured_attributes: ClassVar[dict[str, str]] = {"inputs": "its input", "ids": "its input ids"}

    def __init__(self, module: nn.Module, module_name: str, params: dict[str, nn.Parameter]) -> None:
        self.module = module
        self.module_name = module_name
        self.params = params
        # The forward tensors the record keeps, with their versions at capture time (see watch).
        self._watched: list[_Watched] = []
        self.edges: list[GradientEdge] = []
        # Per edge, ``(view_shape, base_shape)`` when the edge is that of the base of an output that
        # is a reshaping view of it (a Linear on [B, T, d] inputs returns a view of its [B * T, d]
        # product), else ``None``; :attr:`view_edges` then holds the outputs' own edges. An in-place
        # change of such an output (``h[mask] = 0``, ``relu_``) leaves its own edge out of the
        # graph, while the base's edge still receives the gradient w.r.t. the output as returned.
        self.edge_views: list[tuple[torch.Size, torch.Size] | None] = []
        self.view_edges: list[GradientEdge] = []
        self.layout: RowLayout | None = None
        # Single-backward mode: keep the per-row gradients computed for the Gramian, so that the
        # weighted gradient is a cheap ``wᵀ rows`` instead of a recomputation.
        self.keep_rows = False
        self.kept_rows: dict[str, Tensor] = {}
        # Whether no input of the call requires grad (then no other record lies upstream of it).
        self.is_source = False
        # Whether the captured tensors are split by example along the engine's batch_dim; if not,
        # the record gets one full output gradient per loss row (layout without batch dimension).
        self.batched = True
        # For a position-wise call not split by example: k when its tensors have k * B entries
        # along batch_dim (a candidate for batch-major grouping, verified by the engine), else 0.
        self.groups = 0
        # For a call not split by example along batch_dim whose tensors have the batch size along exactly
        # one other dimension (time-major [T, B, d] layouts: XLNet, nn.MultiheadAttention without
        # batch_first): that dimension, a candidate batch dimension verified by the engine; else None.
        self.other_batch_dim: int | None = None
        # The candidates for other_batch_dim, in order: one, or, for a generic call whose tensors have the batch size
        # along several such dimensions ([T, B, d] with d = B), all of them, which the engine's check tries in turn,
        # setting other_batch_dim to the one that holds the examples (the check then runs on every step).
        self.other_batch_dims: tuple[int, ...] = ()
        # For a call split by example whose outputs hold the examples along different dimensions, known from the
        # module's documented layout (a batch-first nn.LSTM returns [B, T, h] outputs and [layers, B, h] states):
        # per edge, that dimension; else None (batch_dim for all).
        self.output_batch_dims: list[int] | None = None
        # Set when a [B, m] grouping check confirmed one of those candidates (the gradients of the later pass
        # over the tasks come in the call's flat layout): ("split", batch_dim) for k consecutive entries per
        # example along batch_dim (the record was regrouped), ("other", dim) for examples along another dim.
        self.confirmed_grouping: tuple[str, int] | None = None
        # Whether the call's shapes cannot show that it is split by example although it is taken to be (an
        # embedding of [B, L] ids whose length L matches no input of the model: ids padded inside the model, as
        # Longformer's, or a table of ids whose first size happens to be B): verified as for coincident sizes.
        self.layout_unclear = False
        # Which call of its module in the forward pass this is (0 for the first): a layout verified for one call
        # of a module says nothing about another one (a module applied to batch- and time-major tensors).
        self.call_index = 0
        # Autograd sequence numbers of the nodes created during the call (None: unknown), and whether
        # autocast was on (its cached casts of the parameters may come from an earlier call).
        self.nodes: range | None = None
        self.autocast = False

    def uncover_param(self, name: str) -> None:
        """Stop covering parameter ``name``: the engine computes its per-row gradients from the losses instead
        (it is also used outside the captured calls, so this call holds only part of its gradient).

        Parameters
        ----------
        name
            The parameter's name in ``params``.
        """
        self.params.pop(name, None)

    def describe(self) -> str:
        """Human-readable name of the module, for error messages.

        Returns
        -------
        str
            ``name (Type)``.
        """
        return f"{self.module_name or '<root>'} ({type(self.module).__name__})"

    def watch(self, what: str, tensor: Tensor, captured: bool = False) -> None:
        """Remember the version counter of a forward tensor the record keeps, to check before using it (see
        :meth:`check_unmodified`). Views share their base's counter, so an in-place change of the base (or of another
        view of it) shows too, as it does to autograd.

        Parameters
        ----------
        what
            How error messages name the tensor (``"its input"``).
        tensor
            The tensor (watched through a weak reference: once nothing holds it, its changes cannot reach the
            record's results, and it is not checked).
        captured
            Whether it is one of the call's captured tensors (see :attr:`captured_attributes`), which only the
            parameters not in :data:`INPUT_FREE_PARAMETERS` read.
        """
        version = _version(tensor)
        if version is not None:
            self._watched.append(_Watched(what, weakref.ref(tensor), version, captured))

    def watch_captured(self) -> None:
        """Watch the call's captured tensors (the attributes named by :attr:`captured_attributes`), once the
        capture built the record."""
        for attribute, what in self.captured_attributes.items():
            tensor = getattr(self, attribute, None)
            if isinstance(tensor, Tensor):
                self.watch(what, tensor, captured=True)

    def check_unmodified(self) -> None:
        """Raise if a forward tensor the record keeps was modified in place since the call, as autograd raises for
        the tensors it saved: the Gramian and gradients computed from it would silently be wrong. Called before the
        record uses them (when it is bound to its output gradients in ``compute_gramian``, and before each weighted
        gradient of ``Engine.backward``).

        Raises
        ------
        RuntimeError
            If a watched tensor's version counter changed.
        """
        reads_captured = any(name not in INPUT_FREE_PARAMETERS for name in self.params)
        for watched in self._watched:
            if watched.captured and not reads_captured:
                continue  # (e.g. only a Linear's bias: its gradients read no input, autograd's would not either)
            tensor = watched.tensor()
            version = None if tensor is None else _version(tensor)
            if tensor is None or version is None or version == watched.version:
                continue
            call = f" (call {self.call_index + 1} of the module in the forward pass)" if self.call_index else ""
            raise RuntimeError(
                f"Module {self.describe()}{call}: {watched.what}, a {tensor.dtype} tensor of shape "
                f"{tuple(tensor.shape)}, was modified by an in-place operation after the call (it is at version "
                f"{version}; the engine captured it at version {watched.version}). The autogram engine computes the "
                "Gramian and the gradients from the tensors of the call, which would now be wrong (autograd raises "
                "'one of the variables needed for gradient computation has been modified by an inplace operation' for "
                "the same reason). Avoid the in-place operation (e.g. `x = x * 2` instead of `x.mul_(2)`, "
                "`ids = ids + 1` instead of `ids.add_(1)`), or clone the tensor before modifying it "
                "(`x = x.clone(); x.mul_(2)`)."
            )

    def bind(self, grads: list[Tensor | None], layout: RowLayout, shaped: bool = False) -> bool:
        """Store the batched output gradients ``[m, *shape]`` (one per edge), received at the edges
        (reshaped to the outputs' shapes here, see :meth:`to_view_shapes`) unless ``shaped``.

        Returns ``False`` when the losses do not depend on this call's outputs.

        Parameters
        ----------
        grads
            One batched gradient per edge (``None`` where the losses do not reach it).
        layout
            The row layout of the gradients.
        shaped
            The gradients already have the outputs' shapes.

        Returns
        -------
        bool
            Whether the record was bound.

        Raises
        ------
        RuntimeError
            If a forward tensor the record keeps was modified in place since the call (see
            :meth:`check_unmodified`).
        """
        if all(grad is None for grad in grads):
            return False  # (its captured tensors are not used: as autograd, which runs no node of it, no check)
        self.check_unmodified()
        self.layout = layout
        self._bind(grads if shaped else self.to_view_shapes(grads), layout)
        return True

    def to_view_shapes(self, grads: list[Tensor | None]) -> list[Tensor | None]:
        """Gradients received at base edges (leading batch or task dimensions, then the base's shape)
        reshaped to the outputs' own shapes; others are returned as they are.

        Parameters
        ----------
        grads
            One gradient per edge.

        Returns
        -------
        list of Tensor or None
            The gradients, in the outputs' shapes.
        """
        if not self.edge_views:
            return grads
        shaped: list[Tensor | None] = []
        for grad, view in zip(grads, self.edge_views):
            if grad is not None and view is not None:
                view_shape, base_shape = view
                lead = grad.dim() - len(base_shape)
                if lead >= 0 and grad.shape[lead:] == base_shape:
                    grad = grad.reshape(*grad.shape[:lead], *view_shape)
            shaped.append(grad)
        return shaped

    def example_dims(self, batch_dim: int) -> list[int]:
        """The dimension holding the examples in each edge's gradient (without its leading row dimension).

        Parameters
        ----------
        batch_dim
            The engine's batch dimension.

        Returns
        -------
        list of int
            One per edge: :attr:`output_batch_dims` when set, else ``batch_dim``.
        """
        return list(self.output_batch_dims) if self.output_batch_dims is not None else [batch_dim] * len(self.edges)

    def shape_edges(self) -> list[GradientEdge]:
        """The edges of the outputs as the module returned them (for reading their shapes and uses).

        Returns
        -------
        list of GradientEdge
            One per output.
        """
        return self.view_edges or self.edges

    @abstractmethod
    def _bind(self, grads: list[Tensor | None], layout: RowLayout) -> None:
        """Prepare the factors from the output gradients (at least one is not ``None``)."""

    @abstractmethod
    def per_row(self, name: str) -> Tensor:
        """Per-row gradients of parameter ``name``, shape ``[R, numel]``.

        Parameters
        ----------
        name
            The parameter's name in ``params``.

        Returns
        -------
        Tensor
            Shape ``[R, numel]``.
        """

    def gram(self, name: str) -> Tensor:
        """Gram matrix ``[R, R]`` of the per-row gradients of parameter ``name``.

        Parameters
        ----------
        name
            The parameter's name in ``params``.

        Returns
        -------
        Tensor
            Shape ``[R, R]``.
        """
        rows = self.per_row(name)
        if self.keep_rows:
            self.kept_rows[name] = rows
        return rows @ rows.T

    def can_split_batch(self, batch_dim: int) -> bool:
        """Whether :meth:`split_batch` can regroup this record along ``batch_dim``: it holds a captured ``inputs``
        tensor and ``batch_dim`` is not its last (feature) dimension.

        Parameters
        ----------
        batch_dim
            The engine's batch dimension.

        Returns
        -------
        bool
            ``True`` for position-wise closed forms (Linear, LayerNorm, ...) along a dimension of their rows.
        """
        inputs = getattr(self, "inputs", None)
        return isinstance(inputs, Tensor) and batch_dim < inputs.dim() - 1

    def split_batch(self, num_examples: int, batch_dim: int) -> None:
        """Regroup the captured input ``[..., E * k, ...]`` into ``[..., E, k, ...]`` along
        ``batch_dim`` (position-wise records with a verified batch-major grouping only).

        Parameters
        ----------
        num_examples
            ``E``.
        batch_dim
            The engine's batch dimension.

        Raises
        ------
        TypeError
            If the record holds no captured ``inputs`` tensor.
        """
        inputs = getattr(self, "inputs", None)
        if not isinstance(inputs, Tensor):
            raise TypeError(f"{type(self).__name__} cannot regroup its captured tensors by example.")
        self.inputs = inputs.unflatten(batch_dim, (num_examples, -1))

    def can_insert_batch(self, batch_dim: int) -> bool:
        """Whether :meth:`insert_batch` can give this call's captured tensors a batch dimension
        (records whose contribution depends on the captured ``inputs`` and the output gradients
        only, which set :attr:`inserts_batch`).

        Parameters
        ----------
        batch_dim
            Where the batch dimension would go.

        Returns
        -------
        bool
            ``True`` when :meth:`insert_batch` applies.
        """
        inputs = getattr(self, "inputs", None)
        return self.inserts_batch and isinstance(inputs, Tensor) and batch_dim <= inputs.dim()

    def insert_batch(self, num_examples: int, batch_dim: int) -> None:
        """Repeat the captured tensors of a call whose output all examples share, once per example
        along a new ``batch_dim`` (its per-example output gradients then come with that dimension).

        Parameters
        ----------
        num_examples
            Number of examples.
        batch_dim
            Position of the new dimension.

        Raises
        ------
        TypeError
            If the record holds no captured ``inputs`` tensor.
        """
        inputs = getattr(self, "inputs", None)
        if not isinstance(inputs, Tensor):
            raise TypeError(f"{type(self).__name__} cannot repeat its captured tensors per example.")
        shape = list(inputs.shape)
        shape.insert(batch_dim, num_examples)
        self.inputs = inputs.unsqueeze(batch_dim).expand(shape)

    def reaches(self, name: str) -> bool:
        """Whether the call's outputs depend on parameter ``name`` (known once its per-row gradients
        are computed; an ordinary backward pass leaves the ``.grad`` of a parameter it does not
        reach untouched, and so does :meth:`Engine.backward`).

        Parameters
        ----------
        name
            The parameter's name in ``params``.

        Returns
        -------
        bool
            ``True`` unless the outputs are known not to depend on it.
        """
        return True

    def weights_table(self, weights: Tensor) -> Tensor:
        """The loss weights ``[R]`` (or ``[E, m]``) as the ``[E, m]`` table of this record's layout.

        Parameters
        ----------
        weights
            The loss weights, ``[R]`` or ``[E, m]``.

        Returns
        -------
        Tensor
            Shape ``[E, m]``.
        """
        assert self.layout is not None
        return weights.reshape(self.layout.num_examples, self.layout.num_tasks)

    def weighted_grad(self, name: str, weights: Tensor) -> Tensor:
        """Gradient of ``Σ_r w_r L_r`` w.r.t. parameter ``name`` (``weights`` shaped ``[E, m]``
        in this record's layout, see :meth:`weights_table`).

        Parameters
        ----------
        name
            The parameter's name in ``params``.
        weights
            The loss weights, ``[E, m]``.

        Returns
        -------
        Tensor
            Shaped as the parameter.
        """
        rows = self.kept_rows.get(name)
        if rows is None:
            rows = self.per_row(name)
        param = self.params[name]
        return (weights.reshape(-1).to(rows.dtype) @ rows).view(param.shape)

    def compact(self) -> None:  # noqa: B027 - a no-op by default, not abstract
        """Single-backward mode, after the Gramian contributions: drop what :meth:`weighted_grad`
        no longer needs (the factors of parameters whose per-row gradients are kept)."""

    def release(self) -> None:
        """Drop the factors once the record's contributions are no longer needed."""
        self.kept_rows = {}
        self._watched = []

    def check_batch(self, tensor: Tensor, layout: RowLayout, what: str) -> None:
        """Raise if a captured tensor's batch size does not match the losses.

        Parameters
        ----------
        tensor
            A captured tensor.
        layout
            The row layout of the losses.
        what
            What the tensor is, for the error message.

        Raises
        ------
        RuntimeError
            If its size along ``batch_dim`` is not the number of examples.
        """
        if layout.batch_dim is None:
            return
        if tensor.dim() <= layout.batch_dim or tensor.shape[layout.batch_dim] != layout.num_examples:
            raise RuntimeError(
                f"The {what} of module {self.describe()} has shape {tuple(tensor.shape)}, whose "
                f"dimension batch_dim={layout.batch_dim} does not match the {layout.num_examples} "
                "examples of the losses. Use Engine(..., batch_dim=None) for modules whose tensors "
                "are not split by example along that dimension."
            )


def split_by_record(
    grads: list[Tensor | None], records: Sequence[Record]
) -> Iterator[tuple[Record, list[Tensor | None]]]:
    """Yield each record with its slice of ``grads`` (one entry per edge, in ``records`` order).

    ``grads`` holds the gradients w.r.t. the concatenated edges of ``records``; each slice's
    references are dropped from ``grads`` as it is handed out, so that a consumer that releases
    its slice frees the memory before the next record is processed.

    Parameters
    ----------
    grads
        One gradient per edge, the edges of ``records`` in order.
    records
        The records.

    Yields
    ------
    tuple
        Each record and its gradients.
    """
    offset = 0
    for record in records:
        count = len(record.edges)
        record_grads = grads[offset : offset + count]
        grads[offset : offset + count] = [None] * count
        offset += count
        yield record, record_grads
