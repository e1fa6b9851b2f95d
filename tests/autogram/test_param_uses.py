"""Uses of a covered parameter outside the captured calls of the modules that own it would be missing from
the Gramian: compute_gramian finds them from the sequence numbers of the autograd nodes (hf_jd.autogram._param_uses)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import GPT2Config, GPT2LMHeadModel, MobileBertConfig, MobileBertForMaskedLM

from hf_jd.autogram import Engine

from ._reference import assert_exact_step, assert_gramian_matches, jacobian, trainable


class _SlicedByParent(nn.Module):
    """Owns a weight but uses only the slices it is given (DBRX's expert GLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 5))

    def forward(self, inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.tanh(inputs @ weight.T)


class _Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = _SlicedByParent()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        slices = self.mlp.weight.view(2, 4, 5)
        return sum(self.mlp(inputs, slices[expert]) for expert in range(2))


def test_parent_slicing_a_childs_weight_is_rejected() -> None:
    """The child is called, so its weight counted as covered, but its forward never used it: the Gramian
    was silently zero."""
    model = _Experts()
    engine = Engine(model)
    losses = model(torch.randn(3, 5)).pow(2).sum(1)
    with pytest.raises(RuntimeError, match=r"\['mlp.weight'\].*parent module slicing a child's weights"):
        engine.compute_gramian(losses)


def _tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=30, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).train()


def test_tied_embedding_looked_up_by_the_user_is_rejected() -> None:
    """inputs_embeds from the tied weight: the output head's use is captured, the user's lookup is not."""
    model = _tiny_gpt2()
    engine = Engine(model)
    ids = torch.randint(0, 30, (3, 5))
    embeds = F.embedding(ids, model.get_input_embeddings().weight)
    logits = model(inputs_embeds=embeds).logits
    losses = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none").mean(1)
    with pytest.raises(RuntimeError, match=r"\['transformer.wte.weight'\].*outside the forward passes"):
        engine.compute_gramian(losses)


def test_tied_head_without_its_embedding_names_the_missing_module() -> None:
    """The engine has the output head but not the embedding it is tied to, whose lookup comes first."""
    model = _tiny_gpt2()
    engine = Engine(model.lm_head)
    ids = torch.randint(0, 30, (3, 5))
    losses = F.cross_entropy(model(ids).logits.transpose(1, 2), ids, reduction="none").mean(1)
    with pytest.raises(RuntimeError, match="tied input embeddings when the engine has the output head only"):
        engine.compute_gramian(losses)


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 3))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.layers(inputs)


class _PerTask(nn.Module):
    """The documented way to run one forward pass per task: inside one module given to the engine."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.encoder(batch) for batch in batches]


def test_one_forward_pass_per_task_is_rejected_and_the_documented_way_works() -> None:
    torch.manual_seed(0)
    batches = [torch.randn(4, 5), torch.randn(3, 5)]
    encoder = _Encoder()
    engine = Engine(encoder, batch_dim=None)
    losses = torch.stack([encoder(batch).pow(2).mean() for batch in batches])  # the second replaced the first
    with pytest.raises(RuntimeError, match="several forward passes.*inside the forward pass of one module"):
        engine.compute_gramian(losses)
    engine.remove()

    wrapper = _PerTask(encoder)
    engine = Engine(wrapper, batch_dim=None)
    losses = torch.stack([outputs.pow(2).mean() for outputs in wrapper(batches)])
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(wrapper)))


def test_cast_of_a_tied_embedding_outside_autocast_is_rejected() -> None:
    """Casts are exempt only under autocast (whose cached casts outlive a forward pass): a user's own cast
    of the weight before the lookup is a use outside the captured calls like any other."""
    model = _tiny_gpt2()
    engine = Engine(model)
    ids = torch.randint(0, 30, (3, 5))
    embeds = F.embedding(ids, model.get_input_embeddings().weight.double()).float()
    logits = model(inputs_embeds=embeds).logits
    losses = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none").mean(1)
    with pytest.raises(RuntimeError, match=r"\['transformer.wte.weight'\].*outside the forward passes"):
        engine.compute_gramian(losses)


def test_autocast_region_over_several_steps_is_not_a_use_outside() -> None:
    """Autocast caches the bf16 cast of each weight for the whole region: later steps reuse the cast node
    created in the first one, which must not be taken for a use outside the captured calls."""
    model = _tiny_gpt2()
    engine = Engine(model)
    ids = torch.randint(0, 30, (3, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(2):
            logits = model(input_ids=ids).logits
            losses = F.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none").mean(1)
            gramian = engine.compute_gramian(losses)
            losses.backward(torch.ones_like(losses))
    assert torch.isfinite(gramian).all()


@pytest.mark.parametrize("single_backward", [False, True])
def test_weight_penalty_added_to_the_losses_is_exact_with_advice(single_backward: bool) -> None:
    """A penalty on a weight added to per-example losses uses it outside every module call: that weight leaves the
    closed forms for the per-row path from the losses (it used to be rejected), and the warning gives the advice."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))
    engine = Engine(model, single_backward=single_backward)
    losses = model(torch.randn(3, 4))[:, 0].pow(2) + 1e-2 * model[2].weight.pow(2).sum()
    with pytest.warns(RuntimeWarning, match=r"\['2.weight'\].*penalty.*use the optimizer's weight_decay"):
        assert_exact_step(engine, losses, trainable(model), single_backward)


