"""The check of a call's grouping by example (two backward passes, ``G_w[j] = w_e G[j]``) and what the engine
remembers from it: nothing from a check that could not fail (one example, all-zero gradients), nothing across
batch sizes that change a call's candidate dimensions; an example with a small gradient is checked as strictly as
the others; empty calls pass. Each case was a wrong Gramian or a crash found by fuzzing the layouts."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as tf
from torch import Tensor, nn

from hf_jd.autogram import Engine

from ._reference import assert_exact_step_with_freed_graph, assert_gramian_matches, grads_of, jacobian, trainable


def _check(engine: Engine, model: nn.Module, losses: Tensor) -> None:
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


class _TimeMajorNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj, self.norm = nn.Linear(3, 3), nn.LayerNorm(3)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, T, 3]
        hidden = self.norm(self.proj(x).transpose(0, 1))  # LayerNorm on time-major [T, B, 3]
        return (hidden[..., 0] - 0.3).pow(2).mean(0)


def test_steps_with_one_example_do_not_vouch_for_a_grouping() -> None:
    for last in (2, 5):  # B = 5 does not divide T = 4: the trusted grouping used to crash, B = 2 was 30% off
        torch.manual_seed(0)
        model = _TimeMajorNorm()
        engine = Engine(model)
        for batch in (1, 1, last):
            _check(engine, model, model(torch.randn(batch, 4, 3)))


class _ZeroInitAdapter(nn.Module):
    """A LoRA-like adapter (``B`` zero-initialised) whose ``A`` runs on time-major rows ``[T * B, d]``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.lora_a, self.lora_b = nn.Linear(4, 2, bias=False), nn.Linear(2, 4, bias=False)
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, T, 3]
        hidden = torch.tanh(self.proj(x))
        rows = hidden.transpose(0, 1).reshape(-1, 4)  # the example of row r is r % B
        low = self.lora_a(rows).reshape(x.shape[1], x.shape[0], 2).transpose(0, 1)
        return (hidden + self.lora_b(low)).pow(2).mean((1, 2))


def test_all_zero_gradients_do_not_vouch_for_a_grouping() -> None:
    torch.manual_seed(0)
    model = _ZeroInitAdapter()
    engine = Engine(model)
    for _ in range(2):  # step 1: A's output gradients are zero (B = 0); step 2 was 45% off
        _check(engine, model, model(torch.randn(3, 4, 3)))
        with torch.no_grad():
            model.lora_b.weight.normal_()  # as after some training


class _PerHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj, self.per_head, self.head = nn.Linear(3, 6), nn.Linear(2, 2), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, T, 3]
        projected = self.proj(x).transpose(0, 1)
        length, batch = projected.shape[:2]
        hidden = self.per_head(projected.reshape(length, batch, 3, 2)).reshape(length, batch, 6).transpose(0, 1)
        return self.head(hidden).pow(2).mean((1, 2))


def test_a_batch_size_that_changes_the_candidate_dimensions_is_checked_again() -> None:
    torch.manual_seed(0)
    model = _PerHead()  # a Linear on time-major [T, B, 3 heads, 2]
    engine = Engine(model)
    for batch, length in ((2, 4), (2, 4), (3, 6)):  # last step: heads = B (no unique other dimension), T = 2 B
        _check(engine, model, model(torch.randn(batch, length, 3)))


def test_an_example_with_a_small_gradient_is_checked_as_strictly_as_the_others() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({"lin": nn.Linear(2, 2), "head": nn.Linear(4, 1)})
    engine = Engine(model)

    def losses_of(x: Tensor, offset: Tensor) -> Tensor:  # x: [B, T, 4] with T = B = 2
        heads = x.transpose(0, 1).reshape(2, 4, 2)  # time-major heads [T, B * 2, 2]: not grouped by example
        pred = model["head"](torch.tanh(model["lin"](heads)).reshape(2, 2, 4))[0, :, 0]
        return 0.5 * (pred - pred.detach() - offset) ** 2

    for offset in ([1.0, 1.0], [1.0, 1e-3]):  # the second example almost fitted: its slice was 12% off
        _check(engine, model, losses_of(torch.randn(2, 2, 4), torch.tensor(offset)))


