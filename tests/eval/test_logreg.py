"""Logistic regression: parity with scikit-learn's solver, C chosen on the hold-out, chance on noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinov2_core.eval.config import LogregConfig
from dinov2_core.eval.datasets import split_indices
from dinov2_core.eval.logreg import c_values, fit_logistic_regression, logreg_evaluate


def _blobs(n: int, num_classes: int, dim: int, spread: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    centres = 3 * torch.randn(num_classes, dim, generator=generator)
    return centres[labels] + spread * torch.randn(n, dim, generator=generator), labels


def test_matches_scikit_learn_at_fixed_c():
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs(90, 3, 5, 3.0, 0)
    weight, bias = fit_logistic_regression(x, y, 3, c=0.5, max_iter=500, tol=1e-12)
    reference = LogisticRegression(C=0.5, tol=1e-10, max_iter=5000).fit(x.double().numpy(), y.numpy())
    # sklearn's multinomial solution is identifiable only up to a shift shared by all classes
    ours = weight.numpy() - weight.numpy().mean(0)
    theirs = reference.coef_ - reference.coef_.mean(0)
    assert np.allclose(ours, theirs, atol=1e-4)
    assert np.allclose(bias.numpy() - bias.numpy().mean(), reference.intercept_ - reference.intercept_.mean(), atol=1e-4)


def test_c_grid_and_selection_on_holdout():
    cfg = LogregConfig()
    assert len(c_values(cfg)) == 45
    assert c_values(cfg)[0] == pytest.approx(1e-6) and c_values(cfg)[-1] == pytest.approx(1e5)
    x, y = _blobs(200, 4, 8, 1.0, 1)
    test_x, test_y = _blobs(80, 4, 8, 1.0, 1)
    small = LogregConfig(num_c=6, max_iter=200, tol=1e-9)
    result = logreg_evaluate(x, y, test_x, test_y, 4, small)
    per_c = result["holdout_top1_per_c"]
    best = max(range(len(per_c)), key=lambda i: (per_c[i], -i))
    assert result["best_c"] == result["c_values"][best]
    assert per_c[0] < 0.9  # C = 1e-6 is all penalty: the data-free model fails on the hold-out
    assert result["best_c"] > 1e-6
    assert result["top1"] == 1.0
    # the hold-out is 10 % of train, seeded
    keep, held = split_indices(200, 0.1, 0)
    assert len(held) == 20 and len(set(keep) | set(held)) == 200


def test_random_features_on_random_labels_give_chance():
    generator = torch.Generator().manual_seed(0)
    x, test_x = torch.randn(400, 16, generator=generator), torch.randn(400, 16, generator=generator)
    y, test_y = torch.randint(0, 4, (400,), generator=generator), torch.randint(0, 4, (400,), generator=generator)
    result = logreg_evaluate(x, y, test_x, test_y, 4, LogregConfig(num_c=4, max_iter=100, tol=1e-8))
    assert 0.15 < result["top1"] < 0.35
