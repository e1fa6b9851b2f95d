"""Generic calls whose weights meet the data in matrix products alone (mixtures of experts): per-example gradients
from sums over the products' rows, each row's example found from one batched pass through the call."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as tf
from torch import Tensor, nn

from hf_jd.autogram import Engine, _generic, _matmul_uses

from ._reference import assert_exact_step_with_freed_graph, jacobian, trainable

V = 50
_CE = nn.functional.cross_entropy


def _token_losses(model: nn.Module, ids: Tensor) -> Tensor:
    labels = ids.clone()
    labels[0, 2:4] = -100  # tokens without a loss: their rows in the experts get no gradient
    token = _CE(model(input_ids=ids).logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    return token.sum(1) / (labels[:, 1:] != -100).sum(1)


def _mixtral(implementation: str) -> nn.Module:
    config = tf.MixtralConfig(vocab_size=V, hidden_size=16, intermediate_size=8, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
    config._experts_implementation = implementation
    return tf.MixtralForCausalLM(config)


@pytest.mark.parametrize("single_backward", [False, True])
@pytest.mark.parametrize("implementation", ["grouped_mm", "eager", "batched_mm"])
def test_mixtral_experts(implementation: str, single_backward: bool, taken: list[tuple[str, bool]]) -> None:
    """transformers' three implementations of the experts: tokens sorted and ``grouped_mm``, one ``W[e]`` product
    per expert, and ``bmm`` on ``W[ids]`` per token."""
    torch.manual_seed(0)
    model = _mixtral(implementation)
    engine = Engine(model, single_backward=single_backward)
    for batch in (3, 3, 2, 4):
        model.zero_grad(set_to_none=True)
        assert_exact_step_with_freed_graph(engine, model, _token_losses(model, torch.randint(1, V, (batch, 6))),
                                           single_backward)
    assert {taken_ for name, taken_ in taken if name == "MixtralExperts"} == {True}


_MOE = {
    "qwen2_moe": dict(moe_intermediate_size=8, shared_expert_intermediate_size=8, num_experts=4, num_experts_per_tok=2,
                      intermediate_size=16),
    "olmoe": dict(intermediate_size=8, num_experts=4, num_experts_per_tok=2),
    # experts with biases (added to the products' rows, gathered per token)
    "gpt_oss": dict(intermediate_size=8, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                    layer_types=["full_attention"]),
    "deepseek_v3": dict(intermediate_size=16, moe_intermediate_size=8, n_routed_experts=4, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4,
                        qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1),
    # each expert's tokens multiplied as one matrix (bmm blocks holding several examples' rows)
    "llama4_text": dict(intermediate_size=8, intermediate_size_mlp=16, num_local_experts=4, num_experts_per_tok=2,
                        head_dim=8, moe_layers=[0], layer_types=["full_attention"]),
}


@pytest.mark.parametrize("name", sorted(_MOE))
def test_mixture_of_experts_models(name: str, taken: list[tuple[str, bool]]) -> None:
    torch.manual_seed(1)
    config = tf.AutoConfig.for_model(name, vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0, **_MOE[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # configuration notes about RoPE scaling of the tiny configurations
        model = tf.AutoModelForCausalLM.from_config(config)
    engine = Engine(model)
    for batch in (3, 2, 3):
        model.zero_grad(set_to_none=True)
        assert_exact_step_with_freed_graph(engine, model, _token_losses(model, torch.randint(1, V, (batch, 6))), False)
    took = [taken_ for module, taken_ in taken if module.endswith("Experts")]
    assert took and all(took[1:])  # (on the first step, products from the uses may be tried first)


def test_task_losses_without_batch_dim(taken: list[tuple[str, bool]]) -> None:
    """``[m]`` task losses: each task's rows come from the same batched pass through the call."""
    torch.manual_seed(3)
    model = _mixtral("grouped_mm")
    engine = Engine(model, batch_dim=None)
    ids = torch.randint(1, V, (3, 6))
    token = _CE(model(input_ids=ids).logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    assert_exact_step_with_freed_graph(engine, model, torch.stack([token[0].mean(), token[1:].mean()]), False)
    assert {taken_ for name, taken_ in taken if name == "MixtralExperts"} == {True}


def test_float64(taken: list[tuple[str, bool]]) -> None:
    torch.manual_seed(4)
    model = _mixtral("eager").double()  # (grouped_mm has no float64 kernel)
    engine = Engine(model)
    losses = _token_losses(model, torch.randint(1, V, (3, 6)))
    gramian = engine.compute_gramian(losses, retain_graph=True)
    jac = jacobian(losses, trainable(model))
    assert gramian.dtype == torch.float64
    torch.testing.assert_close(gramian, jac @ jac.T, rtol=1e-10, atol=1e-12)
    assert {taken_ for name, taken_ in taken if name == "MixtralExperts"} == {True}


class RoutedBmm(nn.Module):
    """Each token multiplied by the weight its sign pattern selects (tokens sorted by weight), ``bmm`` with the
    weight on the left or right."""

    def __init__(self, left: bool, mix: bool = False, extra_use: bool = False, scaled: bool = False,
                 twice: bool = False, scale_use: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 5, 4) if left else torch.randn(3, 4, 5))
        self.left, self.mix, self.extra_use, self.scaled, self.twice = left, mix, extra_use, scaled, twice
        self.scale_use = scale_use

    def forward(self, x: Tensor) -> Tensor:  # [B, T, 4] -> [B, T, 5]
        rows = x.flatten(0, 1)
        ids = (rows[:, 0] > 0).long() + (rows[:, 1] > 0).long()
        ids, order = torch.sort(ids, stable=True)  # tokens grouped by weight, as experts do
        rows = rows[order]
        weight = 2 * self.weight if self.scaled else self.weight  # (then not only moved between weight and product)
        if self.left:
            out = torch.bmm(weight[ids], rows.unsqueeze(-1)).squeeze(-1)
        else:
            out = torch.bmm(rows.unsqueeze(1), weight[ids]).squeeze(1)
        if self.twice:  # a second product on the same slices: cross terms between the two
            out = out + torch.bmm(rows.unsqueeze(1), weight[2 - ids].mT.mT if not self.left else
                                  weight[2 - ids].flatten(1).view(-1, 4, 5)).squeeze(1)
        if self.mix:  # every token's output depends on all of them
            out = out - out.mean(0, keepdim=True)
        if self.extra_use:  # a use of the weight that is neither a product nor an elementwise scale or sum
            out = torch.maximum(out, self.weight.mean() - 1)
        if self.scale_use:  # an elementwise scale by a scalar computed from the weight
            out = out * self.weight.mean()
        return out[torch.argsort(order)].view(*x.shape[:2], -1)


