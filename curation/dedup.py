"""Deduplicate: exact duplicates by content hash, near duplicates by embedding k-NN + cosine threshold
grouped "keep-first" (every removed image is itself above the threshold to the image kept for it, so
no chain of matches can merge two different photos), and decontamination against an evaluation set
(every pool image within a stricter threshold of an eval image is removed).

Outputs under ``output_uri``: ``manifest.parquet`` (kept rows), ``removed.parquet`` (row_id, uri, reason,
kept_row_id, similarity), ``decontamination.parquet``, ``report.md`` and ``groups.png``.
"""

from __future__ import annotations

import collections
import time
from typing import Any

import numpy as np

from dinov2_core.utils.atomic import atomic_write_text
from dinov2_core.utils.config import to_dict
from dinov2_core.utils.uri import join_uri

from curation import knn
from curation.config import DedupConfig
from curation.embed import load_embeddings
from curation.plots import duplicate_groups_png
from curation.stage_io import fingerprint, finished_result, mark_finished, read_parquet, write_parquet


def _removed_schema():
    import pyarrow as pa

    return pa.schema([("row_id", pa.int64()), ("uri", pa.string()), ("reason", pa.string()),
                      ("kept_row_id", pa.int64()), ("similarity", pa.float32())])


def _decontam_schema():
    import pyarrow as pa

    return pa.schema([("row_id", pa.int64()), ("uri", pa.string()), ("eval_row_id", pa.int64()),
                      ("similarity", pa.float32())])


def keep_order(row_ids: np.ndarray, pixels: np.ndarray, rule: str) -> np.ndarray:
    """Positions sorted by preference: the largest resolution first (``largest``), then lowest row_id."""
    if rule == "largest":
        return np.lexsort((row_ids, -pixels))
    return np.argsort(row_ids, kind="stable")


def exact_duplicates(sha: np.ndarray, row_ids: np.ndarray, pixels: np.ndarray, rule: str) -> dict[int, int]:
    """``{removed position: kept position}`` for identical content hashes."""
    removed: dict[int, int] = {}
    by_hash: dict[str, list[int]] = collections.defaultdict(list)
    for position in keep_order(row_ids, pixels, rule):
        by_hash[sha[position]].append(int(position))
    for positions in by_hash.values():
        for position in positions[1:]:
            removed[position] = positions[0]
    return removed


def pair_similarities(a: np.ndarray, b: np.ndarray, vectors: np.ndarray, views: np.ndarray | None) -> np.ndarray:
    """Cosine similarity of items ``a[i]`` and ``b[i]``; with crop views the best of either item's full
    descriptor against the other's views (the same measure the k-NN search thresholds)."""
    if views is None:
        return np.einsum("id,id->i", vectors[a], vectors[b])
    a_in_b = np.einsum("ivd,id->iv", views[b], vectors[a]).max(axis=1)
    b_in_a = np.einsum("ivd,id->iv", views[a], vectors[b]).max(axis=1)
    return np.maximum(a_in_b, b_in_a)


def crowding(rows: np.ndarray, values: np.ndarray, n: int, rank: int, ignore_above: float) -> np.ndarray:
    """Per query, the similarity of its ``rank``-th nearest other item, not counting items above
    ``ignore_above`` (near-certain copies, so an image with many copies is not deemed crowded by them);
    -1 where there are fewer such neighbours. ``rows``/``values``: all (query, item) pairs of a k-NN
    search, best view per item."""
    crowd = np.full(n, -1.0, dtype=np.float32)
    below = values < ignore_above
    rows, values = rows[below], values[below]
    order = np.lexsort((-values, rows))
    rows, values = rows[order], values[order]
    starts = np.searchsorted(rows, rows, side="left")
    at_rank = np.arange(len(rows)) - starts == rank - 1
    crowd[rows[at_rank]] = values[at_rank]
    return crowd


