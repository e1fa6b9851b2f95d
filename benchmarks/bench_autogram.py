"""Benchmark of the autogram engine: time and peak memory of one training step.

Variants, on the same model and batch, timed interleaved in one process (median over repeats):

- ``plain``: forward, mean loss, backward (the baseline);
- ``hf_jd``: IWRM step with :class:`hf_jd.autogram.Engine` — per-example losses, Gramian,
  UPGrad weights, ``losses.backward(weights)``;
- ``hf_jd-1bw``: the same with ``Engine(..., single_backward=True)`` and ``engine.backward(weights)``
  (no second pass through the network);
- ``torchjd``: torchjd's autogram engine on a copy of the model, when ``torchjd`` is importable
  (e.g. ``PYTHONPATH=/path/to/torchjd``); it gets per-example ``position_ids``, which it needs.

Peak memory is measured afterwards, per variant: the bytes allocated through glibc's malloc, sampled
after every aten operation of the step, above what was allocated when the step started (the
PyTorch profiler's allocation events where glibc is not available).

On CUDA (``--device cuda``), each step is timed between synchronisations and peak memory is
``torch.cuda.max_memory_allocated`` above what was allocated when the step started.

Run: ``python benchmarks/bench_autogram.py [--repeats 15] [--threads 1] [--models bert gpt2] [--clock cpu]
[--device cuda] [--floor]`` (``--clock cpu`` times the process's CPU time, robust to other processes on a
shared machine; ``--floor`` also times the Linear layers' Gram contributions alone, a lower bound of what
the Gramian pass adds to a plain step).
The sanity check before the table compares the updates of the JD variants (same dropout masks).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy
import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from _cli import int_in_range, non_negative_int, positive_int, torchjd_skipped

# transformers' models and hf_jd.autogram are imported where they are used: building the parser stays cheap.
Step = Callable[[], None]
Losses = Callable[[nn.Module, dict[str, Tensor]], Tensor]  # per-example losses [B] of a model on a batch


def _weighting() -> tuple[str, Callable[[Tensor], Tensor]]:
    """UPGrad weighting: hf_jd's when available, else torchjd's, else the mean (named)."""
    try:
        from hf_jd.aggregation import UPGradWeighting

        return "hf_jd UPGradWeighting", UPGradWeighting()
    except (ImportError, AttributeError):
        pass
    try:
        from torchjd.aggregation import UPGradWeighting as TorchJDUPGrad

        return "torchjd UPGradWeighting", TorchJDUPGrad()
    except ImportError:
        return "mean weighting (no UPGrad available)", lambda gramian: torch.full(
            (gramian.shape[0],), 1.0 / gramian.shape[0], dtype=gramian.dtype
        )


@dataclass
class Case:
    name: str
    model: nn.Module
    inputs: dict[str, Tensor]
    losses: Losses
    # torchjd's engine needs per-example position ids, which T5 (relative positions) does not take.
    torchjd: bool = True


def _classification_batch(batch: int, length: int, vocab: int) -> tuple[dict[str, Tensor], Losses]:
    """Random token ids with binary labels, and the per-example cross-entropy of a classifier."""
    ids = torch.randint(1, vocab, (batch, length))
    labels = torch.randint(0, 2, (batch,))

    def losses(m: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
        logits = m(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        return nn.functional.cross_entropy(logits, inputs["labels"], reduction="none")

    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}, losses


def _language_model_batch(batch: int, length: int, vocab: int) -> tuple[dict[str, Tensor], Losses]:
    """Random token ids, and the per-sequence mean next-token loss of a causal language model."""
    ids = torch.randint(0, vocab, (batch, length))

    def losses(m: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
        logits = m(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        token = nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), inputs["labels"][:, 1:], reduction="none"
        )
        return token.mean(1)

    return {"input_ids": ids, "labels": ids}, losses


def _bert_case(batch: int, length: int, vocab: int, hidden: int = 128, layers: int = 2) -> Case:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(2, hidden // 64),
        intermediate_size=4 * hidden, max_position_embeddings=max(512, length), num_labels=2,
    )
    model = BertForSequenceClassification(config).train()
    inputs, losses = _classification_batch(batch, length, vocab)
    size = "tiny" if hidden == 128 and layers == 2 else f"H={hidden}, L={layers}"
    return Case(f"BERT-{size} cls (B={batch}, T={length}, V={vocab})", model, inputs, losses)


def _gpt2_case(batch: int, length: int, vocab: int, hidden: int = 128, layers: int = 2) -> Case:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab, n_positions=max(512, length), n_embd=hidden, n_layer=layers, n_head=max(2, hidden // 64),
        bos_token_id=0, eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).train()
    inputs, losses = _language_model_batch(batch, length, vocab)
    size = "tiny" if hidden == 128 and layers == 2 else f"H={hidden}, L={layers}"
    return Case(f"GPT-2-{size} LM, tied (B={batch}, T={length}, V={vocab})", model, inputs, losses)


def _llama_case(batch: int, length: int, vocab: int) -> Case:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=512, max_position_embeddings=max(512, length), bos_token_id=0, eos_token_id=0,
    )
    model = LlamaForCausalLM(config).train()
    inputs, losses = _language_model_batch(batch, length, vocab)
    return Case(f"LLaMA-tiny LM (B={batch}, T={length}, V={vocab})", model, inputs, losses)


def _t5_case(batch: int, length: int, vocab: int) -> Case:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=vocab, d_model=128, d_kv=64, d_ff=512, num_layers=2, num_heads=2, decoder_start_token_id=0,
    )
    ids = torch.randint(1, vocab, (batch, length))
    labels = torch.randint(1, vocab, (batch, max(1, length // 4)))

    def losses(m: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
        logits = m(**inputs).logits
        return nn.functional.cross_entropy(logits.transpose(1, 2), inputs["labels"], reduction="none").mean(1)

    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    model = T5ForConditionalGeneration(config).train()
    name = f"T5-tiny seq2seq, relative-position bias (B={batch}, T={length}, V={vocab})"
    return Case(name, model, inputs, losses, torchjd=False)


def _deberta_case(batch: int, length: int, vocab: int) -> Case:
    """DeBERTa-v3's configuration at BERT-tiny's size (relative embeddings, shared attention keys)."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    config = DebertaV2Config(
        vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
        max_position_embeddings=512, relative_attention=True, position_buckets=256, max_relative_positions=-1,
        pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False,
        num_labels=2,
    )
    model = DebertaV2ForSequenceClassification(config).train()
    inputs, losses = _classification_batch(batch, length, vocab)
    name = f"DeBERTa-v3-tiny cls, relative embeddings (B={batch}, T={length}, V={vocab})"
    return Case(name, model, inputs, losses, torchjd=False)