class _Net(nn.Module):
    def __init__(self, routed: nn.Module) -> None:
        super().__init__()
        self.inp, self.routed, self.out = nn.Linear(3, 4), routed, nn.Linear(5, 1)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, 3] -> [B]
        return self.out(torch.tanh(self.routed(self.inp(x)))).squeeze(-1).pow(2).mean(1)


@pytest.mark.parametrize("single_backward", [False, True])
@pytest.mark.parametrize(("left", "scaled", "twice"), [(True, False, False), (False, False, False),
                                                       (False, True, False), (False, False, True)])
def test_routed_bmm(left: bool, scaled: bool, twice: bool, single_backward: bool,
                    taken: list[tuple[str, bool]]) -> None:
    """The weight on either side of ``bmm``; a weight scaled before it is selected, and slices used by two products
    (their Gram contributions then come from the per-row gradients, with the cross terms)."""
    torch.manual_seed(5)
    model = _Net(RoutedBmm(left, scaled=scaled, twice=twice))
    engine = Engine(model, single_backward=single_backward)
    for batch in (4, 4, 3):
        model.zero_grad(set_to_none=True)
        assert_exact_step_with_freed_graph(engine, model, model(torch.randn(batch, 5, 3)), single_backward)
    took = [taken_ for name, taken_ in taken if name == "RoutedBmm"]
    assert took and all(took[1:])  # (on the first step, the products from the uses are tried first)


@pytest.mark.parametrize("single_backward", [False, True])
def test_routed_bmm_scaled_by_its_own_weight(single_backward: bool, taken: list[tuple[str, bool]]) -> None:
    """The weight also scales the products' output elementwise (through a scalar computed from it): that use is an
    elementwise one too, with a per-example gradient ``Σ g ⊙ x`` within each row, and the path applies."""
    torch.manual_seed(7)
    model = _Net(RoutedBmm(left=False, scale_use=True))
    engine = Engine(model, single_backward=single_backward)
    for batch in (4, 3):
        model.zero_grad(set_to_none=True)
        assert_exact_step_with_freed_graph(engine, model, model(torch.randn(batch, 5, 3)), single_backward)
    assert {taken_ for name, taken_ in taken if name == "RoutedBmm"} == {True}


