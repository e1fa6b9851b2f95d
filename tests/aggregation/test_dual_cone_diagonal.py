"""The shortcut of ``project_weights`` for diagonal targets (UPGrad's) gives the general answer."""

from __future__ import annotations

import torch
from _aggregation_references import DT, assert_kkt, random_gramian

from hf_jd.aggregation._dual_cone import project_weights


def test_diagonal_targets_match_the_general_path() -> None:
    m = 24
    gram = random_gramian(m, 60, seed=12)
    weights = torch.rand(m, dtype=DT, generator=torch.Generator().manual_seed(1)) + 0.1
    diagonal = torch.diag(weights)
    # One extra row makes the targets non-square: the general product G u is used.
    general = project_weights(torch.cat([diagonal, torch.ones(1, m, dtype=DT)]), gram)[:m]
    shortcut = project_weights(diagonal, gram)
    torch.testing.assert_close(shortcut, general, rtol=1e-12, atol=1e-14)
    assert_kkt(gram, diagonal, shortcut, tol=1e-9)


def test_square_non_diagonal_targets_use_the_product() -> None:
    m = 12
    gram = random_gramian(m, 30, seed=13)
    targets = torch.eye(m, dtype=DT) + 0.1 * torch.rand(m, m, dtype=DT)
    result = project_weights(targets, gram)
    assert_kkt(gram, targets, result, tol=1e-9)
    # Row by row (one target at a time) gives the same answers.
    rows = torch.stack([project_weights(row, gram) for row in targets])
    torch.testing.assert_close(result, rows, rtol=1e-10, atol=1e-12)
