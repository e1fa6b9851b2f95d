"""The autogram engine: the Gramian ``J Jᵀ`` of the losses' Jacobian without ever forming ``J``.

Algorithm 3 of Quinton & Rey, "Jacobian Descent For Multi-Objective Optimization" (arXiv
2406.16232): forward hooks on every module with direct trainable parameters capture what that
module saw (its input, its output's gradient edge); :meth:`Engine.compute_gramian` back-propagates
the losses to those module outputs only (no parameter gradient is computed) and adds each
parameter's contribution in closed form (Linear, Conv1D, Conv2d including grouped and depthwise
ones, Conv1d, Embedding, RMSNorm, LayerNorm, GroupNorm, batch norms in evaluation mode; subclasses of
Linear and Embedding with a forward of their own, and RMS norms by any name, once their first call
verifies the closed form on its tensors) or by batched vector-Jacobian products on the existing
graph (any other module).
Parameters used by several modules (tied embeddings) get their cross terms. Tables looked up once
for all examples and broadcast over the batch later (T5's relative-position bias) get per-example
output gradients at the broadcasting node of the same pass (:mod:`._broadcast`). Other calls whose
tensors are not split by example along ``batch_dim`` (regrouped or time-major rows) are verified
to be split by example otherwise where their shapes allow it, else get exact per-row output gradients.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from ._accumulate import (
    MAX_UNATTRIBUTED_ENTRIES,
    Accumulator,
    empty_call,
    grads_at_once,
    grads_per_row,
    grads_streamed,
    other_uses_of_inputs,
    unattributed_gram,
    uncovered_parameters,
)
from ..autojac._utils import graph_nodes, no_gradient_writes
from ._batched_grad import (
    VmapFailure,
    explain_donated_buffers,
    group_norm_guards,
    guarded_grad,
    guarding_group_norms,
    has_compiled_nodes,
    has_unbatchable_nodes,
    one_vector_at_a_time,
    recording_vmap_failures,
    vmap_rejects_channels_last,
)
from ._broadcast import (
    BroadcastPlan,
    GraphConsumers,
    attach_plans,
    broadcast_nodes,
    grouped_paths,
    node_output_shape,
    plan_broadcasts,
    plan_structure,
)
from ._capture import Capture
from ._deliver import deliver_gradients
from ._direct_uses import start_at_uses
from ._escapes import escaping_calls
from ._gathered import add_gathered
from ._generic import GenericRecord
from ._layer_norm import INPUT_PARAMETER
from ._leaf_uses import record_of_uses
from ._layout import RowLayout, layout_of_losses
from ._param_uses import uses_outside_calls
from ._parameter_record import ParameterRecord
from ._parametrized import keep_fully_covered
from ._precision import tf32_in_graph
from ._record import Record
from ._regroup import (
    IDENTITY_RTOL,
    LOW_PRECISION_IDENTITY_RTOL,
    TF32_IDENTITY_RTOL,
    frontier,
    grads_verified,
    regrouping_structure,
)

__all__ = ["Engine"]


# Structures of loss computations whose mixing of the examples an engine remembers (see _regroup.frontier).
MAX_LOSS_COMPUTATIONS = 64

# Smallest tolerance of check_gramian for Gramians of bf16/fp16 products.
LOW_PRECISION_RTOL = 5e-2
# The same for graphs whose float32 products may run in TF32 (CUDA; see _precision).
TF32_RTOL = 1e-2
# check_gramian cannot tell on a batch whose weighted gradient, times the parameters' norm, is below this fraction
# of the weighted losses (gradients that cancel to rounding).
INCONCLUSIVE_RATIO = 1e-3
# check_gramian's allowance for rounding: this many ε of the products' precision times (Σ |w_i| ‖g_i‖)²; and the ε
# of TF32 products (10 explicit mantissa bits).
ROUNDING_FACTOR = 64
TF32_EPSILON = 2.0**-10

# Live engines with single_backward=True: each one's backward() writes the gradients of the parameters
# it covers, so none writes those of the others (also when their losses are summed or stacked).
_SINGLE_BACKWARD_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


@dataclass
class _Bound:
    """What :meth:`Engine.compute_gramian` keeps for :meth:`Engine.backward`."""

    layout: RowLayout
    shape: torch.Size  # the losses' shape
    losses: Tensor | None  # None when the graph was freed (then nothing is uncovered)
    uses: dict[int, list[tuple[Record, str]]]
    params: dict[int, nn.Parameter]
    uncovered: list[Tensor]
    guards: list[GradientEdge]  # see _batched_grad.group_norm_guards


def _coincident_sizes(record: Record, batch_dim: int, batch_size: int) -> bool:
    """Whether an output of the call with at least 3 dimensions (e.g. ``[B, T, d]`` or ``[T, B, d]``), or 2 for
    a call on the generic path (whose tensors may be feature-major ``[d, B]``), has the batch size along
    ``batch_dim`` and along another dimension too."""
    if batch_size < 2 or record.output_batch_dims is not None:  # (those come from the module's documented layout)
        return False
    min_dims = 2 if isinstance(record, GenericRecord) else 3
    for edge in record.shape_edges():
        shape = node_output_shape(edge.node, edge.output_nr)
        if shape is None:
            continue
        if len(shape) >= min_dims and len(shape) > batch_dim and shape[batch_dim] == batch_size:
            if any(size == batch_size for i, size in enumerate(shape) if i != batch_dim):
                return True
    return False


def _has_size(record: Record, size: int) -> bool:
    """Whether an output of the call has ``size`` entries along some dimension (or its shape is unknown)."""
    for edge in record.shape_edges():
        shape = node_output_shape(edge.node, edge.output_nr)
        if shape is None or size in shape:
            return True
    return False


def _check_finite(losses: Tensor) -> None:
    """Raise if a loss is inf or nan: its row and column of the Gramian would be too, and every weighting fails on
    it (the rows are named, in the flattened order of ``compute_gramian``)."""
    finite = torch.isfinite(losses.detach()).reshape(-1)
    if bool(finite.all()):
        return
    rows = (~finite).nonzero().flatten().tolist()
    shown = ", ".join(str(row) for row in rows[:10]) + (", ..." if len(rows) > 10 else "")
    raise ValueError(
        f"{len(rows)} of the {finite.numel()} losses are inf or nan (rows {shown} of the flattened losses; row "
        "i * m + k is task k of example i for [B, m] losses), so their Gramian would be too. Find what makes them "
        "non-finite (an empty label set, a division by zero, a diverging learning rate), or drop or mask those "
        "rows before compute_gramian; JDTrainer skips such steps with jd_nonfinite='skip'."
    )


def _buffer_storages(capture: Capture) -> frozenset[int]:
    """Storage addresses of the buffers of the engine's modules (see :func:`._regroup.regrouping_structure`)."""
    return frozenset(
        buffer.untyped_storage().data_ptr() for root in capture.roots for buffer in root.buffers() if buffer.numel()
    )


def _informative(checked: list[Record], failed: list[Record], vacuous: list[Record]) -> list[Record]:
    """The calls split along ``batch_dim`` whose grouping check passed and could have failed: verified batch-major
    (the same calls of the same modules on later steps skip the layout check)."""
    excluded = {id(record) for record in failed} | {id(record) for record in vacuous}
    return [record for record in checked if record.batched and id(record) not in excluded]


def _regroup_candidates(unaligned: list[Record]) -> tuple[list[Record], list[Record]]:
    """The calls not split by example along ``batch_dim`` whose shapes offer a per-example grouping (``k`` rows per
    example, or the examples along another dimension), which the engine verifies; and the others."""
    candidates = [record for record in unaligned if record.groups or record.other_batch_dim is not None]
    chosen = {id(record) for record in candidates}
    return candidates, [record for record in unaligned if id(record) not in chosen]


def _remember_layouts(
    capture: Capture,
    verify_layout: bool,
    checked: list[Record],
    failed: list[Record],
    vacuous: list[Record],
    chosen: list[bool],
) -> None:
    """After a grouping check: with ``verify_layout``, the model's batch-major calls and the failures; always, the
    calls split by example along another dimension (time-major ``[T, B, d]``, also with ``T = 1``), which are not
    batch-major: later calls of their modules are checked along that dimension, also when ``T = B``."""
    if verify_layout:
        capture.mark_unaligned(failed)
        capture.mark_batch_major(_informative(checked, failed, vacuous))
    uninformative = {id(record) for record in vacuous}
    capture.mark_unaligned(
        [record for record, other in zip(checked, chosen) if other and id(record) not in uninformative]
    )


