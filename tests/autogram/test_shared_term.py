"""The split of per-example losses ``own_i + term`` with a term shared by the examples (a mixture of experts'
load-balancing loss) into per-example rows for the autogram engine (:mod:`hf_jd.autogram.shared_term`), against the
explicit Jacobian of the losses."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hf_jd.autogram import Engine, SharedTerm, split_shared_term

from ._reference import jacobian, trainable

EXAMPLES, TOKENS, WIDTH, EXPERTS = 4, 3, 5, 3


class _Routed(nn.Module):
    """Per-token router logits (``[B·T, E]`` rows, example by example) that weight a per-token layer, and a
    load-balancing term over all the tokens with a batch-wide factor held constant (as transformers' computes it from
    the top-k assignments)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(WIDTH, WIDTH)
        self.router = nn.Linear(WIDTH, EXPERTS)
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hidden = torch.tanh(self.layer(inputs))  # [B, T, d]
        logits = self.router(hidden.reshape(-1, WIDTH))  # [B·T, E]
        probs = logits.softmax(dim=-1)
        gate = probs.max(dim=-1).values.reshape(EXAMPLES, TOKENS, 1)
        own = self.head(hidden * gate).squeeze(-1).pow(2).mean(dim=1)  # [B]
        fractions = nn.functional.one_hot(probs.argmax(dim=-1), EXPERTS).float().mean(dim=0)  # no gradient
        term = EXPERTS * (fractions * probs.mean(dim=0)).sum()
        return own, term, logits


def test_gramian_and_weights_of_the_split_match_the_losses() -> None:
    torch.manual_seed(0)
    model = _Routed()
    own, term, logits = model(torch.randn(EXAMPLES, TOKENS, WIDTH))
    losses = own + term
    split = split_shared_term(own, term, [(logits,)])
    assert split is not None
    params = trainable(model)
    rows = split.rows()
    assert rows.shape == (EXAMPLES, 2)
    rows_jacobian = jacobian(rows, params)
    losses_jacobian = jacobian(losses, params)
    torch.testing.assert_close(split.gramian(rows_jacobian @ rows_jacobian.T), losses_jacobian @ losses_jacobian.T)
    weights = torch.rand(EXAMPLES)
    torch.testing.assert_close(split.row_weights(weights).reshape(-1) @ rows_jacobian, weights @ losses_jacobian)


def test_engine_takes_the_rows_without_a_per_row_pass(per_row_calls: list[str]) -> None:
    torch.manual_seed(0)
    model = _Routed()
    engine = Engine(model, batch_dim=0)
    own, term, logits = model(torch.randn(EXAMPLES, TOKENS, WIDTH))
    split = split_shared_term(own, term, [logits])
    assert split is not None
    gramian = split.gramian(engine.compute_gramian(split.rows()))
    losses_jacobian = jacobian(own + term, trainable(model))
    torch.testing.assert_close(gramian, losses_jacobian @ losses_jacobian.T, rtol=1e-4, atol=1e-6)
    assert per_row_calls == []


def test_terms_that_cannot_be_split() -> None:
    torch.manual_seed(0)
    model = _Routed()
    own, term, logits = model(torch.randn(EXAMPLES, TOKENS, WIDTH))
    # A parameter reached otherwise than through the sources (a penalty on a weight).
    assert split_shared_term(own, term + model.head.weight.pow(2).sum(), [logits]) is None
    # Only part of the sources given (the other path reaches the router's parameters).
    other = model.router(torch.randn(2 * EXAMPLES, WIDTH))
    assert split_shared_term(own, term + other.mean(), [logits]) is None
    # Sources that are not split by example (rows not a multiple of the batch), none, or no gradient.
    assert split_shared_term(own, term, [logits[:-1]]) is None
    assert split_shared_term(own, term, [None]) is None
    assert split_shared_term(own, term.detach(), [logits]) is None
    assert split_shared_term(own, term, [logits]) is not None


def test_split_weights_of_a_shared_term() -> None:
    weights = torch.tensor([0.5, 1.0, 2.0])
    torch.testing.assert_close(SharedTerm.row_weights(weights), torch.tensor([[0.5, 3.5], [1.0, 3.5], [2.0, 3.5]]))



def test_the_per_row_warning_names_the_split() -> None:
    """Given the summed losses, the engine takes the per-row pass (exact) and its warning, shown from the second step,
    points at split_shared_term."""
    import warnings

    torch.manual_seed(0)
    model = _Routed()
    engine = Engine(model, batch_dim=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            own, term, _ = model(torch.randn(EXAMPLES, TOKENS, WIDTH))
            engine.compute_gramian(own + term)
    messages = [str(w.message) for w in caught if "per-row gradients come from" in str(w.message)]
    assert len(messages) == 1 and "hf_jd.autogram.split_shared_term" in messages[0]
