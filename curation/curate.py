"""Curate: choose the training subset from a (deduplicated) pool.

- ``balanced``: hierarchical k-means with resampling over the pool embeddings, then balanced
  hierarchical sampling to ``target_size`` (DINOv2 data-curation recipe).
- ``retrieval``: for every seed image, its ``retrieval_k`` nearest pool images (DINOv2 paper's
  sample-based retrieval).
- ``cluster_retrieval``: the level-1 clusters the seed images fall in, sampled in a balanced way to
  ``target_size`` (the paper's cluster-based retrieval).
- ``retrieval+balanced``: retrieve, then balance the retrieved set.

Outputs under ``output_uri``: ``manifest.parquet`` (the rows the trainer reads), ``stats.json``
(cluster sizes before and after) and ``cluster_sizes.png``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from dinov2_core.utils.atomic import atomic_write_json
from dinov2_core.utils.uri import join_uri

from curation import knn
from curation.config import CurateConfig
from curation.embed import load_embeddings
from curation.kmeans import KMeansLevel, assign, hierarchical_kmeans, kmeans_index, leaf_sizes
from curation.plots import cluster_sizes_png
from curation.sampling import hierarchical_sampling
from curation.stage_io import fingerprint, finished_result, mark_finished, read_parquet, write_parquet


def retrieve(pool: np.ndarray, seeds: np.ndarray, k: int, use_gpu: str = "auto") -> tuple[np.ndarray, str]:
    """Sorted unique pool indices among the ``k`` nearest neighbours of every seed, and the faiss index
    class that searched them (``Gpu…`` when on GPU)."""
    index = knn.build_index(pool, "auto", gpu=use_gpu)
    _, ids = knn.search(index, seeds, k)
    return np.unique(ids[ids >= 0]), f"faiss.{type(index).__name__}"


def _cluster(cfg: CurateConfig, vectors: np.ndarray) -> list[KMeansLevel]:
    return hierarchical_kmeans(vectors, cfg.levels, cfg.resampling_strategy, cfg.seed,
                               cfg.max_points_per_centroid, cfg.kmeans_init, cfg.use_gpu, cfg.spherical)


def run_curate(cfg: CurateConfig, manifest_uri: str, embeddings_uri: str, output_uri: str,
               seed_embeddings_uri: str | None = None) -> dict[str, Any]:
    """Write the curated ``manifest.parquet`` for the rows of ``manifest_uri`` (see module docstring)."""
    if cfg.mode != "balanced" and not seed_embeddings_uri:
        raise ValueError(f"curate mode {cfg.mode!r} needs seed embeddings (seed_embeddings_uri)")
    stage_fp = fingerprint(cfg, manifest=manifest_uri, embeddings=embeddings_uri, seeds=seed_embeddings_uri)
    done = finished_result(output_uri, stage_fp)
    if done is not None:
        return done
    started = time.perf_counter()
    table = read_parquet(manifest_uri)
    manifest_ids = np.asarray(table.column("row_id").to_pylist(), dtype=np.int64)
    emb_ids, vectors, _ = load_embeddings(embeddings_uri)
    in_pool = np.isin(emb_ids, manifest_ids)
    pool_ids, pool = emb_ids[in_pool], vectors[in_pool]
    seeds = load_embeddings(seed_embeddings_uri)[1] if seed_embeddings_uri else None

    candidates = np.arange(len(pool_ids))
    indexes: dict[str, str] = {}
    if cfg.mode in ("retrieval", "retrieval+balanced"):
        candidates, indexes["retrieval_index"] = retrieve(pool, seeds, cfg.retrieval_k, cfg.use_gpu)

    levels: list[KMeansLevel] = []
    if cfg.mode == "retrieval":
        selected = candidates
    else:
        levels = _cluster(cfg, pool[candidates])
        indexes["kmeans_index"] = kmeans_index(cfg.use_gpu, cfg.spherical)
        if cfg.mode == "cluster_retrieval":
            seed_clusters, _ = assign(seeds, levels[0].centroids, spherical=cfg.spherical, gpu=cfg.use_gpu)
            hit = np.unique(seed_clusters)
            chosen = hierarchical_sampling(levels[:1], cfg.target_size, cfg.seed, cfg.sampling_strategy, hit)
        else:
            chosen = hierarchical_sampling(levels, cfg.target_size, cfg.seed, cfg.sampling_strategy)
        selected = candidates[chosen]

    selected_ids = np.sort(pool_ids[selected])
    keep = np.isin(manifest_ids, selected_ids)
    manifest_out = join_uri(output_uri, "manifest.parquet")
    write_parquet(table.filter(keep), manifest_out)

    stats: dict[str, Any] = {"mode": cfg.mode, "pool_size": int(len(pool_ids)), "candidates": int(len(candidates)),
                             "selected": int(len(selected_ids)), "target_size": cfg.target_size, **indexes}
    plot_uri = join_uri(output_uri, "cluster_sizes.png")
    if levels:
        before = leaf_sizes(levels)
        chosen_mask = np.zeros(len(candidates), dtype=bool)
        chosen_mask[np.searchsorted(candidates, selected)] = True
        after_level1 = np.bincount(levels[0].labels[chosen_mask], minlength=len(levels[0].centroids))
        stats["levels"] = []
        after = after_level1
        for depth, level in enumerate(levels):
            if depth > 0:
                after = np.bincount(level.labels, weights=after, minlength=len(level.centroids)).astype(np.int64)
            stats["levels"].append({"level": depth + 1, "n_clusters": int(len(level.centroids)),
                                    "sizes_before": before[depth].tolist(), "sizes_after": after.tolist()})
        cluster_sizes_png({"pool": before[0], "curated": after_level1}, plot_uri, "level-1 cluster sizes")
    else:  # pure retrieval has no clusters: plot the pool against the retrieved set
        cluster_sizes_png({"pool": np.asarray([len(pool_ids)]), "retrieved": np.asarray([len(selected_ids)])},
                          plot_uri, "retrieval: pool vs retrieved images")
    stats["seconds"] = round(time.perf_counter() - started, 2)
    stats_uri = join_uri(output_uri, "stats.json")
    atomic_write_json(stats_uri, stats)
    result = {"manifest": manifest_out, "stats": stats_uri, "cluster_sizes_png": plot_uri,
              "num_pool": stats["pool_size"], "num_selected": stats["selected"], "mode": cfg.mode,
              "seconds": stats["seconds"], **indexes}
    return mark_finished(output_uri, stage_fp, result)
