"""Per-example losses that mix the examples (in-batch contrastive losses, batch-normalised losses):
the engine finds the mixing where the losses reach the module calls and takes the exact per-row path."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as tf
from torch import Tensor, nn

from hf_jd.autogram import Engine

from ._reference import assert_exact_step, trainable


def _bert() -> nn.Module:
    config = tf.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16,
    )
    return tf.BertModel(config).train()


def _contrastive(embeddings: Tensor, temperature: float = 0.5) -> Tensor:
    """In-batch negatives: example i's loss is the cross-entropy of its similarities to every example."""
    logits = embeddings @ embeddings.T / temperature
    return nn.functional.cross_entropy(logits, torch.arange(embeddings.shape[0]), reduction="none")


@pytest.mark.parametrize("single_backward", [False, True])
def test_in_batch_contrastive_loss_is_exact(single_backward: bool) -> None:
    torch.manual_seed(0)
    model = _bert()
    engine = Engine(model, single_backward=single_backward)
    ids = torch.randint(0, 50, (5, 6))
    losses = _contrastive(model(input_ids=ids).pooler_output)
    with pytest.warns(RuntimeWarning, match="mix the examples"):
        assert_exact_step(engine, losses, trainable(model), single_backward)


@pytest.mark.parametrize("single_backward", [False, True])
def test_losses_divided_by_their_batch_sum_are_exact(single_backward: bool) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    engine = Engine(model, single_backward=single_backward)
    raw = model(torch.randn(6, 4)).squeeze(1) ** 2
    losses = raw / raw.sum()
    with pytest.warns(RuntimeWarning, match="mix the examples"):
        assert_exact_step(engine, losses, trainable(model), single_backward)


@pytest.mark.parametrize("single_backward", [False, True])
def test_per_example_task_losses_with_one_mixing_task_are_exact(single_backward: bool) -> None:
    """[B, 2] losses: task 0 is contrastive (mixes the examples), task 1 is an ordinary per-example loss."""
    torch.manual_seed(2)
    trunk = nn.Sequential(nn.Linear(3, 6), nn.GELU())
    head = nn.Linear(6, 4)
    regression = nn.Linear(6, 1)
    engine = Engine(trunk, head, regression, single_backward=single_backward)
    features = trunk(torch.randn(4, 3))
    contrastive = _contrastive(head(features))
    squared = regression(features).squeeze(1) ** 2
    losses = torch.stack([contrastive, squared], dim=1)
    with pytest.warns(RuntimeWarning, match="mix the examples"):
        assert_exact_step(engine, losses, trainable(trunk, head, regression), single_backward)