@pytest.mark.parametrize(("mix", "extra_use"), [(True, False), (False, True)])
def test_other_cases_keep_the_per_example_products(mix: bool, extra_use: bool, taken: list[tuple[str, bool]]) -> None:
    """Rows reached by several examples (mixed after the product, inside the call), or a use of the weight that is
    neither a product nor an elementwise one: the path does not apply to the examples' rows, and the Gramian is still
    exact. (With the mixing, the first step's per-row fallback, which treats the batch as one example with a task
    per loss row, may use the path: every row then belongs to that one example.)"""
    torch.manual_seed(6)
    model = _Net(RoutedBmm(left=False, mix=mix, extra_use=extra_use))
    engine = Engine(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # examples mixed inside the call: the engine may say so
        for batch in (4, 3):
            model.zero_grad(set_to_none=True)
            assert_exact_step_with_freed_graph(engine, model, model(torch.randn(batch, 5, 3)), False)
    took = [taken_ for name, taken_ in taken if name == "RoutedBmm"]
    assert took and not took[-1]
    if extra_use:
        assert not any(took)



class SplitExperts(nn.Module):
    """Tokens sorted by expert, split, one ``F.linear`` per expert; expert 1 never receives a token."""

    def __init__(self, leak: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 5, 4))
        self.leak = leak

    def forward(self, x: Tensor) -> Tensor:  # [B, T, 4] -> [B, T, 5]
        rows = x.flatten(0, 1)
        ids, order = torch.sort(2 * (rows[:, 0] > 0).long(), stable=True)
        parts = rows[order].split(torch.bincount(ids, minlength=3).tolist())
        out = torch.cat([nn.functional.linear(part, self.weight[index]) for index, part in enumerate(parts)])
        if self.leak:  # every row also gets a little of another token's row (examples mixed inside the call)
            out = out + self.leak * out.flip(0)
        return out[torch.argsort(order)].view(*x.shape[:2], -1)


class _LinearHead(nn.Module):
    """A head linear in the experts' output: every row's output gradient is the same vector for all examples."""

    def __init__(self, experts: SplitExperts) -> None:
        super().__init__()
        self.inp, self.experts, self.out = nn.Linear(3, 4), experts, nn.Linear(5, 1)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, 3] -> [B]
        return self.out(self.experts(self.inp(x))).squeeze(-1).mean(1)


@pytest.mark.parametrize("single_backward", [False, True])
def test_expert_without_tokens(single_backward: bool, taken: list[tuple[str, bool]]) -> None:
    torch.manual_seed(8)
    model = _Net(SplitExperts())
    engine = Engine(model, single_backward=single_backward)
    for batch in (3, 2, 3):
        model.zero_grad(set_to_none=True)
        assert_exact_step_with_freed_graph(engine, model, model(torch.randn(batch, 4, 3)), single_backward)
    took = [taken_ for name, taken_ in taken if name == "SplitExperts"]
    assert took and all(took[1:])


@pytest.mark.parametrize("batch", [2, 8])
def test_rows_mixed_with_parallel_gradients_are_detected(batch: int, taken: list[tuple[str, bool]]) -> None:
    """A row that two examples reach with parallel output gradients (a head linear in the call's output) scales by a
    weight between theirs: the path declines, the Gramian stays exact."""
    torch.manual_seed(9)
    model = _LinearHead(SplitExperts(leak=1e-3))
    engine = Engine(model)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        assert_exact_step_with_freed_graph(engine, model, model(torch.randn(batch, 4, 3)), False)
    assert not any(taken_ for name, taken_ in taken if name == "SplitExperts")


def test_few_rows_of_small_weights_take_one_product_per_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to FEW_ROWS loss rows of small weights the usual path is cheaper; beyond, the products' path applies."""
    calls: list[tuple[int, bool]] = []
    original = _generic.matmul_factors

    def counted(record, layout, *args):  # type: ignore[no-untyped-def]
        factors = original(record, layout, *args)
        if type(record.module).__name__ == "MixtralExperts":
            calls.append((layout.num_rows, factors is not None))
        return factors

    monkeypatch.setattr(_generic, "matmul_factors", counted)
    torch.manual_seed(10)
    model = _mixtral("grouped_mm")
    engine = Engine(model)
    for batch in (3, _matmul_uses.FEW_ROWS + 1):
        model.zero_grad(set_to_none=True)
        assert_exact_step_with_freed_graph(engine, model, _token_losses(model, torch.randint(1, V, (batch, 6))), False)
    assert {taken for rows, taken in calls if rows == 3} == {False}
    assert {taken for rows, taken in calls if rows > _matmul_uses.FEW_ROWS} == {True}


