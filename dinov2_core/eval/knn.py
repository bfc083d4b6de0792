"""Weighted k-nearest-neighbour classification on L2-normalised features (DINOv2 protocol, recipe §7.1).

For every query the ``max(k)`` most similar train features (cosine) are found chunk by chunk, so a
large train set never needs a full query × train similarity matrix. The neighbours vote with weights
``softmax(top-kmax similarities / T)`` taken over all ``kmax`` neighbours; the score of class ``c``
for a given ``k`` is the sum of the first ``k`` weights whose neighbour has label ``c``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def topk_neighbours(
    queries: torch.Tensor, train: torch.Tensor, k: int, train_chunk_size: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, train indices) of the ``k`` most similar train rows per query, best first."""
    best_sims: torch.Tensor | None = None
    best_idx: torch.Tensor | None = None
    for start in range(0, train.shape[0], train_chunk_size):
        chunk = train[start:start + train_chunk_size]
        sims = queries @ chunk.T
        sims, idx = sims.topk(min(k, chunk.shape[0]), dim=1)
        idx = idx + start
        if best_sims is not None:
            sims = torch.cat([best_sims, sims], dim=1)
            idx = torch.cat([best_idx, idx], dim=1)
            sims, order = sims.topk(min(k, sims.shape[1]), dim=1)
            idx = idx.gather(1, order)
        best_sims, best_idx = sims, idx
    return best_sims, best_idx


def knn_class_scores(
    neighbour_sims: torch.Tensor,
    neighbour_labels: torch.Tensor,
    num_classes: int,
    ks: list[int],
    temperature: float,
) -> dict[int, torch.Tensor]:
    """Per-k class scores (Q, C) from the sorted neighbours' similarities and labels (Q, kmax)."""
    weights = torch.softmax(neighbour_sims / temperature, dim=1)
    votes = F.one_hot(neighbour_labels, num_classes).to(weights.dtype) * weights.unsqueeze(-1)
    cumulative = votes.cumsum(dim=1)
    return {k: cumulative[:, k - 1, :] for k in ks}


def topk_accuracy(scores: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Fraction of rows whose target is among the ``k`` highest scores (k clipped to the class count)."""
    k = min(k, scores.shape[1])
    hits = (scores.topk(k, dim=1).indices == targets.unsqueeze(1)).any(dim=1)
    return hits.float().mean().item()


def knn_evaluate(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: list[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    train_chunk_size: int = 65536,
    query_chunk_size: int = 1024,
) -> dict[str, float]:
    """kNN top-1 / top-5 for each k (clipped to the train size), keys ``top1.k20``, ``top5.k20`` …"""
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise ValueError("knn: empty train or test features")
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max()).item()) + 1
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    effective = sorted({min(int(k), train.shape[0]) for k in ks})
    kmax = effective[-1]
    correct = {(k, top): 0.0 for k in effective for top in (1, 5)}
    for start in range(0, test.shape[0], query_chunk_size):
        queries = test[start:start + query_chunk_size]
        targets = test_labels[start:start + query_chunk_size]
        sims, idx = topk_neighbours(queries, train, kmax, train_chunk_size)
        scores = knn_class_scores(sims, train_labels[idx], num_classes, effective, temperature)
        for k, class_scores in scores.items():
            for top in (1, 5):
                correct[(k, top)] += topk_accuracy(class_scores, targets, top) * queries.shape[0]
    n = test.shape[0]
    metrics = {}
    for k in ks:
        used = min(int(k), train.shape[0])
        for top in (1, 5):
            metrics[f"top{top}.k{k}"] = correct[(used, top)] / n
    return metrics
