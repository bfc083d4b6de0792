"""Balanced hierarchical sampling from a hierarchical k-means tree (DINOv2 data-curation recipe).

At the top level an integer cap ``x`` is found by binary search so that Σ_c min(x, size_c) is as
close to the target as possible from below; the remainder goes one image each to randomly chosen
clusters that still have room. Each cluster's quota is then split among its sub-clusters with the same
rule, down to level 1, where images are taken at random or closest-to-centroid first. Small clusters
are taken whole and large ones are capped, so the result is far more uniform over concepts than a
random sample of the same size.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from curation.kmeans import KMeansLevel, leaf_sizes


def split_quota(sizes: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Per-cluster quotas: ``min(cap, size)`` with the cap chosen so the quotas add up to ``target``."""
    sizes = np.asarray(sizes, dtype=np.int64)
    target = int(min(target, sizes.sum()))
    low, high = 0, int(sizes.max()) if len(sizes) else 0
    while low < high:  # the largest cap whose total does not exceed the target
        mid = (low + high + 1) // 2
        if np.minimum(sizes, mid).sum() <= target:
            low = mid
        else:
            high = mid - 1
    quota = np.minimum(sizes, low)
    leftover = target - int(quota.sum())
    if leftover > 0:
        room = np.nonzero(sizes > quota)[0]
        quota[rng.choice(room, leftover, replace=False)] += 1
    return quota


def hierarchical_sampling(levels: list[KMeansLevel], target_size: int, seed: int = 0,
                          strategy: Literal["random", "closest"] = "random",
                          top_clusters: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of ~``target_size`` data points chosen by balanced hierarchical sampling.

    ``top_clusters`` restricts sampling to some clusters of the top level (cluster-based retrieval)."""
    rng = np.random.default_rng(seed)
    sizes = leaf_sizes(levels)
    members = [level.members() for level in levels]
    chosen: list[np.ndarray] = []

    def take(depth: int, clusters: np.ndarray, quota_total: int) -> None:
        quotas = split_quota(sizes[depth][clusters], quota_total, rng)
        for cluster, quota in zip(clusters.tolist(), quotas.tolist()):
            if quota == 0:
                continue
            inside = members[depth][cluster]
            if depth == 0:
                if quota >= len(inside):
                    chosen.append(inside)
                elif strategy == "closest":
                    chosen.append(inside[:quota])
                else:
                    chosen.append(rng.choice(inside, quota, replace=False))
            else:
                take(depth - 1, inside, quota)

    top = len(levels) - 1
    clusters = np.arange(len(levels[top].centroids)) if top_clusters is None else np.asarray(top_clusters)
    take(top, clusters, target_size)
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
