"""Modules on the generic path (batched vector-Jacobian products) whose tensors hold several rows per
example along ``batch_dim``: the ``[B * T, d]`` tokens of transformers' fused mixture-of-experts layers
and routers, rows flattened batch- or time-major, rows mixed inside the module. A verified batch-major
grouping gives them per-example products from the ordinary pass (instead of the per-row pass); exact
against the explicit Jacobian either way, over several steps and batch sizes."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as tf
from torch import Tensor, nn

from hf_jd.autogram import Engine

from ._reference import assert_gramian_matches, count_per_row, grads_of, jacobian, trainable


def _check_step(engine: Engine, model: nn.Module, losses: Tensor, single_backward: bool) -> None:
    params = trainable(model)
    jac = jacobian(losses, params)
    assert_gramian_matches(engine.compute_gramian(losses, retain_graph=True), jac)
    weights = torch.linspace(0.5, 1.5, losses.shape[0])
    model.zero_grad(set_to_none=True)
    if single_backward:
        engine.backward(weights)
    else:
        losses.backward(weights)
    torch.testing.assert_close(grads_of(params), weights @ jac, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm", "eager"])
@pytest.mark.parametrize("single_backward", [False, True])
def test_fused_mixture_of_experts_takes_no_per_row_pass(single_backward: bool, implementation: str,
                                                        monkeypatch) -> None:
    per_row = count_per_row(monkeypatch)
    torch.manual_seed(0)
    config = tf.MixtralConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=2, num_local_experts=4,
                              num_experts_per_tok=2, max_position_embeddings=32)
    model = tf.AutoModelForCausalLM.from_config(config, experts_implementation=implementation)
    engine = Engine(model, single_backward=single_backward)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        for batch, length in ((4, 6), (4, 6), (3, 5)):
            ids = torch.randint(0, 50, (batch, length))
            logits = model(input_ids=ids).logits
            losses = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            _check_step(engine, model, losses.mean(1), single_backward)
    # The experts (3D weights indexed per expert) and the routers took the per-row pass on every step before.
    assert per_row == []
    assert not [record for record in records if "hf_jd.autogram" in str(record.message)]


class _Scale(nn.Module):
    """A module with a parameter of its own (generic path) applied to flattened rows."""

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim))
        self.mode = mode

    def forward(self, rows: Tensor) -> Tensor:
        if self.mode == "centred":  # every output row depends on every input row
            return (rows - rows.mean(0)) * self.weight
        return torch.tanh(rows * self.weight)


class _FlatNet(nn.Module):
    def __init__(self, dim: int, mode: str, time_major: bool) -> None:
        super().__init__()
        self.first = nn.Linear(dim, dim)
        self.scale = _Scale(dim, mode)
        self.last = nn.Linear(dim, 1)
        self.time_major = time_major

    def forward(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        hidden = self.first(x)
        if self.time_major:  # rows ordered (t, example): not grouped by example
            flat = self.scale(hidden.transpose(0, 1).reshape(length * batch, dim))
            hidden = flat.reshape(length, batch, dim).transpose(0, 1)
        else:
            hidden = self.scale(hidden.reshape(batch * length, dim)).reshape(batch, length, dim)
        return self.last(hidden).squeeze(-1).pow(2).mean(1)


# A hidden size equal to the batch size (4) also offers the [B * T, 4] rows a candidate time-major dimension; when
# its check failed on batch-major rows, the generic record could not be regrouped and a TypeError was raised.
@pytest.mark.parametrize("dim", [4, 5])
@pytest.mark.parametrize("mode", ["tanh", "centred"])
@pytest.mark.parametrize("time_major", [False, True])
@pytest.mark.parametrize("single_backward", [False, True])
def test_generic_module_on_flattened_rows_is_exact(
    dim: int, mode: str, time_major: bool, single_backward: bool, monkeypatch
) -> None:
    per_row = count_per_row(monkeypatch)
    torch.manual_seed(0)
    model = _FlatNet(dim, mode, time_major)
    engine = Engine(model, single_backward=single_backward)
    for _ in range(2):
        _check_step(engine, model, model(torch.randn(4, 3, dim)), single_backward)
    on_per_row = {name for call in per_row for name in call}
    # Batch-major rows: the grouping holds at the module's outputs (its own mixing of rows does not change its
    # parameters' per-example gradients; it shows upstream, whose Linear then takes the per-row pass).
    # Time-major rows fail the check and take the per-row pass.
    assert ("scale (_Scale)" in on_per_row) == time_major
    assert ("first (Linear)" in on_per_row) == (mode == "centred")


@pytest.mark.parametrize("single_backward", [False, True])
def test_router_flattening_its_input_takes_no_per_row_pass(single_backward: bool, monkeypatch) -> None:
    # DeepSeek-style top-k routers take [B, T, d] and return [B * T, experts] rows: the outputs alone decide the
    # grouping of a generic call (its products need only their gradients). The router took the per-row pass before.
    per_row = count_per_row(monkeypatch)
    torch.manual_seed(0)
    config = tf.DeepseekV3Config(vocab_size=50, hidden_size=16, intermediate_size=24, moe_intermediate_size=8,
                                 num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2,
                                 num_key_value_heads=2, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                                 n_group=2, topk_group=1, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4,
                                 qk_nope_head_dim=4, v_head_dim=4, max_position_embeddings=32)
    model = tf.DeepseekV3ForCausalLM(config)
    engine = Engine(model, single_backward=single_backward)
    for batch, length in ((4, 6), (3, 5)):
        ids = torch.randint(0, 50, (batch, length))
        logits = model(input_ids=ids).logits
        losses = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        _check_step(engine, model, losses.mean(1), single_backward)
    assert per_row == []
