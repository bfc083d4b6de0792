"""kNN voting, chunking and k clipping against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from dinov2_core.eval.knn import knn_class_scores, knn_evaluate, topk_neighbours


def _three_points():
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    return train, labels, query


def test_voting_weights_match_hand_computation():
    train, labels, query = _three_points()
    sims, idx = topk_neighbours(query, train, k=3)
    assert idx.tolist() == [[0, 1, 2]]
    assert sims[0].tolist() == pytest.approx([1.0, 0.6, 0.0])
    temperature = 0.5
    exps = [math.exp(1.0 / temperature), math.exp(0.6 / temperature), math.exp(0.0)]
    weights = [e / sum(exps) for e in exps]
    scores = knn_class_scores(sims, labels[idx], num_classes=2, ks=[1, 2, 3], temperature=temperature)
    # softmax is over all kmax=3 neighbours; k only decides how many of those weights vote
    assert scores[1][0].tolist() == pytest.approx([weights[0], 0.0])
    assert scores[2][0].tolist() == pytest.approx([weights[0], weights[1]])
    assert scores[3][0].tolist() == pytest.approx([weights[0], weights[1] + weights[2]])


def test_temperature_changes_the_vote_like_the_official_formula():
    train, labels, query = _three_points()
    target = torch.tensor([1])
    warm = knn_evaluate(train, labels, query, target, ks=[1, 3], temperature=1.0, num_classes=2)
    # T=1: w = softmax([1, .6, 0]) = [.475, .318, .207] -> class 1 wins with 3 neighbours
    assert warm["top1.k1"] == 0.0 and warm["top1.k3"] == 1.0
    cold = knn_evaluate(train, labels, query, target, ks=[3], temperature=0.07, num_classes=2)
    assert cold["top1.k3"] == 0.0  # T=0.07 makes the nearest neighbour dominate


def test_chunked_search_equals_full_search():
    torch.manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(103, 16), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(9, 16), dim=1)
    full_sims, full_idx = topk_neighbours(queries, train, k=20, train_chunk_size=1000)
    chunk_sims, chunk_idx = topk_neighbours(queries, train, k=20, train_chunk_size=7)
    assert torch.allclose(full_sims, chunk_sims)
    assert torch.equal(full_idx, chunk_idx)
    labels = torch.randint(0, 5, (103,))
    targets = torch.randint(0, 5, (9,))
    a = knn_evaluate(train, labels, queries, targets, ks=[5, 20], train_chunk_size=1000, query_chunk_size=100)
    b = knn_evaluate(train, labels, queries, targets, ks=[5, 20], train_chunk_size=7, query_chunk_size=2)
    assert a == pytest.approx(b)


def test_k_is_clipped_to_the_train_size_and_one_hot_features_are_perfect():
    labels = torch.arange(30) % 3
    features = torch.nn.functional.one_hot(labels, 3).float()
    metrics = knn_evaluate(features, labels, features[:9], labels[:9], ks=[10, 200], num_classes=3)
    assert set(metrics) == {"top1.k10", "top5.k10", "top1.k200", "top5.k200"}
    assert metrics["top1.k10"] == 1.0 and metrics["top1.k200"] == 1.0


def test_random_features_on_random_labels_give_chance():
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(2000, 32, generator=generator)
    test = torch.randn(1000, 32, generator=generator)
    train_y = torch.randint(0, 10, (2000,), generator=generator)
    test_y = torch.randint(0, 10, (1000,), generator=generator)
    metrics = knn_evaluate(train, train_y, test, test_y, ks=[20], num_classes=10)
    assert 0.05 < metrics["top1.k20"] < 0.15
    assert 0.4 < metrics["top5.k20"] < 0.6
