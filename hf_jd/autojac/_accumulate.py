"""Accumulation of Jacobians into ``.jac`` and of gradients into ``.grad``, like autograd does."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["accumulate_jac", "accumulate_grad", "check_jac_compatible", "get_jac"]


def get_jac(tensor: Tensor) -> Tensor | None:
    """Return the ``.jac`` stored on ``tensor``, or ``None`` if there is none.

    Parameters
    ----------
    tensor
        A tensor that may carry a ``.jac`` attribute.

    Returns
    -------
    Tensor or None
        Its ``.jac``, or ``None``.
    """
    return getattr(tensor, "jac", None)


def check_jac_compatible(tensors: tuple[Tensor, ...], num_rows: int) -> None:
    """Raise before any work if an existing ``.jac`` cannot receive a ``[num_rows]``-row Jacobian.

    Parameters
    ----------
    tensors
        The tensors that will receive a Jacobian.
    num_rows
        Number of rows ``m`` of the Jacobian (number of objectives).

    Raises
    ------
    ValueError
        If a tensor already has a ``.jac`` that is not a tensor of shape ``[num_rows, *tensor.shape]``.
    """
    for tensor in tensors:
        existing = get_jac(tensor)
        if existing is None:
            continue
        expected = (num_rows, *tensor.shape)
        if not isinstance(existing, Tensor) or tuple(existing.shape) != expected:
            found = tuple(existing.shape) if isinstance(existing, Tensor) else type(existing).__name__
            raise ValueError(
                f"A tensor of shape {tuple(tensor.shape)} already has a .jac of shape {found}, "
                f"which cannot accumulate a Jacobian of shape {expected} (the number of objectives "
                "differs). Call jac_to_grad (or del p.jac) between steps with different numbers "
                "of losses."
            )


def accumulate_jac(tensor: Tensor, jacobian: Tensor) -> None:
    """Store ``jacobian`` (shape ``[m] + tensor.shape``) in ``tensor.jac``, adding to any existing one.

    Parameters
    ----------
    tensor
        The leaf tensor that receives the Jacobian.
    jacobian
        Its Jacobian, ``[m, *tensor.shape]``; stored detached.

    Raises
    ------
    ValueError
        If ``tensor`` is complex, or the existing ``.jac`` has another shape.
    TypeError
        If the existing ``.jac`` is not a tensor.
    """
    if tensor.is_complex():
        raise ValueError(
            f"A complex tensor of shape {tuple(tensor.shape)} ({tensor.dtype}) would receive a Jacobian: Jacobian "
            "descent needs real parameters (the aggregators' Gramians are real). Split it into real and "
            "imaginary parts."
        )
    existing = get_jac(tensor)
    if existing is None:
        tensor.jac = jacobian.detach()  # type: ignore[attr-defined]
        return
    if not isinstance(existing, Tensor):
        raise TypeError(
            f"The .jac attribute of a tensor of shape {tuple(tensor.shape)} is a "
            f"{type(existing).__name__}, not a tensor; delete it (del p.jac) before calling again."
        )
    if existing.shape != jacobian.shape:
        raise ValueError(
            f"Cannot accumulate a Jacobian of shape {tuple(jacobian.shape)} into the existing .jac "
            f"of shape {tuple(existing.shape)} (tensor shape {tuple(tensor.shape)}): the number of "
            "objectives differs. Call jac_to_grad (or del p.jac) between steps with different "
            "numbers of losses."
        )
    with torch.no_grad():
        if existing.dtype == jacobian.dtype and existing.device == jacobian.device:
            existing.add_(jacobian)
        else:
            tensor.jac = existing + jacobian.to(existing)  # type: ignore[attr-defined]


def accumulate_grad(tensor: Tensor, gradient: Tensor) -> None:
    """Add ``gradient`` to ``tensor.grad`` (creating it if absent).

    Parameters
    ----------
    tensor
        The leaf tensor whose ``.grad`` receives the gradient.
    gradient
        A gradient of the shape of ``tensor``; cast to its dtype and device.

    Raises
    ------
    ValueError
        If ``gradient`` or the existing ``.grad`` does not have the shape of ``tensor``.
    """
    if gradient.shape != tensor.shape:
        raise ValueError(
            f"Gradient of shape {tuple(gradient.shape)} does not match the tensor shape "
            f"{tuple(tensor.shape)}."
        )
    with torch.no_grad():
        gradient = gradient.detach().to(dtype=tensor.dtype, device=tensor.device)
        if tensor.grad is None:
            tensor.grad = gradient
        else:
            if tensor.grad.shape != tensor.shape:
                raise ValueError(
                    f"The existing .grad has shape {tuple(tensor.grad.shape)} but the tensor has "
                    f"shape {tuple(tensor.shape)}; reset it (p.grad = None)."
                )
            tensor.grad.add_(gradient)
