"""Peak memory of a training step with and without activation checkpointing, plain and with the autogram engine.

The steps: a plain mean-loss step, and the IWRM step (per-example losses, UPGrad weights) with the engine, two-pass
and single backward. The engine keeps the inputs of the parametrised calls it captures until the Gramian is
computed, so checkpointing (non-reentrant, transformers' default) saves less memory with it than in a plain step;
this script measures how much. Peak memory is measured as in ``bench_autogram.py`` (bytes allocated above the start
of the step, sampled after every aten operation; CUDA: ``max_memory_allocated``).

Run: ``python benchmarks/bench_checkpointing.py [--batch 32] [--length 128] [--hidden 256] [--layers 4]
[--device cuda]``.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Sequence

import torch

from _cli import int_in_range, positive_int
from bench_autogram import Case, Step, _bert_case, _cuda_peak_memory, _peak_memory, _to_device
from hf_jd.aggregation import UPGradWeighting

VARIANTS = ("plain", "hf_jd", "hf_jd-1bw")


def _step(case: Case, variant: str, checkpointing: bool) -> tuple[Step, torch.nn.Module]:
    model = copy.deepcopy(case.model)
    if checkpointing:
        model.activation_checkpointing_enable()  # use_reentrant=False: transformers' default
    if variant == "plain":

        def plain() -> None:
            model.zero_grad(set_to_none=True)
            case.losses(model, case.inputs).mean().backward()

        return plain, model
    from hf_jd.autogram import Engine  # imported here: building the parser stays cheap

    engine = Engine(model, single_backward=variant == "hf_jd-1bw")
    weighting = UPGradWeighting()

    def jd() -> None:
        model.zero_grad(set_to_none=True)
        losses = case.losses(model, case.inputs)
        weights = weighting(engine.compute_gramian(losses))
        if variant == "hf_jd-1bw":
            engine.backward(weights)
        else:
            losses.backward(weights.to(losses.dtype))

    return jd, model


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of this benchmark.

    Returns
    -------
    argparse.ArgumentParser
        The parser; its numeric options reject out-of-range values.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--length", type=positive_int, default=128)
    parser.add_argument(
        "--hidden", type=positive_int, default=256,
        help="hidden size, with max(2, hidden // 64) attention heads that must divide it",
    )
    parser.add_argument("--layers", type=positive_int, default=4)
    parser.add_argument(
        "--vocab", type=int_in_range(2), default=1000, help="at least 2: token ids are drawn from 1 to vocab - 1"
    )
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--device", default="cpu")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``sys.argv[1:]`` when ``argv`` is None); exit with a usage error on a bad value."""
    parser = build_parser()
    args = parser.parse_args(argv)
    heads = max(2, args.hidden // 64)
    if args.hidden % heads:
        parser.error(f"--hidden must be a multiple of its number of attention heads (max(2, hidden // 64) = {heads}), "
                     f"got {args.hidden}")  # fmt: skip
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Measure and print the peak memory of each variant (``argv``: the command line, ``sys.argv[1:]`` when None)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    case = _to_device(_bert_case(args.batch, args.length, args.vocab, args.hidden, args.layers), device)
    measure = _cuda_peak_memory if device.type == "cuda" else _peak_memory
    print(f"{case.name}, device {device}: peak memory of one step, MiB (ratio to the plain step without checkpointing)")
    baseline = None
    for variant in VARIANTS:
        cells = []
        for checkpointing in (False, True):
            step, model = _step(case, variant, checkpointing)
            step()  # warm-up
            peak = measure(step, model) / 2**20
            baseline = peak if baseline is None else baseline
            cells.append(f"{peak:8.1f} ({peak / baseline:4.2f}x)")
        print(f"{variant:10s} without checkpointing {cells[0]}   with checkpointing {cells[1]}")


if __name__ == "__main__":
    main()
