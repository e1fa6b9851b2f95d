"""How an autograd node moves entries, as an entry of the structure of a graph.

Two graphs with the same structure (the same operations in the same order, moving entries to the same places) built by
the same code on tensors of the same shapes move the same rows, so what was verified about the rows of one (their
grouping by example) holds for the other, unless an operation picks rows by the data (an index, a sort): such a node's
entry is ``"?"``.
"""

from __future__ import annotations

import hashlib
from typing import Any

from torch import Tensor

__all__ = [
    "DATA_DEPENDENT_NODES", "GATHER_NODES", "MAX_INDEX_ENTRIES", "described_node", "digest", "index_digest",
]

# Autograd nodes of operations that pick rows by an index tensor (which may reorder the examples).
GATHER_NODES = frozenset({
    "GatherBackward0", "IndexBackward0", "IndexSelectBackward0", "TakeAlongDimBackward0", "TakeBackward0",
})


# Autograd nodes of operations whose rows depend on the data (indexing, gathering, scattering, sorting):
# with one of them in the graph, a grouping verified once may not hold in the next step.
DATA_DEPENDENT_NODES = GATHER_NODES | frozenset({
    "MaskedSelectBackward0", "IndexPutBackward0", "IndexAddBackward0", "IndexCopyBackward0", "IndexFillBackward0",
    "ScatterBackward0", "ScatterBackward1", "ScatterAddBackward0", "ScatterReduceBackward0", "MaskedScatterBackward0",
    "SortBackward0", "TopkBackward0", "KthvalueBackward0", "MedianBackward1", "ModeBackward0",
    "MaxBackward0", "MinBackward0", "NonzeroBackward0", "RepeatInterleaveBackward0",
})


def described_node(node: object) -> tuple[str, ...]:
    """A node's entries in a structure: its type, then the position it picks (``SelectBackward0``: rows
    picked one by one, ``torch.stack([h[i] for i in order])``, are part of the structure), or ``"?"`` for
    an operation that selects rows by the data (the structure does not fix them)."""
    name = type(node).__name__
    if name == "SelectBackward0":
        return name, f"{node._saved_dim}:{node._saved_index}"  # type: ignore[attr-defined]
    if name in DATA_DEPENDENT_NODES:
        return name, "?"
    attributes = _POSITIONAL_ATTRIBUTES.get(name)
    if attributes:  # where rows move to (a roll by a shift that changes between steps moves them elsewhere)
        return name, ":".join(str(getattr(node, attribute, "")) for attribute in attributes)
    return (name,)


# Saved arguments that fix where an operation moves entries (not the sizes, which may change from batch to batch).
_POSITIONAL_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "RollBackward0": ("_saved_shifts", "_saved_dims"),
    "SliceBackward0": ("_saved_dim", "_saved_start", "_saved_step"),
    "FlipBackward0": ("_saved_dims",),
    "PermuteBackward0": ("_saved_dims",),
    "TransposeBackward0": ("_saved_dim0", "_saved_dim1"),
}


# Largest number of entries of the index of a lookup that a structure holds (by a digest of its values; larger ones
# leave the call without a structure).
MAX_INDEX_ENTRIES = 2**16
# Saved index tensors of lookups, by node type.
_SAVED_INDICES = {"IndexBackward0": "_saved_indices", "IndexSelectBackward0": "_saved_index", "GatherBackward0":
                  "_saved_index", "TakeAlongDimBackward0": "_saved_indices"}


def digest(tensor: Tensor) -> str:
    """The shape, dtype and a digest of the values of a small tensor (an index)."""
    values = tensor.detach().contiguous().cpu().numpy().tobytes()
    return f"{tuple(tensor.shape)}:{tensor.dtype}:{hashlib.blake2b(values, digest_size=16).hexdigest()}"


def index_digest(node: Any) -> str:
    """The values of a lookup's index (a digest) when it is small, else ``"?"``."""
    attribute = _SAVED_INDICES.get(type(node).__name__)
    saved = getattr(node, attribute, None) if attribute is not None else None
    indices = [saved] if isinstance(saved, Tensor) else list(saved) if isinstance(saved, (tuple, list)) else None
    tensors = [index for index in indices or () if isinstance(index, Tensor)]
    if not tensors or any(index is not None and not isinstance(index, Tensor) for index in indices or ()):
        return "?"
    if sum(index.numel() for index in tensors) > MAX_INDEX_ENTRIES:
        return "?"
    return ";".join("None" if index is None else digest(index) for index in indices or ())  # (a[:, idx]: None first)