def _steps(case: Case, weighting: Callable[[Tensor], Tensor]) -> tuple[dict[str, Step], dict[str, nn.Module]]:
    """The step of each variant, and the model it trains."""
    from hf_jd.autogram import Engine

    steps: dict[str, Step] = {}
    plain_model = case.model

    def plain() -> None:
        plain_model.zero_grad(set_to_none=True)
        case.losses(plain_model, case.inputs).mean().backward()

    steps["plain"] = plain
    models = {"plain": plain_model}

    ours_model = copy.deepcopy(case.model)
    engine = Engine(ours_model)

    def ours() -> None:
        ours_model.zero_grad(set_to_none=True)
        losses = case.losses(ours_model, case.inputs)
        gramian = engine.compute_gramian(losses)
        losses.backward(weighting(gramian).to(losses.dtype))

    steps["hf_jd"] = ours
    models["hf_jd"] = ours_model

    single_model = copy.deepcopy(case.model)
    single_engine = Engine(single_model, single_backward=True)

    def single() -> None:
        single_model.zero_grad(set_to_none=True)
        losses = case.losses(single_model, case.inputs)
        gramian = single_engine.compute_gramian(losses)
        single_engine.backward(weighting(gramian))

    steps["hf_jd-1bw"] = single
    models["hf_jd-1bw"] = single_model


    if not case.torchjd:
        return steps, models
    try:
        from torchjd.autogram import Engine as TorchJDEngine
    except ImportError:
        return steps, models
    theirs_model = copy.deepcopy(case.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_engine = TorchJDEngine(theirs_model, batch_dim=0)
    ids = case.inputs["input_ids"]
    theirs_inputs = dict(case.inputs)
    theirs_inputs["position_ids"] = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1).contiguous()

    def theirs() -> None:
        theirs_model.zero_grad(set_to_none=True)
        losses = case.losses(theirs_model, theirs_inputs)
        gramian = theirs_engine.compute_gramian(losses)
        losses.backward(weighting(gramian).to(losses.dtype))

    try:  # a model torchjd's engine does not handle is reported, and the others are still timed
        theirs()
    except Exception as error:  # noqa: BLE001
        print(f"  torchjd: failed on this model ({type(error).__name__}: {str(error)[:160]})")
        return steps, models
    steps["torchjd"] = theirs
    models["torchjd"] = theirs_model
    return steps, models


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")
    ]