@pytest.mark.parametrize("single_backward", [False, True])
@pytest.mark.parametrize("batch_dim", [0, None])
def test_penalty_on_every_covered_parameter_is_exact(single_backward: bool, batch_dim: int | None) -> None:
    """With every parameter also used outside the calls, no closed form is left: all take the per-row path (this
    was rejected as losses of an uncaptured forward pass), in the parameters' float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    engine = Engine(model, batch_dim=batch_dim, single_backward=single_backward)
    outputs = model(torch.randn(3, 4, dtype=torch.float64))[:, 0].pow(2)
    penalty = 1e-2 * sum(param.pow(2).sum() for param in model.parameters())
    losses = outputs + penalty if batch_dim == 0 else torch.stack([outputs.mean(), penalty])
    params = trainable(model)
    jac = jacobian(losses, params)
    with pytest.warns(RuntimeWarning, match=r"\['0.weight', '0.bias', '2.weight', '2.bias'\]"):
        gramian = engine.compute_gramian(losses, retain_graph=True)
    assert gramian.dtype == torch.float64
    torch.testing.assert_close(gramian, jac @ jac.T, rtol=1e-12, atol=1e-14)
    weights = torch.linspace(0.5, 1.5, losses.numel(), dtype=torch.float64)
    if single_backward:
        engine.backward(weights)
    else:
        losses.backward(weights)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in params]), weights @ jac, rtol=1e-12, atol=1e-14)


class _TiedHead(nn.Module):
    """An embedding whose weight a parent also multiplies with, beside a Linear it never calls (MobileBERT's
    masked-LM head: ``h @ cat([decoder.weight.T, dense.weight])`` with the decoder tied to the embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.body = nn.Linear(4, 6)
        self.extra = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.body(self.embed(ids)))
        return hidden[..., :4] @ torch.cat([self.embed.weight.T, self.extra.weight[:, :4].T], dim=1)


@pytest.mark.parametrize("single_backward", [False, True])
def test_weight_used_by_its_module_and_a_parent_is_exact(single_backward: bool) -> None:
    torch.manual_seed(0)
    model = _TiedHead()
    engine = Engine(model, single_backward=single_backward)
    ids = torch.randint(0, 11, (3, 5))
    logits = model(ids)
    losses = F.cross_entropy(logits[..., :11].transpose(1, 2), ids, reduction="none").mean(1)
    with pytest.warns(RuntimeWarning, match=r"\['embed.weight', 'extra.weight'\]"):
        assert_exact_step(engine, losses, trainable(model), single_backward)


@pytest.mark.parametrize("single_backward", [False, True])
def test_mobilebert_masked_lm_is_exact(single_backward: bool) -> None:
    """Its head multiplies by the tied word embeddings (used by the embedding layer too) and by a Linear's weight
    it never calls. On the first step both take the per-row path from the losses (the tied one was rejected);
    from the second on, the head's generic record borrows them and the tied weight is shared by two records."""
    torch.manual_seed(0)
    config = MobileBertConfig(vocab_size=40, hidden_size=16, embedding_size=8, num_hidden_layers=1,
                              num_attention_heads=2, intermediate_size=16, intra_bottleneck_size=8,
                              true_hidden_size=8, num_feedforward_networks=1, max_position_embeddings=16)
    model = MobileBertForMaskedLM(config).train()
    engine = Engine(model, single_backward=single_backward)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        ids = torch.randint(0, 40, (3, 6))
        logits = model(input_ids=ids).logits
        losses = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none").mean(1)
        assert_exact_step(engine, losses, trainable(model), single_backward)


class _CachedBias(nn.Module):
    """Keeps a tensor computed from its parameter in its first forward pass and reuses it afterwards (LeViT's
    attention-bias cache in evaluation mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.table = nn.Parameter(torch.randn(2))
        self.cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            self.cache = self.table * 2.0
        return self.linear(x) + self.cache


def test_tensor_cached_from_an_earlier_step_is_named_in_the_error() -> None:
    """The second step's losses use a tensor of the first step's graph: the error says that such uses may come from an
    earlier step (it only listed uses outside the owning module within the step)."""
    model = _CachedBias()
    engine = Engine(model)
    losses = model(torch.randn(3, 3)).pow(2).sum(1)
    engine.compute_gramian(losses)
    losses = model(torch.randn(3, 3)).pow(2).sum(1)
    with pytest.raises(RuntimeError, match=r"\['table'\].*in an earlier step, through a tensor kept since"):
        engine.compute_gramian(losses)


class _HeadWithTiedBias(nn.Module):
    """Owns a bias that its never-called decoder shares, and adds it through the decoder (MobileBERT's head)."""

    def __init__(self) -> None:
        super().__init__()
        self.transform = nn.Linear(4, 4)
        self.decoder = nn.Linear(4, 7)
        self.bias = self.decoder.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        scores = torch.tanh(self.transform(hidden)) @ self.decoder.weight.T
        scores += self.decoder.bias
        return scores


@pytest.mark.parametrize("single_backward", [False, True])
def test_own_parameter_tied_to_an_uncalled_submodule_is_exact_from_the_first_step(single_backward: bool) -> None:
    """The module's record covered its bias through its own name while the call used it through the decoder, which
    is only borrowed from the next call on: the first Gramian missed the bias entirely."""
    torch.manual_seed(0)
    model = _HeadWithTiedBias()
    engine = Engine(model, single_backward=single_backward)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        scores = model(torch.randn(3, 5, 4))
        losses = F.cross_entropy(scores.transpose(1, 2), torch.randint(0, 7, (3, 5)), reduction="none").mean(1)
        assert_exact_step(engine, losses, trainable(model), single_backward)
