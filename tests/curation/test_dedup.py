"""Dedup end to end on planted duplicates: exact, near (re-encode, resize, crop, flip, colour) and eval
decontamination, with real dask and faiss."""

from __future__ import annotations

import os

import numpy as np
import pytest

from curation.config import DedupConfig, EmbedConfig, IngestConfig
from curation.dedup import run_dedup
from curation.embed import run_embed
from curation.ingest import run_ingest
from curation.knn import build_index, similar_pairs
from curation.stage_io import read_parquet
from tests.curation.conftest import TEST_CLUSTER, distinct_image, planted_variants

N_DISTINCT = 30
SOURCES = (0, 1, 2)


@pytest.fixture
def pool(tmp_path):
    """30 distinct images, 5 planted near-duplicates of 3 of them, one byte-identical copy."""
    raw = tmp_path / "pool"
    raw.mkdir()
    for i in range(N_DISTINCT):
        distinct_image(i, size=64).save(raw / f"d{i:03d}.png")
    for source in SOURCES:
        for name, image in planted_variants(distinct_image(source, size=64)).items():
            image.save(raw / f"v{source}-{name}.png")
    (raw / "exact-copy.png").write_bytes((raw / "d005.png").read_bytes())
    ingest = run_ingest(IngestConfig(cluster=TEST_CLUSTER), str(raw), str(tmp_path / "ingest"))
    embed = run_embed(EmbedConfig(cluster=TEST_CLUSTER), ingest["manifest"], str(tmp_path / "emb"))
    return ingest["manifest"], embed["embeddings"], tmp_path


def _group_of(result, manifest):
    uri_of = {r["row_id"]: os.path.basename(r["uri"]) for r in read_parquet(manifest).to_pylist()}
    removed = read_parquet(result["removed"]).to_pylist()
    return {uri_of[r["row_id"]]: (r["reason"], uri_of.get(r["kept_row_id"]), r["similarity"]) for r in removed}


def test_planted_duplicates_found_and_distinct_images_kept(pool):
    manifest, embeddings, tmp = pool
    result = run_dedup(DedupConfig(), manifest, embeddings, str(tmp / "dedup"))
    removed = _group_of(result, manifest)
    assert removed["exact-copy.png"][:2] == ("exact_duplicate", "d005.png")
    for source in SOURCES:
        for name in ("reencode", "resize", "crop", "flip", "colour"):
            reason, kept, similarity = removed[f"v{source}-{name}.png"]
            assert reason == "near_duplicate" and kept == f"d{source:03d}.png", (name, kept)
            assert similarity > DedupConfig.threshold  # direct similarity to the kept image
    assert not any(name.startswith("d") for name in removed)  # no distinct image removed
    assert result["num_kept"] == N_DISTINCT and result["removed_by_reason"] == {"exact_duplicate": 1, "near_duplicate": 15}
    kept = read_parquet(result["manifest"]).column("uri").to_pylist()
    assert sorted(os.path.basename(u) for u in kept) == [f"d{i:03d}.png" for i in range(N_DISTINCT)]
    report = open(result["report"]).read()
    assert "near_duplicate | 15" in report and str(DedupConfig.threshold) in report
    assert result["faiss_index"] == {"near": "IndexFlatIP (CPU)"}  # faiss-cpu here; a GpuIndex* where faiss sees GPUs
    assert "near duplicates IndexFlatIP (CPU)" in report
    assert open(result["groups_png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_decontamination_removes_each_image_near_an_eval_image(pool):
    manifest, embeddings, tmp = pool
    eval_dir = tmp / "eval"
    eval_dir.mkdir()
    planted_variants(distinct_image(1, size=64))["crop"].save(eval_dir / "e0.png")  # an eval copy of d001
    distinct_image(12345, size=64).save(eval_dir / "e1.png")
    eval_ingest = run_ingest(IngestConfig(cluster=TEST_CLUSTER), str(eval_dir), str(tmp / "eval_ingest"))
    eval_emb = run_embed(EmbedConfig(cluster=TEST_CLUSTER), eval_ingest["manifest"], str(tmp / "eval_emb"))
    listing = str(tmp / "eval_ingest" / "decontamination.parquet")
    result = run_dedup(DedupConfig(decontam_list_uri=listing), manifest, embeddings, str(tmp / "dedup"),
                       eval_embeddings_uri=eval_emb["embeddings"])
    removed = _group_of(result, manifest)
    contaminated = {name for name, (reason, _, _) in removed.items() if reason == "eval_contamination"}
    assert {"d001.png"} | {f"v1-{n}.png" for n in ("reencode", "resize", "crop", "flip", "colour")} == contaminated
    assert result["removed_by_reason"]["eval_contamination"] == 6
    rows = read_parquet(listing).to_pylist()
    assert len(rows) == 6 and {r["eval_row_id"] for r in rows} == {0}
    assert all(r["similarity"] > DedupConfig.decontam_threshold for r in rows)  # each one directly, not via a chain
    assert result["removed_by_reason"].get("near_duplicate", 0) == 10  # the 2 other sources x 5 copies


def test_knn_pairs_flat_and_ivf_agree():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3000, 32)).astype(np.float32)
    dup = base[:50] + 0.05 * rng.normal(size=(50, 32)).astype(np.float32)
    x = np.concatenate([base, dup])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    found = {}
    for kind in ("flat", "ivf"):
        index = build_index(x, kind, nprobe=8)
        left, right, sims = similar_pairs(x, index, None, k=8, threshold=0.9)
        found[kind] = {tuple(sorted(p)) for p in zip(left.tolist(), right.tolist())}
    assert found["flat"] == {(i, 3000 + i) for i in range(50)}
    assert len(found["ivf"] & found["flat"]) >= 48