def _malloc_counter() -> Callable[[], int] | None:
    """Bytes currently allocated through glibc's malloc (PyTorch's CPU allocator uses it), or None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
    except (OSError, AttributeError):
        return None

    def allocated() -> int:
        info = libc.mallinfo2()
        return int(info.uordblks + info.hblkhd)

    return allocated


class _PeakSampler(TorchDispatchMode):
    """Samples the allocated bytes after every aten operation, forward and backward."""

    def __init__(self, allocated: Callable[[], int]) -> None:
        super().__init__()
        self.allocated = allocated
        self.peak = allocated()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.allocated())
        return out


def _with_lora(case: Case, rank: int) -> Case:
    """The case's model with LoRA adapters of rank ``rank`` on its attention projections (PEFT): only
    the adapters are trained, the rest is frozen (the usual way to fine-tune a large model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import (
        BertForSequenceClassification,
        DebertaV2ForSequenceClassification,
        GPT2LMHeadModel,
        T5ForConditionalGeneration,
    )

    gpt2 = isinstance(case.model, GPT2LMHeadModel)
    if gpt2:
        targets = ["c_attn"]
    elif isinstance(case.model, BertForSequenceClassification):
        targets = ["query", "value"]
    elif isinstance(case.model, T5ForConditionalGeneration):
        targets = ["q", "v"]
    elif isinstance(case.model, DebertaV2ForSequenceClassification):
        targets = ["query_proj", "value_proj"]
    else:
        targets = ["q_proj", "v_proj"]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, fan_in_fan_out=gpt2)
    model = get_peft_model(case.model, config)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; a trained adapter is not
            nn.init.normal_(param, std=0.02)
    return Case(f"{case.name} + LoRA r={rank}", model, case.inputs, case.losses, case.torchjd)


def _to_device(case: Case, device: torch.device) -> Case:
    return Case(
        case.name, case.model.to(device), {k: v.to(device) for k, v in case.inputs.items()}, case.losses, case.torchjd
    )


def _cuda_peak_memory(step: Step, model: nn.Module) -> int:
    """Peak CUDA bytes allocated during ``step`` above what was allocated when it started."""
    model.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return max(0, torch.cuda.max_memory_allocated() - start)


def _peak_memory(step: Step, model: nn.Module) -> int:
    """Peak bytes allocated during ``step`` above what was allocated when it started (with the
    model's gradients freed first, so the peak counts activations, gradients and temporaries).

    With glibc, the allocated bytes (``mallinfo2``) are sampled after every aten operation of the
    step (forward and backward); otherwise the PyTorch profiler's allocation events are summed.
    """
    model.zero_grad(set_to_none=True)
    allocated = _malloc_counter()
    if allocated is not None:
        gc.collect()
        start = allocated()
        sampler = _PeakSampler(allocated)
        with sampler:
            step()
        return max(0, sampler.peak - start)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def _check_same_update(steps: dict[str, Step], models: dict[str, nn.Module]) -> None:
    """Sanity check: all JD variants write the same update into ``.grad``."""
    grads = {}
    for name in steps:
        if name == "plain":
            continue
        torch.manual_seed(1)  # same dropout masks for every variant
        numpy.random.seed(1)  # and SpecAugment masks (Wav2Vec2-family models draw them with NumPy)
        steps[name]()
        grads[name] = torch.cat([p.grad.reshape(-1) for p in models[name].parameters() if p.grad is not None])
    reference = grads["hf_jd"]
    for name, grad in grads.items():
        if name != "hf_jd":
            error = ((grad - reference).norm() / reference.norm()).item()
            print(f"  relative difference of the {name} and hf_jd updates: {error:.1e}")


