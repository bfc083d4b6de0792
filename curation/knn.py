"""k-nearest-neighbour search with faiss for dedup and retrieval: exact (flat) for small pools, IVF
for large ones, on GPU when faiss has GPUs. GPU indexes have no ``range_search``, so similar pairs
are found as k-NN followed by a similarity threshold (what the DINOv2 paper did as well).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np


def gpu_count() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def use_gpu(setting: Literal["auto", "never", "always"]) -> bool:
    if setting == "never":
        return False
    count = gpu_count()
    if setting == "always" and count == 0:
        raise RuntimeError("use_gpu: 'always' but faiss sees no GPU (install faiss-gpu); allowed here: ['auto', 'never']")
    return count > 0


def build_index(vectors: np.ndarray, kind: Literal["auto", "flat", "ivf"] = "auto", flat_max: int = 200_000,
                nlist: int = 0, nprobe: int = 16, gpu: Literal["auto", "never", "always"] = "auto", seed: int = 0):
    """An inner-product index over L2-normalised ``vectors`` (cosine similarity)."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if kind == "auto":
        kind = "flat" if n <= flat_max else "ivf"
    if kind == "flat" or n < 1000:
        index = faiss.IndexFlatIP(dim)
    else:
        nlist = nlist or int(min(65536, max(16, 2 * math.sqrt(n))))
        index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        # coarse cells only need to be roughly right: near duplicates sit close together
        faiss.extract_index_ivf(index).cp.niter = 10
        rng = np.random.default_rng(seed)
        train_n = min(n, nlist * 32)
        sample = vectors[np.sort(rng.choice(n, train_n, replace=False))] if train_n < n else vectors
        index.train(sample)
        index.nprobe = nprobe
    if use_gpu(gpu):
        index = faiss.index_cpu_to_all_gpus(index)
    for start in range(0, n, 262_144):
        index.add(vectors[start:start + 262_144])
    if hasattr(index, "nprobe"):
        index.nprobe = nprobe
    return index


def describe_index(index) -> str:
    """Which faiss index answered, for reports: its class and whether it ran on CPU or GPU(s),
    e.g. ``IndexFlatIP (CPU)`` or ``GpuIndexIVFFlat (GPU x1)``."""
    import faiss

    name = type(index).__name__
    if isinstance(index, faiss.IndexReplicas):
        return f"{type(faiss.downcast_index(index.at(0))).__name__} (GPU x{index.count()})"
    return f"{name} (GPU x1)" if name.startswith("Gpu") else f"{name} (CPU)"


def search(index, queries: np.ndarray, k: int, batch: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """``(similarities, indices)`` of the ``k`` nearest neighbours of every query, in query batches."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = max(1, min(k, index.ntotal, 2048))
    batch = max(1, min(batch, (1 << 26) // k))  # bounds the result buffers to ~0.5 GB
    sims = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), batch):
        sims[start:start + batch], ids[start:start + batch] = index.search(queries[start:start + batch], k)
    return sims, ids


def similar_pairs(queries: np.ndarray, index, owner: np.ndarray | None, k: int, threshold: float,
                  batch: int = 65_536, exclude_self: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs ``(query, base item, similarity)`` with similarity > ``threshold`` among the k-NN.

    ``owner`` maps index rows to base items when an item has several vectors (crop views); the best
    view counts. With ``exclude_self`` the query ``i`` never pairs with base item ``i``."""
    sims, ids = search(index, queries, k, batch)
    return neighbour_pairs(sims, ids, owner, threshold, exclude_self)


def neighbour_pairs(sims: np.ndarray, ids: np.ndarray, owner: np.ndarray | None, threshold: float,
                    exclude_self: bool = True, first_query: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`similar_pairs` on the result of :func:`search`; row ``r`` of ``sims``/``ids`` is query
    ``first_query + r``. Pairs come sorted by query, then base item."""
    rows, cols = np.nonzero((sims > threshold) & (ids >= 0))
    base = ids[rows, cols]
    if owner is not None:
        base = owner[base]
    values = sims[rows, cols]
    rows = rows + first_query
    keep = rows != base if exclude_self else np.ones(len(rows), dtype=bool)
    rows, base, values = rows[keep], base[keep], values[keep]
    if len(rows) == 0:
        return rows.astype(np.int64), base.astype(np.int64), values
    # one pair per (query, item): the best view
    order = np.lexsort((-values, base, rows))
    rows, base, values = rows[order], base[order], values[order]
    first = np.ones(len(rows), dtype=bool)
    first[1:] = (rows[1:] != rows[:-1]) | (base[1:] != base[:-1])
    return rows[first].astype(np.int64), base[first].astype(np.int64), values[first]