class TwoSlices(nn.Module):
    """Two products on slices of one weight ``[3, 4, 5]`` that overlap although their selects differ: ``W[2]`` and
    ``W[-1]``, or ``W[1]`` and ``W.view(6, 2, 5)[2]``, which is ``W[1, :2]``."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4, 5) * 0.5)
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:  # [B, T, 4] -> [B, T, 5]
        rows = x.flatten(0, 1)
        order = torch.argsort(rows[:, 0])  # (rows reordered: the products' path, not the products from the uses)
        rows = rows[order]
        if self.mode == "negative":
            out = rows @ self.weight[2] + torch.tanh(rows) @ self.weight[-1]
        else:
            out = rows @ self.weight[1] + torch.tanh(rows[:, :2]) @ self.weight.view(6, 2, 5)[2]
        return out[torch.argsort(order)].view(*x.shape[:2], -1)


@pytest.mark.parametrize("mode", ["negative", "view"])
def test_overlapping_slices_keep_their_cross_terms(mode: str, taken: list[tuple[str, bool]]) -> None:
    """The Gram contribution is summed per slice only for selects of the weight itself on distinct indices (a negative
    index normalised); otherwise the per-row gradients give the cross terms between the two products."""
    torch.manual_seed(11)
    model = _Net(TwoSlices(mode))
    engine = Engine(model)
    for batch in (3, 5):
        model.zero_grad(set_to_none=True)
        assert_exact_step_with_freed_graph(engine, model, model(torch.randn(batch, 4, 3)), False)


class _FunctionalLinear(nn.Module):
    """A module that applies its own weight and bias with ``F.linear`` on ``[B * T, d]`` rows (``addmm``), or
    with ``torch.addmm`` and other coefficients."""

    def __init__(self, bias: str, alpha: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 4) * 0.5)
        shapes = {"vector": (5,), "row": (1, 5), "frozen weight": (5,)}
        self.bias = nn.Parameter(torch.randn(*shapes[bias]) * 0.1) if bias in shapes else None
        self.weight.requires_grad_(bias != "frozen weight")  # (then only the bias is a use)
        if bias == "frozen":
            self.register_buffer("fixed", torch.randn(5))
        self.alpha = alpha

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        bias = self.bias if self.bias is not None else getattr(self, "fixed", None)
        if self.alpha != 1.0:
            out = torch.addmm(bias, rows, self.weight.T, alpha=self.alpha)
        else:
            out = nn.functional.linear(rows, self.weight, bias)
        return torch.tanh(out).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("single_backward", [False, True])
@pytest.mark.parametrize(("bias", "alpha", "path"), [
    ("vector", 1.0, True), ("row", 1.0, True), ("none", 1.0, True), ("frozen", 1.0, True),
    ("frozen weight", 1.0, True), ("vector", 2.0, False),
])
def test_functional_linear_on_rows(
    bias: str, alpha: float, path: bool, single_backward: bool, taken: list[tuple[str, bool]]
) -> None:
    """``addmm(b, x, Wᵀ)``: the product's rows and the bias added to them are uses of the weight and the bias (other
    coefficients than 1 keep one product per example)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), _FunctionalLinear(bias, alpha), nn.Linear(5, 1))
    engine = Engine(model, single_backward=single_backward)
    for batch in (4, 5):
        model.zero_grad(set_to_none=True)
        losses = model(torch.randn(batch, 6, 3)).squeeze(2).pow(2).mean(1)
        assert_exact_step_with_freed_graph(engine, model, losses, single_backward)
    assert {taken_ for name, taken_ in taken if name == "_FunctionalLinear"} == {path}


