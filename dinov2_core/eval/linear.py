"""Linear probe with the official DINOv2 grid of heads, trained together on frozen features (recipe §7.2).

Heads = n_last_blocks {1, 4} × avgpool {False, True} × 13 learning rates = 52 linear classifiers.
A head's input is the concatenated cls tokens of the last ``n`` blocks, plus, with avgpool, the mean
patch token of the last block. All heads see the same mini-batches of precomputed features; each
has its own learning rate (grid value × batch/256), SGD momentum 0.9, weight decay 0, cosine decay to
0, weights N(0, 0.01), bias 0. The best head is chosen by top-1 on a validation split carved out of
train (ties broken by the lower validation loss), and only that head's test accuracy is reported. Unlike the official script the backbone is not
re-run on augmented crops each step, which makes the probe a few seconds instead of hours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dinov2_core.eval.config import LinearConfig
from dinov2_core.eval.knn import topk_accuracy


@dataclass(frozen=True)
class HeadSpec:
    n_blocks: int
    avgpool: bool
    base_lr: float
    lr: float  # base_lr scaled by batch_size / 256

    @property
    def name(self) -> str:
        return f"blocks{self.n_blocks}_avgpool{self.avgpool}_lr{self.base_lr:g}"


def head_grid(cfg: LinearConfig, available_blocks: int) -> list[HeadSpec]:
    """The grid of heads; block counts above ``available_blocks`` are clipped (then deduplicated)."""
    blocks = sorted({min(n, available_blocks) for n in cfg.n_last_blocks})
    scale = cfg.batch_size / 256.0
    return [HeadSpec(n, pool, lr, lr * scale) for n in blocks for pool in cfg.avgpool for lr in cfg.lrs]


def linear_input(features: dict[str, torch.Tensor], n_blocks: int, avgpool: bool) -> torch.Tensor:
    """[cls of the last n blocks (oldest first) ..., mean patch token of the last block]."""
    parts = [features["cls_blocks"][:, -n_blocks:].flatten(1)]
    if avgpool:
        parts.append(features["patch_mean"])
    return torch.cat(parts, dim=1)


class LinearHeadGrid(nn.Module):
    """One ``nn.Linear`` per :class:`HeadSpec`, fed with its own input variant."""

    def __init__(self, specs: list[HeadSpec], input_dims: dict[tuple[int, bool], int], num_classes: int):
        super().__init__()
        self.specs = specs
        self.heads = nn.ModuleList(nn.Linear(input_dims[(s.n_blocks, s.avgpool)], num_classes) for s in specs)
        for head in self.heads:
            nn.init.normal_(head.weight, mean=0.0, std=0.01)
            nn.init.zeros_(head.bias)

    def forward(self, inputs: dict[tuple[int, bool], torch.Tensor]) -> list[torch.Tensor]:
        return [head(inputs[(s.n_blocks, s.avgpool)]) for s, head in zip(self.specs, self.heads)]

    def optimizer(self, momentum: float, weight_decay: float) -> torch.optim.SGD:
        groups = [{"params": head.parameters(), "lr": s.lr} for s, head in zip(self.specs, self.heads)]
        return torch.optim.SGD(groups, lr=self.specs[0].lr, momentum=momentum, weight_decay=weight_decay)


def _inputs(features: dict[str, torch.Tensor], specs: list[HeadSpec]) -> dict[tuple[int, bool], torch.Tensor]:
    return {(s.n_blocks, s.avgpool): linear_input(features, s.n_blocks, s.avgpool) for s in specs}


@torch.no_grad()
def _accuracies(grid: LinearHeadGrid, inputs: dict, labels: torch.Tensor, top: int) -> list[float]:
    return [topk_accuracy(logits, labels, top) for logits in grid(inputs)]


def train_linear_grid(
    train_features: dict[str, torch.Tensor],
    train_labels: torch.Tensor,
    val_features: dict[str, torch.Tensor],
    val_labels: torch.Tensor,
    test_features: dict[str, torch.Tensor],
    test_labels: torch.Tensor,
    num_classes: int,
    cfg: LinearConfig,
    device: torch.device | str = "cpu",
) -> dict:
    """Train every head of the grid, select on validation, report the selected head on test.

    Returns ``top1``/``top5`` (test, selected head), ``val_top1``, ``best_head`` and per-head lists
    ``heads``, ``val_top1_per_head``, ``test_top1_per_head``.
    """
    available = train_features["cls_blocks"].shape[1]
    specs = head_grid(cfg, available)
    generator = torch.Generator().manual_seed(cfg.seed)
    train_inputs = {k: v.to(device) for k, v in _inputs(train_features, specs).items()}
    torch.manual_seed(cfg.seed)
    grid = LinearHeadGrid(specs, {k: v.shape[1] for k, v in train_inputs.items()}, num_classes).to(device)
    optimizer = grid.optimizer(cfg.momentum, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.iterations, eta_min=0.0)
    labels = train_labels.to(device)
    n = labels.shape[0]
    order = torch.randperm(n, generator=generator)
    cursor = 0
    for _ in range(cfg.iterations):
        if cursor + cfg.batch_size > n and cursor > 0:  # new epoch: reshuffle
            order, cursor = torch.randperm(n, generator=generator), 0
        batch = order[cursor:cursor + cfg.batch_size].to(device)
        cursor += cfg.batch_size
        logits = grid({k: v[batch] for k, v in train_inputs.items()})
        # heads are independent: the sum's gradient w.r.t. each head is that head's own gradient
        loss = sum(F.cross_entropy(out, labels[batch]) for out in logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    grid.eval()
    val_inputs = {k: v.to(device) for k, v in _inputs(val_features, specs).items()}
    test_inputs = {k: v.to(device) for k, v in _inputs(test_features, specs).items()}
    val_top1 = _accuracies(grid, val_inputs, val_labels.to(device), 1)
    test_top1 = _accuracies(grid, test_inputs, test_labels.to(device), 1)
    test_top5 = _accuracies(grid, test_inputs, test_labels.to(device), 5)
    with torch.no_grad():
        val_y = val_labels.to(device)
        val_loss = [F.cross_entropy(logits, val_y).item() for logits in grid(val_inputs)]
    # ties in accuracy are common on small validation splits: the lower validation loss wins
    best = max(range(len(specs)), key=lambda i: (val_top1[i], -val_loss[i], -i))
    return {
        "top1": test_top1[best],
        "top5": test_top5[best],
        "val_top1": val_top1[best],
        "best_head": specs[best].name,
        "heads": [s.name for s in specs],
        "val_top1_per_head": val_top1,
        "test_top1_per_head": test_top1,
    }
