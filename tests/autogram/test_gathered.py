"""Linear calls on rows that the data picks from the examples (adapters per language, experts of a mixture, packed
non-padded tokens): each row's example is found from gradients and the call joins those split by example, instead
of the per-row pass; calls on no example cost no pass; rows reached by several examples keep the per-row pass.
Exact against the explicit Jacobian, with both backward modes."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as tf
from torch import Tensor, nn

from hf_jd.autogram import Engine
from hf_jd.autogram import engine as engine_module
from hf_jd.autogram._accumulate import empty_call

from ._reference import assert_exact_step_with_freed_graph, jacobian, trainable


@pytest.fixture
def passes(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The calls of each per-row pass (a batched backward over the loss rows), calls on no example left out."""
    calls: list[list[str]] = []
    original = engine_module.grads_per_row

    def spy(losses: Tensor, layout: object, records: list, accumulator: object) -> None:
        names = [record.module_name for record in records if not empty_call(record)]
        if names:
            calls.append(names)
        original(losses, layout, records, accumulator)

    monkeypatch.setattr(engine_module, "grads_per_row", spy)
    return calls


class _Adapters(nn.Module):
    """X-MOD's pattern: one adapter per language, called on the examples of that language only."""

    def __init__(self, mix: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.adapters = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.head = nn.Linear(8, 1)
        self.mix = mix

    def forward(self, x: Tensor, lang: Tensor) -> Tensor:  # [B, T, 3], [B] -> [B]
        h = torch.tanh(self.inp(x))
        new = torch.zeros_like(h)
        for k, adapter in enumerate(self.adapters):
            chosen = lang == k
            out = adapter(h[chosen])
            if self.mix and out.shape[0]:
                out = out + out.mean(0, keepdim=True)  # every chosen example's rows reach the others'
            new[chosen] = out
        return self.head(torch.tanh(h + new)).squeeze(-1).pow(2).mean(1)


class _Experts(nn.Module):
    """A top-1 mixture of experts as separate Linear modules, each on the tokens routed to it ([N, d] rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.router = nn.Linear(8, 3)
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, 3] -> [B]
        h = torch.tanh(self.inp(x))
        tokens = h.reshape(-1, 8)
        gates = self.router(tokens).softmax(-1)
        top, choice = gates.max(-1)
        out = torch.zeros_like(tokens)
        for k, expert in enumerate(self.experts):
            picked = (choice == k).nonzero().squeeze(1)
            out = out.index_add(0, picked, expert(tokens[picked]) * top[picked, None])
        return self.head(torch.tanh(out.view_as(h) + h)).squeeze(-1).pow(2).mean(1)


class _Packed(nn.Module):
    """A projection of the non-padded tokens only (``hidden[mask]``), scattered back."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # [B, T, 3], [B, T] -> [B]
        h = torch.tanh(self.inp(x))
        out = torch.zeros_like(h)
        out[mask] = self.proj(h[mask])
        return self.head(torch.tanh(out + h)).squeeze(-1).pow(2).mean(1)


@pytest.mark.parametrize("single_backward", [False, True])
def test_adapters_on_the_examples_of_their_language(single_backward: bool, passes: list[list[str]]) -> None:
    torch.manual_seed(0)
    model = _Adapters()
    engine = Engine(model, single_backward=single_backward)
    languages = [torch.zeros(6, dtype=torch.long), torch.arange(6) % 2, torch.tensor([2, 0, 2, 2, 1, 0])]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # (no per-row pass to warn about)
        for lang in languages * 2:
            model.zero_grad(set_to_none=True)
            assert_exact_step_with_freed_graph(engine, model, model(torch.randn(6, 4, 3), lang), single_backward)
    assert passes == []


@pytest.mark.parametrize("single_backward", [False, True])
def test_experts_on_their_routed_tokens(single_backward: bool, passes: list[list[str]]) -> None:
    torch.manual_seed(1)
    model = _Experts()
    engine = Engine(model, single_backward=single_backward)
    for batch in (5, 5, 7):
        model.zero_grad(set_to_none=True)
        assert_exact_step_with_freed_graph(engine, model, model(torch.randn(batch, 4, 3)), single_backward)
    assert passes == []


@pytest.mark.parametrize("single_backward", [False, True])
def test_projection_of_the_packed_tokens(single_backward: bool, passes: list[list[str]]) -> None:
    torch.manual_seed(2)
    model = _Packed()
    engine = Engine(model, single_backward=single_backward)
    for batch in (5, 6):
        lengths = torch.randint(1, 5, (batch,))
        mask = torch.arange(4)[None, :] < lengths[:, None]
        model.zero_grad(set_to_none=True)
        assert_exact_step_with_freed_graph(engine, model, model(torch.randn(batch, 4, 3), mask), single_backward)
    assert passes == []


def test_rows_reached_by_several_examples_keep_the_per_row_pass(
    passes: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows mixed after the call: the per-row pass, exact; the call is not tried again on later steps (its three
    vectors' pass would be lost on every step)."""
    from hf_jd.autogram import _gathered

    tries: list[int] = []
    original = _gathered.batched_grad
    monkeypatch.setattr(_gathered, "batched_grad", lambda *args: tries.append(1) or original(*args))
    torch.manual_seed(3)
    model = _Adapters(mix=True)
    engine = Engine(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for step in range(3):
            lang = torch.tensor([0, 1, 0, 2, 1, 2])  # (two examples or more per adapter: all mixed)
            assert_exact_step_with_freed_graph(engine, model, model(torch.randn(6, 4, 3), lang), False)
            if step == 0:
                assert tries
                tries.clear()
    assert passes and all("adapters.0" in names for names in passes)
    assert tries == []  # (the adapters whose rows were mixed are not tried again)


def test_switch_transformers_experts(passes: list[list[str]]) -> None:
    """Switch Transformers' experts are Linear modules called on the tokens routed to them."""
    torch.manual_seed(4)
    config = tf.SwitchTransformersConfig(
        vocab_size=40, d_model=16, d_kv=8, d_ff=16, expert_capacity=64, num_layers=2, num_sparse_encoder_layers=1,
        num_decoder_layers=1, num_sparse_decoder_layers=1, num_heads=2, num_experts=4, router_jitter_noise=0.0,
        decoder_start_token_id=0, pad_token_id=0,
    )
    model = tf.SwitchTransformersForConditionalGeneration(config).train()
    engine = Engine(model)
    for _ in range(2):
        ids, labels = torch.randint(1, 40, (5, 6)), torch.randint(1, 40, (5, 3))
        logits = model(input_ids=ids, labels=labels).logits
        losses = nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1)
        assert_exact_step_with_freed_graph(engine, model, losses, False)
    assert passes == []


def test_low_precision_gradients_keep_the_per_row_pass() -> None:
    """Under bf16 autocast the output gradients' rounding would hide rows reached by several examples (the adapters'
    rows are mixed here): such calls keep the per-row pass, and the Gramian stays within bf16's rounding (it was 16%
    off when their rows were assigned from bf16 gradients)."""
    torch.manual_seed(3)
    model = _Adapters(mix=True)
    engine = Engine(model)
    inputs, lang = torch.randn(6, 4, 3), torch.tensor([0, 1, 0, 2, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = model(inputs, lang)
        gramian = engine.compute_gramian(losses)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(inputs, lang)
    jac = jacobian(losses.float(), trainable(model))
    reference = jac @ jac.T
    assert float((gramian - reference).abs().max() / reference.abs().max()) < 0.03


@pytest.mark.parametrize("single_backward", [False, True])
@pytest.mark.parametrize("kind", ["experts", "adapters"])
def test_per_example_task_losses(kind: str, single_backward: bool, passes: list[list[str]]) -> None:
    """``[B, m]`` losses: the rows' examples are found as for ``[B]`` losses (each example's weight on all its tasks),
    and each task's gradients of the rows follow from the same batched pass."""
    torch.manual_seed(6)
    model = _Experts() if kind == "experts" else _Adapters()
    engine = Engine(model, single_backward=single_backward)
    for batch in (5, 5, 6):
        model.zero_grad(set_to_none=True)
        x = torch.randn(batch, 4, 3)
        out = model(x) if kind == "experts" else model(x, torch.arange(batch) % 3)
        losses = torch.stack([out, (out + 1).log()], dim=1)  # [B, 2]
        assert_exact_step_with_freed_graph(engine, model, losses, single_backward)
    assert passes == []


class _DenseExperts(nn.Module):
    """Llama-4's pattern: every token goes through every expert, scaled by its router score, the tokens laid out
    expert-major (``[E * N, d]`` rows, ``N = B * T``) and multiplied by 3-D weights with ``bmm``: a generic call whose
    rows are not grouped by example."""

    def __init__(self, num_experts: int = 3, dim: int = 6) -> None:
        super().__init__()
        self.gate_up = nn.Parameter(torch.randn(num_experts, dim, 2 * dim) / dim**0.5)
        self.down = nn.Parameter(torch.randn(num_experts, dim, dim) / dim**0.5)

    def forward(self, routed: Tensor) -> Tensor:  # [E * N, d] -> [E * N, d]
        hidden = routed.view(self.gate_up.shape[0], -1, routed.shape[-1])
        gate, up = torch.bmm(hidden, self.gate_up).chunk(2, dim=-1)
        return torch.bmm(up * nn.functional.silu(gate), self.down).view(-1, routed.shape[-1])


class _DenseMixture(nn.Module):
    def __init__(self, mix: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 6)
        self.router = nn.Linear(6, 3)
        self.experts = _DenseExperts()
        self.head = nn.Linear(6, 1)
        self.mix = mix

    def forward(self, x: Tensor) -> Tensor:  # [B, T, 3] -> [B]
        h = torch.tanh(self.inp(x))
        tokens = h.reshape(-1, h.shape[-1])
        scores = self.router(tokens).sigmoid()  # [N, E]
        routed = tokens.repeat(scores.shape[1], 1) * scores.T.reshape(-1, 1)
        out = self.experts(routed)
        if self.mix:
            out = out + out.mean(0, keepdim=True)  # every row reaches every example
        summed = out.view(scores.shape[1], -1, out.shape[-1]).sum(0).view_as(h)
        return self.head(torch.tanh(summed + h)).squeeze(-1).pow(2).mean(1)


@pytest.mark.parametrize("single_backward", [False, True])
@pytest.mark.parametrize("batch", [5, 12])
def test_generic_call_on_expert_major_rows(
    batch: int, single_backward: bool, passes: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A generic call whose rows each belong to one example in another order than batch-major (Llama-4's experts):
    the rows' examples are found from gradients and each example's products take its own rows (vector-Jacobian
    products from the masked output gradients for a few rows, the factors of its matrix products for more); after the
    first step (where the products are first tried from the weights' uses), no per-row pass."""
    from hf_jd.autogram import _generic

    factors: list[bool] = []
    original = _generic.matmul_factors

    def spied(*args):  # type: ignore[no-untyped-def]
        found = original(*args)
        if args[0].row_examples is not None:
            factors.append(found is not None)
        return found

    monkeypatch.setattr(_generic, "matmul_factors", spied)
    torch.manual_seed(7)
    model = _DenseMixture()
    engine = Engine(model, single_backward=single_backward)
    per_step = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for size in (batch, batch, batch + 1, batch):
            model.zero_grad(set_to_none=True)
            assert_exact_step_with_freed_graph(engine, model, model(torch.randn(size, 4, 3)), single_backward)
            per_step.append(len(passes))
    assert per_step[-1] == per_step[0] <= 1
    assert factors and any(factors) == (batch > 8)


def test_generic_call_on_rows_reached_by_several_examples_keeps_the_per_row_pass(passes: list[list[str]]) -> None:
    torch.manual_seed(8)
    model = _DenseMixture(mix=True)
    engine = Engine(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            assert_exact_step_with_freed_graph(engine, model, model(torch.randn(5, 4, 3)), False)
    assert len(passes) == 3 and all("experts" in names for names in passes)


@pytest.mark.parametrize("single_backward", [False, True])
def test_generic_call_on_expert_major_rows_with_task_losses(single_backward: bool, passes: list[list[str]]) -> None:
    torch.manual_seed(9)
    model = _DenseMixture()
    engine = Engine(model, single_backward=single_backward)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for batch in (5, 6, 6):
            model.zero_grad(set_to_none=True)
            out = model(torch.randn(batch, 4, 3))
            losses = torch.stack([out, (out + 1).log()], dim=1)  # [B, 2]
            assert_exact_step_with_freed_graph(engine, model, losses, single_backward)
    assert len(passes) <= 1


@pytest.mark.parametrize("single_backward", [False, True])
def test_llama4_experts(single_backward: bool, passes: list[list[str]]) -> None:
    """Llama-4's text experts (every token through every expert, expert-major, scores as weights): exact, and on
    the rows found from gradients from the second step on (they took the per-row pass on every step, 14-33x)."""
    torch.manual_seed(10)
    config = tf.Llama4TextConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
        intermediate_size_mlp=16, max_position_embeddings=32, num_key_value_heads=1, head_dim=8, num_local_experts=3,
        num_experts_per_tok=1, interleave_moe_layer_step=1, attention_chunk_size=8, no_rope_layers=[1, 1],
        pad_token_id=0,
    )
    per_step = _exact_language_model_steps(tf.Llama4ForCausalLM(config).train(), 3, single_backward, passes)
    assert per_step[-1] == per_step[0] <= 1


def test_jetmoe_parallel_experts(passes: list[list[str]]) -> None:
    """JetMoE's parallel experts (attention and MLP) take the tokens sorted by expert: exact, and no per-row pass once
    their rows' examples are found from gradients (they took it on every step)."""
    torch.manual_seed(11)
    config = tf.JetMoeConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_key_value_heads=2, kv_channels=4, intermediate_size=16,
        max_position_embeddings=32, num_local_experts=3, num_experts_per_tok=2, pad_token_id=0,
    )
    per_step = _exact_language_model_steps(tf.JetMoeForCausalLM(config).train(), 4, False, passes)
    assert per_step[-1] == per_step[1] <= 2


def _exact_language_model_steps(
    model: nn.Module, steps: int, single_backward: bool, passes: list[list[str]]
) -> list[int]:
    """Steps of a causal LM (vocabulary 40, B=5, T=6) exact against the explicit Jacobian; the number of per-row passes
    after each."""
    engine = Engine(model, single_backward=single_backward)
    per_step = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(steps):
            ids = torch.randint(1, 40, (5, 6))
            logits = model(input_ids=ids).logits[:, :-1]
            losses = nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)
            model.zero_grad(set_to_none=True)
            assert_exact_step_with_freed_graph(engine, model, losses, single_backward)
            per_step.append(len(passes))
    return per_step


class _SortedRows(nn.Module):
    """A generic module (its weight meets the data in a product) called on all the batch's rows in an order given by a
    routing key that changes on every step, with the same shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 6)
        self.proj = _Projection()
        self.out = nn.Linear(6, 1)

    def forward(self, x: Tensor, key: Tensor) -> Tensor:  # [B, K, 6], [B, K] -> [B]
        h = self.inp(x)
        flat = h.reshape(-1, h.shape[-1])
        order = torch.argsort(key.reshape(-1), stable=True)
        sorted_out = self.proj(flat[order])
        out = torch.empty_like(sorted_out).index_copy(0, order, sorted_out).view_as(h)
        return self.out(torch.tanh(out + h)).squeeze(-1).sum(1)


class _Projection(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 6) / 6**0.5)

    def forward(self, rows: Tensor) -> Tensor:
        return torch.tanh(rows @ self.weight)


@pytest.mark.parametrize("single_backward", [False, True])
def test_rows_sorted_differently_on_each_step_are_found_again(single_backward: bool) -> None:
    """The same shapes on every step but rows of other examples (tokens sorted by a routing key): the examples of the
    rows of the call's products, remembered by the structure of the call, are not reused for another assignment of
    its output rows (the Gramian was 2.5e-2 to 1.1e-1 off from the second or third step on)."""
    torch.manual_seed(12)
    model = _SortedRows()
    engine = Engine(model, single_backward=single_backward)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(4):
            model.zero_grad(set_to_none=True)
            losses = model(torch.randn(12, 3, 6), torch.rand(12, 3)).pow(2)
            assert_exact_step_with_freed_graph(engine, model, losses, single_backward)


class _VariableImages(nn.Module):
    """A vision-language model's pattern: each example has its own number of images (or of crops of one image), all
    of them run through the vision layers as one ``[images, ...]`` batch, then pooled back per example."""

    def __init__(self, patches_3d: bool, rms: bool = False) -> None:
        super().__init__()
        # (Qwen2-VL cuts [C, t, p, p] patches with a Conv3d whose kernel is its stride; LLaVA a Conv2d of an image)
        self.patch = nn.Conv3d(3, 6, (2, 2, 2), stride=(2, 2, 2)) if patches_3d else nn.Conv2d(3, 6, 3, padding=1)
        self.norm = nn.RMSNorm(6, eps=1e-6) if rms else nn.LayerNorm(6)  # (Qwen2.5-VL's vision blocks: RMS norms)
        self.proj = nn.Linear(6, 6)
        self.positions = nn.Embedding(20, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, labels: Tensor, images: Tensor, owner: Tensor) -> Tensor:  # [B]; [N, 3, (2,) 4, 4], owner [N]
        # (the labels first: the engine reads the batch size from the first positional input, a VLM's input_ids)
        features = self.patch(images).flatten(2).transpose(1, 2)  # [N, positions, 6]
        # (position ids per image, as Idefics3 buckets each image's patches)
        features = features + self.positions(torch.arange(features.shape[1]) + owner.unsqueeze(1) % 3)
        features = self.proj(torch.tanh(self.norm(features))).mean(1)  # [N, 6]
        pooled = torch.zeros(labels.shape[0], 6).index_add(0, owner, features)
        return nn.functional.cross_entropy(self.head(torch.tanh(pooled)), labels, reduction="none")


@pytest.mark.parametrize("single_backward", [False, True])
@pytest.mark.parametrize(("patches_3d", "rms"), [(False, False), (True, False), (True, True)])
def test_variable_numbers_of_images_per_example(patches_3d: bool, rms: bool, single_backward: bool,
                                                passes: list[list[str]]) -> None:
    """The convolution, the position embedding and the layer norm on the images join the calls split by example (each
    image's example found from gradients, its samples padded to the most images of an example), as the Linear layers
    do, and an RMS norm
    takes its products from its output, each example's from its own rows: no per-row pass (the convolution and the
    norms took it before)."""
    torch.manual_seed(3)
    model = _VariableImages(patches_3d, rms)
    engine = Engine(model, single_backward=single_backward)
    for counts in ([1, 2, 3, 1, 2, 1], [2, 1, 1, 3, 1, 2, 1]):
        owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        shape = (3, 2, 4, 4) if patches_3d else (3, 4, 4)
        model.zero_grad(set_to_none=True)
        losses = model(torch.randint(0, 3, (len(counts),)), torch.randn(owner.shape[0], *shape), owner)
        assert_exact_step_with_freed_graph(engine, model, losses, single_backward)
    assert passes == []


@pytest.mark.parametrize(("module", "tensor"), [("linear", "bias"), ("layer_norm", "bias"), ("group_norm", "weight")])
def test_parametrisation_with_a_parameter_of_its_own_on_a_vector(module: str, tensor: str) -> None:
    """A parametrisation with a trainable parameter of its own on a 1-D tensor (a learned scale of a bias): its list's
    1-D output, shared by the examples, was checked for rows of one example and raised an IndexError; it now takes the
    per-row pass, exact."""
    from torch.nn.utils import parametrize

    class Scale(nn.Module):
        def __init__(self, size: int) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.linspace(0.5, 1.5, size))

        def forward(self, vector: Tensor) -> Tensor:
            return vector * self.scale

    torch.manual_seed(4)
    layer = {"linear": nn.Linear(8, 8), "layer_norm": nn.LayerNorm(8), "group_norm": nn.GroupNorm(2, 8)}[module]
    parametrize.register_parametrization(layer, tensor, Scale(8))
    first = nn.Conv1d(8, 8, 1) if module == "group_norm" else nn.Linear(8, 8)
    model = nn.Sequential(first, layer)
    engine = Engine(model)
    shape = (12, 5, 8) if module == "layer_norm" else (12, 8) if module == "linear" else (12, 8, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (the per-row pass's)
        assert_exact_step_with_freed_graph(engine, model, model(torch.randn(*shape)).pow(2).flatten(1).mean(1),
                                           single_backward=False)