@pytest.mark.parametrize("single_backward", [False, True])
@pytest.mark.parametrize(("batch_first", "need_weights"), [(True, False), (False, False), (False, True)])
def test_torch_multihead_attention(
    batch_first: bool, need_weights: bool, single_backward: bool, taken: list[tuple[str, bool]]
) -> None:
    """``nn.MultiheadAttention`` applies its packed input projection to ``[T, B, d]`` tokens with ``matmul`` and its
    output projection to ``[T * B, d]`` rows with ``addmm``, as ``nn.TransformerEncoderLayer`` calls it."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(V, 8)
            self.attention = nn.MultiheadAttention(8, 2, batch_first=batch_first)
            self.head = nn.Linear(8, 1)

        def forward(self, ids: Tensor) -> Tensor:
            states = self.embedding(ids) if batch_first else self.embedding(ids).transpose(0, 1)
            outputs, _ = self.attention(states, states, states, need_weights=need_weights)
            outputs = outputs if batch_first else outputs.transpose(0, 1)
            return self.head(outputs).squeeze(2).pow(2).mean(1)

    torch.manual_seed(4)
    model = Model()
    engine = Engine(model, single_backward=single_backward)
    for batch, length in ((4, 5), (3, 6)):
        model.zero_grad(set_to_none=True)
        losses = model(torch.randint(0, V, (batch, length)))
        assert_exact_step_with_freed_graph(engine, model, losses, single_backward)
    assert {taken_ for name, taken_ in taken if name == "MultiheadAttention"} == {True}


@pytest.mark.parametrize("single_backward", [False, True])
def test_siglip_attention_pooling_head(single_backward: bool, taken: list[tuple[str, bool]]) -> None:
    """SigLIP's vision tower pools its patches with a learned probe and torch's ``nn.MultiheadAttention``."""
    config = tf.SiglipVisionConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=32, vision_use_head=True)
    torch.manual_seed(5)
    model = tf.SiglipVisionModel(config).train()
    engine = Engine(model, single_backward=single_backward)
    for batch in (4, 3):
        model.zero_grad(set_to_none=True)
        losses = model(pixel_values=torch.randn(batch, 3, 8, 8)).pooler_output.pow(2).mean(1)
        assert_exact_step_with_freed_graph(engine, model, losses, single_backward)
    assert {taken_ for name, taken_ in taken if name == "MultiheadAttention"} == {True}


class _MaskedWeight(nn.Module):
    """A weight multiplied by a constant mask (an operation on the weight alone, though the mask is untracked), then
    applied to the rows of its input, which requires no gradient when the module comes first."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3))
        self.register_buffer("mask", (torch.rand(4, 3) > 0.3).float())

    def forward(self, x: Tensor) -> Tensor:
        return x @ (self.weight * self.mask)


@pytest.mark.parametrize("single_backward", [False, True])
@pytest.mark.parametrize("first", ["encoder", "masked weight"])
def test_untracked_inputs_to_the_first_call(first: str, single_backward: bool, taken: list[tuple[str, bool]]) -> None:
    """A generic call on inputs that require no gradient (continuous features fed to ``nn.TransformerEncoder``): its
    products with the data are uses of its weights, not operations on the weights alone, which would leave the call and
    send it to one product per example."""
    torch.manual_seed(6)
    if first == "encoder":
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        body: nn.Module = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        width, name = 8, "MultiheadAttention"
    else:
        body, width, name = _MaskedWeight(), 3, "_MaskedWeight"
    model = nn.Sequential(body, nn.Linear(width, 1))
    engine = Engine(model, single_backward=single_backward)
    for batch in (4, 3):
        model.zero_grad(set_to_none=True)
        features = torch.randn(batch, 5, 8 if first == "encoder" else 4)
        losses = model(features).squeeze(2).pow(2).mean(1)
        assert_exact_step_with_freed_graph(engine, model, losses, single_backward)
    assert {taken_ for module, taken_ in taken if module == name} == {True}