def test_default_config_on_real_photos_with_planted_copies(tmp_path):
    """~310 CIFAR-10 photos (every 160th of the shared archive, natural duplicates left in) plus 20 copies
    per transformation: every copy found, no removal of a different photo (bench/bench_dedup.py's judge)."""
    import random
    import tarfile

    from PIL import Image

    from bench.bench_dedup import TARGET_TRANSFORMS, score, transforms
    from bench.cifar_data import ARCHIVE

    if not os.path.exists(ARCHIVE):
        pytest.skip(f"CIFAR-10 archive not found at {ARCHIVE} (the shared data folder beside the checkout)")
    pool = tmp_path / "pool"
    pool.mkdir()
    with tarfile.open(ARCHIVE) as tar:
        for i, member in enumerate(tar):
            if member.isfile() and i % 160 == 0:
                (pool / member.name.replace("/", "_")).write_bytes(tar.extractfile(member).read())
    originals = sorted(str(p) for p in pool.iterdir())
    rng = random.Random(0)
    origin = {path: path for path in originals}
    kind = {}
    for name, transform in transforms(rng).items():
        for index in rng.sample(range(len(originals)), 20):
            target = str(pool / f"copy-{name}-{index:03d}.png")
            transform(Image.open(originals[index]).convert("RGB")).save(target)
            origin[target], kind[target] = originals[index], name
    ingest = run_ingest(IngestConfig(cluster=TEST_CLUSTER), str(pool), str(tmp_path / "ingest"))
    embed = run_embed(EmbedConfig(cluster=TEST_CLUSTER), ingest["manifest"], str(tmp_path / "emb"))
    result = run_dedup(DedupConfig(), ingest["manifest"], embed["embeddings"], str(tmp_path / "dedup"))

    scored = score(result, read_parquet(ingest["manifest"]).to_pylist(), origin, kind, natural_threshold=0.5)
    assert [row["transformation"] for row in scored["rows"]] == list(TARGET_TRANSFORMS)
    assert all(row["planted"] == 20 for row in scored["rows"])
    assert scored["min_recall"] == 1.0, scored["rows"]
    assert scored["removed"] >= 120 and scored["false_removals"] == 0, scored["false_examples"]