class _LinearExperts(nn.Module):
    def __init__(self, dim: int = 2, num_experts: int = 8) -> None:
        super().__init__()
        self.proj, self.gate = nn.Linear(3, dim), nn.Linear(dim, num_experts)
        self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_experts))

    def forward(self, x: Tensor) -> Tensor:  # x: time-major [T, B, 3]
        rows = self.proj(x).flatten(0, 1)
        weight, index = torch.softmax(self.gate(rows), -1).max(-1)
        out = torch.zeros_like(rows)
        for number, expert in enumerate(self.experts):  # every expert, also those no token was routed to
            (picked,) = torch.where(index == number)
            out = out.index_add(0, picked, expert(rows[picked]) * weight[picked, None])
        return out.pow(2).reshape(x.shape[0], x.shape[1], -1).mean((0, 2))


def test_an_expert_called_on_no_token_passes_the_check() -> None:
    torch.manual_seed(0)
    model = _LinearExperts()
    engine = Engine(model, batch_dim=1)
    _check(engine, model, model(torch.randn(3, 2, 3)))  # 6 tokens, 8 experts: used to crash in .max()


class _SharedTableTasks(nn.Module):
    """Per-example task losses ``[B, 2]`` divided by their batch sums (mixing the examples), in a model with a
    table shared by all examples (a call not split by example)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.head, self.table = nn.Linear(3, 4), nn.Linear(4, 2), nn.Embedding(5, 4)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, 3]
        hidden = torch.tanh(self.proj(x)) + self.table(torch.arange(5)).sum(0)
        losses = self.head(hidden).pow(2)
        return losses / losses.sum(0)


def test_task_losses_that_mix_the_examples_beside_a_shared_table_are_caught() -> None:
    torch.manual_seed(0)
    model = _SharedTableTasks()
    engine = Engine(model)
    for _ in range(2):  # was 91% off: with a shared table, [B, m] losses had no check at all
        _check(engine, model, model(torch.randn(4, 3)))


class _TimeMajorExperts(nn.Module):
    """Top-1 Linear experts on the ``[T * B, d]`` rows of a time-major model (``batch_dim=1``), with ``d = B``."""

    def __init__(self, dim: int = 2, heads: int = 2) -> None:
        super().__init__()
        self.proj, self.gate, self.heads = nn.Linear(3, dim), nn.Linear(dim, 3), heads
        self.norm = nn.LayerNorm(dim // heads)
        self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(3))

    def forward(self, x: Tensor) -> Tensor:  # x: [T, B, 3]
        length, batch, _ = x.shape
        rows = self.proj(x).reshape(length * batch, -1)
        weight, index = torch.softmax(self.gate(rows), -1).max(-1)
        out = torch.zeros_like(rows)
        for number, expert in enumerate(self.experts):
            (picked,) = torch.where(index == number)
            if picked.numel():
                out = out.index_add(0, picked, expert(rows[picked]) * weight[picked, None])
        hidden = out.reshape(length, batch, self.heads, -1).permute(1, 2, 0, 3).reshape(batch * self.heads, length, -1)
        return self.norm(hidden).pow(2).reshape(batch, -1).mean(1)


def test_rows_are_never_regrouped_along_their_feature_dimension() -> None:
    torch.manual_seed(0)
    model = _TimeMajorExperts()
    engine = Engine(model, batch_dim=1, single_backward=True)
    losses = model(torch.randn(3, 2, 3))  # T = 3, B = 2 = d
    jac = jacobian(losses, trainable(model))
    assert_gramian_matches(engine.compute_gramian(losses), jac)
    engine.backward(torch.ones(2))  # crashed: a Linear's [N, 2] rows were regrouped along their features
    torch.testing.assert_close(grads_of(trainable(model)), jac.sum(0), rtol=1e-4, atol=1e-6)


class _FeatureMajorScale(nn.Module):
    """A generic-path module (its own parameter) on a feature-major ``[d, B]`` tensor."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x * self.weight)


def test_a_feature_major_two_dimensional_tensor_with_as_many_features_as_examples_is_checked() -> None:
    torch.manual_seed(0)
    proj, scale, head = nn.Linear(3, 4), _FeatureMajorScale(4), nn.Linear(4, 1)
    model = nn.ModuleList([proj, scale, head])
    engine = Engine(model)
    for _ in range(2):  # d = B = 4: taken as split along dim 0 without a check (2.7%, then 15% off)
        x = torch.randn(4, 3)
        _check(engine, model, head(scale(proj(x).T).T).squeeze(-1).pow(2))