class _UnusedScaledOutput(nn.Module):
    """A module's own parameter used only in an output that the losses do not use (CLIPModel's ``logit_scale`` when
    the losses read the embeddings alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(8, 4), nn.Linear(8, 4)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        first, second = self.first(x), self.second(y)
        return first, second, first * self.logit_scale


@pytest.mark.parametrize("single_backward", [False, True])
def test_parameter_used_only_in_an_unused_output(single_backward: bool, taken: list[tuple[str, bool]]) -> None:
    """Its products receive no gradient: its rows are zero (an IndexError from an empty batched pass before)."""
    torch.manual_seed(8)
    model = _UnusedScaledOutput()
    engine = Engine(model, single_backward=single_backward)
    for batch in (9, 4):
        model.zero_grad(set_to_none=True)
        first, second, _ = model(torch.randn(batch, 8), torch.randn(batch, 8))
        assert_exact_step_with_freed_graph(engine, model, (first - second).pow(2).sum(1), single_backward)


def _rows_of(examples: list[int], scales: list[float], num_examples: int, dtype: torch.dtype) -> Tensor:
    """``[3, R, F]`` gradients of rows of the given examples under the weights ``1, w, w'`` of the check, each row a
    random direction of the given norm (computed in float64, then cast)."""
    generator = torch.Generator().manual_seed(0)
    weights = _matmul_uses.check_weights(num_examples)
    plain = torch.randn(len(examples), 6, generator=generator, dtype=torch.float64)
    plain = plain / plain.norm(dim=1, keepdim=True) * torch.tensor(scales, dtype=torch.float64).unsqueeze(1)
    scaled = weights[:, examples].unsqueeze(2) * plain  # [2, R, F]
    return torch.cat([plain.unsqueeze(0), scaled]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_of_examples_whose_gradients_differ_by_orders_of_magnitude_are_kept(dtype: torch.dtype) -> None:
    """A row of 10 beside one of 4e7 (a left-padded position's gradient in Gemma-4's experts, for real): in float32 it
    was taken for rounding noise of the largest row and dropped from its example's gradient (its Gramian 5% off)."""
    examples = [0, 1, 2, 1, 0]
    grads = _rows_of(examples, [4e7, 10.0, 3.0, 2e7, 0.5], 3, dtype)
    rtol = _matmul_uses.RTOL_FLOAT32 * torch.finfo(dtype).eps / torch.finfo(torch.float32).eps
    found = _matmul_uses.examples_of_rows(grads, _matmul_uses.check_weights(3).to(dtype), rtol)
    assert found is not None and found.tolist() == examples


def test_rows_of_rounding_noise_are_left_out_and_mixed_rows_are_refused() -> None:
    weights = _matmul_uses.check_weights(3).float()
    rtol = _matmul_uses.RTOL_FLOAT32
    grads = _rows_of([0, 2], [1e3, 5.0], 3, torch.float32)
    noise = torch.randn(3, 1, 6, generator=torch.Generator().manual_seed(1)) * 1e-6  # (no example's ratios)
    found = _matmul_uses.examples_of_rows(torch.cat([grads, noise], 1), weights, rtol)
    assert found is not None and found.tolist() == [0, 2, -1]
    # (a large row that two examples reach: its ratios average their weights)
    mixed = _rows_of([0], [1e3], 3, torch.float64)
    mixed[1:] = (mixed[1:] + _rows_of([1], [1e3], 3, torch.float64)[1:]) / 2
    assert _matmul_uses.examples_of_rows(torch.cat([grads, mixed.float()], 1), weights, rtol) is None


@pytest.mark.parametrize(("batch", "tasks"), [(5, 2), (12, 1)])
@pytest.mark.parametrize("single_backward", [False, True])
def test_gemma4_experts_with_padding_tokens(
    single_backward: bool, batch: int, tasks: int, taken: list[tuple[str, bool]]
) -> None:
    """Gemma-4's experts on padding tokens (whose embedding row is zero, and whose rows' gradients are then 1e6 times
    the others'), with two losses per example or one: found by the twenty-second session's QA round, the float32
    Gramian of the experts' down projection was 3-60% off, silently."""
    config = tf.AutoConfig.for_model(
        "gemma4_text", vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, intermediate_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, layer_types=["sliding_attention", "full_attention"], sliding_window=4,
        vocab_size_per_layer_input=V, hidden_size_per_layer_input=8, per_layer_config={}, enable_moe_block=True,
        num_experts=4, top_k_experts=2, moe_intermediate_size=16,
    )  # fmt: skip
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tf.AutoModelForCausalLM.from_config(config, experts_implementation="eager").train()
    torch.manual_seed(3)
    ids = torch.randint(3, V, (batch, 8))
    mask = torch.ones(batch, 8, dtype=torch.long)
    for example, padded in ((0, 1), (2, 3), (4, 2)):
        mask[example, :padded] = 0
    ids[mask == 0] = 0
    engine = Engine(model, single_backward=single_backward)
    labels = ids.masked_fill(mask == 0, -100)[:, 1:]
    token = _CE(model(input_ids=ids, attention_mask=mask).logits[:, :-1].transpose(1, 2), labels, reduction="none")
    valid = (labels != -100).float()
    if tasks == 1:
        losses = (token * valid).sum(1) / valid.sum(1)
    else:
        first = (token[:, :3] * valid[:, :3]).sum(1) / valid[:, :3].sum(1).clamp(min=1)
        last = (token[:, 3:] * valid[:, 3:]).sum(1) / valid[:, 3:].sum(1).clamp(min=1)
        losses = torch.stack([first, last], 1)
    assert_exact_step_with_freed_graph(engine, model, losses, single_backward)
    assert any(module.endswith("Experts") and taken_ for module, taken_ in taken)