def test_mixing_is_checked_on_every_step_and_warned_once() -> None:
    """A step with ordinary losses after a contrastive one takes the fast path again (exactly), and a later
    contrastive step is exact too; the warning is shown once per engine."""
    torch.manual_seed(3)
    model = _bert()
    classifier = nn.Linear(16, 3)
    engine = Engine(model, classifier)
    params = trainable(model, classifier)
    ids = torch.randint(0, 50, (4, 5))
    with pytest.warns(RuntimeWarning, match="mix the examples"):
        assert_exact_step(engine, _contrastive(classifier(model(input_ids=ids).pooler_output)), params, False)
    for param in params:
        param.grad = None
    labels = torch.tensor([0, 1, 2, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logits = classifier(model(input_ids=ids).pooler_output)
        assert_exact_step(engine, nn.functional.cross_entropy(logits, labels, reduction="none"), params, False)
        for param in params:
            param.grad = None
        assert_exact_step(engine, _contrastive(classifier(model(input_ids=ids).pooler_output)), params, False)


def test_ordinary_per_example_losses_raise_no_warning() -> None:
    torch.manual_seed(4)
    config = tf.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=3,
    )
    model = tf.BertForSequenceClassification(config).train()
    engine = Engine(model)
    ids = torch.randint(0, 50, (4, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logits = model(input_ids=ids).logits
        losses = nn.functional.cross_entropy(logits, torch.tensor([0, 2, 1, 0]), reduction="none")
        assert_exact_step(engine, losses, trainable(model), False)


def _tiny_causal_lm(model_type: str) -> nn.Module:
    settings = dict(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    if model_type == "opt":
        settings.update(ffn_dim=32, word_embed_proj_dim=16)
    config = tf.AutoConfig.for_model(model_type, **settings)
    assert config.tie_word_embeddings
    return tf.AutoModelForCausalLM.from_config(config).train()


@pytest.mark.parametrize("model_type", ["gpt2", "opt"])
@pytest.mark.parametrize("single_backward", [False, True])
def test_mixing_losses_of_a_model_with_tied_embeddings_are_exact(model_type: str, single_backward: bool) -> None:
    """The tied input and output embeddings then both take the per-row path (their Gram matrix used the batch's
    example count instead of the per-row layout's, and failed); OPT also regroups [B * T, d] rows."""
    torch.manual_seed(5)
    model = _tiny_causal_lm(model_type)
    engine = Engine(model, single_backward=single_backward)
    ids = torch.randint(1, 30, (3, 5))
    logits = model(input_ids=ids).logits
    token = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)
    losses = token / token.sum()
    with warnings.catch_warnings():  # OPT's regrouped rows have every call verified: no frontier check there
        warnings.simplefilter("ignore", RuntimeWarning)
        assert_exact_step(engine, losses, trainable(model), single_backward)


def test_bf16_autocast_rounding_is_not_taken_for_mixing() -> None:
    """Under autocast the output gradients hold the per-example identity to bf16 rounding only."""
    torch.manual_seed(6)
    model = _tiny_causal_lm("gpt2")
    engine = Engine(model)
    ids = torch.randint(1, 30, (4, 6))
    with warnings.catch_warnings(), torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("error", RuntimeWarning)
        logits = model(input_ids=ids).logits
        losses = nn.functional.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none").mean(1)
        gramian = engine.compute_gramian(losses)
    jac = torch.stack([
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, trainable(model), retain_graph=True)])
        for loss in losses
    ])
    expected = jac @ jac.T
    assert (gramian - expected).abs().max() <= 5e-2 * expected.abs().max()



def test_pairs_picked_by_the_data_are_checked_on_every_step() -> None:
    """losses_i = |e_i - e_{pair(i)}|²: the first step's pairing is the identity (no mixing), the second is not; a
    loss computation that picks rows by an index is checked on every step, so the second is exact too."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    engine = Engine(model)
    params = trainable(model)
    x = torch.randn(4, 3)
    for pairing in (torch.arange(4), torch.tensor([1, 0, 3, 2])):
        for param in params:
            param.grad = None
        embeddings = model(x)
        losses = (embeddings - embeddings[pairing]).pow(2).sum(1) + embeddings.pow(2).sum(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            assert_exact_step(engine, losses, params, False)


@pytest.mark.parametrize("single_backward", [False, True])
def test_examples_mixed_between_two_layers_are_exact(single_backward: bool) -> None:
    """A parameter-free operation across the batch between two Linear layers (centring over the batch) shows in
    the first layer's output gradients: checked on the first step, then exact on every step."""

    class Centred(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(3, 5)
            self.second = nn.Linear(5, 1)

        def forward(self, x: Tensor) -> Tensor:
            hidden = torch.tanh(self.first(x))
            return self.second(hidden - hidden.mean(0, keepdim=True))

    torch.manual_seed(9)
    model = Centred()
    engine = Engine(model, single_backward=single_backward)
    params = trainable(model)
    with pytest.warns(RuntimeWarning, match="mix the examples"):
        for _ in range(2):
            for param in params:
                param.grad = None
            assert_exact_step(engine, model(torch.randn(5, 3)).squeeze(1) ** 2, params, single_backward)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_loss_is_rejected_with_its_row(bad: float) -> None:
    """The grouping check cannot judge non-finite gradients, and every weighting fails on the Gramian: the engine
    names the rows instead of warning that the examples are mixed (it returned a non-finite Gramian)."""
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    engine = Engine(model)
    losses = model(torch.randn(3, 4)) ** 2 * torch.tensor([[1.0, 1.0], [1.0, bad], [1.0, 1.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(ValueError, match=r"1 of the 6 losses are inf or nan \(rows 3 of the flattened"):
            engine.compute_gramian(losses)
    losses = model(torch.randn(3, 4)) ** 2  # the captures are kept: a new forward pass works as usual
    assert torch.isfinite(engine.compute_gramian(losses)).all()
