"""Gramian engine: ``J Jᵀ`` of the losses' Jacobian w.r.t. the parameters of given modules,
computed during a backward pass without ever holding ``J`` (Algorithm 3 of Quinton & Rey,
"Jacobian Descent For Multi-Objective Optimization", arXiv 2406.16232).

:func:`split_shared_term` splits per-example losses ``own_i + term``, whose ``term`` is shared by the examples (a
mixture of experts' load-balancing loss), into per-example rows the engine takes without a per-row pass.
"""

from .engine import Engine
from .shared_term import SharedTerm, split_shared_term

__all__ = ["Engine", "SharedTerm", "split_shared_term"]
