"""A seeded ``torch.Generator`` whose state can be saved, restored and reset.

Used by the aggregators that draw random numbers (PCGrad, GradVac, GradDrop) so that they are
deterministic given a seed and can be checkpointed. Without a seed, the seed is drawn from
PyTorch's global generator at construction, so ``torch.manual_seed`` also makes them reproducible.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["SeededGenerator", "SeededStateMixin", "check_seed", "random_orders"]


def check_seed(seed: int | None) -> int:
    """Return ``seed``, or a fresh seed from the global generator if it is ``None``.

    Parameters
    ----------
    seed
        An ``int`` in ``[0, 2**64)`` (the range of ``torch.Generator.manual_seed``), or ``None``.

    Returns
    -------
    int
        The seed.

    Raises
    ------
    TypeError
        If ``seed`` is neither an ``int`` (``bool`` excluded) nor ``None``.
    ValueError
        If it is negative or not below ``2**64``.
    """
    if seed is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}.")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed}.")
    if seed >= 2**64:
        raise ValueError(f"seed must be below 2**64 (a torch.Generator seed), got {seed}.")
    return seed


def random_orders(m: int, generator: torch.Generator) -> np.ndarray:
    """For each ``i < m``, the other indices in a random order (one ``torch.randperm`` each).

    Returns an integer array of shape ``[m, m - 1]`` whose row ``i`` is row ``i``'s order.

    Parameters
    ----------
    m
        Number of indices.
    generator
        Source of the permutations (CPU).

    Returns
    -------
    numpy.ndarray
        Integer array of shape ``[m, m - 1]``.
    """
    permutations = torch.stack(
        [torch.randperm(max(m - 1, 0), generator=generator) for _ in range(m)]
    )
    # Row i's others are 0..i-1, i+1..m-1: position k holds k, or k + 1 from i on.
    return (permutations + (permutations >= torch.arange(m).unsqueeze(1))).numpy()


class SeededGenerator:
    """A ``torch.Generator`` created lazily on the device it is used on, seeded with ``seed``.

    If it is later used on another device, a new generator is created there from the same seed.

    Parameters
    ----------
    seed
        Seed of the generator; ``None`` draws one (see :func:`check_seed`).
    """

    def __init__(self, seed: int | None) -> None:
        self.seed = check_seed(seed)
        self._generator: torch.Generator | None = None
        self._pending: tuple[str, Tensor] | None = None

    def get(self, device: torch.device | str = "cpu") -> torch.Generator:
        """Return the generator for ``device``, creating it if needed.

        Parameters
        ----------
        device
            Device the random numbers are drawn on (``"cuda"`` means the current CUDA device).

        Returns
        -------
        torch.Generator
            The generator, seeded with ``seed`` (or restored from a loaded state) when created.
        """
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        current = self._generator
        if current is not None and torch.device(current.device) == device:
            return current
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed)
        if self._pending is not None and torch.device(self._pending[0]) == device:
            generator.set_state(self._pending[1])
        self._pending = None
        self._generator = generator
        return generator

    def reset(self) -> None:
        """Go back to the state right after construction."""
        self._generator = None
        self._pending = None

    def state_dict(self) -> dict[str, Any]:
        """Return the seed, the generator's device and its state (``None`` before first use).

        Returns
        -------
        dict
            Keys ``"seed"``, ``"device"`` and ``"generator_state"``.
        """
        if self._generator is not None:
            return {
                "seed": self.seed,
                "device": str(self._generator.device),
                "generator_state": self._generator.get_state(),
            }
        if self._pending is not None:
            return {
                "seed": self.seed,
                "device": self._pending[0],
                "generator_state": self._pending[1].clone(),
            }
        return {"seed": self.seed, "device": None, "generator_state": None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict`.

        Parameters
        ----------
        state
            A dictionary returned by :meth:`state_dict`.

        Raises
        ------
        ValueError
            If ``state`` does not have exactly the keys of :meth:`state_dict`, its seed is not an
            ``int``, or only one of its device and generator state is set.
        """
        if not isinstance(state, dict) or set(state) != {"seed", "device", "generator_state"}:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                "A generator state must be a dict with the keys 'device', 'generator_state' and "
                f"'seed' (as returned by state_dict()), got {keys}."
            )
        seed = check_seed(state["seed"]) if state["seed"] is not None else None
        if seed is None:
            raise ValueError("The generator state's 'seed' must be an int, got None.")
        device, generator_state = state["device"], state["generator_state"]
        if (device is None) != (generator_state is None):
            raise ValueError(
                "The generator state's 'device' and 'generator_state' must be both set or "
                "both None."
            )
        if generator_state is not None and not isinstance(generator_state, Tensor):
            raise ValueError(
                "The generator state's 'generator_state' must be a tensor, got "
                f"{type(generator_state).__name__}."
            )
        self.seed = seed
        self._generator = None
        self._pending = None if generator_state is None else (str(device), generator_state.clone())


class SeededStateMixin:
    """State handling of an object whose only state is a :class:`SeededGenerator`.

    Put it before the base class (``class X(SeededStateMixin, Aggregator)``) and set
    ``self._generator = SeededGenerator(seed)`` in ``__init__``: the generator state is then the
    object's state (``state_dict``/``load_state_dict``), and ``reset`` goes back to the seed.
    """

    _generator: SeededGenerator

    @property
    def seed(self) -> int:
        """The seed of the object's random generator."""
        return self._generator.seed

    def reset(self) -> None:
        """Go back to the state right after construction."""
        self._generator.reset()

    def state_dict(self) -> dict[str, Any]:
        """Return the generator's seed, device and state.

        Returns
        -------
        dict
            What :meth:`SeededGenerator.state_dict` returns.
        """
        return self._generator.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict`.

        Parameters
        ----------
        state
            A dictionary returned by :meth:`state_dict`.
        """
        self._generator.load_state_dict(state)
