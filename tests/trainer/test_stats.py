"""Tests of the logged JD statistics against brute-force computations."""

from __future__ import annotations

import itertools

import pytest
import torch

from hf_jd.trainer._stats import StatsAccumulator, gramian_stats, loss_stats, weight_stats


def _brute_force(jacobian: torch.Tensor) -> tuple[int, float | None]:
    conflicts, cosines = 0, []
    for i, j in itertools.combinations(range(jacobian.shape[0]), 2):
        gi, gj = jacobian[i], jacobian[j]
        conflicts += int(gi @ gj < 0)
        if gi.norm() > 0 and gj.norm() > 0:
            cosines.append(float(torch.nn.functional.cosine_similarity(gi, gj, dim=0)))
    return conflicts, (min(cosines) if cosines else None)


@pytest.mark.parametrize("seed", range(4))
def test_gramian_stats_match_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    jacobian = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    jacobian[2] = 0.0  # a zero row has no cosine and conflicts with nothing
    stats = gramian_stats(jacobian @ jacobian.T)
    conflicts, min_cosine = _brute_force(jacobian)
    assert stats["jd/conflicting_pairs"].item() == conflicts
    assert stats["jd/min_cosine"].item() == pytest.approx(min_cosine, abs=1e-5)


def test_gramian_stats_single_row_and_parallel_rows():
    stats = gramian_stats(torch.tensor([[4.0]]))
    assert stats["jd/conflicting_pairs"].item() == 0 and "jd/min_cosine" not in stats
    jacobian = torch.tensor([[1.0, 0.0], [-2.0, 0.0]])
    stats = gramian_stats(jacobian @ jacobian.T)
    assert stats["jd/conflicting_pairs"].item() == 1
    assert stats["jd/min_cosine"].item() == pytest.approx(-1.0)


def test_weight_stats_per_mode():
    mtl = weight_stats(torch.tensor([0.25, 0.75]), "mtl", ["a", "b"])
    assert mtl == {"jd/weight_a": pytest.approx(0.25), "jd/weight_b": pytest.approx(0.75)}
    iwrm = weight_stats(torch.tensor([0.1, 0.3, 0.2]), "iwrm", None)
    assert iwrm["jd/weight_min"].item() == pytest.approx(0.1)
    assert iwrm["jd/weight_max"].item() == pytest.approx(0.3)
    assert iwrm["jd/weight_mean"].item() == pytest.approx(0.2)
    iwmtl = weight_stats(torch.tensor([[0.1, 0.2], [0.3, 0.4]]), "iwmtl", ["a", "b"])
    assert iwmtl["jd/weight_a"].item() == pytest.approx(0.4)
    assert iwmtl["jd/weight_b"].item() == pytest.approx(0.6)


def test_loss_stats_per_mode():
    assert loss_stats(torch.tensor([1.0, 2.0]), "mtl", ["a", "b"]) == {
        "loss_a": pytest.approx(1.0),
        "loss_b": pytest.approx(2.0),
    }
    stats = loss_stats(torch.tensor([[1.0, 2.0], [3.0, 6.0]]), "iwmtl", ["a", "b"])
    assert stats["loss_a"].item() == pytest.approx(2.0) and stats["loss_b"].item() == pytest.approx(4.0)
    assert loss_stats(torch.tensor([1.0, 2.0]), "iwrm", None) == {}


def test_accumulator_means_per_key_and_resets():
    accumulator = StatsAccumulator()
    assert not accumulator
    accumulator.add({"x": torch.tensor(1.0), "y": torch.tensor(4.0)})
    accumulator.add({"x": torch.tensor(3.0)})
    assert accumulator
    assert accumulator.pop_means() == {"x": 2.0, "y": 4.0}
    assert not accumulator and accumulator.pop_means() == {}


def test_iwmtl_loss_stats_divide_by_labelled_examples():
    losses = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 5.0]])  # zeros: label missing
    stats = loss_stats(losses, "iwmtl", ["a", "b"], label_counts=[2, 1])
    assert stats["loss_a"].item() == pytest.approx(2.0) and stats["loss_b"].item() == pytest.approx(5.0)
    assert loss_stats(losses, "iwmtl", ["a", "b"], label_counts=[3, 0]).keys() == {"loss_a"}
