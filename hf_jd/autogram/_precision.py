"""Whether float32 products on a CUDA device may run in TensorFloat-32.

cuDNN runs float32 convolutions and recurrent layers in TF32 by default on Ampere and later GPUs (torch's
``torch.backends.cudnn.conv.fp32_precision`` and ``rnn.fp32_precision`` are ``"tf32"`` unless set otherwise), and
cuBLAS runs float32 matrix products in TF32 when asked (``torch.backends.cuda.matmul.allow_tf32``,
``torch.set_float32_matmul_precision("high")``, the Trainer's ``tf32=True``). TF32 keeps 10 bits of mantissa, so
such products are exact to about 1e-3 relative instead of float32's 1e-7: the engine's checks that compare two
backward passes of the same graph must then allow for that rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["full_float32_precision", "tf32_in_graph"]

# Autograd nodes of operations that cuDNN may run in TF32, by the cuDNN flag that governs them.
_CUDNN_NODES = {"ConvolutionBackward0": "conv", "CudnnRnnBackward0": "rnn"}


def _legacy_flag(read: Callable[[], bool]) -> bool:
    """A legacy ``allow_tf32`` flag; torch refuses to read it when the new per-operation flags disagree, which
    means that TF32 is on for some operation."""
    try:
        return bool(read())
    except RuntimeError:
        return True


def _matmul_tf32() -> bool:
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    return torch.get_float32_matmul_precision() != "highest" or _legacy_flag(
        lambda: torch.backends.cuda.matmul.allow_tf32
    )


def _cudnn_tf32(kind: str) -> bool:
    precision = getattr(getattr(torch.backends.cudnn, kind, None), "fp32_precision", None)
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    return _legacy_flag(lambda: torch.backends.cudnn.allow_tf32)


def tf32_in_graph(device: torch.device, nodes: Iterable[Any]) -> bool:
    """Whether some float32 product of the graph may run in TF32.

    Parameters
    ----------
    device
        The device of the losses.
    nodes
        The graph's autograd nodes.

    Returns
    -------
    bool
        ``True`` on a CUDA device when TF32 matrix products are allowed, or when the graph holds a convolution or a
        cuDNN recurrent layer and cuDNN may run it in TF32.
    """
    if device.type != "cuda":
        return False
    if _matmul_tf32():
        return True
    kinds = {_CUDNN_NODES.get(type(node).__name__) for node in nodes}
    return any(_cudnn_tf32(kind) for kind in kinds if kind is not None)


@contextmanager
def full_float32_precision(device: torch.device, matmul: bool = True) -> Iterator[None]:
    """Within the block, float32 convolutions and recurrent layers (cuDNN), and matrix products (cuBLAS) unless
    ``matmul`` is ``False``, run in full float32 precision on ``device``, whatever the TF32 flags say; the flags are
    restored on exit. For the engine's own passes whose results are compared at float32's precision (the rows'
    examples of the products' path) or must match an exact Gramian (per-row gradients from convolutions).

    Parameters
    ----------
    device
        The device of the computation (nothing changes off CUDA).
    matmul
        Also the matrix products.

    Yields
    ------
    None
    """
    if device.type != "cuda":
        yield
        return
    cudnn: list[Any] = [getattr(torch.backends.cudnn, kind, None) for kind in ("conv", "rnn")]
    backends: list[Any] = [backend for backend in cudnn if hasattr(backend, "fp32_precision")]
    if matmul and hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        backends.append(torch.backends.cuda.matmul)
    if backends:  # (torch >= 2.9: per-operation flags)
        previous = [backend.fp32_precision for backend in backends]
        for backend in backends:
            backend.fp32_precision = "ieee"
        try:
            yield
        finally:
            for backend, value in zip(backends, previous):
                backend.fp32_precision = value
        return
    convolutions, products = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    if matmul:
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = convolutions, products
