"""Time one Jacobian-descent step with hf_jd.autojac against a plain SGD-style backward pass.

The model is a tiny BERT classifier (hidden 128, 2 layers, B=16, T=32 by default, dropout 0).
Variants, each timed from the forward pass to the filled ``.grad`` and interleaved over repeats:

* ``plain``: ``loss.mean().backward()``;
* ``hf_jd chunk=c``: per-example losses, ``hf_jd.autojac.backward(..., parallel_chunk_size=c)``
  then ``jac_to_grad(params, UPGrad())``; the time split between the two is also reported;
* ``torchjd``: the same step with TorchJD's autojac, when ``torchjd`` is importable.

Run: ``.venv/bin/python benchmarks/bench_autojac.py [--threads 1 --repeats 15 --chunks none,1,4]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn


def build_model(hidden: int, layers: int, attn: str) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        intermediate_size=4 * hidden,
        vocab_size=1000,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    config._attn_implementation = attn
    return BertForSequenceClassification(config)


def per_example_losses(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return nn.functional.cross_entropy(logits, batch["labels"], reduction="none")


def zero_grads(params: list[Tensor]) -> None:
    for param in params:
        param.grad = None
        if hasattr(param, "jac"):
            del param.jac


def make_torchjd_step(
    model: nn.Module, params: list[Tensor], batch: dict[str, Tensor]
) -> Callable[[], None] | None:
    """Return a TorchJD step on the same model, whatever the installed TorchJD API, or None."""
    try:
        import torchjd
        from torchjd.aggregation import UPGrad as TorchJDUPGrad
    except Exception:  # noqa: BLE001 - torchjd is optional
        return None
    aggregator = TorchJDUPGrad()
    autojac = getattr(torchjd, "autojac", None)
    new_backward = getattr(autojac, "backward", None)
    new_jac_to_grad = getattr(autojac, "jac_to_grad", None) or getattr(torchjd, "jac_to_grad", None)
    if new_backward is not None and new_jac_to_grad is not None:

        def step() -> None:
            new_backward(per_example_losses(model, batch), inputs=params)
            new_jac_to_grad(params, aggregator)

        return step
    old_backward = getattr(torchjd, "backward", None) or getattr(autojac, "backward", None)
    if old_backward is None:
        return None

    def old_step() -> None:
        old_backward(per_example_losses(model, batch), aggregator, inputs=params)

    return old_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="eager")
    parser.add_argument(
        "--chunks",
        default="none,1",
        help="comma-separated parallel_chunk_size values for hf_jd ('none': all rows at once)",
    )
    parser.add_argument("--aggregator", default="upgrad", help="name for get_aggregator")
    args = parser.parse_args()

    from hf_jd.aggregation import get_aggregator
    from hf_jd.autojac import backward, jac_to_grad

    warnings.filterwarnings("ignore", message="There is a performance drop")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.hidden, args.layers, args.attn).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = {
        "input_ids": torch.randint(0, 1000, (args.batch, args.length)),
        "attention_mask": torch.ones(args.batch, args.length, dtype=torch.long),
        "labels": torch.randint(0, 2, (args.batch,)),
    }
    batch["attention_mask"][: args.batch // 2, args.length // 2 :] = 0
    aggregator = get_aggregator(args.aggregator)
    chunks = [None if c.strip().lower() == "none" else int(c) for c in args.chunks.split(",")]
    split: dict[str, list[float]] = {}

    def plain() -> None:
        per_example_losses(model, batch).mean().backward()

    def make_ours(chunk: int | None) -> tuple[str, Callable[[], None]]:
        name = f"hf_jd chunk={chunk}"
        backward_times = split.setdefault(f"  {name}: backward", [])
        aggregate_times = split.setdefault(f"  {name}: jac_to_grad", [])

        def step() -> None:
            losses = per_example_losses(model, batch)
            start = time.perf_counter()
            backward(losses, params, parallel_chunk_size=chunk)
            middle = time.perf_counter()
            jac_to_grad(params, aggregator)
            backward_times.append(middle - start)
            aggregate_times.append(time.perf_counter() - middle)

        return name, step

    variants: dict[str, Callable[[], None]] = {"plain": plain}
    variants.update(make_ours(chunk) for chunk in chunks)
    torchjd_step = make_torchjd_step(model, params, batch)
    if torchjd_step is not None:
        variants["torchjd"] = torchjd_step

    times: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.warmup + args.repeats):
        for name, step in variants.items():
            zero_grads(params)
            start = time.perf_counter()
            step()
            elapsed = time.perf_counter() - start
            if repeat >= args.warmup:
                times[name].append(elapsed)
    for values in split.values():
        del values[: args.warmup]

    n = sum(p.numel() for p in params)
    print(
        f"tiny BERT: hidden={args.hidden} layers={args.layers} params={n} B={args.batch} "
        f"T={args.length} attn={args.attn} threads={args.threads} repeats={args.repeats} "
        f"aggregator={aggregator!r}"
    )
    medians = {name: statistics.median(values) for name, values in {**times, **split}.items()}
    for name, value in medians.items():
        print(f"  {name:<34} median {1000 * value:8.1f} ms")
    ours = [name for name in times if name.startswith("hf_jd")]
    for name in ours:
        print(f"  ratio {name} / plain: {medians[name] / medians['plain']:.2f}")
    if "torchjd" in medians:
        print(f"  ratio torchjd / plain: {medians['torchjd'] / medians['plain']:.2f}")
        for name in ours:
            print(f"  ratio {name} / torchjd: {medians[name] / medians['torchjd']:.2f}")
    else:
        print("  torchjd not importable: no comparison")


if __name__ == "__main__":
    main()
