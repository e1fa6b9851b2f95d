"""Benchmark of the dual-cone weightings (UPGrad, DualProj) against torchjd, when importable.

For each number of objectives ``m`` and each kind of Jacobian, it builds ``J`` (``m × n``), its
Gramian ``G = J Jᵀ``, and times ``UPGradWeighting()(G)`` and ``DualProjWeighting()(G)`` (median
of several calls); ``--weightings`` also takes ``MGDA`` and ``PCGrad`` (hf_jd only, no reference).
Where ``torchjd`` can be imported (benchmark only; install it with
``pip install --no-deps torchjd``; its default projector also needs ``qpsolvers``), the same
Gramians go through torchjd's weightings: the table gives their time, the speed-up and the largest
relative difference of the weights, ``max|w − w_torchjd| / max|w_torchjd|``.

Kinds of Jacobians (``n = 2000`` columns by default):

* ``iid``: ``randn(m, n)``; about half of the pairs of rows conflict (the hardest case).
* ``shared``: ``randn(m, n) + 0.1·√m``-scaled shared direction: most rows agree, some conflict.
* ``lowrank``: ``randn(m, r) @ randn(r, n)`` with ``r = max(2, m // 4)``: ill-conditioned.
* ``bert``: the realistic case: per-example gradients (``torch.func.vmap(grad)``) of the
  cross-entropy of a tiny, randomly initialised BERT classifier (hidden size 32, 2 layers,
  23.6k parameters) on ``m`` random sequences of 16 tokens; condition number about 10⁴ after
  UPGrad's regularisation. ``n`` is the number of parameters here.

With ``--check``, every answer is also compared with an independent reference: each projection
solved by ``quadprog`` (Goldfarb-Idnani) on the same normalised and regularised Gramian; the
column ``qp rel diff`` gives ``max|w − w_quadprog| / max|w_quadprog|`` (quadprog takes about a
second per ``m = 256`` cell).

With ``--cold``, the CPU caches are flushed before every timed call of hf_jd (a 40 MB write and a
384 × 384 matrix product), as the forward and backward passes of a training step do: at small
``m`` that is the latency a step sees, several times the latency of back-to-back calls.

Run: ``.venv/bin/python benchmarks/bench_aggregation.py [--threads 1] [--sizes 2 8 32 128 256]
[--weightings UPGrad DualProj MGDA PCGrad] [--check] [--cold]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from _cli import non_negative_float, positive_int, torchjd_skipped
from hf_jd.aggregation import DualProjWeighting, MGDAWeighting, PCGradWeighting, UPGradWeighting
from hf_jd.aggregation._dual_cone import add_relative_ridge, normalize_gramian, regularize_gramian

KINDS = ("iid", "shared", "lowrank", "bert")
WEIGHTINGS: dict[str, Callable[[], Callable[[Tensor], Tensor]]] = {
    "UPGrad": UPGradWeighting,
    "DualProj": DualProjWeighting,
    "MGDA": MGDAWeighting,
    "PCGrad": lambda: PCGradWeighting(seed=0),
}


def make_gramian(kind: str, m: int, n: int, seed: int) -> Tensor:
    """Gramian of a synthetic Jacobian of the given kind (float64)."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "iid":
        jacobian = torch.randn(m, n, generator=generator, dtype=torch.float64)
    elif kind == "shared":
        jacobian = torch.randn(m, n, generator=generator, dtype=torch.float64)
        jacobian += 0.1 * torch.randn(n, generator=generator, dtype=torch.float64)
    elif kind == "bert":
        jacobian = bert_per_example_gradients(m, seed)
    elif kind == "lowrank":
        rank = max(2, m // 4)
        left = torch.randn(m, rank, generator=generator, dtype=torch.float64)
        jacobian = left @ torch.randn(rank, n, generator=generator, dtype=torch.float64) / rank**0.5
    else:
        raise ValueError(f"Unknown kind {kind!r}; choose from {', '.join(KINDS)}.")
    gramian = jacobian @ jacobian.T
    return (gramian + gramian.T) / 2


def bert_per_example_gradients(batch: int, seed: int) -> Tensor:
    """Per-example gradients ``[batch, n_params]`` (float64) of a tiny BERT classifier's loss."""
    from torch.func import functional_call, grad, vmap
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation="eager",
    )
    model = BertForSequenceClassification(config).eval()
    params = {name: p.detach() for name, p in model.named_parameters()}
    tokens = torch.randint(0, config.vocab_size, (batch, 16))
    labels = torch.randint(0, config.num_labels, (batch,))

    def loss(parameters: dict[str, Tensor], ids: Tensor, label: Tensor) -> Tensor:
        logits = functional_call(model, parameters, (ids.unsqueeze(0),)).logits
        return torch.nn.functional.cross_entropy(logits, label.unsqueeze(0))

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, tokens, labels)
    return torch.cat([g.reshape(batch, -1) for g in grads.values()], dim=1).double()


