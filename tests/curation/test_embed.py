"""Embedding shards: normalised vectors, crop views, per-shard markers, skip and recompute on re-run."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from curation.config import EmbedConfig, IngestConfig
from curation.embed import embed_shards, load_embeddings, run_embed
from curation.ingest import run_ingest
from tests.curation.conftest import TEST_CLUSTER


@pytest.fixture
def manifest(image_folder, tmp_path):
    root, _ = image_folder
    return run_ingest(IngestConfig(max_pixels=100_000, cluster=TEST_CLUSTER), root, str(tmp_path / "ingest"))["manifest"]


def test_pixels_shards_and_rerun(manifest, tmp_path):
    cfg = EmbedConfig(shard_size=4, cluster=TEST_CLUSTER)
    out = str(tmp_path / "emb")
    result = run_embed(cfg, manifest, out)
    assert result["num_shards"] == 4 and result["num_embedded"] == 15 and result["dim"] == 3 * 12 * 12
    ids, vectors, views = load_embeddings(out, with_views=True)
    assert ids.tolist() == list(range(15))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert views.shape == (15, 1 + 9 + 1, 432)
    np.testing.assert_allclose(views[:, 0], vectors, atol=1e-6)  # view 0 is the full image

    # a half-written shard: data present, marker missing -> recomputed; finished shards are skipped
    os.remove(os.path.join(out, "shard-00002._SUCCESS"))
    with open(os.path.join(out, "shard-00002.npy"), "wb") as handle:
        handle.write(b"partial")
    infos = embed_shards(cfg, manifest, out)
    assert [info["skipped"] for info in infos] == [True, True, False, True]
    ids2, vectors2, _ = load_embeddings(out)
    np.testing.assert_array_equal(ids2, ids)
    np.testing.assert_allclose(vectors2, vectors)
    assert json.load(open(os.path.join(out, "shard-00002._SUCCESS")))["rows"] == 4


def test_random_init_backbone(manifest, tmp_path):
    cfg = EmbedConfig(model="arch", arch="vit_test", image_size=28, shard_size=8, batch_size=4, cluster=TEST_CLUSTER)
    result = run_embed(cfg, manifest, str(tmp_path / "emb"))
    ids, vectors, views = load_embeddings(str(tmp_path / "emb"), with_views=True)
    assert result["num_embedded"] == 15 and views is None
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
