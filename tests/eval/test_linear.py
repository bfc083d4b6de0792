"""The linear-probe grid: its shape, learning-rate scaling, and selection on validation only."""

from __future__ import annotations

import torch

from dinov2_core.eval.config import OFFICIAL_LINEAR_LRS, LinearConfig
from dinov2_core.eval.linear import LinearHeadGrid, head_grid, linear_input, train_linear_grid


def _features(labels: torch.Tensor, num_classes: int, noise: float, seed: int, dim: int = 8) -> dict:
    generator = torch.Generator().manual_seed(seed)
    signal = torch.nn.functional.one_hot(labels, num_classes).float().repeat(1, dim // num_classes + 1)[:, :dim]
    blocks = signal.unsqueeze(1).repeat(1, 4, 1) + noise * torch.randn(len(labels), 4, dim, generator=generator)
    return {"cls_blocks": blocks, "patch_mean": noise * torch.randn(len(labels), dim, generator=generator)}


def test_official_grid_has_52_heads_with_scaled_lrs_and_right_input_dims():
    cfg = LinearConfig(batch_size=128)
    specs = head_grid(cfg, available_blocks=12)
    assert len(specs) == 52
    assert {(s.n_blocks, s.avgpool) for s in specs} == {(1, False), (1, True), (4, False), (4, True)}
    assert sorted({s.base_lr for s in specs}) == sorted(OFFICIAL_LINEAR_LRS)
    assert all(abs(s.lr - s.base_lr * 128 / 256) < 1e-15 for s in specs)
    features = _features(torch.arange(6) % 2, 2, 0.1, 0, dim=8)
    dims = {(n, p): linear_input(features, n, p).shape[1] for n, p in [(1, False), (1, True), (4, False), (4, True)]}
    assert dims == {(1, False): 8, (1, True): 16, (4, False): 32, (4, True): 40}
    grid = LinearHeadGrid(specs, dims, num_classes=5)
    assert len(grid.heads) == 52
    assert all(h.weight.shape == (5, dims[(s.n_blocks, s.avgpool)]) for s, h in zip(specs, grid.heads))
    assert all(torch.all(h.bias == 0) for h in grid.heads)
    assert 0.005 < torch.cat([h.weight.flatten() for h in grid.heads]).std().item() < 0.015  # N(0, 0.01)
    optimizer = grid.optimizer(momentum=0.9, weight_decay=0.0)
    assert [g["lr"] for g in optimizer.param_groups] == [s.lr for s in specs]
    # a 2-block backbone clips n_last_blocks=4 to 2
    assert {s.n_blocks for s in head_grid(cfg, available_blocks=2)} == {1, 2}
    assert len(head_grid(LinearConfig(batch_size=512), 12)) == 52
    assert head_grid(LinearConfig(batch_size=512), 12)[0].lr == OFFICIAL_LINEAR_LRS[0] * 2


def test_one_hot_features_reach_100_percent():
    labels = torch.arange(60) % 3
    features = _features(labels, 3, 0.0, 0)
    result = train_linear_grid(features, labels, features, labels, features, labels, 3,
                               LinearConfig(iterations=100, batch_size=32))
    assert result["top1"] == 1.0 and result["val_top1"] == 1.0


def test_best_head_is_selected_on_validation_not_on_test():
    num_classes = 4
    train_y = torch.arange(120) % num_classes
    val_y = torch.arange(40) % num_classes
    test_y = torch.randint(0, num_classes, (40,), generator=torch.Generator().manual_seed(3))
    train = _features(train_y, num_classes, 1.0, 1)
    val = _features(val_y, num_classes, 1.0, 2)
    test = _features(torch.arange(40) % num_classes, num_classes, 1.0, 4)  # labels above are random
    result = train_linear_grid(train, train_y, val, val_y, test, test_y, num_classes,
                               LinearConfig(iterations=40, batch_size=32))
    val_acc, test_acc = result["val_top1_per_head"], result["test_top1_per_head"]
    assert result["val_top1"] == max(val_acc)
    val_best = result["heads"].index(result["best_head"])
    test_best = max(range(52), key=lambda i: (test_acc[i], -i))
    assert test_acc[val_best] < test_acc[test_best]  # the case is informative: selections disagree
    assert result["top1"] == test_acc[val_best]
    assert result["val_top1"] == val_acc[val_best]
