"""Bytes held by tensors during a call, counted from the tensors themselves (not the allocator), so that a bound on
them is the same on every machine."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _HeldBytes(TorchDispatchMode):
    """After every aten operation: the bytes of the storages, at least ``min_bytes`` each, of the operations'
    outputs that some Python object still references."""

    def __init__(self, min_bytes: int) -> None:
        super().__init__()
        self.min_bytes = min_bytes
        self.storages: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            known = self.storages.get(storage.data_ptr())
            if storage.nbytes() >= self.min_bytes and (known is None or known[0]() is None):
                self.storages[storage.data_ptr()] = (weakref.ref(tensor), storage.nbytes())
        held = sum(size for ref, size in self.storages.values() if ref() is not None)
        self.peak = max(self.peak, held)
        return out


def peak_held_bytes(call: Callable[[], Any], min_bytes: int) -> tuple[Any, int]:
    """Run ``call`` and return its result with the most bytes that tensors it created (each of at least
    ``min_bytes``) held at once."""
    counter = _HeldBytes(min_bytes)
    with counter:
        result = call()
    return result, counter.peak
