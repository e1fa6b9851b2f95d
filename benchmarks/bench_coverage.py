"""Coverage of transformers' architectures: the engine's Gramian against the explicit Jacobian, model by model.

For every model type that transformers registers for a head (``AutoModelForCausalLM``,
``AutoModelForSequenceClassification``, ``AutoModelForTokenClassification``, ``AutoModelForMaskedLM``,
``AutoModelForQuestionAnswering``), a tiny random model is built from
its configuration (hidden size 32, 2 layers, 2 heads, vocabulary 64: the fields the configuration has are
overridden, a field it rejects is left at its default; nothing is downloaded) and run in train mode on 4 random
sequences of 8 tokens, two of them padded. The per-example losses (mean token cross-entropy over the unpadded
tokens, the sequence's cross-entropy, or the answer span's start and end cross-entropies) give:

* the engine's Gramian, compared with ``J Jᵀ`` from the explicit Jacobian (one ``autograd.grad`` per loss on the
  same graph, so the same dropout masks), relative to its largest entry;
* the weighted update ``losses.backward(w)`` after it, compared with ``wᵀ J``;
* the engine's warnings (a call taking the exact per-row path says so);
* with ``--timing``, the median CPU time of the two-pass step over a plain mean-loss step (tiny models: the
  ratios measure per-call overhead, see ``bench_architectures.py`` for realistic sizes).

Each model runs in a subprocess of its own (a model whose forward pass hangs or exhausts memory costs only its
timeout). Outcomes: ``exact``; ``MISMATCH`` (a wrong Gramian or update: a bug); ``ENGINE ERROR`` (the engine
raised on a model it should handle: a bug, or a limitation to document); ``rejected`` (the engine's documented
errors, e.g. a batch norm in training mode); ``not built`` and ``forward failed`` (the generic tiny configuration
does not suit the model, or its own code fails on it: nothing about the engine); ``too large`` (the tiny
configuration left some size at its default, over 5M parameters).

Run: ``python benchmarks/bench_coverage.py [--heads causal-lm sequence-classification ... question-answering]
[--models llama bert ...] [--dtype float64] [--timing] [--timeout 180] [--output results.jsonl]``.
"""

from __future__ import annotations

import argparse
import collections
import difflib
import json
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from _cli import positive_float

ROOT = Path(__file__).resolve().parent.parent
B, T, V = 4, 8, 64
MAX_PARAMETERS = 5_000_000
TOLERANCE = {"float32": 1e-3, "float64": 1e-6}  # relative to the largest entry (float32: the reference's rounding)
HEADS = {
    "causal-lm": ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    "sequence-classification": (
        "AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"
    ),
    "token-classification": ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    "masked-lm": ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    "question-answering": ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
}
# Tiny sizes under the names configurations use; only those a configuration has are set.
TINY = dict(
    vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    max_position_embeddings=64, num_key_value_heads=2, head_dim=16, num_labels=3, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, decoder_start_token_id=1, d_model=32, n_embd=32, n_layer=2, n_head=2, num_layers=2, num_heads=2,
    ffn_dim=64, d_ff=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
    encoder_ffn_dim=64, decoder_ffn_dim=64, embedding_size=32, dim_ff=64, dim_model=32, dim_head=16,
)


def _tiny_config(model_type: str) -> Any:
    """The model type's configuration with the :data:`TINY` sizes it has, leaving out those it rejects."""
    import transformers as tf

    defaults = tf.AutoConfig.for_model(model_type)
    sizes = {key: value for key, value in TINY.items() if hasattr(defaults, key) or key in defaults.attribute_map}
    for _ in range(len(sizes) + 1):
        try:
            return tf.AutoConfig.for_model(model_type, **sizes)
        except Exception as error:  # noqa: BLE001 - a field the configuration validates otherwise: drop it
            field = re.search(r"field '(\w+)'", str(error))
            if field is None or field.group(1) not in sizes:
                raise
            sizes.pop(field.group(1))
    raise RuntimeError("unreachable")


def _per_example_losses(head: str, output: Any, ids: Tensor, mask: Tensor, dtype: torch.dtype) -> Tensor:
    ce = nn.functional.cross_entropy
    if head == "question-answering":  # answer span: tokens 1 to 2 of each example
        start, end = output.start_logits.to(dtype), output.end_logits.to(dtype)
        return ce(start, torch.ones(B, dtype=torch.long), reduction="none") + ce(
            end, torch.full((B,), 2), reduction="none"
        )
    logits, mask = output.logits.to(dtype), mask.to(dtype)
    if head == "sequence-classification":
        return ce(logits, torch.arange(B) % logits.shape[-1], reduction="none")
    if head == "causal-lm":
        logits, labels, mask = logits[:, :-1], ids[:, 1:], mask[:, 1:]
    else:
        labels = ids % logits.shape[-1]
    tokens = ce(logits.flatten(0, 1), labels.flatten(), reduction="none").view(B, -1)
    return (tokens * mask).sum(1) / mask.sum(1)