def near_duplicate_edges(cfg: DedupConfig, vectors: np.ndarray,
                         views: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Edges (i, j, similarity) between embedded items that count as near duplicates, and the faiss
    index that found them (:func:`curation.knn.describe_index`).

    An edge needs a cosine similarity above ``cfg.threshold``, raised where the pair sits in a crowded
    part of the descriptor space: ``threshold + crowding_weight * max(0, crowd - crowding_start)`` with
    ``crowd`` the larger :func:`crowding` of the two items (``crowding_rank: 0`` turns this off).
    With crop views, every item's full descriptor is matched against all items' views."""
    n = len(vectors)
    if views is not None:
        n_views = views.shape[1]
        base = views.reshape(-1, views.shape[-1])
        owner = np.repeat(np.arange(n), n_views)
        k = min(2048, cfg.k * n_views)
    else:
        base, owner, k = vectors, None, cfg.k
    index = knn.build_index(base, cfg.index, cfg.flat_max, cfg.ivf_nlist, cfg.ivf_nprobe, cfg.use_gpu)
    batch = max(1, min(cfg.query_batch, (1 << 23) // k))  # all-pairs arrays of a batch stay ~100 MB
    crowd = np.full(n, -1.0, dtype=np.float32)
    left, right, sims = [], [], []
    for start in range(0, n, batch):
        found, ids = knn.search(index, vectors[start:start + batch], k, batch)
        floor = -np.inf if cfg.crowding_rank else cfg.threshold
        rows, items, values = knn.neighbour_pairs(found, ids, owner, floor, first_query=start)
        if cfg.crowding_rank:
            crowd[start:start + batch] = crowding(rows - start, values, len(found), cfg.crowding_rank,
                                                  cfg.crowding_ignore_above)
        above = values > cfg.threshold
        left.append(rows[above])
        right.append(items[above])
        sims.append(values[above])
    left, right, sims = np.concatenate(left), np.concatenate(right), np.concatenate(sims)
    required = cfg.threshold + cfg.crowding_weight * np.maximum(
        0.0, np.maximum(crowd[left], crowd[right]) - cfg.crowding_start)
    keep = sims > required if cfg.crowding_rank else np.ones(len(sims), dtype=bool)
    return left[keep], right[keep], sims[keep], knn.describe_index(index)


def keep_first_groups(order: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``kept_for[i]``: the item kept in place of item ``i`` (``i`` itself when ``i`` is kept).

    Items are visited in ``order`` (most preferred first); an item not yet removed is kept, and its
    neighbours (undirected edges ``left``–``right``) not yet removed or kept are removed for it. Every
    removed item therefore has a direct edge to its kept item: unlike connected components, a chain
    A–B–C with no edge A–C never removes C for A (C is kept, or removed by a neighbour of its own)."""
    n = len(order)
    from scipy.sparse import coo_matrix

    graph = coo_matrix((np.ones(2 * len(left), dtype=np.int8),
                        (np.concatenate([left, right]), np.concatenate([right, left]))), shape=(n, n)).tocsr()
    kept_for = np.full(n, -1, dtype=np.int64)
    for item in order.tolist():
        if kept_for[item] >= 0:
            continue
        kept_for[item] = item
        neighbours = graph.indices[graph.indptr[item]:graph.indptr[item + 1]]
        free = neighbours[kept_for[neighbours] < 0]
        kept_for[free] = item
    return kept_for


def contaminated_items(cfg: DedupConfig, vectors: np.ndarray, views: np.ndarray | None,
                       eval_vectors: np.ndarray, eval_views: np.ndarray | None) -> tuple[dict[int, tuple[int, float]], str]:
    """``{pool position: (eval position, similarity)}`` for pool items within ``decontam_threshold``
    of an eval item, checked in both directions (pool image vs eval crops and eval image vs pool crops),
    and the faiss index that searched the eval set."""
    best: dict[int, tuple[int, float]] = {}

    def note(pool: np.ndarray, ev: np.ndarray, sims: np.ndarray) -> None:
        for p, e, s in zip(pool.tolist(), ev.tolist(), sims.tolist()):
            if p not in best or s > best[p][1]:
                best[p] = (e, s)

    eval_base = eval_views.reshape(-1, eval_views.shape[-1]) if eval_views is not None else eval_vectors
    eval_owner = np.repeat(np.arange(len(eval_vectors)), eval_views.shape[1]) if eval_views is not None else None
    index = knn.build_index(eval_base, "flat" if len(eval_base) <= cfg.flat_max else "ivf", cfg.flat_max,
                            cfg.ivf_nlist, cfg.ivf_nprobe, cfg.use_gpu)
    k = cfg.k * (eval_views.shape[1] if eval_views is not None else 1)
    pool, ev, sims = knn.similar_pairs(vectors, index, eval_owner, k, cfg.decontam_threshold, cfg.query_batch,
                                       exclude_self=False)
    note(pool, ev, sims)
    if views is not None:
        pool_index = knn.build_index(views.reshape(-1, views.shape[-1]), cfg.index, cfg.flat_max,
                                     cfg.ivf_nlist, cfg.ivf_nprobe, cfg.use_gpu)
        owner = np.repeat(np.arange(len(vectors)), views.shape[1])
        ev2, pool2, sims2 = knn.similar_pairs(eval_vectors, pool_index, owner, k, cfg.decontam_threshold,
                                              cfg.query_batch, exclude_self=False)
        note(pool2, ev2, sims2)
    return best, knn.describe_index(index)


def run_dedup(cfg: DedupConfig, manifest_uri: str, embeddings_uri: str, output_uri: str,
              eval_embeddings_uri: str | None = None) -> dict[str, Any]:
    """Remove eval-set contamination, exact and near duplicates from ``manifest_uri``.

    Order: contamination first (so a contaminated image is never the one kept for others), then exact
    duplicates, then near duplicates among the remaining embedded rows."""
    stage_fp = fingerprint(cfg, manifest=manifest_uri, embeddings=embeddings_uri, eval_embeddings=eval_embeddings_uri)
    done = finished_result(output_uri, stage_fp)
    if done is not None:
        return done
    started = time.perf_counter()
    table = read_parquet(manifest_uri)
    row_ids = np.asarray(table.column("row_id").to_pylist(), dtype=np.int64)
    uris = table.column("uri").to_pylist()
    n = len(row_ids)
    pixels = (np.asarray(table.column("width").to_pylist(), dtype=np.int64)
              * np.asarray(table.column("height").to_pylist(), dtype=np.int64)) if n else np.zeros(0, np.int64)
    sha = np.asarray(table.column("sha256").to_pylist(), dtype=object)
    position_of = {int(r): i for i, r in enumerate(row_ids)}

    emb_ids, vectors, views = load_embeddings(embeddings_uri, with_views=True)
    in_manifest = np.array([int(r) in position_of for r in emb_ids], dtype=bool)
    emb_positions = np.array([position_of[int(r)] for r in emb_ids[in_manifest]], dtype=np.int64)
    vectors = vectors[in_manifest]
    views = views[in_manifest] if views is not None else None

    removed: dict[int, tuple[str, int | None, float]] = {}  # position -> (reason, kept position, similarity)
    decontam_rows: list[dict[str, Any]] = []
    indexes: dict[str, str] = {}
    if eval_embeddings_uri and len(emb_positions):
        eval_ids, eval_vectors, eval_views = load_embeddings(eval_embeddings_uri, with_views=True)
        if views is None:
            eval_views = None
        contaminated, indexes["decontamination"] = contaminated_items(cfg, vectors, views, eval_vectors, eval_views)
        for i, (eval_index, similarity) in contaminated.items():
            position = int(emb_positions[i])
            removed[position] = ("eval_contamination", None, similarity)
            decontam_rows.append({"row_id": int(row_ids[position]), "uri": uris[position],
                                  "eval_row_id": int(eval_ids[eval_index]), "similarity": similarity})

    if cfg.exact and n:
        clean = np.array([p not in removed for p in range(n)], dtype=bool)
        clean_positions = np.nonzero(clean)[0]
        for position, kept in exact_duplicates(sha[clean], row_ids[clean], pixels[clean], cfg.keep).items():
            removed[int(clean_positions[position])] = ("exact_duplicate", int(clean_positions[kept]), 1.0)

    alive = np.array([p not in removed for p in emb_positions.tolist()], dtype=bool)
    emb_positions, vectors = emb_positions[alive], vectors[alive]
    views = views[alive] if views is not None else None
    num_edges = 0
    example_groups: list[list[int]] = []
    if cfg.near and len(emb_positions) > 1:
        left, right, _, indexes["near"] = near_duplicate_edges(cfg, vectors, views)
        num_edges = len(left)
        order = keep_order(row_ids[emb_positions], pixels[emb_positions], cfg.keep)
        kept_for = keep_first_groups(order, left, right)
        duplicates = np.nonzero(kept_for != np.arange(len(kept_for)))[0]
        similarities = pair_similarities(duplicates, kept_for[duplicates], vectors, views)
        members: dict[int, list[int]] = collections.defaultdict(list)
        for item, similarity in zip(duplicates.tolist(), similarities.tolist()):
            keeper = int(kept_for[item])
            removed[int(emb_positions[item])] = ("near_duplicate", int(emb_positions[keeper]), similarity)
            members[keeper].append(item)
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        example_groups = [[keeper, *sorted(items, key=lambda i: rank[i])] for keeper, items in members.items()]

    kept_mask = np.ones(n, dtype=bool)
    kept_mask[list(removed)] = False
    manifest_out = join_uri(output_uri, "manifest.parquet")
    removed_out = join_uri(output_uri, "removed.parquet")
    decontam_out = join_uri(output_uri, "decontamination.parquet")
    write_parquet(table.filter(kept_mask), manifest_out)
    removed_rows = [{"row_id": int(row_ids[p]), "uri": uris[p], "reason": reason,
                     "kept_row_id": None if kept is None else int(row_ids[kept]), "similarity": float(sim)}
                    for p, (reason, kept, sim) in sorted(removed.items())]
    write_parquet(removed_rows, removed_out, schema=_removed_schema())
    decontam_rows.sort(key=lambda r: r["row_id"])
    write_parquet(decontam_rows, decontam_out, schema=_decontam_schema())
    if cfg.decontam_list_uri and eval_embeddings_uri:
        write_parquet(decontam_rows, cfg.decontam_list_uri, schema=_decontam_schema())

    example_groups.sort(key=lambda g: (-len(g), int(row_ids[emb_positions[g[0]]])))
    picture = [[(uris[emb_positions[i]], f"{'kept' if rank == 0 else 'dup'} #{row_ids[emb_positions[i]]}")
                for rank, i in enumerate(group)] for group in example_groups[: cfg.example_groups]]
    groups_png = duplicate_groups_png(picture, join_uri(output_uri, "groups.png"))

    by_reason = dict(collections.Counter(reason for reason, _, _ in removed.values()))
    result = {
        "manifest": manifest_out,
        "removed": removed_out,
        "decontamination": decontam_out,
        "decontamination_list": cfg.decontam_list_uri if eval_embeddings_uri else None,
        "report": join_uri(output_uri, "report.md"),
        "groups_png": groups_png,
        "num_input": n,
        "num_kept": int(kept_mask.sum()),
        "num_removed": len(removed),
        "removed_by_reason": by_reason,
        "num_near_edges": int(num_edges),
        "num_duplicate_groups": len(example_groups),
        "num_not_embedded": int(n - in_manifest.sum()),
        "faiss_index": indexes,
        "seconds": round(time.perf_counter() - started, 2),
    }
    atomic_write_text(result["report"], _report(cfg, result, views is not None))
    return mark_finished(output_uri, stage_fp, result)


def _report(cfg: DedupConfig, result: dict[str, Any], crop_views: bool) -> str:
    lines = ["# Deduplication report", "",
             f"- input images: {result['num_input']}", f"- kept: {result['num_kept']}",
             f"- removed: {result['num_removed']}", ""]
    lines += ["| reason | count |", "|---|---|"]
    for reason in ("exact_duplicate", "near_duplicate", "eval_contamination"):
        lines.append(f"| {reason} | {result['removed_by_reason'].get(reason, 0)} |")
    indexes = result["faiss_index"]
    lines += ["", "## Thresholds", "",
              f"- near duplicates: cosine similarity > {cfg.threshold} among k={cfg.k} nearest neighbours "
              f"(crop views: {'yes' if crop_views else 'no'}), raised by {cfg.crowding_weight} x (similarity of "
              f"the {cfg.crowding_rank}th-nearest image - {cfg.crowding_start}) in crowded regions "
              f"(crowding_rank 0: off); keep-first grouping (each removed image is directly above the "
              f"threshold to its kept image), keep rule `{cfg.keep}`",
              f"- eval decontamination: cosine similarity > {cfg.decontam_threshold} to an eval image",
              f"- faiss index: near duplicates {indexes.get('near', 'not searched')}; "
              f"decontamination {indexes.get('decontamination', 'not searched')} (use_gpu: {cfg.use_gpu})",
              f"- near-duplicate edges: {result['num_near_edges']}; duplicate groups: {result['num_duplicate_groups']}",
              f"- rows without an embedding (kept unjudged): {result['num_not_embedded']}",
              "", "## Config", "", "```", *(f"{k}: {v}" for k, v in to_dict(cfg).items()), "```", ""]
    return "\n".join(lines)