def conflict_fraction(gramian: Tensor) -> float:
    """Fraction of pairs of distinct rows with a negative inner product."""
    m = gramian.shape[0]
    if m < 2:
        return 0.0
    off_diagonal = ~torch.eye(m, dtype=torch.bool)
    return float((gramian[off_diagonal] < 0).double().mean())


def quadprog_weights(name: str, gramian: Tensor) -> Tensor:
    """Reference weights of the default UPGrad or DualProj weighting, one quadprog QP per target.

    Uses the weighting's own preprocessing (trace normalisation, relative ridge with ``reg_eps = 1e-4``), then solves
    ``min vᵀGv`` subject to ``v ≥ u`` for every target ``u`` with quadprog.
    """
    import numpy as np
    import quadprog

    m = gramian.shape[0]
    matrix = regularize_gramian(add_relative_ridge(normalize_gramian(gramian.double(), 0.0), 1e-4), 0.0).numpy()
    targets = np.eye(m) / m if name == "UPGrad" else np.full((1, m), 1.0 / m)
    rows = [quadprog.solve_qp(matrix, np.zeros(m), np.eye(m), u)[0] for u in targets]
    return torch.from_numpy(np.sum(rows, axis=0))


def median_time(
    function: Callable[[], Tensor],
    repeats: int,
    budget_s: float,
    before: Callable[[], None] | None = None,
) -> tuple[float, float, Tensor]:
    """Median wall and process-CPU times in seconds of ``function`` (after one warm-up call).

    The CPU time is less sensitive to other processes competing for the cores. ``before`` runs
    (untimed) before each timed call.
    """
    result = function()
    wall: list[float] = []
    cpu: list[float] = []
    start = time.perf_counter()
    for _ in range(repeats):
        if before is not None:
            before()
        begin, begin_cpu = time.perf_counter(), time.process_time()
        result = function()
        wall.append(time.perf_counter() - begin)
        cpu.append(time.process_time() - begin_cpu)
        if time.perf_counter() - start > budget_s:
            break
    return statistics.median(wall), statistics.median(cpu), result


