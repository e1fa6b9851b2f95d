"""The split of per-example losses ``own_i + term`` with a term shared by the examples (a mixture of experts'
load-balancing loss) into per-example rows for the autogram engine (:mod:`hf_jd.trainer._shared_term`), against the
explicit Jacobian of the losses."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from hf_jd.autogram import Engine
from hf_jd.trainer._shared_term import SharedTerm, shared_term

from jd_trainer_helpers import explicit_jacobian, trainable

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
    split = shared_term(own, term, [(logits,)])
    assert split is not None
    params = trainable(model)
    rows = split.rows()
    assert rows.shape == (EXAMPLES, 2)
    rows_jacobian = explicit_jacobian(rows, params)
    jacobian = explicit_jacobian(losses, params)
    torch.testing.assert_close(split.gramian(rows_jacobian @ rows_jacobian.T), jacobian @ jacobian.T)
    weights = torch.rand(EXAMPLES)
    torch.testing.assert_close(split.row_weights(weights).reshape(-1) @ rows_jacobian, weights @ jacobian)


def test_engine_takes_the_rows_without_a_per_row_pass(monkeypatch) -> None:
    from hf_jd.autogram import engine as engine_module

    per_row: list[int] = []
    original = engine_module.grads_per_row
    monkeypatch.setattr(engine_module, "grads_per_row", lambda *args: per_row.append(1) or original(*args))
    torch.manual_seed(0)
    model = _Routed()
    engine = Engine(model, batch_dim=0)
    own, term, logits = model(torch.randn(EXAMPLES, TOKENS, WIDTH))
    split = shared_term(own, term, [logits])
    assert split is not None
    gramian = split.gramian(engine.compute_gramian(split.rows()))
    jacobian = explicit_jacobian(own + term, trainable(model))
    torch.testing.assert_close(gramian, jacobian @ jacobian.T, rtol=1e-4, atol=1e-6)
    assert per_row == []


def test_terms_that_cannot_be_split() -> None:
    torch.manual_seed(0)
    model = _Routed()
    own, term, logits = model(torch.randn(EXAMPLES, TOKENS, WIDTH))
    # A parameter reached otherwise than through the sources (a penalty on a weight).
    assert shared_term(own, term + model.head.weight.pow(2).sum(), [logits]) is None
    # Only part of the sources given (the other path reaches the router's parameters).
    other = model.router(torch.randn(2 * EXAMPLES, WIDTH))
    assert shared_term(own, term + other.mean(), [logits]) is None
    # Sources that are not split by example (rows not a multiple of the batch), none, or no gradient.
    assert shared_term(own, term, [logits[:-1]]) is None
    assert shared_term(own, term, [None]) is None
    assert shared_term(own, term.detach(), [logits]) is None
    assert shared_term(own, term, [logits]) is not None


def test_split_weights_of_a_shared_term() -> None:
    weights = torch.tensor([0.5, 1.0, 2.0])
    torch.testing.assert_close(SharedTerm.row_weights(weights), torch.tensor([[0.5, 3.5], [1.0, 3.5], [2.0, 3.5]]))


@pytest.mark.parametrize(
    ("model_type", "extra"),
    [
        ("qwen2_moe", {"moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "num_experts": 4}),
        ("granitemoe", {"num_local_experts": 4}),
    ],
)
def test_mixtures_of_experts_router_loss_split(model_type: str, extra: dict, monkeypatch) -> None:
    """The built-in causal LM losses of other mixtures of experts than Mixtral (tested through the trainer): split,
    exact, and without the engine's per-row pass."""
    import transformers

    from hf_jd.autogram import engine as engine_module
    from hf_jd.trainer.losses import per_example_losses_and_router_term, router_loss_split

    per_row: list[int] = []
    original = engine_module.grads_per_row
    monkeypatch.setattr(engine_module, "grads_per_row", lambda *args: per_row.append(1) or original(*args))
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, output_router_logits=True, router_aux_loss_coef=0.3,
        num_experts_per_tok=2, **extra,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).train()
    engine = Engine(model, batch_dim=0)
    ids = torch.randint(1, 100, (4, 8))
    outputs = model(input_ids=ids)
    own, term = per_example_losses_and_router_term(model, outputs, ids)
    assert term is not None
    split = router_loss_split(outputs, own, term)
    assert split is not None
    jacobian = explicit_jacobian(own + term, trainable(model))
    gramian = split.gramian(engine.compute_gramian(split.rows()))
    torch.testing.assert_close(gramian, jacobian @ jacobian.T, rtol=1e-4, atol=1e-5)
    assert per_row == []
