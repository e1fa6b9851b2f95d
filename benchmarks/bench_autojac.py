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
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from _cli import int_in_range, non_negative_int, positive_int, torchjd_skipped

MAX_LENGTH = 128  # the model's max_position_embeddings


def build_model(hidden: int, layers: int, attn: str) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        intermediate_size=4 * hidden,
        vocab_size=1000,
        max_position_embeddings=MAX_LENGTH,
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
) -> tuple[Callable[[], None] | None, str]:
    """Return a TorchJD step on the same model, whatever the installed TorchJD API, or None and the line saying why
    there is none."""
    try:
        import torchjd
        from torchjd.aggregation import UPGrad as TorchJDUPGrad
    except Exception as error:  # noqa: BLE001 - torchjd is optional
        return None, torchjd_skipped(error)
    aggregator = TorchJDUPGrad()
    autojac = getattr(torchjd, "autojac", None)
    new_backward = getattr(autojac, "backward", None)
    new_jac_to_grad = getattr(autojac, "jac_to_grad", None) or getattr(torchjd, "jac_to_grad", None)
    if new_backward is not None and new_jac_to_grad is not None:

        def step() -> None:
            new_backward(per_example_losses(model, batch), inputs=params)
            new_jac_to_grad(params, aggregator)

        return step, ""
    old_backward = getattr(torchjd, "backward", None) or getattr(autojac, "backward", None)
    if old_backward is None:
        return None, torchjd_skipped("the installed torchjd has neither autojac.backward nor backward")

    def old_step() -> None:
        old_backward(per_example_losses(model, batch), aggregator, inputs=params)

    return old_step, ""


def chunk_sizes(text: str) -> list[int | None]:
    """The ``--chunks`` value: comma-separated ``parallel_chunk_size`` values, each a positive integer or ``none``.

    Parameters
    ----------
    text : str
        The command-line value, e.g. ``"none,1,4"``.

    Returns
    -------
    list[int | None]
        The chunk sizes, None for ``none`` (all rows at once).

    Raises
    ------
    argparse.ArgumentTypeError
        If an item is neither ``none`` nor a positive integer.
    """
    sizes: list[int | None] = []
    for item in text.split(","):
        if item.strip().lower() == "none":
            sizes.append(None)
            continue
        try:
            sizes.append(positive_int(item.strip()))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"must be comma-separated positive integers or 'none', got {text!r}"
            ) from None
    return sizes


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of this benchmark.

    Returns
    -------
    argparse.ArgumentParser
        The parser; its numeric options reject out-of-range values.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--hidden", type=positive_int, default=128,
        help="hidden size, with hidden // 32 attention heads (at least 1) that must divide it",
    )
    parser.add_argument("--layers", type=positive_int, default=2)
    parser.add_argument("--batch", type=positive_int, default=16)
    parser.add_argument(
        "--length", type=int_in_range(1, MAX_LENGTH), default=32,
        help=f"tokens per example (at most {MAX_LENGTH}, the model's position embeddings)",
    )
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--repeats", type=positive_int, default=15)
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="untimed rounds before the timed ones")
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="eager")
    parser.add_argument(
        "--chunks",
        type=chunk_sizes,
        default="none,1",
        help="comma-separated parallel_chunk_size values for hf_jd (positive integers, or 'none': all rows at once)",
    )
    parser.add_argument("--aggregator", default="upgrad", help="name for get_aggregator")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``sys.argv[1:]`` when ``argv`` is None); exit with a usage error on a bad value."""
    parser = build_parser()
    args = parser.parse_args(argv)
    heads = max(1, args.hidden // 32)
    if args.hidden % heads:
        parser.error(f"--hidden must be a multiple of its number of attention heads (hidden // 32 = {heads}), "
                     f"got {args.hidden}")  # fmt: skip
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print its medians (``argv``: the command line, ``sys.argv[1:]`` when None)."""
    args = parse_args(argv)

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
    chunks: list[int | None] = args.chunks
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
    torchjd_step, torchjd_skip = make_torchjd_step(model, params, batch)
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
        print(f"  {torchjd_skip}")


if __name__ == "__main__":
    main()
