"""Synthetic L2-normalised embeddings for the 1M-scale curation benchmarks: an imbalanced Gaussian
mixture (Zipf-like concept sizes), optionally with planted near-duplicates."""

from __future__ import annotations

import numpy as np


def mixture(n: int = 1_000_000, dim: int = 384, concepts: int = 2000, seed: int = 0,
            duplicates: int = 0, noise: float = 0.02, spread: float = 1.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(embeddings (n + duplicates, dim), duplicate_of, concept)``; ``duplicate_of[i]`` is the source
    row of a planted duplicate (-1 otherwise) and ``concept[i]`` the mixture component of row i.
    Centres are unit Gaussians; ``spread`` is the within-concept standard deviation (1.5: concepts
    overlap heavily; 0.5: they are separable)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, concepts + 1) ** 0.8
    sizes = rng.multinomial(n, weights / weights.sum())
    centers = rng.standard_normal((concepts, dim), dtype=np.float32)
    x = np.empty((n + duplicates, dim), dtype=np.float32)
    start = 0
    for center, size in zip(centers, sizes):
        x[start:start + size] = center + spread * rng.standard_normal((size, dim), dtype=np.float32)
        start += size
    duplicate_of = np.full(n + duplicates, -1, dtype=np.int64)
    if duplicates:
        sources = rng.choice(n, duplicates, replace=False)
        x[n:] = x[sources] + noise * np.linalg.norm(x[sources], axis=1, keepdims=True) / np.sqrt(dim) \
            * rng.standard_normal((duplicates, dim), dtype=np.float32)
        duplicate_of[n:] = sources
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    concept = np.repeat(np.arange(concepts), sizes)
    concept = np.concatenate([concept, concept[duplicate_of[n:]]]) if duplicates else concept
    return x, duplicate_of, concept
