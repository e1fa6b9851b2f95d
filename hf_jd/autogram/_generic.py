"""Generic record for any module with direct parameters (RMSNorm, ViT embeddings, ...).

Per-row parameter gradients are batched vector-Jacobian products on the graph the forward pass
already built: ``autograd.grad(outputs, params, grad_outputs=per-row masked output gradients,
is_grads_batched=True)``. Nothing is re-run. So that these products only see the module's own use
of its parameters (and not, e.g., another call of the same shared module), the module's direct
parameters are swapped for per-call aliases (``p.view_as(p)``) during its forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, TypeGuard

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from ._batched_grad import batched_grad
from ._layout import RowLayout
from ._matmul_uses import MatmulFactors, matmul_factors
from ._record import Record, compute_dtype

# Largest number of entries of the per-row masked output gradients built at once.
MAX_SPREAD_ENTRIES = 2**24
# Single-backward mode: per-row gradients of a call's parameters, when given by the factors of its products, are
# kept for the weighted gradient up to this many entries (a gather then, instead of a pass through the weights).
MAX_KEPT_ENTRIES = 2**20

__all__ = [
    "GenericRecord",
    "alias_outputs",
    "borrowed_submodules",
    "direct_parameters",
    "install_aliases",
    "restore_parameters",
    "tensors_in",
]


def tensors_in(output: Any) -> list[Tensor]:
    """The tensors of a module output (a tensor, or tuples / lists / dicts of them).

    Parameters
    ----------
    output
        A module output.

    Returns
    -------
    list of Tensor
        Its tensors, in order.
    """
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for value in output.values() for t in tensors_in(value)]
    if isinstance(output, (tuple, list)):
        return [t for value in output for t in tensors_in(value)]
    return []


def alias_outputs(output: Any) -> Any:
    """Return the output with every tensor that requires grad replaced by a view of itself.

    When a module returns several tensors, one may be computed from another inside the module;
    the gradient reaching the returned views is then only the one from outside the module, so that
    a vector-Jacobian product from all outputs counts each path once.

    Parameters
    ----------
    output
        A module output (tensors, or tuples / lists / dicts of them).

    Returns
    -------
    Any
        The same structure with the aliases (a dict subclass is modified in place).
    """
    if isinstance(output, Tensor):
        return output.view_as(output) if output.requires_grad else output
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # namedtuple
        return type(output)(*(alias_outputs(value) for value in output))
    if isinstance(output, (tuple, list)):
        return type(output)(alias_outputs(value) for value in output)
    if isinstance(output, Mapping):
        if isinstance(output, dict) and type(output) is not dict:  # e.g. transformers' ModelOutput
            for key, value in list(output.items()):
                output[key] = alias_outputs(value)
            return output
        return {key: alias_outputs(value) for key, value in output.items()}
    return output


def borrowed_submodules(module: nn.Module) -> dict[str, nn.Module]:
    """Submodules whose parameters ``module`` uses directly instead of calling them: parameter
    containers (``nn.ParameterDict`` / ``nn.ParameterList``, which cannot be called: PEFT keeps the
    adapters of IA3, AdaLoRA, LoHa, LoKr, VeRA and of LoRA on embeddings in them) and
    ``nn.MultiheadAttention``'s output projection.

    Parameters
    ----------
    module
        The module.

    Returns
    -------
    dict
        The borrowed submodules, by attribute name.
    """
    borrowed: dict[str, nn.Module] = {
        name: child
        for name, child in module.named_children()
        if isinstance(child, (nn.ParameterDict, nn.ParameterList))
    }
    if isinstance(module, nn.MultiheadAttention):
        borrowed["out_proj"] = module.out_proj  # used through F.multi_head_attention_forward
    return borrowed


def direct_parameters(module: nn.Module, borrowed: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    """Trainable parameters the module uses directly, by (qualified) name: leaves only (a tensor computed
    from a parameter and swapped in by ``torch.func.functional_call`` is not one; the parameter it comes
    from is then used outside the module's call).

    Parameters
    ----------
    module
        The module.
    borrowed
        Its borrowed submodules (see :func:`borrowed_submodules`).

    Returns
    -------
    dict
        The parameters, by name (``prefix.name`` for those of borrowed submodules).
    """

    def trainable(tensor: nn.Parameter | None) -> TypeGuard[nn.Parameter]:
        return tensor is not None and tensor.requires_grad and tensor.is_leaf

    params = {n: p for n, p in module._parameters.items() if trainable(p)}
    for prefix, sub in borrowed.items():
        params.update({f"{prefix}.{n}": p for n, p in sub._parameters.items() if trainable(p)})
    return params


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    prefix, _, attribute = name.rpartition(".")
    return (module.get_submodule(prefix) if prefix else module), attribute


def install_aliases(module: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    """Replace the given (qualified) parameters of ``module`` by differentiable aliases for one call.

    Parameters
    ----------
    module
        The module.
    params
        The parameters to replace, by qualified name.

    Returns
    -------
    dict
        The aliases, by qualified name.
    """
    aliases = {}
    for name, param in params.items():
        owner, attribute = _owner(module, name)
        # A module with sparse gradients (nn.EmbeddingBag(sparse=True)) gets a copy: the backward of a view cannot
        # reshape a sparse gradient.
        alias = param.clone() if getattr(owner, "sparse", False) is True else param.view_as(param)
        owner._parameters[attribute] = alias  # type: ignore[assignment]
        aliases[name] = alias
    return aliases


def restore_parameters(module: nn.Module, params: dict[str, nn.Parameter]) -> None:
    """Undo :func:`install_aliases`.

    Parameters
    ----------
    module
        The module.
    params
        The original parameters, by qualified name.
    """
    for name, param in params.items():
        owner, attribute = _owner(module, name)
        owner._parameters[attribute] = param


class GenericRecord(Record):
    """One call of a module handled through batched vector-Jacobian products.

    Parameters
    ----------
    module
        The module that was called.
    module_name
        Its qualified name (for error messages).
    params
        Its direct trainable parameters at call time, by qualified name.
    aliases
        The aliases the call used in place of ``params`` (see :func:`install_aliases`).
    outputs
        The tensors of the call's output.
    """

    def __init__(
        self,
        module: nn.Module,
        module_name: str,
        params: dict[str, nn.Parameter],
        aliases: dict[str, Tensor],
        outputs: list[Tensor],
    ) -> None:
        super().__init__(module, module_name, params)
        self.aliases = aliases
        self.outputs = [out for out in outputs if out.requires_grad]
        self.edges = [get_gradient_edge(out) for out in self.outputs]
        self._rows: dict[str, Tensor] | None = None
        self._versions: list[int] | None = None
        self.unused: set[str] = set()  # parameters the call's outputs do not depend on
        # Set by split_batch: the outputs' E * k entries along this dimension are k consecutive ones per example.
        self._grouped_dim: int | None = None
        # Set by insert_batch: the single output is shared by all examples (a table computed from the parameters
        # alone, only broadcast over the batch), and each example's output gradient comes from a broadcast plan.
        self._shared_output = False
        self.started_at = False  # set by start_at: the products start at the operations using the parameters
        # The factors of the call's matrix products (False: not looked at yet; None: they do not apply).
        self._matmul: MatmulFactors | bool | None = False
        # Set by start_at for nested uses: per edge, the parameters whose products start there (None: all of them).
        self.serves: list[frozenset[str]] | None = None
        self.upstream: list[frozenset[int]] | None = None  # (with serves: per edge, the edges upstream of it)
        # Set by take_row_examples: the example of each entry of the output along dimension 0 (-1: none), found from
        # gradients (rows laid out in any order, e.g. expert-major tokens); the output gradients then come whole.
        self.row_examples: Tensor | None = None

    def uncover_param(self, name: str) -> None:
        """Stop covering parameter ``name`` (see :meth:`Record.uncover_param`); its alias leaves the products."""
        super().uncover_param(name)
        self.aliases.pop(name, None)

    def can_insert_batch(self, batch_dim: int) -> bool:
        """Whether :meth:`insert_batch` applies: for a call with one output, whose per-example
        vector-Jacobian products then take one output gradient per example in the output's own shape.

        Parameters
        ----------
        batch_dim
            The engine's batch dimension.

        Returns
        -------
        bool
            ``True`` for a single output.
        """
        return len(self.edges) == 1 and self._grouped_dim is None and self.output_batch_dims is None

    def insert_batch(self, num_examples: int, batch_dim: int) -> None:
        """Take the output gradients as one per example, each of the shared output's shape, stacked along
        ``batch_dim`` (see :func:`hf_jd.autogram._broadcast.attach_plans`).

        Parameters
        ----------
        num_examples
            Number of examples.
        batch_dim
            Where the examples are stacked.
        """
        self._shared_output = True

    def can_split_batch(self, batch_dim: int) -> bool:
        """Whether :meth:`split_batch` applies: yes, the products only need the output gradients regrouped, unless
        the outputs hold the examples along dimensions of their own (:attr:`Record.output_batch_dims`).

        Parameters
        ----------
        batch_dim
            The engine's batch dimension.

        Returns
        -------
        bool
            ``True`` but for such outputs.
        """
        return self.output_batch_dims is None

    def split_batch(self, num_examples: int, batch_dim: int) -> None:
        """Take the outputs' ``E * k`` entries along ``batch_dim`` as ``k`` consecutive ones per example
        (a batch-major grouping the engine verified, e.g. a fused mixture-of-experts layer on ``[B * T, d]``
        tokens): the output gradients then come shaped ``[..., E, k, ...]``, and are flattened back to the
        outputs' shape for the vector-Jacobian products of each example.

        Parameters
        ----------
        num_examples
            ``E``.
        batch_dim
            The engine's batch dimension.
        """
        self._grouped_dim = batch_dim

    def can_take_row_examples(self) -> bool:
        """Whether :meth:`take_row_examples` applies: a call with one output, on its usual path (products from its
        output, not regrouped, shared or started at its parameters' uses).

        Returns
        -------
        bool
            ``True`` for such a call.
        """
        return (
            len(self.edges) == 1
            and self._grouped_dim is None
            and not self._shared_output
            and not self.started_at
            and self.output_batch_dims is None
            and hasattr(self, "outputs")
            and self.outputs[0].dim() > 0
        )

    def take_row_examples(self, examples: Tensor) -> None:
        """Take the output's entries along dimension 0 as belonging to ``examples`` (``[N]``, ``-1`` for entries of no
        example), found from gradients (see :mod:`._gathered`): the output gradients then come in the output's own
        shape, ``[m, *shape]``, and each example's products take the entries of its own rows.

        Parameters
        ----------
        examples
            The example of each entry along dimension 0 of the output.
        """
        self.row_examples = examples

    def weighted_output(self, index: int, rows: Tensor, table: Tensor) -> Tensor:
        """The gradient of ``Σ_{e,k} table[e, k] L_{e,k}`` w.r.t. output ``index``, from its bound gradients ``rows``.

        Parameters
        ----------
        index
            The output's position in the call's outputs.
        rows
            Its bound output gradients (``[E, m, *rest]``, or ``[m, *shape]`` with row examples).
        table
            The weights, ``[E, m]``.

        Returns
        -------
        Tensor
            In the output's shape.
        """
        assert self.layout is not None
        if self.row_examples is None:
            return self.output_layout(index, self.layout).weighted_grad_output(rows, table)
        # rows [m, N, ...]: each entry scaled by its example's weight of each task (0 for entries of no example)
        padded = torch.cat([table.to(rows.dtype), table.new_zeros(1, table.shape[1]).to(rows.dtype)])
        scales = padded[self.row_examples].T  # [m, N] (index -1: the zero row)
        return (rows * scales.view(*scales.shape, *([1] * (rows.dim() - 2)))).sum(0)

    def _spread_output(self, index: int, rows: Tensor, examples: slice | None) -> Tensor:
        """Per-row output gradients ``[n * m, *shape]`` of output ``index`` for the examples of ``examples`` (all when
        ``None``), example-major."""
        assert self.layout is not None
        if self.row_examples is None:
            return self.output_layout(index, self.layout).rows_to_grad_outputs(rows, examples)
        num_examples = self.layout.num_examples
        chosen = torch.arange(num_examples, device=rows.device)[examples if examples is not None else slice(None)]
        mask = (self.row_examples.unsqueeze(0) == chosen.unsqueeze(1)).to(rows.dtype)  # [n, N]
        spread = rows.unsqueeze(0) * mask.view(mask.shape[0], 1, mask.shape[1], *([1] * (rows.dim() - 2)))
        return spread.flatten(0, 1)  # [n * m, N, ...]

    def can_start_at_uses(self) -> bool:
        """Whether :meth:`start_at` applies: a call with parameters, outputs not regrouped nor shared.

        Returns
        -------
        bool
            ``True`` when the call's products may start at the operations using its parameters.
        """
        return (
            bool(self.aliases)
            and self._grouped_dim is None
            and not self._shared_output
            and self.output_batch_dims is None
            and hasattr(self, "outputs")
        )

    def start_at(
        self,
        edges: list[GradientEdge],
        serves: list[frozenset[str]] | None = None,
        upstream: list[frozenset[int]] | None = None,
    ) -> None:
        """Take the outputs of the operations that use the parameters (split by example, one output each) as this
        call's edges: its vector-Jacobian products then start there (see :mod:`._direct_uses`).

        Parameters
        ----------
        edges
            The operations' output edges.
        serves
            Per edge, the parameters it uses, when some edges lie upstream of others: the products of each
            parameter then run from its own edges only (from all of them at once, one path would count twice).
            ``None``: every edge serves every parameter.
        upstream
            With ``serves``: per edge, the indices of the edges upstream of it.
        """
        self.serves = serves
        self.upstream = upstream
        self.edges = list(edges)
        self.edge_views, self.view_edges = [], []
        self.outputs = [
            torch.empty(meta.shape, dtype=meta.dtype, device="meta")
            for meta in (edge.node._input_metadata[edge.output_nr] for edge in self.edges)
        ]
        self._versions = None  # (checked before: the operations' outputs are not the call's)
        self.started_at = True

    def watch_versions(self) -> None:
        """Remember the version counters of the (aliased) outputs: an in-place operation on them
        after the call re-routes autograd around the aliases' edges."""
        self._versions = [out._version for out in self.outputs]

    def check_not_modified(self) -> None:
        """Raise if an aliased output was modified in place after the call.

        Raises
        ------
        RuntimeError
            If one was (its vector-Jacobian products would be wrong).
        """
        if self._versions is None or not hasattr(self, "outputs"):
            return
        for out, version in zip(self.outputs, self._versions):
            if out._version != version:
                raise RuntimeError(
                    f"An output of module {self.describe()} was modified in place after the module returned "
                    "(e.g. `out += other`). The autogram engine handles modules with parameters of their own "
                    "and several outputs through views of those outputs, which an in-place operation "
                    "detaches from the graph. Make that operation out of place (`out = out + other`), or "
                    "freeze the module's parameters."
                )

    def output_layout(self, index: int, layout: RowLayout) -> RowLayout:
        """The row layout of output ``index``: ``layout`` with the output's own batch dimension, when the call's
        outputs hold the examples along different dimensions (see :attr:`Record.output_batch_dims`).

        Parameters
        ----------
        index
            The output's position in the call's outputs.
        layout
            The row layout of the losses.

        Returns
        -------
        RowLayout
            The output's row layout.
        """
        if self.output_batch_dims is None or layout.batch_dim is None:
            return layout
        return replace(layout, batch_dim=self.output_batch_dims[index])

    def _bind(self, grads: list[Tensor | None], layout: RowLayout) -> None:
        self.grad_rows: list[tuple[int, Tensor]] = []
        for index, (out, grad) in enumerate(zip(self.outputs, grads)):
            if grad is None:
                continue
            if self.row_examples is not None:  # (the output gradients in the output's shape, [m, *shape])
                self.grad_rows.append((index, grad))
                continue
            own = self.output_layout(index, layout)
            if self._grouped_dim is not None:
                out = out.unflatten(self._grouped_dim, (layout.num_examples, -1))
            if not self._shared_output:
                self.check_batch(out, own, "output")
            self.grad_rows.append((index, own.grad_to_rows(grad)))
        self.output_dtypes = [out.dtype for out in self.outputs]
        del self.outputs

    def _all_rows(self) -> dict[str, Tensor]:
        if self._rows is not None:
            return self._rows
        assert self.layout is not None
        layout = self.layout
        factors = self._matmul_factors()
        if factors is not None:  # (e.g. a mixture of experts: per-example sums over its products' rows)
            found = factors.per_row()
            self._rows = {}
            for name, param in self.params.items():
                rows = found[name] if name in found else param.new_zeros(layout.num_rows, param.numel())
                self._rows[name] = rows.to(compute_dtype(param))
            return self._rows
        edges = [self.edges[index] for index, _ in self.grad_rows]
        # The parameters by the edges their products start from (all of them but for nested uses, see start_at).
        by_edges: dict[tuple[int, ...], list[str]] = {}
        for name in self.aliases:
            serving = tuple(
                position
                for position, (index, _) in enumerate(self.grad_rows)
                if self.serves is None or name in self.serves[index]
            )
            by_edges.setdefault(serving, []).append(name)
        chunks_of: dict[str, list[Tensor | None]] = {name: [] for name in self.aliases}
        for examples in self._example_chunks():
            if self._shared_output:  # one gradient per example, already in the output's shape
                grad_outputs = [
                    (rows if examples is None else rows[examples]).flatten(0, 1).to(self.output_dtypes[index])
                    for index, rows in self.grad_rows
                ]
            else:
                grad_outputs = [
                    self._spread_output(index, rows, examples).to(self.output_dtypes[index])
                    for index, rows in self.grad_rows
                ]
            if self._grouped_dim is not None:  # [n, ..., E, k, ...] -> [n, ..., E * k, ...], the outputs' shape
                grad_outputs = [grad.flatten(self._grouped_dim + 1, self._grouped_dim + 2) for grad in grad_outputs]
            for serving, names in by_edges.items():
                products: list[Tensor | None] = (
                    list(batched_grad(
                        [edges[position] for position in serving],
                        [self.aliases[name] for name in names],
                        [grad_outputs[position] for position in serving],
                    ))
                    if serving
                    else [None] * len(names)
                )
                for name, chunk in zip(names, products):
                    chunks_of[name].append(chunk)
        self._rows = {}
        for name, chunks in chunks_of.items():
            param = self.params[name]
            if all(chunk is None for chunk in chunks):
                self.unused.add(name)  # e.g. Wav2Vec2's mask embedding when nothing is masked
            if any(chunk is None for chunk in chunks):
                rows = param.new_zeros(layout.num_rows, *param.shape)
            else:
                rows = torch.cat(chunks)  # type: ignore[arg-type]
            if rows.layout != torch.strided:  # sparse gradients (nn.EmbeddingBag(sparse=True)): the dense rows
                rows = rows.to_dense()
            self._rows[name] = rows.reshape(layout.num_rows, -1).to(compute_dtype(param))
        del self.grad_rows
        return self._rows

    def _matmul_factors(self) -> MatmulFactors | None:
        """The factors of the call's matrix products (computed once per step), or ``None`` when they do not apply
        (see :mod:`._matmul_uses`)."""
        if self._matmul is False:
            assert self.layout is not None
            dtypes = {compute_dtype(param) for param in self.params.values()}
            factors = matmul_factors(self, self.layout, dtypes.pop()) if len(dtypes) == 1 else None
            self._matmul = factors
            if factors is not None:
                self.unused |= set(self.params) - factors.used()
                del self.grad_rows
                # The products' data operands, saved by autograd (which checked them when the factors unpacked them),
                # are read again by the weighted gradient of Engine.backward.
                for entry in factors.rows:
                    if entry.use.data is not None:
                        self.watch("an operand of its matrix products", entry.use.data)
        return self._matmul  # type: ignore[return-value]

    def gram(self, name: str) -> Tensor:
        """Gram matrix ``[R, R]`` of the per-row gradients of parameter ``name`` (from the call's matrix products,
        slices at a time, when they apply).

        Parameters
        ----------
        name
            The parameter's name in ``params``.

        Returns
        -------
        Tensor
            Shape ``[R, R]``.
        """
        factors = self._matmul_factors() if self._rows is None else None
        if factors is not None and not (self.keep_rows and self._small()):
            gramian = factors.gram(name)
            if gramian is not None:
                return gramian
        return super().gram(name)

    def _small(self) -> bool:
        """Whether the per-row gradients of all the call's parameters are small enough to be kept for the weighted
        gradient of the single-backward mode (layer scales, biases), rather than recomputed from the factors."""
        assert self.layout is not None
        return self.layout.num_rows * sum(param.numel() for param in self.params.values()) <= MAX_KEPT_ENTRIES

    def weighted_grad(self, name: str, weights: Tensor) -> Tensor:
        """Gradient of ``Σ_r w_r L_r`` w.r.t. parameter ``name`` (see :meth:`Record.weighted_grad`); from the call's
        matrix products when they apply and the per-row gradients were not kept.

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
        if isinstance(self._matmul, MatmulFactors) and name not in self.kept_rows:
            param = self.params[name]
            grad = self._matmul.weighted_grad(name, weights)
            grad = param.new_zeros(param.shape) if grad is None else grad.to(param.dtype).view(param.shape)
        else:
            grad = super().weighted_grad(name, weights)
        owner, _ = _owner(self.module, name)
        if getattr(owner, "sparse", False) is True and grad.dim() > 0:
            # As the ordinary backward of nn.EmbeddingBag(sparse=True): a sparse gradient over the table's rows
            # (SparseAdam rejects dense ones).
            return grad.to_sparse(sparse_dim=1).coalesce()
        return grad

    def _example_chunks(self) -> list[slice | None]:
        """Groups of examples whose masked output gradients fit the memory budget."""
        assert self.layout is not None
        if not self.layout.batched:
            return [None]
        num_examples = self.layout.num_examples
        # One example's rows ([m, *rest] each) spread over all examples (with row examples, one whole output gradient
        # per task).
        if self.row_examples is not None:
            per_example = sum(rows.numel() for _, rows in self.grad_rows)
        else:
            per_example = sum(rows[0].numel() * num_examples for _, rows in self.grad_rows)
        size = max(1, MAX_SPREAD_ENTRIES // max(1, per_example))
        return [slice(start, min(start + size, num_examples)) for start in range(0, num_examples, size)]

    def per_row(self, name: str) -> Tensor:
        """Per-row gradients of parameter ``name``, from batched vector-Jacobian products.

        Parameters
        ----------
        name
            The parameter's name in ``params``.

        Returns
        -------
        Tensor
            Shape ``[R, numel]``.
        """
        return self._all_rows()[name]

    def reaches(self, name: str) -> bool:
        """Whether the call's outputs depend on parameter ``name`` (after :meth:`per_row`).

        Parameters
        ----------
        name
            The parameter's name in ``params``.

        Returns
        -------
        bool
            ``False`` when its vector-Jacobian products were all ``None``.
        """
        return name not in self.unused

    def release(self) -> None:
        """Drop the factors and the kept rows once the record's contributions are added."""
        super().release()
        self._rows = None
        self._matmul = None
        self.aliases = {}
