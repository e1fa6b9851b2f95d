"""Forward hooks of the autogram engine: what each parametrised module call leaves behind.

Every module with direct parameters gets a pre-hook and a hook. When capturing (engine enabled,
grad mode on), the hook builds a :class:`~._record.Record` of the call: the tensors its closed form
needs and the gradient edges of its outputs. It never changes the shapes or values a module
returns: an output of size 1 along ``batch_dim`` (BERT's ``[1, T, d]`` position embeddings) is a
table shared by the examples, whose per-example gradients the engine gets otherwise (see
:mod:`._broadcast`). The capture also tracks the batch size, rejects modules that mix examples
(BatchNorm in training mode) and forward passes re-run inside the engine's own backward pass
(gradient checkpointing), and signals when a given module starts a new forward.
"""

from __future__ import annotations

import itertools
import warnings
from contextlib import contextmanager
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.nn.utils import parametrize

from ._batched_grad import guarded_grad, is_channels_last
from ._dispatch import Kind, closed_form_parameters, kind_of, mixes_examples, parametrized_kind, record_class
from ._embedding import EmbeddingRecord, computes_scaled_lookup, embedding_scale, is_embedding_subclass
from ._group_norm import computes_channel_norm
from ._layer_norm import computes_layer_norm, is_layer_norm_like
from ._linear import computes_linear, is_linear_subclass
from ._node_structure import GATHER_NODES
from ._generic import (
    GenericRecord,
    alias_outputs,
    borrowed_submodules,
    direct_parameters,
    install_aliases,
    restore_parameters,
    tensors_in,
)
from ._param_uses import autocast_enabled, next_sequence_number
from ._parametrized import (
    ParametrizedTensor,
    cached_tensor,
    originals_of,
    parametrization_lists,
    parametrized_record,
)
from ._record import Record
from ._rms_norm import RMSNormRecord

__all__ = ["Capture", "describe"]


def in_backward_pass() -> bool:
    """Whether this thread is running a backward pass (autograd graph task): a module forward then
    recomputes activations of a non-reentrant checkpointed block.

    Returns
    -------
    bool
        ``True`` inside a backward pass.
    """
    return torch._C._current_graph_task_id() != -1


