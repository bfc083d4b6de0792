"""Retrieval mAP and recall@k against values computed by hand."""

from __future__ import annotations

import pytest
import torch

from dinov2_core.eval.retrieval import retrieval_metrics


def test_map_and_recall_by_hand():
    # gallery on the unit circle; each query's ranking is fixed by the angles
    angles = torch.tensor([0.0, 0.3, 0.6, 0.9])
    gallery = torch.stack([angles.cos(), angles.sin()], dim=1)
    gallery_groups = torch.tensor([1, 2, 1, 3])
    queries = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    query_groups = torch.tensor([1, 2, 9])
    metrics = retrieval_metrics(queries, query_groups, gallery, gallery_groups, ks=[1, 2, 5])
    # query 0 (group 1): relevant at ranks 1 and 3 -> AP = (1/1 + 2/3) / 2
    # query 1 (group 2): relevant at rank 2 -> AP = 1/2; query 2 has no match and is left out
    assert metrics["map"] == pytest.approx(((1 + 2 / 3) / 2 + 0.5) / 2)
    assert metrics["recall@1"] == pytest.approx(0.5)
    assert metrics["recall@2"] == pytest.approx(1.0)
    assert metrics["recall@5"] == pytest.approx(1.0)
    assert metrics["num_queries"] == 2 and metrics["queries_without_match"] == 1


def test_planted_near_duplicates_are_found():
    generator = torch.Generator().manual_seed(0)
    originals = torch.randn(50, 64, generator=generator)
    duplicates = originals + 0.05 * torch.randn(50, 64, generator=generator)
    gallery = torch.cat([originals, torch.randn(200, 64, generator=generator)])
    groups = torch.cat([torch.arange(50), torch.full((200,), -1)])
    metrics = retrieval_metrics(duplicates, torch.arange(50), gallery, groups, query_chunk_size=16)
    assert metrics["map"] == pytest.approx(1.0)
    assert metrics["recall@1"] == pytest.approx(1.0)
