"""Peak memory of a training step with and without activation checkpointing, plain and with the
autogram engine (IWRM step: per-example losses, UPGrad weights; two-pass and single backward).

The engine keeps the inputs of the parametrised calls it captures until the Gramian is computed, so
checkpointing (non-reentrant, transformers' default) saves less memory with it than in a plain step;
this script measures how much. Peak memory is measured as in ``bench_autogram.py`` (bytes allocated
above the start of the step, sampled after every aten operation; CUDA: ``max_memory_allocated``).

Run: ``python benchmarks/bench_checkpointing.py [--batch 32] [--length 128] [--hidden 256] [--layers 4]
[--device cuda]``.
"""

from __future__ import annotations

import argparse
import copy

import torch

from bench_autogram import Case, Step, _bert_case, _cuda_peak_memory, _peak_memory, _to_device
from hf_jd.aggregation import UPGradWeighting
from hf_jd.autogram import Engine

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
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
