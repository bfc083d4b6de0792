"""Hierarchical k-means with resampling and balanced hierarchical sampling: target size, hierarchy
consistency, and better balance than random sampling on an imbalanced mixture."""

from __future__ import annotations

import numpy as np
import pytest

from curation.config import KMeansLevelConfig
from curation.kmeans import hierarchical_kmeans, leaf_sizes
from curation.sampling import hierarchical_sampling, split_quota


def imbalanced_mixture(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """20 well-separated Gaussian concepts with sizes from 1500 down to 10."""
    rng = np.random.default_rng(seed)
    sizes = np.geomspace(1500, 10, 20).astype(int)
    centers = rng.normal(size=(20, 16)) * 10
    x = np.concatenate([c + rng.normal(size=(s, 16)) for c, s in zip(centers, sizes)]).astype(np.float32)
    labels = np.repeat(np.arange(20), sizes)
    return x, labels


def test_split_quota_caps_large_clusters_and_hits_target():
    rng = np.random.default_rng(0)
    quota = split_quota(np.array([100, 50, 5, 1]), 40, rng)
    assert quota.sum() == 40 and quota[2] == 5 and quota[3] == 1 and abs(int(quota[0]) - int(quota[1])) <= 1
    assert split_quota(np.array([3, 2]), 100, rng).tolist() == [3, 2]


def test_hierarchy_is_consistent():
    x, _ = imbalanced_mixture()
    levels = hierarchical_kmeans(x, [KMeansLevelConfig(40, 3, 0, 10), KMeansLevelConfig(8, 2, 0, 10)], seed=0)
    assert levels[0].centroids.shape == (40, 16) and levels[1].centroids.shape == (8, 16)
    assert len(levels[0].labels) == len(x) and len(levels[1].labels) == 40
    sizes = leaf_sizes(levels)
    assert sizes[0].sum() == sizes[1].sum() == len(x)


@pytest.mark.parametrize("spherical", [False, True])
def test_balanced_sampling_hits_target_and_beats_random(spherical):
    x, concept = imbalanced_mixture()
    if spherical:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    levels = hierarchical_kmeans(x, [KMeansLevelConfig(60, 3, 0, 15), KMeansLevelConfig(15, 3, 0, 15)], seed=0,
                                 spherical=spherical)
    target = 400
    chosen = hierarchical_sampling(levels, target, seed=0)
    assert len(chosen) == target and len(np.unique(chosen)) == target

    def entropy(selection: np.ndarray) -> float:
        p = np.bincount(concept[selection], minlength=20) / len(selection)
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    random_pick = np.random.default_rng(0).choice(len(x), target, replace=False)
    balanced, uniform = entropy(chosen), entropy(random_pick)
    assert balanced > uniform + 0.3, (balanced, uniform)
    # every concept is represented, even the 10-image one
    assert len(np.unique(concept[chosen])) == 20
    # the largest concept is capped well below its random-sampling share (1500/8000 of the data)
    assert (concept[chosen] == 0).mean() < 0.5 * (concept == 0).mean()


def test_resampling_spreads_centroids_over_small_concepts():
    x, concept = imbalanced_mixture(1)
    plain = hierarchical_kmeans(x, [KMeansLevelConfig(20, 1, 0, 20)], seed=0)[0]
    resampled = hierarchical_kmeans(x, [KMeansLevelConfig(20, 4, 0, 20)], seed=0)[0]

    def concepts_covered(level) -> int:  # concepts that own the majority of some cluster
        owners = {int(np.bincount(concept[level.labels == c]).argmax()) for c in range(20) if (level.labels == c).any()}
        return len(owners)

    assert concepts_covered(resampled) >= concepts_covered(plain)