class _RolledRows(nn.Module):
    """Rows ``[B * T, d]`` rolled by a shift that changes between steps (crossing examples) around a module."""

    def __init__(self, generic: bool) -> None:
        super().__init__()
        self.first, self.last = nn.Linear(5, 5), nn.Linear(5, 1)
        self.mid = _FeatureMajorScale(5) if generic else nn.Linear(5, 5)

    def forward(self, x: Tensor, shift: int) -> Tensor:
        batch, length, dim = x.shape
        rows = torch.roll(self.first(x).reshape(batch * length, dim), shift, 0)
        rows = self.mid(rows if isinstance(self.mid, nn.Linear) else rows.T)
        rows = rows if isinstance(self.mid, nn.Linear) else rows.T
        return self.last(torch.roll(rows, -shift, 0).reshape(batch, length, dim)).squeeze(-1).pow(2).mean(1)


def test_a_remembered_grouping_is_not_reused_when_a_roll_moves_rows_elsewhere() -> None:
    for generic in (False, True):  # was 15-17% off (Linear) and 1-2% off (generic path) from the third step
        torch.manual_seed(0)
        model = _RolledRows(generic)
        engine = Engine(model)
        for shift in (0, 0, 1, 2, 0):
            _check(engine, model, model(torch.randn(4, 3, 5), shift))


def test_steps_with_one_example_do_not_count_towards_the_per_row_warning() -> None:
    # T5's relative-position tables take the per-row pass on a step with one example (the last batch of an epoch),
    # where it costs nothing; two such steps warned that they took that pass "on every step".
    torch.manual_seed(0)
    config = tf.T5Config(d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2, vocab_size=40, dropout_rate=0.0,
                         decoder_start_token_id=0, relative_attention_num_buckets=8)
    model = tf.T5ForConditionalGeneration(config)
    engine = Engine(model)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        for batch in (4, 1, 4, 1):
            ids, labels = torch.randint(1, 40, (batch, 6)), torch.randint(1, 40, (batch, 5))
            logits = model(input_ids=ids, labels=labels).logits
            losses = nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1)
            engine.compute_gramian(losses)
    assert not [record for record in records if "per-row gradients come from" in str(record.message)]


def test_subnormal_output_gradients_are_not_taken_for_mixed_examples() -> None:
    """Gradients that vanish into float32's subnormal range (tiny weights above a layer, as HF's small init of
    frozen-BatchNorm vision models gives) keep a few bits: their rounding failed the grouping check, which sent
    the layer to the per-row path with a warning that the losses mix the examples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), *[nn.Linear(8, 8) for _ in range(3)], nn.Linear(8, 1))
    with torch.no_grad():
        for layer in list(model)[2:5]:
            layer.weight.mul_(1e-14)  # the first layer's output gradients: about 1e-42
    engine = Engine(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _check(engine, model, model(torch.randn(3, 4)).squeeze(1) ** 2)


def test_an_example_whose_gradient_is_only_rounding_noise_does_not_fail_the_check() -> None:
    """An example whose gradient at a call is float32 rounding noise (1e-9 beside 1: its loss does not depend on the
    call, but the two passes round differently) says nothing about the grouping; a deviation well above rounding (a
    real mixing, even of a small gradient) still fails it. (CLIP's text projections for a matched-pair loss were taken
    for mixed, then took the per-row pass on every step.)"""
    from hf_jd.autogram._regroup import _grouped_by_example

    weights = torch.tensor([1.3, 2.7])
    plain = torch.randn(2, 5, 4)
    weighted = weights.view(2, 1, 1) * plain
    plain[1], weighted[1] = 1e-9 * torch.randn(5, 4), 1e-9 * torch.randn(5, 4)  # rounding noise, unrelated
    assert _grouped_by_example(torch.stack([plain, weighted]), weights, 0, 1e-4)
    weighted[1] = weights[1] * plain[1] + 1e-4 * torch.randn(5, 4)  # another example's gradient leaks in
    assert not _grouped_by_example(torch.stack([plain, weighted]), weights, 0, 1e-4)


def _check_inputs(relative: float, mixing: float) -> tuple[Tensor, Tensor, Tensor]:
    """``[G, G_w]`` of 4 examples, whose weighted gradients carry rounding of ``relative`` size (as gradients computed
    with heavy cancellation do) and, with ``mixing``, another example's gradient; and the gradient of the pass over
    the plain vector scaled by NOISE_SCALE, with rounding of the same size."""
    from hf_jd.autogram._regroup import NOISE_SCALE

    generator = torch.Generator().manual_seed(0)
    plain = torch.randn(4, 6, generator=generator)
    weights = torch.tensor([1.0, 2.5, 1.5, 3.0])
    weighted = weights[:, None] * plain + relative * torch.randn(4, 6, generator=generator)
    weighted[1] += mixing * plain[2]
    rounding = NOISE_SCALE * plain + relative * torch.randn(4, 6, generator=generator)
    return torch.stack([plain, weighted]), weights, rounding.unsqueeze(0)


def test_a_check_failed_by_rounding_passes_against_the_rounding_of_its_pass() -> None:
    from hf_jd.autogram._regroup import IDENTITY_RTOL, _grouped_by_example

    grad, weights, rounding = _check_inputs(relative=1e-3, mixing=0.0)
    assert not _grouped_by_example(grad, weights, 0, IDENTITY_RTOL)
    assert _grouped_by_example(grad, weights, 0, IDENTITY_RTOL, rounding)
    # Mixed examples deviate by far more than the pass's rounding: they still fail.
    grad, weights, rounding = _check_inputs(relative=1e-5, mixing=0.05)
    assert not _grouped_by_example(grad, weights, 0, IDENTITY_RTOL, rounding)


def test_gated_delta_rule_gates_keep_their_products_from_their_uses(monkeypatch) -> None:
    """Qwen3-Next's linear attention computes the gradients of its decay gates with heavy cancellation (entries around
    1e-7 from far larger terms): its grouping check failed by about 1e-2 relative on every first step, and its module
    fell back to products through the whole chunked attention (about 11x a plain step instead of 4x at B=16)."""
    from hf_jd.autogram import _regroup

    measured: list[int] = []
    original = _regroup.plain_grad
    monkeypatch.setattr(_regroup, "plain_grad", lambda *a: measured.append(1) or original(*a))
    torch.manual_seed(0)
    config = tf.Qwen3NextConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_key_value_heads=1, head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=32,
        layer_types=["linear_attention", "full_attention"],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (transformers: the reference kernels of the linear attention)
        model = tf.Qwen3NextForCausalLM(config).train()
    engine = Engine(model)
    ids = torch.randint(3, 64, (8, 16))
    for _ in range(2):
        logits = model(input_ids=ids).logits[:, :-1]
        losses = nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(8, -1)
        _check(engine, model, losses.mean(1))
    assert engine._no_direct_uses == set()
    assert measured  # (the rounding was measured)


class _VanishingGradient(torch.autograd.Function):
    """The identity whose backward returns zeros (a vision tower whose gradients vanish, as a tiny random Gemma-3's)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return torch.zeros_like(grad)


class _ImageProjector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4) / 2)

    def forward(self, features: Tensor) -> Tensor:
        return features @ self.weight


