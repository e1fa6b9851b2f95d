"""Which record type handles which module, and which modules mix the examples of a batch."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any

from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._conv import (
    Conv2dRecord,
    ConvTransposePatchRecord,
    PatchConvRecord,
    is_patch_conv3d,
    is_patch_conv_transpose2d,
    is_unfoldable_conv2d,
    is_unfoldable_grouped_conv,
)
from ._embedding import EmbeddingRecord, is_embedding
from ._group_norm import GroupNormRecord, is_batch_norm, is_group_norm
from ._layer_norm import LayerNormRecord, is_layer_norm
from ._linear import LinearRecord, is_conv1d, is_linear
from ._record import Record
from ._rms_norm import is_rms_norm_like

__all__ = ["Kind", "closed_form_parameters", "kind_of", "parametrized_kind", "record_class", "mixes_examples"]


class Kind(Enum):
    """How the contribution of a module's direct parameters is computed."""

    LINEAR = "linear"
    EMBEDDING = "embedding"
    CONV2D = "conv2d"  # Conv2d (unfold form), and Conv3d patch embeddings (kernel = stride)
    GROUPED_CONV = "grouped_conv"  # Conv1d, grouped Conv2d
    CONV_TRANSPOSE = "conv_transpose"  # ConvTranspose2d with kernel = stride (an output patch per input position)
    LAYER_NORM = "layer_norm"
    GROUP_NORM = "group_norm"
    BATCH_NORM = "batch_norm"  # evaluation mode (running statistics), or training mode with batch_dim=None
    CHANNEL_NORM = "channel_norm"  # a layer norm over dimension 1 of [N, C, *spatial], verified on the first call
    RMS_NORM = "rms_norm"  # generic, with a verified closed form
    GENERIC = "generic"

    @property
    def is_generic(self) -> bool:
        """Whether the module's parameters are aliased per call (generic handling)."""
        return self in (Kind.RMS_NORM, Kind.GENERIC)

    @property
    def samples_first(self) -> bool:
        """Whether the closed form needs the call's samples along dimension 0 (``[N, C, *spatial]`` tensors of
        convolutions and GroupNorm, which mix the positions or channels of a sample)."""
        return self in (
            Kind.CONV2D, Kind.GROUPED_CONV, Kind.CONV_TRANSPOSE, Kind.GROUP_NORM, Kind.BATCH_NORM, Kind.CHANNEL_NORM
        )


# The constructor of a closed-form record: (module, module_name, params, args, output).
RecordFactory = Callable[[nn.Module, str, dict[str, nn.Parameter], tuple[Any, ...], Tensor], Record]

_CLASSES: dict[Kind, RecordFactory] = {
    Kind.LINEAR: LinearRecord,
    Kind.EMBEDDING: EmbeddingRecord,
    Kind.CONV2D: Conv2dRecord,
    Kind.GROUPED_CONV: PatchConvRecord,
    Kind.CONV_TRANSPOSE: ConvTransposePatchRecord,
    Kind.LAYER_NORM: LayerNormRecord,
    Kind.GROUP_NORM: GroupNormRecord,
    Kind.BATCH_NORM: GroupNormRecord,
    Kind.CHANNEL_NORM: GroupNormRecord,
}


def closed_form_parameters(module: nn.Module) -> bool:
    """Whether the module's direct parameters are the ``weight`` and ``bias`` its stock forward uses
    as they are (not an older ``weight_norm``'s ``weight_g``/``weight_v``, an extra parameter, or a
    parametrisation computing ``weight``), which the closed forms assume.

    Parameters
    ----------
    module
        The module.

    Returns
    -------
    bool
        ``True`` when a closed form may apply.
    """
    names = {name for name, param in module._parameters.items() if param is not None}
    return names <= {"weight", "bias"} and not parametrize.is_parametrized(module)


def parametrized_kind(module: nn.Module) -> Kind | None:
    """The closed form of a stock ``Linear`` / ``Conv1d`` / ``Conv2d`` whose ``weight`` (only) is computed by a
    parametrisation (``torch.nn.utils.parametrizations.weight_norm``, ``spectral_norm``, ...): its per-row
    weight gradients are those of the closed form, pulled back to the originals (see ``_parametrized``).

    Parameters
    ----------
    module
        The module.

    Returns
    -------
    Kind or None
        ``Kind.LINEAR``, ``Kind.GROUPED_CONV`` or ``Kind.CONV2D``; ``None`` for any other module.
    """
    if not parametrize.is_parametrized(module) or set(getattr(module, "parametrizations", {})) != {"weight"}:
        return None
    if {name for name, param in module._parameters.items() if param is not None} - {"bias"}:
        return None
    if is_linear(module):
        return Kind.LINEAR
    if is_unfoldable_conv2d(module) or is_patch_conv3d(module):
        return Kind.CONV2D
    if is_unfoldable_grouped_conv(module):
        return Kind.GROUPED_CONV
    return None


def kind_of(module: nn.Module) -> Kind:
    """The handler of a module that has direct parameters.

    Parameters
    ----------
    module
        The module.

    Returns
    -------
    Kind
        The handler.
    """
    parametrized = parametrized_kind(module)
    if parametrized is not None:
        return parametrized
    if not closed_form_parameters(module):
        return Kind.RMS_NORM if is_rms_norm_like(module) else Kind.GENERIC
    if is_linear(module) or is_conv1d(module):
        return Kind.LINEAR
    if is_embedding(module):
        return Kind.EMBEDDING
    if is_unfoldable_conv2d(module) or is_patch_conv3d(module):
        return Kind.CONV2D
    if is_unfoldable_grouped_conv(module):
        return Kind.GROUPED_CONV
    if is_patch_conv_transpose2d(module):
        return Kind.CONV_TRANSPOSE
    if is_layer_norm(module):
        return Kind.LAYER_NORM
    if is_group_norm(module):
        return Kind.GROUP_NORM
    if is_batch_norm(module):
        return Kind.BATCH_NORM
    if is_rms_norm_like(module):
        return Kind.RMS_NORM
    return Kind.GENERIC


def record_class(kind: Kind) -> RecordFactory:
    """The record class of a closed-form kind.

    Parameters
    ----------
    kind
        Any kind but ``Kind.GENERIC`` and ``Kind.RMS_NORM`` (generic records).

    Returns
    -------
    RecordFactory
        The :class:`Record` subclass, called as ``(module, module_name, params, args, output)``.
    """
    return _CLASSES[kind]


def mixes_examples(module: nn.Module) -> bool:
    """Whether the module, in its current mode, computes statistics across the batch.

    Parameters
    ----------
    module
        The module.

    Returns
    -------
    bool
        ``True`` for a batch norm in training mode or without running statistics.
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.training or not module.track_running_stats
    return False
