"""Hierarchical k-means with resampling (DINOv2 data-curation recipe), on faiss.

Level 1 clusters the embeddings; level ℓ>1 clusters the centroids of level ℓ−1. Within a level,
step 0 is k-means on all points; each resampling step keeps ``sample_size`` points per cluster (the
closest to their centroid, or random ones), runs a fresh k-means on that sample and reassigns all
points. Resampling spreads centroids more evenly over the data instead of piling them into dense
regions, which is what makes the later balanced sampling balanced.

``spherical`` clusters by cosine with unit-norm centroids. The recipe uses squared L2; on
L2-normalised embeddings with more concepts than clusters, L2 assignment after a resampling step
sends every point without a nearby centroid to the centroid of smallest norm (a blend of many
concepts), which grew one cluster to a quarter of the data in our measurements; cosine assignment
does not have that failure.

Training and assignment run on the GPUs faiss sees (the ``gpu`` extra, faiss-gpu) unless ``gpu`` is
``never``; :func:`kmeans_index` names the index used, which the curate stage records in its stats.

``faiss.Kmeans`` silently subsamples its training set to ``k × max_points_per_centroid``; the
default here is raised so that every point takes part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from curation.knn import use_gpu

INIT_METHODS = ("kmeans++", "afkmc2", "random")


@dataclass
class KMeansLevel:
    """One level: centroids, the cluster of each input item and its squared distance to the centroid."""

    centroids: np.ndarray
    labels: np.ndarray
    distances: np.ndarray

    def members(self) -> list[np.ndarray]:
        """Input-item indices of every cluster, sorted by distance to the centroid (closest first)."""
        order = np.lexsort((self.distances, self.labels))
        bounds = np.searchsorted(self.labels[order], np.arange(len(self.centroids) + 1))
        return [order[bounds[c]:bounds[c + 1]] for c in range(len(self.centroids))]


def kmeans_index(gpu: Literal["auto", "never", "always"], spherical: bool) -> str:
    """The faiss index k-means trains and assigns with, e.g. ``faiss.IndexFlatIP (cpu)`` or
    ``faiss.IndexFlatL2 (gpu x 2)``."""
    from curation.knn import gpu_count

    name = "faiss.IndexFlatIP" if spherical else "faiss.IndexFlatL2"
    return f"{name} (gpu x {gpu_count()})" if use_gpu(gpu) else f"{name} (cpu)"


def kmeans(x: np.ndarray, k: int, n_iters: int, seed: int, max_points_per_centroid: int,
           init: str = "kmeans++", gpu: Literal["auto", "never", "always"] = "never",
           spherical: bool = False) -> np.ndarray:
    """Centroids of one k-means run (faiss; squared L2, or cosine with unit centroids if ``spherical``)."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    k = max(1, min(k, len(x)))
    method = {"kmeans++": faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
              "afkmc2": faiss.ClusteringInitMethod_AFK_MC2,
              "random": faiss.ClusteringInitMethod_RANDOM}[init]
    model = faiss.Kmeans(x.shape[1], k, niter=n_iters, seed=seed, verbose=False,
                         max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1,
                         init_method=method, gpu=use_gpu(gpu), spherical=spherical)
    model.train(x)
    return model.centroids.copy()


def assign(x: np.ndarray, centroids: np.ndarray, batch: int = 262_144, spherical: bool = False,
           gpu: Literal["auto", "never", "always"] = "never") -> tuple[np.ndarray, np.ndarray]:
    """``(labels, distances)`` of the nearest centroid of every row of ``x``: squared L2, or
    ``1 − cosine`` to the unit-normalised centroids if ``spherical``; on faiss's GPUs unless ``never``."""
    import faiss

    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    if spherical:
        centroids = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        index = faiss.IndexFlatIP(centroids.shape[1])
    else:
        index = faiss.IndexFlatL2(centroids.shape[1])
    if use_gpu(gpu):
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(centroids)
    labels = np.empty(len(x), dtype=np.int64)
    distances = np.empty(len(x), dtype=np.float32)
    for start in range(0, len(x), batch):
        d, i = index.search(np.ascontiguousarray(x[start:start + batch], dtype=np.float32), 1)
        labels[start:start + batch], distances[start:start + batch] = i[:, 0], (1.0 - d[:, 0]) if spherical else d[:, 0]
    return labels, distances


def resample(level: KMeansLevel, sample_size: int, strategy: Literal["closest", "random"],
             rng: np.random.Generator) -> np.ndarray:
    """Indices of up to ``sample_size`` items per cluster (closest to the centroid, or random)."""
    chosen = []
    for members in level.members():
        if len(members) <= sample_size:
            chosen.append(members)
        elif strategy == "closest":
            chosen.append(members[:sample_size])
        else:
            chosen.append(rng.choice(members, sample_size, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def kmeans_with_resampling(x: np.ndarray, n_clusters: int, n_resampling_steps: int, sample_size: int,
                           n_iters: int, strategy: Literal["closest", "random"], seed: int,
                           max_points_per_centroid: int, init: str = "kmeans++",
                           gpu: Literal["auto", "never", "always"] = "never", spherical: bool = False) -> KMeansLevel:
    """One level of hierarchical k-means: plain k-means, then ``n_resampling_steps − 1`` resampling steps."""
    rng = np.random.default_rng(seed)
    centroids = kmeans(x, n_clusters, n_iters, seed, max_points_per_centroid, init, gpu, spherical)
    level = KMeansLevel(centroids, *assign(x, centroids, spherical=spherical, gpu=gpu))
    for step in range(1, n_resampling_steps):
        per_cluster = sample_size or max(1, len(x) // (2 * len(level.centroids)))
        sample = resample(level, per_cluster, strategy, rng)
        centroids = kmeans(x[sample], n_clusters, n_iters, seed + step, max_points_per_centroid, init, gpu, spherical)
        level = KMeansLevel(centroids, *assign(x, centroids, spherical=spherical, gpu=gpu))
    return level


def hierarchical_kmeans(x: np.ndarray, levels: list, strategy: Literal["closest", "random"] = "closest",
                        seed: int = 0, max_points_per_centroid: int = 100_000, init: str = "kmeans++",
                        gpu: Literal["auto", "never", "always"] = "never", spherical: bool = False) -> list[KMeansLevel]:
    """All levels, bottom first; ``levels`` items have ``n_clusters``, ``n_resampling_steps``,
    ``sample_size`` and ``n_iters`` (see :class:`curation.config.KMeansLevelConfig`)."""
    result: list[KMeansLevel] = []
    data = x
    for depth, spec in enumerate(levels):
        level = kmeans_with_resampling(data, spec.n_clusters, max(1, spec.n_resampling_steps), spec.sample_size,
                                       spec.n_iters, strategy, seed + 1000 * depth, max_points_per_centroid, init, gpu,
                                       spherical)
        result.append(level)
        data = level.centroids
    return result


def leaf_sizes(levels: list[KMeansLevel]) -> list[np.ndarray]:
    """Number of data points under every cluster of every level."""
    sizes = [np.bincount(levels[0].labels, minlength=len(levels[0].centroids))]
    for level in levels[1:]:
        sizes.append(np.bincount(level.labels, weights=sizes[-1], minlength=len(level.centroids)).astype(np.int64))
    return sizes