def _saved_tensors_hooks() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """The innermost active saved-tensor hooks ``(pack, unpack)``, or ``None``."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(True)
    except (AttributeError, RuntimeError):  # pragma: no cover - depends on the torch version
        return None


def recomputing_checkpoint() -> bool:
    """Whether this is torch.utils.checkpoint re-running a non-reentrant checkpointed block (in a
    backward pass, to recompute the tensors its autograd nodes saved).

    Returns
    -------
    bool
        ``True`` during a checkpoint recomputation.
    """
    hooks = _saved_tensors_hooks()
    name = "" if hooks is None else getattr(hooks[0], "__qualname__", "")
    # The recomputation of an outer checkpointed block re-runs the checkpointed blocks nested in it (Swin checkpoints
    # its stages and their layers), whose forward passes then run under their own checkpoint hooks.
    return name.startswith(("_recomputation_hook.", "_checkpoint_hook."))


def saved_tensors_hooked() -> bool:
    """Whether saved-tensor hooks are active (e.g. inside a non-reentrant checkpointed block, whose
    autograd nodes' saved tensors can then be unpacked only once per backward pass).

    Returns
    -------
    bool
        ``True`` when some saved-tensor hooks are active.
    """
    return _saved_tensors_hooks() is not None


# Frame of a module call that re-runs a captured one inside a backward pass (activation checkpointing).
_RECOMPUTED = object()
# Frame of a ParametrizationList call inside a call of its module whose closed form covers its originals.
_CLAIMED = object()


def describe(name: str, module: nn.Module) -> str:
    """``name (Type)`` of a module, for error messages.

    Parameters
    ----------
    name
        The module's qualified name (empty for a root module; ``"k."`` for the ``k``-th of several roots).
    module
        The module.

    Returns
    -------
    str
        The description.
    """
    if not name:
        return f"{type(module).__name__} (a module given to the engine)"
    if name.endswith(".") and name[:-1].isdigit():
        return f"{type(module).__name__} (module {name[:-1]} of those given to the engine)"
    return f"{name} ({type(module).__name__})"


@dataclass
class _ModuleInfo:
    module: nn.Module
    name: str
    kind: Kind
    borrowed: dict[str, nn.Module] = field(default_factory=dict)
    trainable_descendants: list[nn.Module] = field(default_factory=list)
    frames: list[Any] = field(default_factory=list)
    unaligned: bool = False  # seen with tensors not split by example along batch_dim
    # The calls of a forward pass (by index, see Record.call_index) that, split along batch_dim, passed the
    # batch-major check: only those (a call seen time-major with T = 1 says nothing about its [T, B, d] tensors
    # when T = B, nor one call of a module about another).
    batch_major_calls: set[int] = field(default_factory=set)
    # An nn.Linear / nn.Embedding subclass with a forward of its own, or a layer-norm look-alike: handled
    # generically until its first captured call shows that it computes F.linear / a scaled lookup / a
    # layer norm over the last dimension, then by the closed form (this kind).
    candidate: Kind | None = None
    # A norm look-alike (not a stock module) in a closed form: its form is verified again on every call.
    look_alike: bool = False
    embedding_scale: float = 1.0
    # A stock Linear / Conv with a parametrised weight (weight norm): its closed form covers the originals,
    # from the weight its ParametrizationList computes inside the call (see _parametrized).
    parametrized: bool = False
    claimed: Tensor | None = None  # the parametrised weight of its last captured call
    hook_id: int | None = None  # the id of the engine's forward hook on the module (first of its forward hooks)


def _note_descendants(info: _ModuleInfo) -> None:
    """For a module on the generic path: the submodules it uses without calling them (borrowed) and its trainable
    descendants, whose calls it checks."""
    module = info.module
    info.borrowed = borrowed_submodules(module)
    # The ParametrizationLists of a parametrised module without a closed form (a weight-normalised ConvTranspose1d):
    # their originals are the module's own, aliased for each call like its direct parameters, and the weight they
    # compute inside the call is followed through to its uses (see Capture._claims_call).
    info.borrowed.update({f"parametrizations.{name}": plist for name, plist in parametrization_lists(module).items()})
    # Submodules used directly by this module or by a descendant (nn.MultiheadAttention's out_proj, also under a
    # parent with parameters of its own) are not called.
    borrowed_ids = {id(sub) for owner in module.modules() for sub in borrowed_submodules(owner).values()}
    borrowed_ids |= {id(sub) for sub in info.borrowed.values()}
    info.trainable_descendants = [
        sub
        for sub in module.modules()
        if sub is not module and id(sub) not in borrowed_ids and any(True for _ in sub.parameters(recurse=False))
    ]


def _make_generic(info: _ModuleInfo) -> None:
    """Switch a module from its closed form to the generic path, from its next call on (see
    Capture._leave_closed_form)."""
    info.kind, info.candidate, info.look_alike = Kind.GENERIC, None, False
    _note_descendants(info)


def _unbatched_convolution(module: nn.Module, args: tuple[Any, ...]) -> bool:
    """Whether a convolution is called on an unbatched input (``[C, L]`` for a Conv1d: one dimension per kernel
    dimension, plus the channels)."""
    kernel = getattr(module, "kernel_size", None)
    inputs = args[0] if args else None
    return isinstance(kernel, tuple) and isinstance(inputs, Tensor) and inputs.dim() == len(kernel) + 1


def _hooks_run_before_the_engines(info: _ModuleInfo) -> bool:
    """Whether forward hooks that may change a module's output run before the engine's hook sees it: global ones
    (``nn.modules.module.register_module_forward_hook``, which always run first) or the module's own registered with
    ``prepend=True`` after the engine's."""
    if nn.modules.module._global_forward_hooks:
        return True
    hooks = info.module._forward_hooks
    return bool(hooks) and next(iter(hooks)) != info.hook_id


# Why a module leaves its closed form for the generic path (see Capture._leave_closed_form): the cause, as
# "module X has <cause>", and what to do about it.
_LEAVING: dict[str, tuple[str, str]] = {
    "hooks": (
        "forward hooks that run before the engine's (global hooks from "
        "torch.nn.modules.module.register_module_forward_hook, or hooks registered with prepend=True after the engine "
        "was created), which may change its output from the module's own that the closed forms assume",
        "Register such hooks on the module without prepend=True to keep the closed forms, or remove them while "
        "training.",
    ),
    "forward": (
        "a forward replaced on the instance (module.forward = ...), which may compute something else than the "
        "class's forward that the closed forms assume",
        "To keep the closed form, restore the class's forward (del module.forward) while training.",
    ),
    "unbatched": (
        "an unbatched input (no sample dimension, e.g. [C, L] for a Conv1d), which the closed forms of convolutions "
        "do not take",
        "Pass batched inputs ([1, C, L] for one sample) to keep the closed form.",
    ),
}

# Convolution kinds, whose inputs have a sample dimension, channels, then one dimension per kernel dimension.
_CONVOLUTIONS = frozenset({Kind.CONV2D, Kind.GROUPED_CONV, Kind.CONV_TRANSPOSE})


@dataclass
class _Frame:
    params: dict[str, nn.Parameter]
    aliases: dict[str, Tensor] | None
    descendant_calls: list[int] | None
    # Autograd sequence number when the call started (nodes it creates get numbers from here on).
    first_node: int | None = None
    autocast: bool = False
    # Parametrised tensors computed inside the call (by their ParametrizationList), by name.
    parametrized: dict[str, Tensor] | None = None




# Nodes of reshaping operations looked through to find such an index (``h[None, idx].reshape(-1, d)``).
_RESHAPE_NODES = frozenset({
    "AliasBackward0", "CloneBackward0", "ReshapeAliasBackward0", "SqueezeBackward0", "SqueezeBackward1",
    "SqueezeBackward2", "ToCopyBackward0", "UnsafeViewBackward0", "UnsqueezeBackward0", "ViewBackward0",
})


# The forward passes of torch's recurrent layers, whose output layout their documentation fixes.
_RECURRENT_FORWARDS = (nn.RNN.forward, nn.LSTM.forward, nn.GRU.forward)


def _stock_recurrent(module: nn.Module) -> bool:
    """Whether ``module`` is a recurrent layer of torch running its own forward pass (a subclass may return
    something else)."""
    return isinstance(module, nn.RNNBase) and type(module).forward in _RECURRENT_FORWARDS


def _stock_attention(module: nn.Module) -> bool:
    """Whether ``module`` is torch's ``nn.MultiheadAttention`` running its own forward pass."""
    return isinstance(module, nn.MultiheadAttention) and type(module).forward is nn.MultiheadAttention.forward


def documented_output_dims(module: nn.Module, output: Any) -> list[int] | None:
    """The dimension holding the batch in each tensor of ``output``, for torch modules whose documentation fixes
    it differently for different outputs (as found in ``tensors_in(output)``), on 3-D batched inputs:

    - ``nn.RNN``, ``nn.LSTM``, ``nn.GRU``: ``[B, T, h]`` outputs with ``batch_first`` (``[T, B, h]`` without),
      ``[layers, B, h]`` final states either way;
    - ``nn.MultiheadAttention``: ``[B, T, d]`` outputs with ``batch_first`` (``[T, B, d]`` without), and
      ``[B, (heads,) T, S]`` attention weights either way when it returns them.

    ``None`` for other calls (subclasses with their own ``forward``, packed sequences, unbatched inputs).

    Parameters
    ----------
    module
        The module called.
    output
        What it returned.

    Returns
    -------
    list of int or None
        One dimension per tensor of the output, or ``None``.
    """
    recurrent = _stock_recurrent(module)
    if not recurrent and not _stock_attention(module):
        return None  # (before reading the output: this runs on every generic call of the forward pass)
    tensors = tensors_in(output)
    if not tensors or tensors[0].dim() != 3:
        return None  # (a packed sequence's data is [N, h]; unbatched inputs give [T, h])
    if recurrent:
        if len(tensors) < 2 or any(tensor.dim() != 3 for tensor in tensors):
            return None
        return [0 if cast(nn.RNNBase, module).batch_first else 1] + [1] * (len(tensors) - 1)
    batch = 0 if cast(nn.MultiheadAttention, module).batch_first else 1
    if len(tensors) == 1:  # (need_weights=False: the weights are None)
        return [batch]
    if len(tensors) == 2 and tensors[1].dim() in (3, 4):
        return [batch, 0]
    return None


# The keyword inputs of transformers models that hold one row per example, in order of precedence: when a root
# module is called with keywords only, the first one present gives the batch size.
_MAIN_INPUTS = ("input_ids", "inputs_embeds", "input_values", "input_features", "past_values")


def _gathered(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether the first tensor input of a call was produced by indexing (``h[idx]``, ``index_select``,
    ``gather``), possibly reshaped afterwards: its rows need not be the examples in order, even when
    there are as many. (Later calls on the same rows are covered by the verification that this one
    triggers for every call of the pass.)"""
    inputs = tensors_in(args) or tensors_in(kwargs)
    node = inputs[0].grad_fn if inputs else None
    for _ in range(8):
        name = type(node).__name__
        if name in GATHER_NODES:
            return True
        if node is None or name not in _RESHAPE_NODES or not node.next_functions:
            return False
        node = node.next_functions[0][0]
    return False


def _reshaped_base(output: Tensor) -> Tensor | None:
    """The base of an output that is a reshaping view of it (same entries in the same order), e.g.
    the ``[B * T, d]`` product of which a Linear layer returns the ``[B, T, d]`` view; else ``None``."""
    base = output._base
    if base is None or base.grad_fn is None or not base.requires_grad:
        return None
    if base.numel() != output.numel() or not output.is_contiguous() or not base.is_contiguous():
        return None
    if base.data_ptr() != output.data_ptr() or base.dtype != output.dtype:
        return None
    return base


class Capture:
    """Hooks on the given modules and everything they captured since the last reset.

    Parameters
    ----------
    roots
        The modules given to the engine.
    batch_dim
        Batch dimension of module tensors, or ``None``.
    on_new_forward
        Called when a root module starts a forward pass after having completed one.
    """

    def __init__(self, roots: list[nn.Module], batch_dim: int | None, on_new_forward: Callable[[], None]) -> None:
        self.roots = roots
        self.batch_dim = batch_dim
        self.on_new_forward = on_new_forward
        self.enabled = True
        self.computing = False  # set while the engine back-propagates
        self.infos: dict[int, _ModuleInfo] = {}
        self.modules: list[nn.Module] = []
        self.handles: list[Any] = []
        self.warned_leaving: set[str] = set()  # (see _leave_closed_form)
        self.calls: dict[int, int] = {}
        self.depth = 0
        self.records: list[Record] = []
        self.call_counts: dict[int, int] = {}  # captured calls of each module in this forward pass
        self.consumed = False  # whether compute_gramian took this forward pass's records
        self.replaced_forwards = 0
        self.batch_size = 0
        self.batch_source = ""
        self.batch_from_root = False  # whether batch_size was read from a root module's inputs
        self.root_sizes: frozenset[int] = frozenset()  # non-batch sizes of the root modules' inputs
        # Whether a root was given, beside its main input, a floating tensor with the batch size along batch_dim (a
        # vision-language model's pixel_values with as many images as examples): its rows may be images, not examples.
        self.secondary_batch_sized = False
        self.completed_roots: set[int] = set()
        self.root_ids: set[int] = {id(root) for root in roots}
        # ParametrizationList modules (by id) whose calls inside a call of their module that module's closed
        # form covers: their module's info and the parametrised tensor's name.
        self.claims: dict[int, tuple[_ModuleInfo, str]] = {}
        # Whether a captured call of this forward pass ran under saved-tensor hooks (checkpointing).
        self.checkpointed = False
        # Whether a captured call had a channels-last input (see _batched_grad.vmap_rejects_channels_last).
        self.channels_last = False
        # Parameters (ids) whose handling changes from the next forward pass on (those of a submodule borrowed in
        # this one, see _check_descendants_called, or of a norm look-alike whose call broke its form): their uses in
        # this one take the per-row pass of uncovered parameters, without the warning about it.
        self.switched_now: set[int] = set()
        # Modules (ids) captured no more in this forward pass: a call of a norm look-alike broke its form.
        self.paused: set[int] = set()
        self._register()
        try:
            self.check_alone()
        except RuntimeError:
            self.remove()
            raise
        self.module_ids: set[int] = {id(module) for module in self.modules}

    def __deepcopy__(self, memo: dict[int, Any]) -> Capture:
        """Deep-copying a hooked model copies its hooks, bound to this capture: keep them bound to
        it (not to a copy of it); the hooks ignore the copied modules, which they do not know."""
        return self

    def __copy__(self) -> Capture:
        return self

    def reset(self) -> None:
        """Drop the captured records and the batch-size and forward tracking."""
        self.records = []
        self.call_counts = {}
        self.consumed = False
        # Forward passes whose captures a new forward pass replaced before any compute_gramian.
        self.replaced_forwards = 0
        self.batch_size = 0
        self.batch_source = ""
        self.batch_from_root = False
        self.root_sizes = frozenset()
        self.secondary_batch_sized = False
        self.completed_roots = set()
        self.checkpointed = False
        self.channels_last = False
        self.switched_now = set()
        self.paused = set()

    def check_alone(self) -> None:
        """Raise if another enabled engine captures one of this capture's modules.

        Raises
        ------
        RuntimeError
            Naming the module: both engines would capture its forward passes and swap its parameters.
        """
        for info in self.infos.values():
            module = info.module
            for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values()):
                owner = getattr(hook, "__self__", None)
                if isinstance(owner, Capture) and owner is not self and owner.enabled and owner.hooks(module):
                    raise RuntimeError(
                        f"Module {describe(info.name, module)} is also given to another autogram Engine, which is "
                        "enabled: two enabled engines on the same modules would each capture its forward passes and "
                        "swap its parameters. Call remove() on the other engine (e.g. one created by an earlier run "
                        "of a notebook cell), or disable it (engine.enabled = False) while this one is enabled."
                    )

    def hooks(self, module: nn.Module) -> bool:
        """Whether this capture's module hooks are on ``module`` itself (a copy of a hooked model has copies of the
        hooks, which ignore it).

        Parameters
        ----------
        module
            A module.

        Returns
        -------
        bool
            ``True`` for a module with parameters the capture registered its hooks on and has not removed them from.
        """
        if not self.handles:
            return False
        info = self.infos.get(id(module))
        return info is not None and info.module is module

    def remove(self) -> None:
        """Remove all hooks."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.reset()

    @contextmanager
    def backpropagating(self) -> Iterator[None]:
        """Mark the engine's own backward passes: a module forward inside one is an error (gradient
        checkpointing re-running the model).

        Yields
        ------
        None
        """
        self.computing = True
        try:
            yield
        finally:
            self.computing = False

    def mark_unaligned(self, records: list[Any]) -> None:
        """Remember that the modules of ``records`` have tensors not split by example along
        ``batch_dim`` (their later calls take the exact paths).

        Parameters
        ----------
        records
            The records of the modules.
        """
        for record in records:
            info = self.infos.get(id(record.module))
            if info is not None:
                info.unaligned = True

    def mark_batch_major(self, records: list[Any]) -> None:
        """Remember that these calls of their modules (by :attr:`Record.call_index`), split along ``batch_dim``,
        passed the check that their examples are along ``batch_dim`` (not, e.g., a time-major ``[T, B, d]`` layout
        with ``T = B``).

        Parameters
        ----------
        records
            The records of the calls that passed an informative check.
        """
        for record in records:
            info = self.infos.get(id(record.module))
            if info is not None:
                info.batch_major_calls.add(record.call_index)

    def batch_major_verified(self, record: Any) -> bool:
        """Whether the same call of the same module (its first, second, ... call in the forward pass) was confirmed
        batch-major on an earlier step (:meth:`mark_batch_major`), and the module never seen with tensors not split
        by example along ``batch_dim``.

        Parameters
        ----------
        record
            The record of a call.

        Returns
        -------
        bool
            ``True`` if its layout was verified.
        """
        info = self.infos.get(id(record.module))
        return info is not None and record.call_index in info.batch_major_calls and not info.unaligned

    def unaligned_besides(self, records: list[Any]) -> bool:
        """Whether a module other than those of ``records`` was ever seen with tensors not split by
        example along ``batch_dim`` (e.g. a time-major layout): then batch sizes are ambiguous.

        Parameters
        ----------
        records
            The records whose modules are excluded.

        Returns
        -------
        bool
            ``True`` if another module was seen unaligned.
        """
        modules = {id(record.module) for record in records}
        return any(info.unaligned and id(info.module) not in modules for info in self.infos.values())

    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of the hooked modules, each once, in module order.

        Returns
        -------
        list of nn.Parameter
            The parameters.
        """
        seen: set[int] = set()
        params: list[nn.Parameter] = []
        for module in self.modules:
            for param in module.parameters(recurse=False):
                if param.requires_grad and id(param) not in seen:
                    seen.add(id(param))
                    params.append(param)
        return params

    def _register(self) -> None:
        seen: set[int] = set()
        many = len(self.roots) > 1
        for index, root in enumerate(self.roots):
            prefix = f"{index}." if many else ""
            for name, module in root.named_modules():
                if id(module) in seen:
                    continue
                seen.add(id(module))
                if isinstance(module, torch.jit.ScriptModule):
                    raise TypeError(
                        f"Module {describe(prefix + name, module)} is a TorchScript module (torch.jit.script or "
                        "torch.jit.trace), which takes no forward hooks, and the autogram engine needs them: use the "
                        "eager module (torch.compile is supported), or the autojac engine (hf_jd.autojac, "
                        "jd_engine='autojac')."
                    )
                self.modules.append(module)
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    self.handles.append(module.register_forward_pre_hook(self._batch_norm_pre_hook))
                borrowed = borrowed_submodules(module)
                containers = any(isinstance(sub, (nn.ParameterDict, nn.ParameterList)) for sub in borrowed.values())
                parametrized = parametrized_kind(module) is not None
                if (
                    not any(True for _ in module.parameters(recurse=False))
                    and not (
                        containers and any(True for sub in borrowed.values() for _ in sub.parameters(recurse=False))
                    )
                    and not parametrize.is_parametrized(module)
                ):
                    continue
                # A module reading parameters from containers it owns (PEFT's IA3, LoHa, ... layers) is
                # handled generically, its own parameters and the containers' together.
                kind = Kind.GENERIC if containers else kind_of(module)
                info = _ModuleInfo(module=module, name=prefix + name, kind=kind, parametrized=parametrized)
                if info.kind is Kind.GENERIC and not containers and closed_form_parameters(module):
                    if is_linear_subclass(module):
                        info.candidate = Kind.LINEAR
                    elif is_embedding_subclass(module):
                        info.candidate = Kind.EMBEDDING
                    elif is_layer_norm_like(module):
                        info.candidate = Kind.LAYER_NORM
                if info.kind.is_generic:
                    _note_descendants(info)
                self.infos[id(module)] = info
                # Prepended: the engine sees the module's own output before any user hook changes it,
                # and installs its aliases before user pre-hooks compute from the parameters.
                self.handles.append(
                    module.register_forward_pre_hook(self._module_pre_hook, with_kwargs=True, prepend=True)
                )
                handle = module.register_forward_hook(
                    self._module_hook, with_kwargs=True, always_call=True, prepend=True
                )
                info.hook_id = handle.id
                self.handles.append(handle)
        for info in self.infos.values():
            if info.parametrized or info.kind.is_generic:
                for tensor_name, plist in parametrization_lists(info.module).items():
                    self.claims[id(plist)] = (info, tensor_name)
        for root in self.roots:
            # (prepended: a new forward pass starts before a root's own module pre-hook reads the pass's state)
            self.handles.append(root.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True, prepend=True))
            self.handles.append(root.register_forward_hook(self._root_hook, always_call=True))

    def capturing(self) -> bool:
        """Whether hooks capture now: enabled and in grad mode.

        Returns
        -------
        bool
            ``True`` when the hooks record calls.
        """
        return self.enabled and torch.is_grad_enabled()

    def note_batch(self, tensor: Any, source: str, from_root: bool = False) -> None:
        """Track the batch size: the largest size along ``batch_dim`` among the inputs of the
        root modules; only when those have none, among the tensors of parametrised modules
        (whose inputs may legitimately be regrouped, e.g. ``[B * heads, T, d]``).

        Parameters
        ----------
        tensor
            A tensor a hook saw (anything else is ignored).
        source
            Where it comes from, for error messages.
        from_root
            Whether it is an input of a root module.
        """
        bd = self.batch_dim
        if self.batch_from_root and not from_root:
            return
        if bd is not None and isinstance(tensor, Tensor) and tensor.dim() > bd:
            if from_root and not self.batch_from_root:
                self.batch_from_root = True
                self.batch_size = 0
            size = int(tensor.shape[bd])
            if size > self.batch_size:
                self.batch_size = size
                self.batch_source = f"{source}, of shape {tuple(tensor.shape)}"

    def _check_no_new_modules(self) -> None:
        """Raise if a module with trainable parameters joined the roots' module trees after the engine hooked them
        (a replaced head, ``get_peft_model``, ``resize_token_embeddings``, a parametrisation registered later):
        it has no hooks, so its parameters would be silently missing from the Gramian."""
        for root in self.roots:
            for module in root.modules():  # (names only for the error: this runs on every captured forward pass)
                if id(module) in self.infos or not module._parameters:
                    continue
                if any(p is not None and p.requires_grad for p in module._parameters.values()):
                    name = next(n for n, m in root.named_modules() if m is module)
                    raise RuntimeError(
                        f"Module {describe(name, module)} has trainable parameters but joined the model after the "
                        "autogram Engine was created (a replaced or added module, get_peft_model, "
                        "resize_token_embeddings, a parametrisation registered later): the engine has no hooks on it, "
                        "so its parameters would be missing from the Gramian. Create the Engine after changing the "
                        "model (call remove() on the old one first)."
                    )

    def _root_pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if id(module) not in self.root_ids:  # a copy of a hooked model (copy.deepcopy)
            return
        if self.depth == 0 and self.capturing() and not self.computing and not in_backward_pass():
            self._check_no_new_modules()
            if id(module) in self.completed_roots:
                replaced = bool(self.records)
                self.on_new_forward()
                if replaced:
                    self.replaced_forwards += 1
            bd = self.batch_dim
            # A first positional tensor split along batch_dim gives the batch size (the examples, as in
            # model(x, mask=...) with a [T, T] mask larger than the batch); otherwise the largest size among the
            # inputs does (model(**batch): ids, masks, and tables such as [1, T] position ids).
            first = args[0] if args and isinstance(args[0], Tensor) else None
            leads = first is not None and bd is not None and first.dim() > bd and first.shape[bd] > 1
            if first is None and bd is not None:
                # Called with keywords (model(**batch)): the model's main input gives the batch size, not the largest
                # input (a vision-language model's pixel_values hold one row per image or per patch).
                first = next((kwargs[name] for name in _MAIN_INPUTS if isinstance(kwargs.get(name), Tensor)), None)
                leads = first is not None and first.dim() > bd
            for value in itertools.chain(args, kwargs.values()):
                # (a list of per-example tensors, as TimesFM's past_values, holds no batch dimension)
                source = "an element of a list" if isinstance(value, (list, tuple)) else "an input"
                for tensor in tensors_in(value):
                    if not leads or tensor is first:
                        self.note_batch(tensor, f"{source} of {type(module).__name__}", from_root=True)
                    if self.batch_dim is not None and tensor.dim() > self.batch_dim:
                        sizes = {int(size) for dim, size in enumerate(tensor.shape) if dim != self.batch_dim}
                        self.root_sizes = self.root_sizes | sizes
            if leads and bd is not None:
                self.secondary_batch_sized = self.secondary_batch_sized or any(
                    tensor is not first
                    and tensor.is_floating_point()
                    and tensor.dim() > bd
                    and int(tensor.shape[bd]) == self.batch_size
                    for value in itertools.chain(args, kwargs.values())
                    for tensor in tensors_in(value)
                )
        self.depth += 1

    def _root_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if id(module) not in self.root_ids:
            return
        self.depth = max(0, self.depth - 1)
        if self.capturing() and not self.computing and not in_backward_pass():
            self.completed_roots.add(id(module))

    def _batch_norm_pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if id(module) not in self.module_ids:
            return  # a copy of a hooked model
        if in_backward_pass():
            return  # a checkpointed block re-run to recompute saved tensors (checked when captured)
        if self.capturing() and self.batch_dim is not None and mixes_examples(module):
            name = next((n for n, m in self._named_all() if m is module), "?")
            if module.training:
                why = "in training mode"
                fix = (
                    "put it in eval mode (its running statistics then normalise; with JDTrainer, "
                    "jd_freeze_batch_norm=True keeps every batch norm in eval mode while training)"
                )
            else:
                why = "also in eval mode, since it keeps no running statistics (track_running_stats=False)"
                fix = "build it with track_running_stats=True and put it in eval mode"
            raise RuntimeError(
                f"Module {name} ({type(module).__name__}) computes statistics across the batch {why}, so per-example "
                "losses are not independent and the per-example Gramian is undefined. Replace it (e.g. by GroupNorm "
                f"or LayerNorm), {fix}, or use Engine(..., batch_dim=None) with task losses."
            )

    def _named_all(self) -> Iterator[tuple[str, nn.Module]]:
        for root in self.roots:
            yield from root.named_modules()

    def _module_pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        info = self.infos.get(id(module))
        if info is None or info.module is not module:  # a copy of a hooked model (copy.deepcopy)
            return
        if self.computing or in_backward_pass():
            if self.computing and not recomputing_checkpoint():
                raise RuntimeError(
                    f"Module {describe(info.name, module)} ran a forward pass during Engine.compute_gramian's "
                    "backward pass, outside torch.utils.checkpoint: reversible layers (Reformer) recompute their "
                    "activations and write the parameters' gradients themselves in the backward pass, which the "
                    "autogram engine cannot follow (non-reentrant checkpointing is supported). Train such models "
                    "without Jacobian descent, or make their layers non-reversible."
                )
            # Non-reentrant activation checkpointing re-runs the forward pass of a checkpointed block
            # inside a backward pass, only to recompute the tensors its autograd nodes saved: the
            # original call was captured, this one is not.
            info.frames.append(_RECOMPUTED)
            return
        if not self.capturing() or id(module) in self.paused:
            info.frames.append(None)
            return
        if self.consumed and self.depth == 0:
            # A new forward pass through the modules without their root (a step calling model.transformer and
            # model.lm_head directly): the batch size and the call counts start again, as a root's call does.
            self.on_new_forward()
        claim = self.claims.get(id(module))
        if claim is not None and self._claims_call(*claim):
            # The weight of a module whose closed form covers its originals, computed inside its call.
            info.frames.append(_CLAIMED)
            return
        if not info.kind.is_generic and _hooks_run_before_the_engines(info):
            self._leave_closed_form(info, "hooks")
        elif not info.kind.is_generic and "forward" in module.__dict__:
            self._leave_closed_form(info, "forward")
        elif info.kind in _CONVOLUTIONS and _unbatched_convolution(module, args):
            self._leave_closed_form(info, "unbatched")
        elif not info.kind.is_generic and not info.parametrized and not closed_form_parameters(module):
            # Its parameters changed since it was registered (torch.nn.utils.prune's weight_orig, with a forward
            # pre-hook computing weight): the closed form no longer applies; the generic path is exact.
            _make_generic(info)
        params = direct_parameters(module, info.borrowed)
        if info.kind.is_generic and bool(getattr(parametrize, "_cache_enabled", False)):  # (see _claims_call)
            params = {name: param for name, param in params.items() if not name.startswith("parametrizations.")}
        # A layer norm of a trainable parameter (DeBERTa's relative-position table) covers that
        # parameter, also when its own weight and bias are frozen.
        table = info.kind is Kind.LAYER_NORM and bool(args) and isinstance(args[0], nn.Parameter)
        originals = info.parametrized and any(originals_of(module, name) for name in parametrization_lists(module))
        if not params and not (table and args[0].requires_grad) and not originals:
            info.frames.append(None)
            return
        first_node = next_sequence_number()
        if not self.checkpointed:
            self.checkpointed = saved_tensors_hooked()
        if not self.channels_last:
            self.channels_last = any(is_channels_last(tensor) for tensor in tensors_in(args))
        aliases = None
        calls = None
        if info.kind.is_generic:
            aliases = install_aliases(module, params)
            calls = [self.calls.get(id(sub), 0) for sub in info.trainable_descendants]
        info.frames.append(
            _Frame(params, aliases, calls, first_node, autocast_enabled(), {} if info.parametrized else None)
        )
        for value in itertools.chain(args, kwargs.values()):
            self.note_batch(value, f"an input of {describe(info.name, module)}")

    @staticmethod
    def _claims_call(owner: _ModuleInfo, tensor_name: str) -> bool:
        """Whether a call of the ParametrizationList of ``owner``'s ``tensor_name`` happens inside a call of ``owner``
        that covers the list's originals: a closed form's (see :meth:`_cover_originals`), or a generic call that
        aliased them (its borrowed list, unless ``parametrize.cached()`` was on at the call: a cached weight is reused
        by later calls, whose aliases it would not depend on, and is covered where it is computed)."""
        frame = owner.frames[-1] if owner.frames else None
        if not isinstance(frame, _Frame):
            return False
        if owner.parametrized:
            return True
        prefix = f"parametrizations.{tensor_name}."
        return frame.aliases is not None and any(name.startswith(prefix) for name in frame.aliases)

    def _leave_closed_form(self, info: _ModuleInfo, reason: str) -> None:
        """A module that may compute something else than its closed form assumes, for ``reason`` (a key of
        :data:`_LEAVING`: forward hooks that run before the engine's and may change its output, a forward replaced
        on the instance, or an unbatched convolution input): the generic path takes over (vector-Jacobian products
        from the output the model goes on with, through aliases of the parameters: exact whatever the module
        computes), with a warning once per engine and reason, since it is slower. A module with a parametrised weight
        cannot take it and is rejected."""
        described = describe(info.name, info.module)
        cause, fix = _LEAVING[reason]
        if info.parametrized:
            raise RuntimeError(
                f"Module {described} has a parametrised weight and {cause}: the engine cannot follow it. {fix}"
            )
        _make_generic(info)
        if reason not in self.warned_leaving:
            self.warned_leaving.add(reason)
            warnings.warn(
                f"hf_jd.autogram: module {described} has {cause}: it takes the generic path from now on (exact, "
                f"slower), and so does any other such module. {fix} This warning is shown once per engine.",
                RuntimeWarning,
                stacklevel=4,
            )

    def _module_hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        info = self.infos.get(id(module))
        if info is None or info.module is not module:
            return None
        frame = info.frames.pop() if info.frames else None
        if frame is None or frame is _RECOMPUTED:  # (a re-run call returns its output unchanged, as captured)
            return None
        if frame is _CLAIMED:
            owner, tensor_name = self.claims[id(module)]
            owner_frame = owner.frames[-1]
            if output is not None and isinstance(owner_frame, _Frame) and owner_frame.parametrized is not None:
                owner_frame.parametrized[tensor_name] = output
            self.calls[id(module)] = self.calls.get(id(module), 0) + 1
            return None
        end_node = next_sequence_number()
        if frame.aliases is not None:
            restore_parameters(module, frame.params)
        if output is None:  # the forward raised (always_call hook): nothing to capture
            return None
        self.calls[id(module)] = self.calls.get(id(module), 0) + 1
        if info.candidate is not None:
            self._settle_candidate(info, module, args, kwargs, output, frame.aliases)
            if info.look_alike and not self._look_alike_holds(info, module, args, kwargs, output):
                info.kind, info.look_alike = Kind.GENERIC, False  # (its aliases are installed: generic from now)
        elif info.look_alike and not self._look_alike_holds(info, module, args, kwargs, output):
            # A later call of a verified norm look-alike that computes something else (a flag, another input
            # layout, an input scale that shows its epsilon differs), or a channels-first norm whose samples are not
            # the examples: generic from the next forward pass on. In this one, its calls are not captured (those
            # captured already are dropped), so its parameters take the exact per-row pass of parameters used
            # outside the captured calls.
            info.kind, info.look_alike = Kind.GENERIC, False
            self.paused.add(id(module))
            self.switched_now |= {id(p) for p in module.parameters(recurse=False)}
            self.records = [record for record in self.records if record.module is not module]
            return None
        if frame.descendant_calls is not None and info.kind.is_generic:
            self._check_descendants_called(module, info, frame.descendant_calls, output)
        # (a module's documented layout, e.g. a recurrent layer's, also settles shapes that would fit batch_dim by
        # coincidence, e.g. [layers, B, h] states with as many layers as examples)
        output_dims = self._documented_output_dims(info.kind, module, output)
        batched = output_dims is not None or self._aligned(info.kind, args, kwargs, output)
        unclear = batched and self._unclear_ids(info.kind, args, kwargs)
        # A module once seen with an output whose size along batch_dim is neither the batch size
        # nor 1 keeps the exact paths: that dimension is something else (e.g. time in XLNet's
        # [T, B, d] layout), even in a later batch where its size happens to equal the batch size.
        if not batched and self._foreign_size(output):
            info.unaligned = True
        elif batched and info.unaligned:
            batched = False
        elif batched and info.kind in (Kind.LINEAR, Kind.LAYER_NORM) and _gathered(args, kwargs):
            # Rows picked by an index (a mixture-of-experts layer's tokens, possibly exactly B of them in
            # another order): their grouping by example is verified rather than assumed.
            batched = False
        returned = output  # the module's own output (or, for the generic path, aliases of its tensors)
        if isinstance(returned, Tensor) and not returned.requires_grad:
            return None
        if info.kind.is_generic:
            assert frame.aliases is not None
            aliased = len(tensors_in(returned)) > 1
            if aliased:
                returned = alias_outputs(returned)
            outputs = tensors_in(returned)
            if info.kind is Kind.RMS_NORM:
                record: Record = RMSNormRecord(module, info.name, frame.params, frame.aliases, outputs, args)
            else:
                record = GenericRecord(module, info.name, frame.params, frame.aliases, outputs)
            if output_dims is not None and batched:
                record.output_batch_dims = [
                    dim for tensor, dim in zip(tensors_in(output), output_dims) if tensor.requires_grad
                ]
        else:
            inputs = args if args else tuple(kwargs.values())
            if not isinstance(returned, Tensor):
                raise RuntimeError(
                    f"Module {describe(info.name, module)} returned "
                    f"{type(returned).__name__}, expected a tensor."
                )
            record = record_class(info.kind)(module, info.name, frame.params, inputs, returned)
            if isinstance(record, EmbeddingRecord):
                record.scale = info.embedding_scale
            record.edges = [get_gradient_edge(returned)]
            base = _reshaped_base(returned) if returned is output else None
            if base is not None:
                record.view_edges = record.edges
                record.edges = [get_gradient_edge(base)]
                record.edge_views = [(returned.shape, base.shape)]
            if info.parametrized:
                record = self._cover_originals(info, frame, record)
                if not record.params:  # only frozen tensors were used (e.g. a cached weight computed elsewhere)
                    return None
        record.batched = batched
        record.layout_unclear = unclear and batched
        if frame.first_node is not None and end_node is not None:
            record.nodes = range(frame.first_node, end_node)
        record.autocast = frame.autocast
        if not batched and info.kind in (
            Kind.LINEAR, Kind.LAYER_NORM, Kind.RMS_NORM, Kind.GENERIC, Kind.GROUP_NORM, Kind.BATCH_NORM, Kind.EMBEDDING,
            Kind.CONV2D,
        ):
            record.groups = self._groups(args, kwargs, returned, outputs_only=info.kind is Kind.GENERIC)
        if not batched:
            record.other_batch_dims = self._other_batch_dims(info.kind, args, kwargs, returned)
            record.other_batch_dim = record.other_batch_dims[0] if record.other_batch_dims else None
        if info.kind.is_generic and aliased:
            assert isinstance(record, GenericRecord)
            record.watch_versions()
        record.is_source = not any(
            t.requires_grad for t in itertools.chain(tensors_in(args), tensors_in(kwargs))
        )
        record.call_index = self.call_counts.get(id(module), 0)
        self.call_counts[id(module)] = record.call_index + 1
        # (their versions now, right after the call: an in-place change later on is checked before they are used)
        record.watch_captured()
        self.records.append(record)
        return returned if returned is not output else None

    @staticmethod
    def _cover_originals(info: _ModuleInfo, frame: _Frame, record: Record) -> Record:
        """Have the closed-form record of a call of a module with a parametrised weight cover the weight's
        originals, when the call computed it (its ParametrizationList ran inside the call), or reused the one an
        earlier covered call computed (``parametrize.cached()``). A weight computed elsewhere is covered where it
        was computed (its ParametrizationList's own call), like any tensor shared by the examples."""
        module = info.module
        tensors: list[ParametrizedTensor] = []
        for name in parametrization_lists(module):
            tensor = None if frame.parametrized is None else frame.parametrized.get(name)
            if tensor is None:
                cached = cached_tensor(module, name)
                tensor = cached if cached is not None and cached is info.claimed else None
            originals = originals_of(module, name)
            if tensor is not None and originals:
                tensors.append(ParametrizedTensor(name, tensor, originals))
                info.claimed = tensor
        return parametrized_record(record, tensors) if tensors else record

    @staticmethod
    def _settle_candidate(
        info: _ModuleInfo,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Any,
        aliases: dict[str, Tensor] | None,
    ) -> None:
        """On the first captured call of a candidate (Linear or Embedding subclass, layer-norm
        look-alike), switch it to its closed form (this call and the later ones, which then install no
        aliases) if the call verifies it."""
        kind, info.candidate = info.candidate, None
        if kwargs:
            return
        if (kind is Kind.LINEAR and computes_linear(module, args, output)) or (
            kind is Kind.LAYER_NORM and computes_layer_norm(module, args, output)
        ):
            info.kind, info.look_alike = kind, True
        elif kind is Kind.LAYER_NORM and computes_channel_norm(module, args, output):
            info.kind, info.look_alike = Kind.CHANNEL_NORM, True
        elif kind is Kind.EMBEDDING and aliases is not None and "weight" in aliases:
            scale = embedding_scale(module, args, output, aliases["weight"])
            if scale is not None:
                info.kind, info.embedding_scale, info.look_alike = kind, scale, True

    def _look_alike_holds(
        self, info: _ModuleInfo, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> bool:
        """Whether a call of a look-alike computes the closed form its module was given (a Linear or Embedding
        subclass with a forward of its own: ``F.linear`` of its input, or a scaled lookup, e.g. until a mask it
        applies to its weight changes; a layer norm over the last dimension, or over the channels of
        ``[N, C, *spatial]`` samples that are the examples), checked on the first entry along dimension 0 (a call
        computing something else shows there, at a fraction of the cost); a lookup on all the ids (as cheap)."""
        if kwargs or len(args) != 1 or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            return False
        inputs = args[0]
        if info.kind is Kind.LINEAR:
            sliced = inputs.dim() > 1 and output.dim() > 1 and inputs.shape[0] == output.shape[0]
            if sliced:
                return computes_linear(module, (inputs[:1],), output[:1])
            return computes_linear(module, args, output)
        if info.kind is Kind.EMBEDDING:  # (all the ids: the first example may not use the rows that changed)
            return computes_scaled_lookup(module, inputs, output, info.embedding_scale)
        if inputs.dim() == 0 or inputs.shape != output.shape:
            return False
        first = (inputs[:1],)
        if info.kind is Kind.LAYER_NORM:
            return computes_layer_norm(module, first, output[:1])
        samples_are_examples = self.batch_dim is None or (self.batch_dim == 0 and inputs.shape[0] == self.batch_size)
        return samples_are_examples and computes_channel_norm(module, first, output[:1])

    def _foreign_size(self, output: Any) -> bool:
        """Whether an output's size along ``batch_dim`` is neither the batch size nor 1."""
        bd = self.batch_dim
        assert bd is not None
        return any(
            t.dim() <= bd or t.shape[bd] not in (1, self.batch_size) for t in tensors_in(output) if t.requires_grad
        )

    def _other_batch_dims(
        self, kind: Kind, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> tuple[int, ...]:
        """The dimension other than ``batch_dim`` along which every output requiring grad (and, for the
        closed forms, which read it, the first input) has the batch size (time-major ``[T, B, d]``
        tensors), if there is one, the same for all: a candidate batch dimension for this call, which
        the engine verifies before relying on it. A generic call may offer several, all of its tensors having
        the batch size along each (``[T, B, d]`` with ``d = B``): the check tries them in order. Empty when there
        is none."""
        bd, size = self.batch_dim, self.batch_size
        # Convolutions and GroupNorm mix positions (or channels) within a sample: their closed forms need the
        # samples along batch_dim. Position-wise closed forms and the generic path (whose vector-Jacobian
        # products are exact whenever the grouping holds) can take another dimension.
        position_wise = kind.is_generic or kind in (Kind.LINEAR, Kind.LAYER_NORM, Kind.EMBEDDING)
        if bd is None or size <= 1 or not position_wise:
            return ()
        tensors = [t for t in tensors_in(output) if t.requires_grad]
        if not kind.is_generic:
            inputs = tensors_in(args) or tensors_in(kwargs)
            if not inputs:
                return ()
            tensors.append(inputs[0])
        # The last dimension of a closed form's tensors is its features (ids excepted), never the batch.
        features = not kind.is_generic and kind is not Kind.EMBEDDING
        common: list[int] | None = None
        for tensor in tensors:
            last = tensor.dim() - 1 if features and tensor.is_floating_point() else tensor.dim()
            dims = [dim for dim in range(last) if dim != bd and tensor.shape[dim] == size]
            if len(dims) != 1 and not kind.is_generic:
                return ()
            common = dims if common is None else [dim for dim in common if dim in dims]
        return tuple(common or ())

    def _groups(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any, outputs_only: bool = False) -> int:
        """``k`` when a call's first input and its outputs that require grad have ``k * batch_size``
        entries along ``batch_dim`` (e.g. OPT's ``[B * T, d]`` rows, Swin's ``[B * windows, ...]``, the
        ``[B * T, d]`` tokens of transformers' fused mixture-of-experts layers and their routers): a
        candidate for the batch-major grouping, which the engine verifies before relying on it; else 0.
        With ``outputs_only`` (generic calls, whose products need only the output gradients) the outputs
        alone decide (DeepSeek-style routers flatten their ``[B, T, d]`` input to ``[B * T, d]`` rows), each with its
        own ``k`` (the largest is returned)."""
        bd, size = self.batch_dim, self.batch_size
        inputs = tensors_in(args) or tensors_in(kwargs)
        outputs = [tensor for tensor in tensors_in(output) if tensor.requires_grad]
        if bd is None or size <= 0 or not outputs or any(tensor.dim() <= bd for tensor in outputs):
            return 0
        if outputs_only:
            # (each output may have its own k: WavLM's attention returns its [B, T, d] states beside the [B * heads, T,
            # T] position bias it passes on; each output's gradient is checked and regrouped with its own)
            counts = {int(tensor.shape[bd]) for tensor in outputs}
            if any(count == 0 or count % size for count in counts):
                return 0
            return max(counts) // size
        if not inputs or inputs[0].dim() <= bd:
            return 0
        count = int(inputs[0].shape[bd])
        if count == 0 or count % size or any(tensor.shape[bd] != count for tensor in outputs):
            return 0
        return count // size

    def _aligned(self, kind: Kind, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> bool:
        """Whether the tensors the call's contribution is computed from are split by example
        along ``batch_dim``: size ``batch_size`` there.

        Other calls get no per-example slices of one output gradient: tables shared by the examples
        (BERT's ``[1, T, d]`` position embeddings, T5's ``[T, T, h]`` relative-position tables, which the
        model broadcasts over the batch further on; the hook never changes an output) and regrouped
        ``[B * T, d]`` or ``[B * heads, T, d]`` tensors take the engine's exact paths for them (broadcast
        plans, verified groupings, else per-row output gradients from a batched backward pass).
        """
        bd = self.batch_dim
        if bd is None:
            return True
        if bd != 0 and kind.samples_first:
            # Convolutions and GroupNorm take their samples along dimension 0: with another batch_dim, the batch
            # size there (e.g. as many channels as examples, C = B) is a coincidence, never the examples.
            return False
        size = self.batch_size

        def fits(tensor: Tensor) -> bool:
            return tensor.dim() > bd and tensor.shape[bd] == size

        inputs = tensors_in(args) or tensors_in(kwargs)
        outputs = [t for t in tensors_in(output) if t.requires_grad]
        if not all(fits(t) for t in outputs):
            return False
        if kind is Kind.GENERIC:
            return True
        if not inputs:
            return kind is Kind.RMS_NORM
        return fits(inputs[0])

    def _documented_output_dims(self, kind: Kind, module: nn.Module, output: Any) -> list[int] | None:
        """For a generic call of a torch module whose documentation gives where each output holds the batch
        (:func:`documented_output_dims`), those dimensions, when they hold the batch size and are not all
        ``batch_dim`` (calls split by example along ``batch_dim`` alone take the usual paths); else ``None``."""
        size, bd = self.batch_size, self.batch_dim
        if bd is None or size < 1 or kind is not Kind.GENERIC:
            return None
        dims = documented_output_dims(module, output)
        if dims is None or all(dim == bd for dim in dims):
            return None
        if any(tensor.shape[dim] != size for tensor, dim in zip(tensors_in(output), dims)):
            return None
        return dims

    def _unclear_ids(self, kind: Kind, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether an embedding call of ``[B, L, ...]`` ids taken as split by example has no size beside the batch
        size in common with the root inputs: ids padded inside the model (Longformer, LED, BigBird pad their
        ``[B, T]`` ids to a multiple of a window), or a table of ids computed inside the model whose first size
        merely equals the batch size (LongT5's ``[block_len, 3 block_len]`` relative buckets). Per-example ids
        share a length with the root inputs ([B, T] tokens or positions) otherwise."""
        if kind is not Kind.EMBEDDING or self.batch_dim is None or not self.root_sizes:
            return False
        inputs = tensors_in(args) or tensors_in(kwargs)
        ids, bd = inputs[0], self.batch_dim
        if ids.dim() < 2:
            return False
        return not any(int(ids.shape[dim]) in self.root_sizes for dim in range(ids.dim()) if dim != bd)

    def _check_descendants_called(
        self, module: nn.Module, info: _ModuleInfo, before: list[int], output: Any
    ) -> None:
        """Borrow the submodules whose parameters the module's outputs depend on without the module calling them
        (Mamba's mixers pass their ``conv1d.weight`` to a convolution function): from the next call on, those
        parameters are aliased with the module's own and covered by its generic record. In this call they were
        used as they are: the engine finds them uncovered and gives them the exact per-row pass of parameters used
        outside the captured calls."""
        uncalled = [
            (sub, p)
            for sub, count in zip(info.trainable_descendants, before)
            if self.calls.get(id(sub), 0) == count
            for p in sub.parameters(recurse=False)
            if p.requires_grad
        ]
        outputs = [t for t in tensors_in(output) if t.requires_grad]
        if not uncalled or not outputs:
            return
        grads = guarded_grad(
            outputs,
            [p for _, p in uncalled],
            grad_outputs=[torch.ones_like(t) for t in outputs],
            retain_graph=True,
            allow_unused=True,
        )
        used = {id(sub): sub for (sub, _), grad in zip(uncalled, grads) if grad is not None}
        if not used:
            return
        names = {id(m): n for n, m in module.named_modules()}
        info.borrowed = {**info.borrowed, **{names[key]: sub for key, sub in used.items()}}
        info.trainable_descendants = [sub for sub in info.trainable_descendants if id(sub) not in used]
        self.switched_now |= {id(p) for sub in used.values() for p in sub.parameters(recurse=False)}


def _run_eagerly_under_torch_compile(*functions: Callable[..., Any]) -> None:
    """Have TorchDynamo run ``functions`` (and what they call) eagerly instead of tracing them.

    The hooks break the compiled graph anyway (they keep Python state); traced, they were recompiled
    at every call until Dynamo's recompile limit. Unlike ``torch.compiler.disable``, which wraps a
    function and costs time at every eager call, this marks the code objects once. It uses a private
    Dynamo entry point: where it is missing, nothing is done (Dynamo then only warns).
    """
    try:
        from torch._dynamo.eval_frame import set_code_exec_strategy
        from torch._dynamo.types import FrameAction, FrameExecStrategy
    except ImportError:  # pragma: no cover - depends on the torch version
        return
    for function in functions:
        try:
            set_code_exec_strategy(function.__code__, FrameExecStrategy(FrameAction.SKIP, FrameAction.SKIP))
        except (AttributeError, TypeError, RuntimeError):  # pragma: no cover - depends on the torch version
            return


_run_eagerly_under_torch_compile(
    Capture._module_pre_hook,
    Capture._module_hook,
    Capture._root_pre_hook,
    Capture._root_hook,
    Capture._batch_norm_pre_hook,
)