_SEVERAL_FORWARDS = (
    "the losses come from several forward passes of the engine's modules (e.g. one per task): each new "
    "forward pass of a module given to the engine replaces the captures of the previous one, so only the last "
    "one counts. Run one forward pass (e.g. on the concatenated batches), or call the model several times "
    "inside the forward pass of one module that is given to the engine."
)

_OUTSIDE_USES = (
    "they are also used outside the forward passes of the modules that own them (e.g. "
    "`inputs_embeds=F.embedding(ids, model.get_input_embeddings().weight)` with tied embeddings, "
    "a parent module slicing a child's weights and passing the slices to it, `module.forward(x)` "
    "called instead of `module(x)`, a forward hook using them, or a weight tied to a module that is not given to "
    "the engine). Let the owning module compute them (for a tied weight, give the other module to the engine too, "
    "e.g. in jd_modules), or use the autojac engine (hf_jd.autojac, jd_engine='autojac')."
)

_UNCAPTURED_LOSSES = (
    "no captured call covers any of them. The losses come from a forward pass the engine did not capture (run "
    "with the engine disabled, or before the captured one): run the forward pass with the engine enabled, then "
    "call compute_gramian on its losses."
)

_EARLIER_USES = (
    "Here those uses come before the captured calls of this forward pass: by a module not given to the engine that "
    "shares the weight (tied input embeddings when the engine has the output head only: give it the embedding "
    "module too), before the model was called (a penalty on the weights added to the losses: compute it after the "
    "forward pass, which the engine handles exactly, or use the optimizer's weight_decay), or in an earlier step, "
    "through a tensor kept since (a cache such "
    "as LeViT's attention biases in evaluation mode, through which a plain training step fails too on its second "
    "backward pass: train such a model in training mode, or clear the cache before each forward pass)."
)