def _jacobian(losses: Tensor, params: list[nn.Parameter]) -> Tensor:
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([torch.zeros(p.numel(), dtype=losses.dtype) if g is None else g.flatten().to(losses.dtype)
                               for p, g in zip(params, grads)]))
    return torch.stack(rows)


def _relative(error: Tensor, reference: Tensor) -> float:
    return float(error.abs().max() / reference.abs().max().clamp_min(1e-30))


def check_model(head: str, model_type: str, dtype: torch.dtype, timing: bool) -> dict[str, Any]:
    """One model type under one head: the outcome, the errors measured and the engine's warnings."""
    import transformers as tf

    from hf_jd.autogram import Engine

    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    result: dict[str, Any] = {"head": head, "model": model_type, "dtype": str(dtype).removeprefix("torch.")}
    auto_class = getattr(tf, HEADS[head][0])
    try:
        config = _tiny_config(model_type)
        if head == "question-answering":
            config.num_labels = 2  # start and end logits
        with torch.device("meta"):  # counted before anything is allocated (a default vision tower is large)
            size = sum(p.numel() for p in auto_class.from_config(config).parameters())
        if size > MAX_PARAMETERS:
            return {**result, "status": "too large", "error": f"{size} parameters"}
        model = auto_class.from_config(config)
    except Exception as error:  # noqa: BLE001 - reported, not raised
        return {**result, "status": "not built", "error": f"{type(error).__name__}: {str(error)[:200]}"}
    model.train()
    ids = torch.randint(3, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0
    mask[3, 4:] = 0
    ids[torch.arange(B), mask.sum(1) - 1] = 2  # each example ends with <eos> (BART's classifier pools it)
    inputs = {"input_ids": ids, "attention_mask": mask}
    try:
        engine = Engine(model)
    except Exception as error:  # noqa: BLE001
        return {**result, "status": "ENGINE ERROR", "error": f"{type(error).__name__}: {str(error)[:300]}"}

    def losses_of() -> Tensor:
        return _per_example_losses(head, model(**inputs), ids, mask, dtype)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            losses = losses_of()
        except RuntimeError as error:
            status = "rejected" if "hf_jd" in str(error) or "per-example" in str(error) else "forward failed"
            return {**result, "status": status, "error": f"{type(error).__name__}: {str(error)[:300]}"}
        except Exception as error:  # noqa: BLE001
            return {**result, "status": "forward failed", "error": f"{type(error).__name__}: {str(error)[:200]}"}
        if not bool(torch.isfinite(losses).all()):  # the model's own output (the engine would say so too)
            return {**result, "status": "forward failed", "error": "the model's losses are not finite"}
        params = [p for p in model.parameters() if p.requires_grad]
        jacobian = _jacobian(losses, params)
        if not bool(torch.isfinite(jacobian).all()):  # e.g. fully masked attention rows: a plain step's too
            return {**result, "status": "forward failed", "error": "the model's own gradients are not finite"}
        try:
            gramian = engine.compute_gramian(losses, retain_graph=True)
        except Exception as error:  # noqa: BLE001
            return {**result, "status": "ENGINE ERROR", "error": f"{type(error).__name__}: {str(error)[:300]}"}
        expected = jacobian @ jacobian.T
        weights = torch.linspace(0.5, 1.5, B, dtype=losses.dtype)
        model.zero_grad(set_to_none=True)
        losses.backward(weights)
        update = torch.cat([torch.zeros(p.numel(), dtype=dtype) if p.grad is None else p.grad.flatten().to(dtype)
                            for p in params])
    result["gramian_error"] = _relative(gramian.to(dtype) - expected, expected)
    result["update_error"] = _relative(update - weights @ jacobian, weights @ jacobian)
    result["warnings"] = sorted({str(w.message)[:200] for w in caught if str(w.message).startswith("hf_jd")})
    tolerance = TOLERANCE[str(dtype).removeprefix("torch.")]
    exact = result["gramian_error"] <= tolerance and result["update_error"] <= tolerance
    result["status"] = "exact" if exact else "MISMATCH"
    if timing:
        result["ratio"] = _time_ratio(model, engine, losses_of)
    return result


def _time_ratio(model: nn.Module, engine: Any, losses_of: Any) -> float:
    """Median CPU time of the engine's two-pass step over a plain mean-loss step, interleaved."""

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        with engine.disabled():
            losses_of().mean().backward()

    def ours() -> None:
        model.zero_grad(set_to_none=True)
        losses = losses_of()
        engine.compute_gramian(losses)
        losses.backward(torch.full_like(losses, 1 / len(losses)))

    times: dict[str, list[float]] = {"plain": [], "ours": []}
    for repeat in range(9):
        for name, step in (("plain", plain), ("ours", ours)):
            start = time.process_time()
            step()
            if repeat >= 2:
                times[name].append(time.process_time() - start)
    return round(statistics.median(times["ours"]) / statistics.median(times["plain"]), 2)


def model_types(head: str) -> list[str]:
    """The model types transformers registers for ``head``."""
    from transformers.models.auto import modeling_auto

    return sorted(getattr(modeling_auto, HEADS[head][1]))


def _run_one(head: str, model_type: str, args: argparse.Namespace) -> dict[str, Any]:
    """One model in a subprocess; in float32 again when the model's own kernels refuse float64 (grouped expert
    products)."""
    result = _run_worker(head, model_type, args.dtype, args)
    if args.dtype == "float64" and result["status"] == "forward failed" and "Double" in result.get("error", ""):
        result = _run_worker(head, model_type, "float32", args)
    return result


def _run_worker(head: str, model_type: str, dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", head, model_type, "--dtype", dtype]
    if args.timing:
        command.append("--timing")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"head": head, "model": model_type, "status": "forward failed", "error": f"timeout ({args.timeout} s)"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"head": head, "model": model_type, "status": "forward failed",
                "error": f"worker exited with {done.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


def known_model_type(text: str) -> str:
    """The ``--models`` type of a model type that transformers knows (a key of its configuration mapping).

    Parameters
    ----------
    text : str
        The command-line value, e.g. ``llama``.

    Returns
    -------
    str
        The model type.

    Raises
    ------
    argparse.ArgumentTypeError
        If transformers has no configuration of that type; the message lists the closest known types.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if text in CONFIG_MAPPING_NAMES:
        return text
    close = difflib.get_close_matches(text, list(CONFIG_MAPPING_NAMES), n=5)
    hint = f"close matches: {', '.join(close)}" if close else "no close match"
    raise argparse.ArgumentTypeError(f"unknown model type {text!r} for transformers ({hint})")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of this benchmark.

    Returns
    -------
    argparse.ArgumentParser
        The parser; ``--timeout`` must be positive and ``--models`` known to transformers.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    parser.add_argument(
        "--models", nargs="+", type=known_model_type,
        help="model types, as transformers names them (default: all registered for each head)",
    )
    parser.add_argument("--dtype", default="float64", choices=list(TOLERANCE))
    parser.add_argument("--timing", action="store_true", help="also time the two-pass step against a plain one")
    parser.add_argument("--timeout", type=positive_float, default=180.0, help="seconds per model")
    parser.add_argument("--output", help="also write one JSON line per model to this file")
    parser.add_argument("--worker", nargs=2, metavar=("HEAD", "MODEL_TYPE"), help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``sys.argv[1:]`` when ``argv`` is None); exit with a usage error on a bad value."""
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Check every model and print its outcome, then a summary (``argv``: the command line, ``sys.argv[1:]`` when
    None)."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.worker:
        warnings.filterwarnings("ignore", module="transformers")
        head, model_type = args.worker
        print(json.dumps(check_model(head, model_type, getattr(torch, args.dtype), args.timing)))
        return
    results = []
    output = open(args.output, "w", encoding="utf-8") if args.output else None  # noqa: SIM115
    try:
        for head in args.heads:
            for model_type in args.models or model_types(head):
                result = _run_one(head, model_type, args)
                results.append(result)
                if output is not None:
                    output.write(json.dumps(result) + "\n")
                    output.flush()
                _print_result(result)
    finally:
        if output is not None:
            output.close()
    _print_summary(results)


def _print_result(result: dict[str, Any]) -> None:
    line = f"{result['head']:<24}{result['model']:<28}{result.get('dtype', ''):<9}{result['status']:<16}"
    if "gramian_error" in result:
        line += f"gramian {result['gramian_error']:.1e}  update {result['update_error']:.1e}"
        if "ratio" in result:
            line += f"  {result['ratio']:.2f}x"
        if result["warnings"]:
            line += f"  warns: {result['warnings'][0][:80]}"
    else:
        line += result.get("error", "")[:100]
    print(line, flush=True)


def _print_summary(results: list[dict[str, Any]]) -> None:
    print("\noutcomes by head")
    for head in dict.fromkeys(result["head"] for result in results):
        counts = collections.Counter(result["status"] for result in results if result["head"] == head)
        warned = sum(1 for result in results if result["head"] == head and result.get("warnings"))
        print(f"  {head}: " + ", ".join(f"{count} {status}" for status, count in counts.most_common())
              + f" ({warned} with an engine warning)")
    bugs = [result for result in results if result["status"] in ("MISMATCH", "ENGINE ERROR")]
    for result in bugs:
        print(f"  {result['status']}: {result['head']} {result['model']} {result.get('error', '')}")


if __name__ == "__main__":
    main()