class CacheFlush:
    """Evicts the CPU caches, as a training step's forward and backward passes do: writes 40 MB
    and runs a 384 × 384 matrix product."""

    def __init__(self) -> None:
        self._buffer = torch.empty(40 * 2**20 // 8, dtype=torch.float64)
        self._matrix = torch.randn(384, 384)

    def __call__(self) -> None:
        self._buffer.fill_(1.0)
        torch.mm(self._matrix, self._matrix)


def load_torchjd() -> tuple[dict[str, Callable[[], object]] | None, str]:
    """Return torchjd's weighting constructors, or None and the line saying why they are unavailable."""
    try:
        from torchjd.aggregation import DualProjWeighting as TorchjdDualProj
        from torchjd.aggregation import UPGradWeighting as TorchjdUPGrad
    except ImportError as error:
        return None, torchjd_skipped(error)
    try:
        TorchjdUPGrad()  # its default projector may need optional dependencies
    except Exception as error:  # noqa: BLE001 - any failure just disables the comparison
        return None, torchjd_skipped(f"torchjd's UPGradWeighting cannot be built ({type(error).__name__}: {error})")
    return {"UPGrad": TorchjdUPGrad, "DualProj": TorchjdDualProj}, ""


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of this benchmark.

    Returns
    -------
    argparse.ArgumentParser
        The parser; its numeric options reject out-of-range values.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes", type=positive_int, nargs="+", default=[2, 8, 32, 128, 256], metavar="M",
        help="numbers of objectives m (rows of the Jacobians)",
    )
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--weightings", nargs="+", default=["UPGrad", "DualProj"], choices=list(WEIGHTINGS))
    parser.add_argument("--n", type=positive_int, default=2000, help="number of columns of the Jacobians")
    parser.add_argument("--repeats", type=positive_int, default=9, help="timed calls of hf_jd (median)")
    parser.add_argument("--torchjd-repeats", type=positive_int, default=3, help="timed calls of torchjd")
    parser.add_argument(
        "--budget", type=non_negative_float, default=20.0,
        help="max seconds of timed calls per cell (at least one timed call is made: 0 means exactly one)",
    )
    parser.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (default: unchanged)")
    parser.add_argument("--no-torchjd", action="store_true", help="skip the torchjd comparison")
    parser.add_argument("--check", action="store_true", help="compare every answer with quadprog (slow)")
    parser.add_argument("--cold", action="store_true", help="flush the CPU caches before each timed hf_jd call")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``sys.argv[1:]`` when ``argv`` is None); exit with a usage error on a bad value."""
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print its table (``argv``: the command line, ``sys.argv[1:]`` when None)."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torchjd, skipped = (None, torchjd_skipped("disabled by --no-torchjd")) if args.no_torchjd else load_torchjd()
    ours = {name: WEIGHTINGS[name] for name in args.weightings}

    flush = CacheFlush() if args.cold else None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPU(s), "
        f"load average {load:.1f}; n = {args.n}; wall-time medians (hf_jd CPU time in brackets)"
        + ("; hf_jd timed with cold caches" if args.cold else "")
    )
    if torchjd is None:
        print(skipped)
    header = (
        f"{'weighting':<9} {'kind':<8} {'m':>4} {'conflict':>8} {'hf_jd ms':>9} {'(cpu ms)':>9} "
        f"{'torchjd ms':>11} {'speed-up':>9} {'max rel diff':>13}"
        + (f" {'qp rel diff':>12}" if args.check else "")
    )
    print(header)
    print("-" * len(header))
    for name, weighting_class in ours.items():
        for kind in args.kinds:
            for m in args.sizes:
                gramian = make_gramian(kind, m, args.n, seed=m)
                weighting = weighting_class()
                ours_s, ours_cpu, weights = median_time(
                    lambda weighting=weighting, gramian=gramian: weighting(gramian), args.repeats, args.budget, flush
                )
                row = (
                    f"{name:<9} {kind:<8} {m:>4} {conflict_fraction(gramian):>8.2f} "
                    f"{ours_s * 1e3:>9.2f} {ours_cpu * 1e3:>9.2f}"
                )
                if torchjd is not None and name in torchjd:
                    reference_weighting = torchjd[name]()
                    theirs_s, _, reference = median_time(
                        lambda reference_weighting=reference_weighting, gramian=gramian: reference_weighting(gramian),
                        args.torchjd_repeats,
                        args.budget,
                    )
                    difference = float((weights - reference).abs().max() / reference.abs().max())
                    row += f" {theirs_s * 1e3:>11.2f} {theirs_s / ours_s:>8.1f}x {difference:>13.1e}"
                else:
                    row += f" {'-':>11} {'-':>9} {'-':>13}"
                if args.check and name in ("UPGrad", "DualProj"):
                    expected = quadprog_weights(name, gramian)
                    difference = float((weights - expected).abs().max() / expected.abs().max())
                    row += f" {difference:>12.1e}"
                elif args.check:
                    row += f" {'-':>12}"
                print(row, flush=True)


if __name__ == "__main__":
    main()
