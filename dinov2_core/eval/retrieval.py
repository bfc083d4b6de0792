"""Instance retrieval: rank a gallery by cosine similarity for each query; mAP and recall@k.

A gallery item is relevant to a query when they share a group id (a planted near-duplicate group,
an instance id or simply the class label). AP is the mean of precision@rank over the ranks of the
relevant items; recall@k is the fraction of queries with at least one relevant item in the top k
(the usual definition for instance retrieval). Queries without any relevant gallery item are left
out and counted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def retrieval_metrics(
    query_features: torch.Tensor,
    query_groups: torch.Tensor,
    gallery_features: torch.Tensor,
    gallery_groups: torch.Tensor,
    ks: list[int] = (1, 5, 10),
    query_chunk_size: int = 256,
) -> dict[str, float]:
    """``map``, ``recall@k`` for each k, and ``num_queries`` / ``queries_without_match``."""
    queries = F.normalize(query_features.float(), dim=1)
    gallery = F.normalize(gallery_features.float(), dim=1)
    ap_sum = 0.0
    hits = {k: 0 for k in ks}
    evaluated = 0
    without_match = 0
    for start in range(0, queries.shape[0], query_chunk_size):
        sims = queries[start:start + query_chunk_size] @ gallery.T
        order = sims.argsort(dim=1, descending=True)
        relevant = gallery_groups[order] == query_groups[start:start + query_chunk_size].unsqueeze(1)
        num_relevant = relevant.sum(dim=1)
        has_match = num_relevant > 0
        without_match += int((~has_match).sum())
        relevant, num_relevant = relevant[has_match].float(), num_relevant[has_match].float()
        if relevant.shape[0] == 0:
            continue
        ranks = torch.arange(1, relevant.shape[1] + 1, dtype=torch.float32)
        precision_at_rank = relevant.cumsum(dim=1) / ranks
        ap_sum += float(((precision_at_rank * relevant).sum(dim=1) / num_relevant).sum())
        for k in ks:
            hits[k] += int(relevant[:, :k].any(dim=1).sum())
        evaluated += relevant.shape[0]
    if evaluated == 0:
        raise ValueError("retrieval: no query has a relevant gallery item")
    metrics = {"map": ap_sum / evaluated}
    metrics.update({f"recall@{k}": hits[k] / evaluated for k in ks})
    metrics["num_queries"] = evaluated
    metrics["queries_without_match"] = without_match
    return metrics