def _calls_in_graph(records: Sequence[Record], nodes: list[Any]) -> bool:
    """Whether the output of some captured call is on the losses' graph (``nodes``)."""
    graph = set(nodes)
    return any(edge.node in graph for record in records for edge in record.shape_edges())


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
        network ("book-keeping", Bu et al., ICML 2023): e.g. ``(diag(w) G)ᵀ A`` for a Linear layer
        from its inputs ``A`` and output gradients ``G``. Faster than ``losses.backward(weights)``;
        the output gradients of all layers are held until :meth:`backward`, while the graph's
        saved tensors are freed during the Gramian pass when :meth:`backward` does not need them.
        Per-example weight gradients materialised for the Gramian are kept when they are no
        larger than the output gradients they replace (keeping all of them, ``R`` times each
        layer's size, measured no faster on CPU: the fresh memory costs page faults).

    Raises
    ------
    ValueError
        If no module is given or ``batch_dim`` is not a non-negative int or ``None``.
    TypeError
        If an argument of ``*modules`` is not an ``nn.Module``.
    RuntimeError
        If another enabled engine hooks one of the modules (one created earlier and not removed, e.g. by a notebook
        cell run again): call ``remove()`` on it, or disable it. Enabling an engine beside another enabled one on the
        same modules raises the same error.

    Notes
    -----
    Usage::

        engine = Engine(model)
        losses = loss_fn(model(x), y)             # shape [B], reduction="none"
        gramian = engine.compute_gramian(losses)  # [B, B]; the autograd graph is retained
        weights = weighting(gramian)              # [B]
        losses.backward(weights)                  # or engine.backward(weights) (single_backward)

    For ``[B, m]`` losses, reshape the weights to ``[B, m]`` before ``losses.backward``. On a
    first step, ``engine.check_gramian(losses, gramian)`` (before the backward) verifies the
    Gramian against autograd with one extra backward pass.

    * Requirements: with ``batch_dim`` set, example ``i``'s losses must depend on example ``i``
      only (BatchNorm in training mode raises a ``RuntimeError``). The batch size is read from
      the inputs of the modules given to the engine. The hooks never change what a module returns:
      an output of size 1 along ``batch_dim`` while the batch is larger (BERT's ``[1, T, d]`` position
      embeddings of its default ``position_ids``) is a table shared by the examples (next item).
    * Tensors not split by example: a module call whose output is shared by the examples and only
      broadcast (or repeated) over the batch further on (BERT's and GPT-2's position embeddings, the
      relative-position bias of T5 or MPNet) gets its per-example output gradients from the ordinary
      backward pass, at the node that broadcasts it. Any other call whose tensors do not have the batch
      size along ``batch_dim`` (a size-1 output used otherwise, weight-norm parametrisations) gets one
      output gradient per loss row
      from a batched backward pass over the ``R`` rows: exact, but it costs about ``R`` backward
      passes over the part of the network above that call and holds ``R`` times its output
      gradient. With per-example losses ``[B]``, Linear and LayerNorm calls on ``[k B, ...]``
      rows (OPT's ``[B * T, d]`` MLP, Swin's ``[B * windows, ...]`` attention) and all calls
      shaped ``[B, ...]`` of such a forward pass are instead checked by an exact identity (one
      backward pass over two vectors, see ``_regroup``) and keep their closed forms when their
      rows belong to one example each (batch-major), else take the per-row pass. So do the calls
      whose tensors have the batch size along exactly one other dimension (time-major ``[T, B, d]``
      layouts: XLNet, ``nn.TransformerEncoder`` or ``nn.LSTM`` without ``batch_first``), checked
      along that dimension and then handled in their own layout. A later forward pass of the same
      structure (the same autograd node types and calls) reuses the verified grouping without the
      check, unless some operation selects rows by the data (indexing, gathering, sorting:
      mixture-of-experts tokens), in which case every step is checked.
    * Losses that mix the examples (an in-batch contrastive loss, losses divided by their batch
      sum, mined pairs) are detected where they reach the module calls closest to them, and
      examples mixed by a parameter-free operation between two layers (centring over the batch)
      where they reach the model's first calls: on the first step of each structure of the loss
      computation (two backward passes; every step, at the closest calls only, when the loss
      computation picks rows by the data). The calls are then checked on every step and those
      whose examples are mixed take the exact per-row path (a ``RuntimeWarning`` says so once per
      engine). Not detected: mixing that appears later in a loss computation of the same structure
      (its presence depends on the data, e.g. negatives masked by labels), and under bf16/fp16 a
      mixing weaker than the low-precision tolerance (5e-2 relative).
    * Not detected without :meth:`check_gramian`: a time-major layout
      whose length equals the batch size in the very first step, losses that contain gradients of
      the model (``create_graph=True`` penalties: autograd numbers those nodes like the forward
      nodes they differentiate), and a user's forward pre-hook using its module's parameters.
    * State: captured tensors are dropped after :meth:`compute_gramian` (after :meth:`backward`
      with ``single_backward``), by :meth:`reset`, and when a module given to the engine starts a
      new forward pass after having completed one. A model called several times before one
      ``compute_gramian`` (siamese set-ups) must therefore be called inside one module's forward.
    * Activation checkpointing works when it is non-reentrant (``use_reentrant=False``,
      transformers' default): the forward passes of checkpointed blocks re-run inside backward
      passes are not captured again (the engine keeps the inputs of the parametrised calls it
      captured, so checkpointing saves less memory than in a plain step). Reentrant checkpoints
      (whose forward passes run without gradients) are rejected.
    * Not supported, with a ``RuntimeError`` naming the cause: reversible layers (Reformer), which
      re-run forward passes in the backward pass outside ``torch.utils.checkpoint`` and write the
      parameters' gradients themselves, ``Embedding(scale_grad_by_freq=True)``, and trainable
      parameters used both inside and outside the captured calls of the modules that own them (a
      parent slicing a child's weights and passing the slices to it, a tied embedding looked up by
      the user, or losses that also depend on an earlier forward pass, whose captures a new
      forward pass replaced): the autograd
      nodes that use a parameter must have been created during a captured call of its module
      (autograd numbers its nodes in order), except autocast's cached casts, which are created
      once per autocast region.
    * In-place changes of the tensors a captured call keeps (a Linear layer's input, an embedding's
      ids) after the call (``x.mul_(2)`` after ``self.linear(x)``) raise a ``RuntimeError`` naming the
      module, when :meth:`compute_gramian` or :meth:`backward` is about to use them, as autograd raises for
      the tensors it saved: they are detected by the tensors' version counters, without copies.
    * A module with parameters of its own that uses a submodule's parameters without calling it (Mamba's
      mixers pass ``conv1d.weight`` to a convolution function) borrows the submodule after its first call:
      its generic record then covers the submodule's parameters with its own (on the first step, they take
      the per-row pass below). Its per-example products start at the operations that use the parameters
      when those split the examples (not back through the rest of the module, e.g. a selective scan).
    * A Linear module called on rows that the data picks from the examples (adapters per language, experts on
      their routed tokens, ``proj(h[mask])``) finds each row's example from one batched backward pass over
      three weighted sums of the losses and keeps its closed form; a call on no example costs nothing.
    * A parameter of the engine's modules used *only* outside their captured calls (a parent
      calling ``F.linear(x, self.child.weight)`` without calling the child; DeBERTa-v2's
      relative-position table with ``norm_rel_ebd="none"``) gets its per-row gradients from a
      batched backward pass from the losses (exact, up to one backward pass per loss row; a
      ``RuntimeWarning`` says so once per engine), when ``R × numel`` stays below 2**26 entries
      (else a ``RuntimeError``).
    * ``torch.compile``: create the engine before the first compiled forward pass (graphs
      compiled earlier do not run its hooks). Each hooked module call breaks the compiled graph,
      so compiling brings little speed; batches of vectors are back-propagated through compiled
      backward kernels one at a time (they cannot be vmapped); AOTAutograd's buffer donation must
      be off (``torch._functorch.config.donated_buffer = False``), since the graph is kept for the
      weighted backward.
    * Dtypes: the Gramian is float32 (float64 for float64 parameters), also under autocast.
    * Copies: ``copy.deepcopy`` of a hooked model copies the hooks, which keep pointing to this
      engine and ignore the copy's modules (the copy runs normally; give it its own engine).
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
        if self._single_backward:
            _SINGLE_BACKWARD_ENGINES.add(self)
        self._bound: _Bound | None = None
        self._capture = Capture(list(modules), batch_dim, on_new_forward=self.reset)
        self._warned_unattributed = False
        # Modules whose generic products started at their parameters' uses (see _direct_uses) and failed a grouping
        # check there (e.g. uses on time-major flattened rows): they keep products from their outputs afterwards.
        self._no_direct_uses: set[int] = set()
        # Modules whose Linear calls on rows picked by the data had rows reached by several examples (see _gathered).
        self._not_gathered: set[int] = set()
        # Structures of broadcast plans (see plan_structure) that succeeded: single-backward passes with them free the
        # graph as they go.
        self._planned: set[tuple[Any, ...]] = set()
        self._warned_mixed = False
        self._warned_per_row = False
        self._per_row_before: set[str] = set()  # modules that took the per-row path on an earlier step
        # Whether the examples were found mixed, by structure of the loss computation (the autograd graph
        # between the losses and the calls closest to them, see _regroup.frontier).
        self._loss_computations: dict[tuple[str, ...], bool] = {}
        # Loss computations on whose first step the model's first calls were checked too.
        self._sources_checked: set[tuple[str, ...]] = set()
        # Per structure of a forward pass whose calls not split along batch_dim all passed the grouping check:
        # whether each checked call was split along its other batch dimension (see _regroup.regrouping_structure).
        self._verified_groupings: dict[tuple[str, ...], tuple[bool, ...]] = {}
        self._low_precision = False  # whether the last Gramian came from bf16/fp16 products
        self._tf32 = False  # whether the last Gramian's graph may have run float32 products in TF32 (CUDA)
        # Whether a vmapped backward pass of this engine failed on a kernel that cannot be batched (found out on a
        # step, see _batched_grad.batched_grad): the later steps back-propagate one vector at a time from the start.
        self._vmap_failed = False

    def _note_vmap_failures(self, failures: list[str]) -> None:
        """Back-propagate one vector at a time from the next step on; warn once per engine."""
        first = not self._vmap_failed
        self._vmap_failed = True
        if not first:
            return
        warnings.warn(
            f"hf_jd.autogram: a vmapped backward pass of the engine failed ({failures[0]}): an operation of the "
            "model has a backward kernel that vmap cannot batch. The engine back-propagates its vectors one at a "
            "time instead, on this step and the next ones: the same result, at up to one backward pass per vector "
            "where the closed forms do not apply. This warning is shown once per engine.",
            RuntimeWarning,
            stacklevel=4,
        )

    def _uncover_uses_outside_calls(self, records: list[Record], nodes: list[Any]) -> list[Record]:
        """The records without the parameters the losses also use outside the captured calls (a tied weight
        multiplied by a parent, a weight penalty) or through a submodule found uncalled in this pass: those take the
        exact path of parameters used outside their modules' calls (per-row gradients from the losses, with a
        warning). Uses that predate the captured calls (several forward passes, a kept cache, ``inputs_embeds``
        looked up from a tied embedding before the model's call, a penalty computed before the forward pass) raise.

        Parameters
        ----------
        records
            The captured calls.
        nodes
            The autograd nodes of the losses' graph.

        Returns
        -------
        list of Record
            The records that still cover some parameter.

        Raises
        ------
        RuntimeError
            If some use predates the captured calls.
        """
        outside = uses_outside_calls(nodes, records)
        earlier = [param for param, before in outside if before]
        if earlier:
            several = self._capture.replaced_forwards > 0
            cause = _SEVERAL_FORWARDS if several else f"{_OUTSIDE_USES} {_EARLIER_USES}"
            raise RuntimeError(
                f"The losses use {len(earlier)} trainable parameter(s) of the engine's modules "
                f"({self._names_of(earlier)}) outside the module calls the engine captured: {cause}"
            )
        # Parameters of submodules first found used without being called (borrowed from the next call on, see
        # Capture._check_descendants_called) were used as they are in this pass: a record covering one through a
        # tie (MobileBERT's head owns the bias its uncalled decoder adds) did not see that use.
        ids = {id(param) for param, _ in outside} | self._capture.switched_now
        if not ids:
            return records
        kept = [record for record in records if any(id(param) not in ids for param in record.params.values())]
        if outside and not kept and not _calls_in_graph(records, nodes):
            # Every captured parameter used otherwise, and no captured call on the losses' graph: these losses are not
            # of those calls. (Captured calls on the graph, with every parameter also used after them, e.g. a penalty
            # on all the weights, take the per-row path below.)
            params = [param for param, _ in outside]
            raise RuntimeError(
                f"The losses use {len(params)} trainable parameter(s) of the engine's modules "
                f"({self._names_of(params)}) outside the module calls the engine captured: "
                f"{_SEVERAL_FORWARDS if self._capture.replaced_forwards else _UNCAPTURED_LOSSES}"
            )
        for record in records:
            for name, param in list(record.params.items()):
                if id(param) in ids:
                    record.uncover_param(name)
        return [record for record in records if record.params]

    def _owners(self, params: list[Tensor]) -> dict[int, tuple[nn.Module, str, str, nn.Parameter]]:
        """By id, the module owning each of ``params`` (parameters of the engine's modules), its qualified name, the
        parameter's attribute name, and the parameter."""
        ids = {id(param) for param in params}
        roots = self._capture.roots
        owners: dict[int, tuple[nn.Module, str, str, nn.Parameter]] = {}
        for index, root in enumerate(roots):
            prefix = f"modules[{index}]." if len(roots) > 1 else ""
            for module_name, module in root.named_modules(prefix=prefix.rstrip(".")):
                for name, param in module._parameters.items():
                    if param is not None and id(param) in ids and id(param) not in owners:
                        owners[id(param)] = (module, module_name, name, param)
        return owners

    def _cover_read_parameters(
        self, layout: RowLayout, params: list[Tensor], checkpointed: bool, consumers: GraphConsumers
    ) -> tuple[list[BroadcastPlan], list[GenericRecord]]:
        """For parameters of the engine's modules read outside their calls (``params``), instead of a batched pass over
        the loss rows: broadcast plans for those whose every use is broadcast over the batch further on (DeBERTa's
        relative-position table, sliced, dropped out and projected by Linear layers whose outputs meet the examples in
        the attention scores; see :mod:`._parameter_record`), whose per-example gradients then come from the ordinary
        pass; then generic records for the others whose every use is an operation split by example (LFM2's short
        convolutions pass ``self.conv.weight`` to ``F.conv1d``; see :mod:`._leaf_uses`), whose products start there.
        The rest (a tied weight multiplied by another module than its own) keep that per-row path."""
        if not params or layout.batch_dim is None or layout.num_examples < 2:
            return [], []
        owners = self._owners(params)
        plans = plan_broadcasts(
            consumers.losses, [ParameterRecord(*owner) for owner in owners.values()], layout.batch_dim,
            layout.num_examples, checkpointed, partial=True, consumers=consumers.get(),
        )
        planned = {id(param) for plan in plans for param in plan.record.params.values()}
        records = (
            record_of_uses(*owner, consumers.get(), layout.batch_dim, layout.num_examples)
            for key, owner in owners.items()
            if key not in planned
        )
        return plans, [record for record in records if record is not None]

    def _warn_unattributed(self, params: list[Tensor]) -> None:
        """Warn once per engine that some parameters take the per-row backward pass."""
        if self._warned_unattributed:
            return
        self._warned_unattributed = True
        warnings.warn(
            f"hf_jd.autogram: the losses use {len(params)} trainable parameter(s) of the engine's modules "
            f"({self._names_of(params)}) outside the calls of the modules that own them (e.g. a parent module "
            "calling F.linear(x, self.child.weight), a tied weight multiplied by another module than its own (as "
            "MobileBERT's masked-LM head does), a penalty on a weight added to the losses, under "
            "parametrize.cached(), a parametrised weight read again after its module's call, or a parameter used "
            "before a tensor that leaves its module's call otherwise than through its outputs, e.g. router logits "
            "that a forward hook records for a load-balancing loss). Their per-row "
            "gradients are computed by a batched backward pass from the losses: exact, but up to one backward pass "
            "per loss row. Let the owning module use them (self.child(x)) for the engine's closed forms; for a "
            "penalty, use the optimizer's weight_decay. This warning is shown once per engine.",
            RuntimeWarning,
            stacklevel=3,
        )

    def _warn_per_row(self, records: Sequence[Record], layout: RowLayout, one_time: bool = False) -> None:
        """Warn once per engine that some modules take the per-row backward pass on every step (silent slowness
        otherwise); not for one-time checks (a [1, T, d] table with T = B before the layout is verified, which
        ``one_time`` marks) nor for steps with a single loss row (where that pass costs nothing): only for a module
        that took that path on an earlier such step too."""
        if self._warned_per_row or one_time or layout.num_rows < 2:
            return
        # (a call on no example costs no pass)
        described = list(dict.fromkeys(record.describe() for record in records if not empty_call(record)))
        names = [name for name in described if name in self._per_row_before]
        self._per_row_before.update(described)
        if not names:
            return
        self._warned_per_row = True
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        warnings.warn(
            f"hf_jd.autogram: {len(names)} module(s) of the engine ({shown}) have captured tensors that are not "
            f"split by example along batch_dim={layout.batch_dim} (e.g. a weight-normalised convolution, a table "
            "shared by the examples and used otherwise than broadcast over the batch, examples regrouped by the "
            "model, or examples mixed by the model or the losses: contrastive logits computed inside the model, a "
            "loss term over the whole batch such as a router's auxiliary loss), so the engine's closed forms do not "
            "apply to them: their per-row gradients come from a batched backward pass over the "
            f"{layout.num_rows} loss rows, exact but costing up to one backward pass per row. If the examples are "
            "meant to be independent, look for such mixing; a term shared by the examples that depends on the "
            "parameters through some per-example tensors only (a mixture of experts' load-balancing loss, through "
            "the router logits) can be given to the engine split by example with hf_jd.autogram.split_shared_term. "
            "If these parameters need not be in the Jacobian, leave their modules out of the engine (JDTrainer: "
            "jd_modules) or freeze them. This warning is shown once per engine.",
            RuntimeWarning,
            stacklevel=3,
        )

    def _gathered(
        self, losses: Tensor, layout: RowLayout, failed: list[Record], unaligned: list[Record], accumulator: Accumulator
    ) -> tuple[list[Record], list[Record]]:
        """Add the calls among ``failed`` and ``unaligned`` whose rows each belong to one example (see
        :func:`._gathered.add_gathered`, one batched pass for all of them); return the two lists without them."""
        if not failed and not unaligned:
            return failed, unaligned
        left = add_gathered(losses, layout, failed + unaligned, accumulator, self._not_gathered)
        kept = {id(record) for record in left}
        return [r for r in failed if id(r) in kept], [r for r in unaligned if id(r) in kept]

    def _direct_uses_failed(self, failed: Sequence[Record]) -> bool:
        """Remember the modules of ``failed`` whose products started at their parameters' uses: they keep
        products from their outputs on later steps. Returns whether there was one."""
        modules = {id(record.module) for record in failed if isinstance(record, GenericRecord) and record.started_at}
        self._no_direct_uses |= modules
        return bool(modules)

    def _remember_loss_computation(self, structure: tuple[str, ...], mixed: bool) -> None:
        """Remember whether this loss computation mixes the examples; warn once if so."""
        if len(self._loss_computations) >= MAX_LOSS_COMPUTATIONS:
            self._loss_computations.clear()
        self._loss_computations[structure] = mixed
        if not mixed or self._warned_mixed:
            return
        self._warned_mixed = True
        warnings.warn(
            "hf_jd.autogram: the per-example losses mix the examples of the batch (a loss depends on other "
            "examples' module outputs: an in-batch contrastive loss, losses divided by their batch sum, or an "
            "operation across the batch between two layers, such as centring or reordering the batch), so the "
            "per-example gradients of some module calls are not those of the losses. Every call is then verified "
            "on each step of this loss computation, and those whose examples are mixed get one output gradient per "
            "loss row from a batched backward pass: exact, but up to one backward pass per loss row. This warning "
            "is shown once per engine.",
            RuntimeWarning,
            stacklevel=3,
        )

    def _qualified_names(self, params: Sequence[Tensor]) -> list[str]:
        """Qualified names of parameters of the engine's modules, for error messages."""
        ids = {id(p) for p in params}
        roots = self._capture.roots
        return [
            f"modules[{index}].{name}" if len(roots) > 1 else name
            for index, root in enumerate(roots)
            for name, p in root.named_parameters()
            if id(p) in ids
        ]

    def _names_of(self, params: Sequence[Tensor]) -> str:
        """The first qualified names of some parameters of the engine's modules, for error messages."""
        names = self._qualified_names(params)
        return f"{names[:4]}{' …' if len(names) > 4 else ''}"

    def _name_of(self, param: Tensor) -> str:
        names = self._qualified_names([param])
        return names[0] if names else f"a parameter of shape {tuple(param.shape)}"

    # ------------------------------------------------------------------ public API

    @property
    def enabled(self) -> bool:
        """Whether the hooks capture anything (when ``False`` they do nothing, store nothing)."""
        return self._capture.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if value and not self._capture.enabled:
            self._capture.check_alone()  # (another engine enabled on the same modules meanwhile)
        self._capture.enabled = bool(value)

    @property
    def batch_dim(self) -> int | None:
        """The batch dimension of module tensors, or ``None``."""
        return self._capture.batch_dim

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Context manager disabling the engine, restoring the previous state on exit.

        Yields
        ------
        None
            With the engine disabled.
        """
        previous = self.enabled
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = previous

    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters covered by the engine, each once, in module order.

        Returns
        -------
        list of nn.Parameter
            The parameters.
        """
        return self._capture.parameters()

    def reset(self) -> None:
        """Drop any captured state."""
        self._capture.reset()
        self._bound = None

    def remove(self) -> None:
        """Remove all hooks (the engine captures nothing afterwards) and drop captured state."""
        self._capture.remove()
        self._bound = None
        _SINGLE_BACKWARD_ENGINES.discard(self)

    def compute_gramian(self, losses: Tensor, retain_graph: bool | None = None) -> Tensor:
        """Return the Gramian ``J Jᵀ`` of the Jacobian of ``losses.flatten()``.

        Parameters
        ----------
        losses
            Shape ``[B]`` (``batch_dim`` set), ``[m]`` (``batch_dim=None``) or ``[B, m]``
            (``batch_dim`` set; row ``i * m + k`` of the Gramian is task ``k`` of example ``i``).
            Must come from a forward pass run with the engine enabled and grad mode on.
        retain_graph
            Whether the autograd graph is kept after the call. ``None`` (default): kept, so that
            ``losses.backward(weights)`` can follow, except with ``single_backward`` when
            :meth:`backward` does not need it (every trainable parameter the losses depend on is
            covered by closed forms); freeing it as the pass goes lowers the peak memory. Pass
            ``True`` to call :meth:`check_gramian` in single-backward mode; ``False`` frees it
            whenever :meth:`backward` allows (single-backward mode only).

        Returns
        -------
        Tensor
            The ``[R, R]`` Gramian with ``R = losses.numel()``, in float32 (float64 when the
            parameters are float64).

        Raises
        ------
        RuntimeError
            If no module call was captured, the captures were already used, the losses depend on none
            of them, they use parameters of the engine's modules outside the captured calls, or a tensor a
            captured call keeps (its input) was modified in place after the call.
        ValueError
            If ``retain_graph=False`` without ``single_backward=True``, or if a loss is inf or nan.
        """
        capture = self._capture
        layout, grad_outputs, batched = layout_of_losses(
            losses, capture.batch_dim, capture.batch_size, capture.batch_source
        )
        _check_finite(losses)
        records = [record for record in capture.records if record.edges]
        if not records:
            if capture.consumed:
                raise RuntimeError(
                    "The engine has no captures left: compute_gramian was already called on those of the last forward "
                    "pass run with the engine enabled (they are used once), and no forward pass captured anything "
                    "since (one run with the engine disabled, e.g. under engine.disabled(), captures nothing). Run a "
                    "new forward pass with the engine enabled before computing another Gramian."
                )
            raise RuntimeError(
                "The engine captured no module call: run the forward pass with the engine enabled, "
                "in grad mode, and with trainable parameters in the engine's modules. If it was, the "
                "trainable parameters are only used outside the forward passes of the modules that own "
                "them (e.g. a parent calling F.linear(x, self.child.weight)), which the engine cannot "
                "attribute: use the autojac engine (hf_jd.autojac, jd_engine='autojac'). With torch.compile, "
                "create the engine before the first compiled forward pass (or call torch._dynamo.reset() "
                "after creating it): graphs compiled earlier do not run its hooks."
            )
        capture.records = []
        capture.consumed = True
        checkpointed = capture.checkpointed
        channels_last = capture.channels_last
        for record in records:
            if isinstance(record, GenericRecord):
                record.check_not_modified()
        nodes = list(graph_nodes([losses.grad_fn]))
        in_graph = set(nodes)
        for record in records:
            # Tensors changed in place since the call (also checked when a record is bound): before the engine's own
            # passes, which would meet autograd's error on them naming no module. As autograd, which runs none of
            # their nodes, calls that the losses do not reach are not checked.
            if any(edge.node in in_graph for edge in record.edges):
                record.check_unmodified()
        # (a parametrised weight reused outside the calls covering it: its originals take the exact path instead)
        keep_fully_covered(records, nodes)
        # (before parameters leave the records for the per-row path: theirs count too)
        float64 = any(p.dtype == torch.float64 for record in records for p in record.params.values())
        records = self._uncover_uses_outside_calls(records, nodes)
        consumers = GraphConsumers(losses)
        counts: dict[int, int] = {}
        for record in records:
            for param in record.params.values():
                counts[id(param)] = counts.get(id(param), 0) + 1
        # bf16/fp16 products: check_gramian's identity then holds to the low precision's rounding only.
        self._low_precision = any(record.autocast for record in records) or any(
            p.dtype in (torch.bfloat16, torch.float16) for record in records for p in record.params.values()
        )
        dtype = torch.float64 if float64 else torch.float32
        accumulator = Accumulator(layout, dtype, losses.device, counts, self._single_backward)
        retain = True
        # TF32 convolutions (cuDNN's default) or matrix products: the checks allow for their rounding.
        self._tf32 = not self._low_precision and tf32_in_graph(losses.device, nodes)
        covered = {id(p): p for record in records for p in record.params.values()}
        if layout.batched and layout.batch_dim is not None:
            # Generic calls whose parameters are used by operations with outputs split by example (a mask
            # embedding, a class token) back-propagate from those operations instead of their outputs.
            start_at_uses(records, nodes, layout.batch_dim, layout.num_examples, skip=self._no_direct_uses)
        # Generic calls whose products start at their outputs, from whose inside a tensor reaches the losses another way
        # (a hook keeping a child's output, as transformers records router logits for the load-balancing loss): their
        # parameters are taken from the losses directly (the products from the outputs would miss that path).
        from_outputs = [record for record in records if isinstance(record, GenericRecord) and not record.started_at]
        escaping = escaping_calls(from_outputs, nodes) if from_outputs else []
        for record in escaping:
            for name, param in list(record.params.items()):
                record.uncover_param(name)
                covered.pop(id(param), None)
        if escaping:
            records = [record for record in records if record.params]
        uncovered = uncovered_parameters(nodes, covered)
        own = {id(p) for p in capture.parameters()} if uncovered else set()
        # Parameters of the engine's modules used only outside the calls it captured (a parent calling
        # F.linear(x, self.child.weight)): their per-row gradients come from the losses directly.
        unattributed = [p for p in uncovered if id(p) in own]
        missed = [p for p in unattributed if layout.num_rows * p.numel() > MAX_UNATTRIBUTED_ENTRIES]
        unattributed = [p for p in unattributed if layout.num_rows * p.numel() <= MAX_UNATTRIBUTED_ENTRIES]
        # Those only broadcast over the batch further on (DeBERTa's relative-position table, read without calling its
        # embedding) get their per-example gradients from the ordinary pass, as the shared tables below; those used
        # first by operations split by example (a convolution's weight passed to F.conv1d by its parent), products from
        # those operations, verified like a call's uses.
        parameter_plans, used = self._cover_read_parameters(layout, unattributed, checkpointed, consumers)
        taken = {
            id(p): p for record in [*(plan.record for plan in parameter_plans), *used] for p in record.params.values()
        }
        if taken:
            unattributed = [p for p in unattributed if id(p) not in taken]
            uncovered = [p for p in uncovered if id(p) not in taken]
            covered.update(taken)
            counts.update(dict.fromkeys(taken, 1))
            records = [*records, *used]
        inputs = {id(p): p for record in records for name, p in record.params.items() if name == INPUT_PARAMETER}
        if inputs:  # a parameter covered through the module it is passed to must have no other use
            claimed = {edge.node for record in records if INPUT_PARAMETER in record.params for edge in record.edges}
            missed += other_uses_of_inputs(nodes, inputs, claimed)
        if missed:
            outside_use = (
                "they are used outside the forward pass of the module that owns them (e.g. a parent module calling "
                "F.linear(x, self.child.weight)) and are too large for the engine's per-row backward pass for such "
                f"parameters (R × numel > {MAX_UNATTRIBUTED_ENTRIES} entries), or a parameter passed to a module as "
                "its input is also used elsewhere: call the owning module instead, freeze them, leave their modules "
                "out of the engine (jd_modules), or use the autojac engine (jd_engine='autojac')."
            )
            causes = (
                f"{_SEVERAL_FORWARDS} Or {outside_use}"
                if capture.replaced_forwards
                else f"{outside_use} Or {_SEVERAL_FORWARDS}"
            )
            raise RuntimeError(
                f"The losses depend on {len(missed)} trainable parameter(s) of the engine's modules "
                f"({self._names_of(missed)}) through no module call the engine captured. Either {causes}"
            )
        if self._single_backward:
            # Generic records run vector-Jacobian products on the graph after the pass.
            needs_graph = bool(uncovered) or any(isinstance(record, GenericRecord) for record in records)
            retain = needs_graph if retain_graph is None else bool(retain_graph) or needs_graph
        elif retain_graph is False:
            raise ValueError(
                "retain_graph=False is only possible with Engine(..., single_backward=True): otherwise the "
                "weighted backward losses.backward(weights) needs the graph."
            )
        unaligned = [record for record in records if not record.batched] if layout.batched else []
        if unaligned:
            records = [record for record in records if record.batched]
        plans: list[BroadcastPlan] = []
        plans_key: tuple[Any, ...] = ()
        partial_plans = False
        # Tensors with the batch size along batch_dim and along another dimension (e.g. [B, T, d] with
        # T = B) cannot show whether they are batch- or time-major: their grouping is then verified, unless each
        # such call (the same call of the same module) passed that check on an earlier step (a call seen only
        # time-major with T = 1, or not at all, has not: its [T, B, d] tensors with T = B are checked).
        verify_layout = layout.batch_dim is not None and any(
            (record.layout_unclear or _coincident_sizes(record, layout.batch_dim, layout.num_examples))
            and not capture.batch_major_verified(record)
            for record in records
        )
        # Once the model's [B, T, d] calls are verified batch-major, a [1, T, d] table with T = B (BERT's position
        # embeddings) is broadcast over the batch like any other table. Before, only the calls with no size equal to
        # the batch size may be planned (LED's [T, d] position tables beside the embedding of the ids it pads inside
        # the model, whose gradients are zero, so that its layout check never tells).
        tables = (
            unaligned
            if not verify_layout
            else [record for record in unaligned if not _has_size(record, layout.num_examples)]
        )
        if tables and not capture.unaligned_besides(unaligned):
            # Outputs shared by all examples and only broadcast over the batch further on (BERT's [1, T, d]
            # position embeddings, T5's relative-position bias): per-example gradients from the ordinary pass.
            assert layout.batch_dim is not None
            # Under activation checkpointing, only through nodes that read no saved tensor: the plans call
            # autograd nodes, whose checkpointed saved tensors may be unpacked only once per backward pass.
            plans = plan_broadcasts(
                losses, tables, layout.batch_dim, layout.num_examples, checkpointed, consumers=consumers.get()
            )
            if not plans and len(tables) > 1:
                # Else the calls that can be planned (a shared table beside a Linear layer on flattened [B * T, d]
                # rows or beside time-major calls; also a table whose length happens to be a multiple of the batch
                # size, e.g. LED's [T, d] position tables, which would otherwise be taken for regrouped rows and
                # fail their check); the others take the verification or the per-row path below.
                plans = plan_broadcasts(
                    losses, tables, layout.batch_dim, layout.num_examples, checkpointed, partial=True,
                    consumers=consumers.get(),
                )
            # (a call left unplanned may be a table that carries a batch statistic to the examples, which
            # would reach the planned tables' broadcasting nodes: they are checked as for mixed examples)
            partial_plans = bool(plans) and len(plans) < len(unaligned)
        plans += parameter_plans
        planned = {id(plan.record) for plan in plans}
        if plans:
            unaligned = [record for record in unaligned if id(record) not in planned]
            records = records + [plan.record for plan in plans]
            attach_plans(plans, accumulator)
            # Kept for the exact per-row path, should a plan fail; not in single-backward mode once plans of the same
            # structure succeeded (the failures depend on the nodes and shapes only), so that the pass frees the
            # activations as it goes (BERT's position table: 1.44x a plain step's peak memory instead of 1.65x).
            plans_key = plan_structure(plans)
            plans_known = self._single_backward and not retain_graph and not batched and plans_key in self._planned
            retain = retain if plans_known else True
        # Compiled backward kernels cannot be vmapped, nor can the random operations (dropout) of
        # checkpointed blocks re-run inside a vmapped backward pass, nor the backward kernels of
        # group norms and max_unpool of channels-last tensors, nor cuDNN's recurrent layers, nor a kernel whose
        # vmapped pass failed on an earlier step: one vector at a time then.
        one_at_a_time = (
            checkpointed
            or self._vmap_failed
            or vmap_rejects_channels_last(nodes, losses.device, channels_last)
            or has_compiled_nodes(nodes)
            or has_unbatchable_nodes(nodes)
        )
        covered_params = list(covered.values())
        # (also asked for by the single backward's pass for uncovered parameters, see _Bound)
        guards = group_norm_guards(nodes)

        @contextmanager
        def backpropagating() -> Iterator[None]:
            """The context of the engine's own backward passes."""
            with (
                no_gradient_writes(covered_params, lambda index: self._name_of(covered_params[index])),
                capture.backpropagating(),
                one_vector_at_a_time(one_at_a_time),
                guarding_group_norms(guards),
                recording_vmap_failures() as failures,
            ):
                try:
                    yield
                except VmapFailure:
                    self._vmap_failed = True
                    raise
                finally:
                    if failures:
                        self._note_vmap_failures(failures)

        identity_rtol = (
            LOW_PRECISION_IDENTITY_RTOL if self._low_precision else TF32_IDENTITY_RTOL if self._tf32 else IDENTITY_RTOL
        )
        with backpropagating(), explain_donated_buffers():
            # Losses that mix the examples (an in-batch contrastive loss) show where they reach the calls closest
            # to them, operations that mix them between layers at the model's first calls: both checked on the
            # first step of each loss computation (two ordinary backward passes; a vmapped pass falls back to slow
            # loops for some loss kernels). A computation found mixing them has every call verified on every step.
            mixed = False
            # Every call's grouping is verified on this step (one pass over two vectors, remembering nothing) when the
            # model was given, beside its main input, a floating tensor with the batch size along batch_dim (a
            # vision-language model's pixel_values with as many images as examples: its rows may be images, not
            # examples, arranged differently from step to step on the same shapes), or when a checked call's output
            # gradients were all zero (a vision tower whose gradients vanish, a LoRA A while B is zero): examples moved
            # around between it and the losses would not show in its check.
            verify_all = capture.secondary_batch_sized
            if not (unaligned or verify_layout) and layout.batch_dim is not None and layout.num_examples > 1:
                reached, structure = frontier(losses, records)
                # (per batch size too: a fixed roll along the batch mixes the examples for some sizes only)
                structure = (*structure, f"B={layout.num_examples}")
                known = self._loss_computations.get(structure)
                if known is None:
                    checked = [record for record in reached if id(record) not in planned]
                    if structure not in self._sources_checked:
                        # Once per loss computation, the first calls of the model too (those whose inputs do not
                        # require grad): examples mixed anywhere downstream, between two layers as well as in the
                        # losses, show in their output gradients (two full backward passes, the first step only).
                        if len(self._sources_checked) >= MAX_LOSS_COMPUTATIONS:
                            self._sources_checked.clear()
                        self._sources_checked.add(structure)
                        reached_ids = {id(record) for record in checked}
                        checked += [
                            record
                            for record in records
                            if record.is_source and id(record) not in planned and id(record) not in reached_ids
                        ]
                    unseen: list[Record] = []  # all-zero output gradients (a LoRA A while B is zero) show no mixing
                    # Also at the nodes where planned tables meet the examples: examples mixed after them (a batch
                    # statistic of the sum of the inputs and a position table) show there even without a call before.
                    plan_nodes = broadcast_nodes(plans)
                    separate: list[bool] = []
                    with one_vector_at_a_time(True):
                        failed = grads_verified(
                            losses, layout, checked, accumulator, add=False, rtol=identity_rtol, vacuous=unseen,
                            nodes=plan_nodes, nodes_grouped=separate,
                        )
                    known = bool(failed) or not all(separate)
                    # Rows picked by the data (mined pairs) are checked every step, and so is a computation whose
                    # check could not see the examples through some call, or one where products started at the
                    # uses of some call's parameters fail (checked again next step without that).
                    retry = self._direct_uses_failed(failed)
                    if not retry and (known or ("?" not in structure and not unseen)):
                        self._remember_loss_computation(structure, known)
                    if retry or unseen:
                        # (the model's first calls are checked again on the next step of this computation: this check
                        # could not see through some call, or is redone without the products from the uses)
                        self._sources_checked.discard(structure)
                    verify_all = verify_all or (bool(unseen) and not known)
                mixed = known
            # (with mixed examples, every planned table's broadcasting node is checked, not only the grouped ones)
            grouped_nodes = broadcast_nodes(plans) if mixed or partial_plans else grouped_paths(plans)
            if (unaligned or verify_layout or mixed or grouped_nodes or verify_all) and layout.num_tasks == 1:
                # Tensors not split by example: the model moves examples around, so every call
                # whose shapes allow a per-example grouping has it verified (one backward pass
                # over two vectors); the others and the failures take the exact per-row path.
                # The planned calls get their per-example gradients from the ordinary pass below.
                regrouped, unaligned = _regroup_candidates(unaligned)
                checked = [record for record in records if id(record) not in planned] + regrouped
                records = [record for record in records if id(record) in planned]
                # A pass of the same structure as one verified earlier (OPT's reshapes to [B * T, d] rows, time-major
                # layers, Swin's windows and the tables broadcast over them) has the same grouping: added from one
                # plain backward pass, unchecked, unless rows are selected by the data somewhere (mixture-of-experts
                # tokens), or some call takes the per-row path.
                # (also per batch size: a fixed roll along the batch is the identity for some sizes only)
                shape_free = (
                    regrouping_structure(nodes, checked + [plan.record for plan in plans], _buffer_storages(capture))
                    if not (verify_layout or mixed or unaligned or verify_all)
                    else None
                )
                pass_structure = None if shape_free is None else (*shape_free, f"B={layout.num_examples}")
                trusted = None if pass_structure is None else self._verified_groupings.get(pass_structure)
                chosen: list[bool] = []
                vacuous: list[Record] = []  # passed checks that could not fail: nothing to remember from them
                # Plans for tables broadcast over [B * k, ...] rows (Swin's windows) assume k consecutive rows per
                # example: checked in the same pass.
                grouped: list[bool] = []
                # A trusted grouping takes one ordinary pass: the planned tables get their per-example gradients from
                # that pass too (their hooks on), instead of from a second one below.
                merged = trusted is not None and bool(plans) and not batched
                with ExitStack() as stack:
                    if merged:
                        for plan in plans:
                            stack.enter_context(plan.hooks())
                    failed = grads_verified(
                        losses, layout, checked, accumulator, rtol=identity_rtol, trusted=trusted, chosen=chosen,
                        vacuous=vacuous, nodes=grouped_nodes if trusted is None else (), nodes_grouped=grouped,
                        passing=[edge for record in records for edge in record.edges] if merged else (),
                        measure_rounding=not mixed,
                    )
                if merged:
                    records = []  # (the planned calls: done)
                self._direct_uses_failed(failed)
                if pass_structure is not None and trusted is None and not failed and not vacuous and all(grouped):
                    if len(self._verified_groupings) >= MAX_LOSS_COMPUTATIONS:
                        self._verified_groupings.clear()
                    self._verified_groupings[pass_structure] = tuple(chosen)
                # (failed modules keep the exact paths)
                _remember_layouts(capture, verify_layout, checked, failed, vacuous, chosen)
                if not mixed:
                    # Linear calls on rows the data picks from the examples (adapters per language, experts): each
                    # row's example found from gradients, they join the calls split by example (and a failure of that
                    # kind leaves the planned tables their plans).
                    failed, unaligned = self._gathered(losses, layout, failed, unaligned, accumulator)
                unaligned += failed
                if (failed or not all(grouped)) and plans:
                    # Some calls are not split by example (e.g. a contrastive loss mixes the examples), or a table's
                    # [B * k, ...] rows are not grouped by example: the planned tables' per-example gradients, which
                    # assume separate examples, take the exact path too.
                    unaligned += [plan.record for plan in plans]
                    accumulator.deferred -= planned
                    records = []  # the planned calls only, at this point
                    plans = []
            elif verify_layout or mixed or unaligned or grouped_nodes or verify_all:
                # Per-example task losses [B, m]: the grouping is verified (per-example weights, the
                # same for every task), then the confirmed calls take the batched pass over the tasks. Also
                # when some call is not split by example (a shared table): the check for losses that mix the
                # examples is skipped then, and this one catches them, as for [B] losses.
                # Calls whose shapes allow a per-example grouping (OPT's [B * T, d] rows, Swin's windows, tokens
                # routed to experts, time-major layers) are verified in the same pass and then take the pass over
                # the tasks in that grouping (grads_at_once follows Record.confirmed_grouping).
                vacuous = []
                regrouped, unaligned = _regroup_candidates(unaligned)
                checked = [record for record in records if id(record) not in planned] + regrouped
                chosen = []
                grouped = []
                failed = grads_verified(
                    losses, layout, checked, accumulator, add=False, rtol=identity_rtol, vacuous=vacuous,
                    chosen=chosen, nodes=grouped_nodes, nodes_grouped=grouped, confirm=True,
                    measure_rounding=not mixed,
                )
                self._direct_uses_failed(failed)
                _remember_layouts(capture, verify_layout, checked, failed, vacuous, chosen)
                records = records + [record for record in regrouped if all(record is not other for other in failed)]
                gathered = {id(record) for record in failed}
                if not mixed:  # (rows picked by the data, each of one example: as for [B] losses)
                    failed, unaligned = self._gathered(losses, layout, failed, unaligned, accumulator)
                gathered -= {id(record) for record in failed}
                if (failed or not all(grouped)) and plans:
                    # Examples mixed somewhere, or a table's [B * k, ...] rows not grouped by example: the planned
                    # tables take the exact path too.
                    failed += [plan.record for plan in plans]
                    accumulator.deferred -= planned
                    plans = []
                records = [
                    record
                    for record in records
                    if all(record is not other for other in failed) and id(record) not in gathered
                ]
                unaligned += failed
            if unaligned:
                grads_per_row(losses, layout, unaligned, accumulator)
                if not mixed:  # (losses that mix the examples have their own warning)
                    self._warn_per_row(unaligned, layout, one_time=verify_layout)
            with ExitStack() as stack:
                if not batched:  # (a pass batched over tasks gives the plans the gradients of their nodes instead)
                    for plan in plans:
                        stack.enter_context(plan.hooks())
                if records and (batched or not retain):
                    grads_at_once(
                        losses, grad_outputs, records, accumulator, batched=batched, retain_graph=retain,
                        plans=plans if batched else (),
                    )
                elif records:
                    grads_streamed(losses, grad_outputs, records, accumulator)
        accumulator.deferred = set()
        failed = [plan.record for plan in plans if not plan.added]
        if plans and not failed:
            if len(self._planned) >= MAX_LOSS_COMPUTATIONS:
                self._planned.clear()
            self._planned.add(plans_key)  # (plans are only ever dropped after it was computed)
        if failed and not retain:
            raise RuntimeError(
                "hf_jd.autogram: a table shared by the examples was planned like on an earlier step of the same "
                f"structure, but the plan failed this time ({', '.join(r.describe() for r in failed)}), after the "
                "graph was freed. Call compute_gramian(losses, retain_graph=True) to keep the exact fallback, and "
                "please report this model."
            )
        if failed:  # a broadcasting node did not give per-example gradients: the exact per-row path
            with backpropagating():
                grads_per_row(losses, layout, failed, accumulator)
            self._warn_per_row(failed, layout)
        if unattributed:
            # (not for parameters whose handling changes from the next forward pass on, see Capture.switched_now)
            lasting = [param for param in unattributed if id(param) not in capture.switched_now]
            if lasting:
                self._warn_unattributed(lasting)
            with backpropagating():
                accumulator.gramian += unattributed_gram(losses, layout.num_rows, unattributed, dtype)
        del records
        if accumulator.bound == 0 and not unattributed:
            raise RuntimeError(
                "The losses depend on none of the module calls the engine captured: compute_gramian needs the "
                "losses of the last forward pass run with the engine enabled (each new forward pass of a module "
                "given to the engine replaces the captures; a forward pass run with the engine disabled captures "
                "nothing), computed from the outputs of the engine's modules. The captures are dropped: run "
                "the forward pass again."
            )
        gramian = accumulator.finish()
        if self._single_backward:
            # Parameters another enabled single-backward engine covers get their gradients from its backward()
            # (a disabled one, e.g. a JDTrainer's between its steps, writes nothing).
            others = {
                id(p)
                for engine in list(_SINGLE_BACKWARD_ENGINES)
                if engine is not self and engine.enabled
                for p in engine.parameters()
            }
            not_covered = [param for param in uncovered if id(param) not in others]
            self._bound = _Bound(
                layout, losses.shape, losses if retain else None, accumulator.uses, accumulator.params, not_covered,
                guards if not_covered and retain else [],
            )
        return gramian

    def check_gramian(
        self, losses: Tensor, gramian: Tensor, weights: Tensor | None = None, rtol: float = 1e-3
    ) -> bool:
        """Raise if ``gramian`` misses part of the Jacobian, by an exact identity checked with one
        extra backward pass (meant for a first step, not every step).

        For any weights ``w``, the gradient of ``Σ_r w_r L_r`` w.r.t. the covered parameters is
        ``Jᵀ w``, so ``‖Jᵀ w‖² = wᵀ (J Jᵀ) w``. The left side is computed by autograd (which sees
        every use of every parameter), the right side from the engine's Gramian; they differ when a
        parameter is used where the engine cannot see it, e.g. by a module that does not own it.

        Call it after :meth:`compute_gramian` and before the weighted backward (it needs the graph,
        which it retains). Nothing is written to ``.grad`` and no gradient hook fires.

        Parameters
        ----------
        losses
            The losses given to :meth:`compute_gramian`.
        gramian
            Its result.
        weights
            Shape ``[R]`` or the losses' shape; by default a fixed ramp from 0.5 to 1.5 (the
            identity holds for every ``w``; unequal weights also test the cross terms).
        rtol
            Relative tolerance of the comparison; raised to at least ``5e-2`` when the Gramian came
            from bf16/fp16 parameters or products under autocast (their rounding alone moves the two
            sides apart by a few 1e-3, while a missing use of a parameter moves them by much more).

        Returns
        -------
        bool
            ``True`` when verified; ``False`` when the batch cannot tell: both sides are negligible,
            ``‖θ‖ · max(‖Jᵀw‖, √(wᵀGw)) < 10⁻³ Σ_r w_r |L_r|`` (per-example gradients that cancel,
            e.g. multiple choice with identical choices, leave only float32 rounding, which differs
            between the two computations). Check again on another batch then.

        Raises
        ------
        RuntimeError
            If the two sides differ by more than ``rtol`` (relative to the larger one), unless the
            batch cannot tell (see above).
        """
        if not isinstance(losses, Tensor) or not isinstance(gramian, Tensor):
            raise TypeError("check_gramian expects the losses and the Gramian as torch.Tensor objects.")
        num_rows = losses.numel()
        if gramian.shape != (num_rows, num_rows):
            raise ValueError(
                f"The Gramian has shape {tuple(gramian.shape)} but the losses have {num_rows} entries; pass "
                "the losses given to compute_gramian and its result."
            )
        if weights is None:
            weights = torch.linspace(0.5, 1.5, num_rows, device=losses.device)
        if weights.numel() != num_rows:
            raise ValueError(f"weights must have {num_rows} entries (one per loss), got {weights.numel()}.")
        if not losses.requires_grad:
            raise ValueError("losses do not require grad: pass the losses given to compute_gramian.")
        if self._single_backward and self._bound is not None and self._bound.losses is None:
            raise RuntimeError(
                "check_gramian needs the autograd graph, which compute_gramian freed (single-backward mode): "
                "call compute_gramian(losses, retain_graph=True) before check_gramian."
            )
        if self._low_precision:
            rtol = max(rtol, LOW_PRECISION_RTOL)
        elif self._tf32:
            rtol = max(rtol, TF32_RTOL)
        params = self.parameters()
        flat_weights = weights.detach().reshape(-1)
        weighted = (flat_weights.to(losses.dtype) * losses.reshape(-1)).sum()
        was_enabled = self.enabled
        self.enabled = False  # a forward re-run inside this backward must not be captured
        try:
            grads = guarded_grad([weighted], params, retain_graph=True, allow_unused=True)
        finally:
            self.enabled = was_enabled
        actual = sum(float(g.double().pow(2).sum()) for g in grads if g is not None)
        w64 = flat_weights.double().to(gramian.device)
        expected = float(w64 @ gramian.double() @ w64)
        # The rounding of both sides, which weights whose weighted gradient nearly cancels (wᵀ G w far below the
        # Gramian's scale) can make larger than rtol of them: each entry G_ij is a sum of per-layer terms bounded by
        # sqrt(G_ii G_jj) in all, so wᵀ G w is off by at most a few ε (per layer) of (Σ |w_i| sqrt(G_ii))².
        precision = torch.bfloat16 if self._low_precision else gramian.dtype
        epsilon = TF32_EPSILON if self._tf32 and not self._low_precision else torch.finfo(precision).eps
        diagonal = gramian.double().diagonal().clamp(min=0).sqrt()
        rounding = ROUNDING_FACTOR * epsilon * float(w64.abs() @ diagonal) ** 2
        if abs(actual - expected) <= rtol * max(abs(actual), abs(expected)) + rounding + 1e-30:
            return True
        norm = math.sqrt(sum(float(param.detach().double().pow(2).sum()) for param in params))
        loss_scale = float((flat_weights.double().abs() * losses.detach().reshape(-1).double().abs()).sum())
        if norm * math.sqrt(max(actual, expected, 0.0)) < INCONCLUSIVE_RATIO * loss_scale:
            return False
        raise RuntimeError(
            "The autogram engine's Gramian does not account for all uses of the covered parameters: "
            f"‖Jᵀw‖² = {actual:.6g} by autograd but wᵀ G w = {expected:.6g} from the Gramian (relative "
            f"difference {abs(actual - expected) / max(abs(actual), abs(expected)):.2e}). Known causes: a "
            "parameter used outside the forward pass of the module that owns it in a way the engine cannot "
            "attribute (e.g. a parent module calling F.linear(x, self.child.weight) instead of self.child(x)): "
            "call the owning module instead, freeze that parameter, or leave its module out of the engine "
            "(jd_modules); per-example task losses shaped [m, B] instead of [B, m] (examples first); and, when the "
            f"per-example gradients are tiny or nearly cancel (‖Jᵀw‖² = {actual:.3g} here), float32 rounding, "
            "which the same check on a float64 copy of the model (model.double()) tells apart. If none applies, "
            "this is a bug of hf_jd's autogram engine: please report it with the model's configuration and the "
            "inputs. The autojac engine (jd_engine='autojac', or hf_jd.autojac) is exact meanwhile."
        )

    def backward(self, weights: Tensor) -> None:
        """Accumulate the gradient of ``Σ_r w_r L_r`` into ``.grad`` without a second backward
        through the network (needs ``Engine(..., single_backward=True)`` and a preceding
        :meth:`compute_gramian`).

        Covered parameters get their gradient from the captured factors (e.g. ``(diag(w) G)ᵀ A``
        for a Linear layer), delivered through autograd so that gradient hooks (DDP, Accelerate)
        fire. Trainable parameters that the losses depend on but that the engine does not cover
        get theirs by an ordinary weighted backward restricted to them, except those covered by
        another live, enabled engine with ``single_backward=True``: with several such engines (one
        per model, losses summed or models stacked), call each one's :meth:`backward`; call
        :meth:`remove` on (or disable) an engine that is no longer used.

        Parameters
        ----------
        weights
            Shape ``[R]`` (as returned by a weighting) or the shape of the losses.

        Raises
        ------
        RuntimeError
            Without ``single_backward=True``, or without a preceding :meth:`compute_gramian`, or if a
            tensor a captured call keeps was modified in place since the call.
        TypeError
            If ``weights`` is not a tensor.
        ValueError
            If ``weights`` has neither shape ``[R]`` nor the losses' shape.
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
            bound.shape,
        ):
            raise ValueError(
                f"weights must have shape [{layout.num_rows}] or the losses' shape "
                f"{tuple(bound.shape)}, got {tuple(weights.shape)}."
            )
        table = weights.detach().reshape(layout.num_examples, layout.num_tasks)
        # A forward tensor the records still read changed in place since compute_gramian: raise as autograd would,
        # before any gradient is computed or written.
        for param_uses in bound.uses.values():
            for record, _ in param_uses:
                record.check_unmodified()
        self._bound = None
        remaining: dict[int, int] = {}  # uses left per record, to release its factors early
        for param_uses in bound.uses.values():
            for record, _ in param_uses:
                remaining[id(record)] = remaining.get(id(record), 0) + 1
        params: list[Tensor] = []
        grads: list[Tensor] = []
        for key, param_uses in bound.uses.items():
            param = bound.params[key]
            reached = [(record, name) for record, name in param_uses if record.reaches(name)]
            if reached:  # like a backward pass, leave the .grad of a parameter the losses do not reach alone
                first, first_name = reached[0]
                grad = first.weighted_grad(first_name, first.weights_table(table))
                for record, name in reached[1:]:
                    grad = grad + record.weighted_grad(name, record.weights_table(table))
                params.append(param)
                grads.append(grad.to(param.dtype))
                del grad
            for record, _ in param_uses:
                remaining[id(record)] -= 1
                if remaining[id(record)] == 0:
                    record.release()
        bound.uses.clear()
        if bound.uncovered:
            assert bound.losses is not None
            # Other engines bound to the same losses (one engine per sub-model) whose backward is still to come: the
            # parameters none of them covers get their gradient here, once, and the graph stays for those engines.
            pending = [
                engine._bound
                for engine in _SINGLE_BACKWARD_ENGINES
                if engine is not self and engine._bound is not None and engine._bound.losses is bound.losses
            ]
            torch.autograd.backward(
                bound.losses, weights.detach().reshape(bound.losses.shape).to(bound.losses.dtype),
                # (the guards' gradients are not kept: they are not leaves)
                inputs=[*bound.uncovered, *bound.guards],  # type: ignore[arg-type]
                retain_graph=bool(pending),
            )
            done = {id(param) for param in bound.uncovered}
            for other in pending:
                other.uncovered = [param for param in other.uncovered if id(param) not in done]
        if params:
            deliver_gradients(params, grads)
