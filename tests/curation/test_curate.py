"""run_curate end to end: balanced, retrieval and cluster-retrieval modes on embedding shards."""

from __future__ import annotations

import json

import numpy as np
import pytest

from curation.config import CurateConfig, KMeansLevelConfig
from curation.curate import run_curate
from curation.stage_io import read_parquet, save_npy, write_parquet
from dinov2_core.utils.atomic import atomic_write_json
from tests.curation.test_kmeans_sampling import imbalanced_mixture


def write_shards(directory, vectors: np.ndarray, ids: np.ndarray) -> str:
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    for shard, start in enumerate(range(0, len(ids), 3000)):
        save_npy(vectors[start:start + 3000].astype(np.float32), str(directory / f"shard-{shard:05d}.npy"))
        save_npy(ids[start:start + 3000], str(directory / f"shard-{shard:05d}.ids.npy"))
        atomic_write_json(str(directory / f"shard-{shard:05d}._SUCCESS"), {"rows": 1})
    return str(directory)


@pytest.fixture
def pool(tmp_path):
    x, concept = imbalanced_mixture()
    ids = np.arange(len(x), dtype=np.int64)
    manifest = str(tmp_path / "manifest.parquet")
    write_parquet([{"row_id": int(i), "uri": f"/data/{i}.jpg", "label": str(concept[i])} for i in ids], manifest)
    (tmp_path / "emb").mkdir()
    return manifest, write_shards(tmp_path / "emb", x, ids), x, concept, tmp_path


def test_balanced(pool):
    manifest, emb, _, concept, tmp = pool
    cfg = CurateConfig(target_size=300, levels=[KMeansLevelConfig(50, 2, 0, 10), KMeansLevelConfig(10, 2, 0, 10)])
    result = run_curate(cfg, manifest, emb, str(tmp / "out"))
    rows = read_parquet(result["manifest"]).to_pylist()
    assert len(rows) == 300 == result["num_selected"]
    stats = json.load(open(result["stats"]))
    assert sum(stats["levels"][0]["sizes_after"]) == 300 and sum(stats["levels"][0]["sizes_before"]) == len(concept)
    assert max(stats["levels"][0]["sizes_after"]) < max(stats["levels"][0]["sizes_before"])
    assert open(result["cluster_sizes_png"], "rb").read(4) == b"\x89PNG"
    assert run_curate(cfg, manifest, emb, str(tmp / "out")) == result


def test_retrieval_modes(pool):
    manifest, emb, x, concept, tmp = pool
    seed_dir = tmp / "seeds"
    seed_dir.mkdir()
    seeds = x[concept == 19][:3]  # the smallest concept
    write_shards(seed_dir, seeds, np.arange(3, dtype=np.int64))
    result = run_curate(CurateConfig(mode="retrieval", retrieval_k=5), manifest, emb, str(tmp / "r"), str(seed_dir))
    labels = [r["label"] for r in read_parquet(result["manifest"]).to_pylist()]
    assert 5 <= len(labels) <= 15 and set(labels) == {"19"}
    cfg = CurateConfig(mode="cluster_retrieval", target_size=8, levels=[KMeansLevelConfig(60, 3, 0, 10)])
    result = run_curate(cfg, manifest, emb, str(tmp / "c"), str(seed_dir))
    labels = [r["label"] for r in read_parquet(result["manifest"]).to_pylist()]
    assert len(labels) == 8 and set(labels) == {"19"}
    with pytest.raises(ValueError, match="seed embeddings"):
        run_curate(CurateConfig(mode="retrieval"), manifest, emb, str(tmp / "x"))