class _ImagesPerExample(nn.Module):
    """A vision-language pattern: an encoder and a projector on ``[images, d]`` rows, scattered into the examples'
    text by an image-to-example index (as many images as examples, but not one per example on some steps)."""

    def __init__(self, vanish: bool) -> None:
        super().__init__()
        self.encoder = nn.Linear(3, 4)
        self.projector = _ImageProjector()
        self.text = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)
        self.vanish = vanish

    def forward(self, text: Tensor, images: Tensor, owner: Tensor) -> Tensor:  # [B, T, 4], [n, 3], [n] -> [B]
        encoded = torch.tanh(self.encoder(images))
        features = self.projector(_VanishingGradient.apply(encoded) if self.vanish else encoded)  # [n, 4]
        hidden = self.text(text)
        hidden = hidden + torch.zeros_like(hidden[:, 0]).index_add(0, owner, features).unsqueeze(1)
        return self.head(torch.tanh(hidden)).squeeze(-1).pow(2).mean(1)


@pytest.mark.parametrize("single_backward", [False, True])
@pytest.mark.parametrize("vanish", [False, True])
def test_images_as_many_as_the_examples_but_not_one_per_example(vanish: bool, single_backward: bool) -> None:
    """As many images as examples, not one per example on some steps (two in the first example, none in the second),
    with the same shapes as on steps with one per example: every call's grouping is verified on each step of a model
    given such a tensor beside its main input, and on each step where a call's check sees all-zero output gradients
    (the encoder's with ``vanish``, as a vision tower whose gradients vanish). The encoder's and projector's rows
    were taken for the examples once a step with one image per example had passed its check: a tiny Gemma-3 or
    PaliGemma had its Gramian 20-70% off."""
    torch.manual_seed(13)
    model = _ImagesPerExample(vanish)
    engine = Engine(model, single_backward=single_backward)
    batch = 12
    aligned = torch.arange(batch)
    shifted = torch.cat([torch.tensor([0, 0]), torch.arange(2, batch)])  # two images in example 0, none in 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for owner in (aligned, shifted, aligned, shifted, shifted):
            model.zero_grad(set_to_none=True)
            losses = model(torch.randn(batch, 3, 4), torch.randn(batch, 3), owner)
            assert_exact_step_with_freed_graph(engine, model, losses, single_backward)