def _linear_gram_floor(case: Case, repeats: int, clock: Callable[[], float]) -> float:
    """Seconds that the engine's closed-form Gram contributions of the model's Linear / Conv1D calls
    take alone (``OuterProductRows.weight_gram`` on random factors of the calls' shapes, each timed
    in isolation, medians summed): a lower bound of what the Gramian pass adds to a plain step."""
    from transformers.pytorch_utils import Conv1D

    from hf_jd.autogram._outer import OuterProductRows

    shapes: list[tuple[torch.Size, int, bool]] = []

    def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            shapes.append((args[0].shape, output.shape[-1], isinstance(module, Conv1D)))

    handles = [m.register_forward_hook(hook) for m in case.model.modules() if isinstance(m, (nn.Linear, Conv1D))]
    try:
        with torch.no_grad():
            case.losses(case.model, case.inputs)
    finally:
        for handle in handles:
            handle.remove()
    total = 0.0
    device = next(case.model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for shape, d_out, transposed in shapes:
        batch, d_in = shape[0], shape[-1]
        inputs = torch.randn(batch, shape[1:-1].numel(), d_in, device=device)
        grads = torch.randn(batch, 1, shape[1:-1].numel(), d_out, device=device)
        rows = OuterProductRows(inputs, grads, transposed)
        rows.weight_gram()
        times = []
        for _ in range(max(3, repeats)):
            sync()
            start = clock()
            rows.weight_gram()
            sync()
            times.append(clock() - start)
        total += statistics.median(times)
    return total


def run(
    case: Case,
    weighting: Callable[[Tensor], Tensor],
    repeats: int,
    warmup: int,
    variants: list[str] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    floor: bool = False,
) -> dict[str, Any]:
    torch.manual_seed(0)
    steps, models = _steps(case, weighting)
    if variants is not None:
        keep = {"plain", "hf_jd", *variants}
        steps = {name: step for name, step in steps.items() if name in keep}
    for _ in range(warmup):
        for step in steps.values():
            step()
    cuda = next(case.model.parameters()).is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            sync()
            start = clock()
            step()
            sync()
            times[name].append(clock() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    measure = _cuda_peak_memory if cuda else _peak_memory
    memory = {name: measure(step, models[name]) for name, step in steps.items()}
    print(f"\n{case.name}")
    _check_same_update(steps, models)
    plain_time, plain_memory = medians["plain"], memory["plain"]
    print(f"  {'variant':<12}{'median ms':>11}{'x plain':>9}{'peak MB':>10}{'x plain':>9}")
    for name in steps:
        print(
            f"  {name:<12}{medians[name] * 1e3:>11.1f}{medians[name] / plain_time:>9.2f}"
            f"{memory[name] / 2**20:>10.1f}{memory[name] / plain_memory:>9.2f}"
        )
    if floor:
        linear = _linear_gram_floor(case, repeats, clock)
        print(
            f"  Linear-layer Gram products alone (per-example materialisation or ghost form, in isolation): "
            f"{linear * 1e3:.1f} ms = {linear / plain_time:.2f}x the plain step"
        )
    if "torchjd" in medians:
        for name in ("hf_jd", "hf_jd-1bw"):
            if name in medians:
                print(f"  torchjd / {name}: {medians['torchjd'] / medians[name]:.2f}x")
    return {"times": medians, "memory": memory}


def torchjd_unavailable() -> str | None:
    """The line saying why the torchjd variant is left out (its autogram engine does not import), or None."""
    try:
        from torchjd.autogram import Engine as TorchJDEngine  # noqa: F401 - only whether it imports
    except ImportError as error:
        return torchjd_skipped(error)
    return None


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of this benchmark.

    Returns
    -------
    argparse.ArgumentParser
        The parser; its numeric options reject out-of-range values.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=positive_int, default=15, help="timed steps per variant (median)")
    parser.add_argument("--warmup", type=non_negative_int, default=3, help="untimed steps per variant first")
    parser.add_argument(
        "--threads", type=positive_int, default=1,
        help="torch threads (1 by default: on shared CPUs, more threads mostly add contention noise)",
    )
    parser.add_argument(
        "--vocab", type=int_in_range(2), default=30522,
        help="vocabulary of bert, gpt2, llama and deberta (at least 2: the classifiers draw ids from 1 to vocab - 1)",
    )
    parser.add_argument(
        "--models", nargs="+", default=["bert", "gpt2"],
        choices=["bert", "gpt2", "llama", "t5", "deberta", "bert-small", "bert-base", "gpt2-small"],
        help="bert/gpt2/llama: the tiny models of the issue; t5, deberta: tiny models with relative positions; "
        "bert-small (H=256, 4 layers, B=32, T=128); bert-base (H=768, 12 layers, B=32, T=128) and gpt2-small "
        "(H=768, 12 layers, B=16, T=128, V=50257): real sizes, meant for a GPU",
    )
    parser.add_argument(
        "--variants", nargs="+", default=None, choices=["hf_jd-1bw", "torchjd"],
        help="optional variants to time besides plain and hf_jd (default: all available)",
    )
    parser.add_argument(
        "--clock", default="wall", choices=["wall", "cpu"],
        help="'wall' (time.perf_counter) or 'cpu' (time.process_time: the process's CPU time, much less "
        "sensitive to other processes on a shared machine; meaningful with --threads 1)",
    )
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda'")
    parser.add_argument(
        "--lora", type=non_negative_int, default=0, metavar="RANK",
        help="train LoRA adapters of this rank on the attention projections instead of the whole model (needs peft); "
        "0 (the default): no LoRA, the whole model is trained",
    )
    parser.add_argument(
        "--floor", action="store_true",
        help="also time the Linear layers' Gram contributions alone (a lower bound of the Gramian pass's cost)",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``sys.argv[1:]`` when ``argv`` is None); exit with a usage error on a bad value."""
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print one table per case (``argv``: the command line, ``sys.argv[1:]`` when None)."""
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    name, weighting = _weighting()
    print(
        f"torch {torch.__version__}, {device}"
        f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
        f"{args.threads} threads, {args.repeats} repeats, {args.clock} clock, "
        f"weighting: {name}"
    )
    if args.variants is None or "torchjd" in args.variants:
        skipped = torchjd_unavailable()
        if skipped is not None:
            print(skipped)
    cases = []
    if "bert" in args.models:
        cases += [_bert_case(16, 32, args.vocab), _bert_case(32, 64, args.vocab)]
    if "gpt2" in args.models:
        cases += [_gpt2_case(16, 32, args.vocab)]
    if "llama" in args.models:
        cases += [_llama_case(16, 32, args.vocab)]
    if "t5" in args.models:
        cases += [_t5_case(16, 32, 1000)]
    if "deberta" in args.models:
        cases += [_deberta_case(16, 32, args.vocab)]
    if "bert-small" in args.models:
        cases += [_bert_case(32, 128, 30522, hidden=256, layers=4)]
    if "bert-base" in args.models:
        cases += [_bert_case(32, 128, 30522, hidden=768, layers=12)]
    if "gpt2-small" in args.models:
        cases += [_gpt2_case(16, 128, 50257, hidden=768, layers=12)]
    for case in cases:
        clock = time.perf_counter if args.clock == "wall" else time.process_time
        if args.lora:
            case = _with_lora(case, args.lora)
        run(_to_device(case, device), weighting, args.repeats, args.warmup, args.variants, clock, args.floor)


if __name__ == "__main__":
    main()
