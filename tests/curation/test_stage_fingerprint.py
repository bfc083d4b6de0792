"""Stage fingerprints follow what their inputs hold, not only where they are: an upstream stage that
rewrites its output at the same URI (re-ingest after new images arrived) makes every later stage redo
its work instead of returning its stored ``_RESULT.json``."""

from __future__ import annotations

import os

import pytest

from curation.config import CurateConfig, DedupConfig, EmbedConfig, IngestConfig, KMeansLevelConfig
from curation.curate import run_curate
from curation.dedup import run_dedup
from curation.embed import load_embeddings, run_embed
from curation.ingest import run_ingest
from curation.stage_io import fingerprint, read_parquet
from tests.curation.conftest import TEST_CLUSTER, distinct_image

CURATE = CurateConfig(target_size=100, levels=[KMeansLevelConfig(3, 1, 0, 10)])


def _run_chain(raw: str, out) -> dict[str, dict]:
    """ingest → embed → dedup → curate with fixed output URIs, as a scheduled re-run calls them."""
    ingest = run_ingest(IngestConfig(cluster=TEST_CLUSTER), raw, str(out / "ingest"))
    embed = run_embed(EmbedConfig(shard_size=4, cluster=TEST_CLUSTER), ingest["manifest"], str(out / "emb"))
    dedup = run_dedup(DedupConfig(), ingest["manifest"], embed["embeddings"], str(out / "dedup"))
    curate = run_curate(CURATE, dedup["manifest"], embed["embeddings"], str(out / "curate"))
    return {"ingest": ingest, "embed": embed, "dedup": dedup, "curate": curate}


def test_new_source_image_reaches_the_curated_set(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(8):
        distinct_image(i).save(raw / f"{i:03d}.png")
    first = _run_chain(str(raw), tmp_path)
    assert first["curate"]["num_selected"] == 8
    assert _run_chain(str(raw), tmp_path) == first  # nothing changed: every stage reuses its result

    distinct_image(100).save(raw / "new.png")  # the source listing changes; ingest rewrites its manifest
    second = _run_chain(str(raw), tmp_path)
    assert second["ingest"]["manifest"] == first["ingest"]["manifest"]  # same URI, new content
    assert second["ingest"]["num_images"] == 9
    assert second["embed"]["num_embedded"] == 9
    assert second["dedup"]["num_kept"] == 9
    assert second["curate"]["num_selected"] == 9
    curated = read_parquet(second["curate"]["manifest"]).column("uri").to_pylist()
    assert str(raw / "new.png") in curated


def test_dedup_follows_a_manifest_rewritten_in_place(tmp_path):
    """The same, one stage alone: dedup's inputs are rewritten by hand (fewer rows, same URIs)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(6):
        distinct_image(i).save(raw / f"{i:03d}.png")
    ingest = run_ingest(IngestConfig(cluster=TEST_CLUSTER), str(raw), str(tmp_path / "ingest"))
    embed = run_embed(EmbedConfig(cluster=TEST_CLUSTER), ingest["manifest"], str(tmp_path / "emb"))
    assert run_dedup(DedupConfig(), ingest["manifest"], embed["embeddings"], str(tmp_path / "dedup"))["num_kept"] == 6

    os.remove(raw / "005.png")
    assert run_ingest(IngestConfig(cluster=TEST_CLUSTER), str(raw), str(tmp_path / "ingest"))["num_images"] == 5
    assert run_dedup(DedupConfig(), ingest["manifest"], embed["embeddings"], str(tmp_path / "dedup"))["num_kept"] == 5


def test_shards_of_a_larger_earlier_manifest_are_removed(tmp_path):
    """9 images in shards of 4 → 3 shards; after two images go, 2 shards: the third must not be read."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(9):
        distinct_image(i).save(raw / f"{i:03d}.png")
    first = _run_chain(str(raw), tmp_path)
    assert first["embed"]["num_shards"] == 3
    for name in ("007.png", "008.png"):
        os.remove(raw / name)
    second = _run_chain(str(raw), tmp_path)
    assert second["embed"]["num_shards"] == 2
    row_ids, vectors, _ = load_embeddings(second["embed"]["embeddings"])
    assert sorted(row_ids.tolist()) == list(range(7)) and len(vectors) == 7
    assert not list((tmp_path / "emb").glob("shard-00002*"))
    assert second["curate"]["num_selected"] == 7


def test_fingerprint_stamps_paths_and_leaves_values_alone(tmp_path):
    cfg = DedupConfig()
    manifest = tmp_path / "manifest.parquet"
    manifest.write_bytes(b"one")
    shards = tmp_path / "emb"
    shards.mkdir()
    (shards / "shard-00000.npy").write_bytes(b"a")
    missing = str(tmp_path / "not-written-yet")

    def current() -> str:
        return fingerprint(cfg, manifest=str(manifest), embeddings=str(shards), kind="directory", n=3, seeds=None,
                           later=missing)

    before = current()
    assert current() == before
    manifest.write_bytes(b"one more")  # rewritten at the same path
    after_manifest = current()
    assert after_manifest != before
    (shards / "shard-00001.npy").write_bytes(b"b")  # one more shard in the directory
    assert current() != after_manifest
    # values that are not existing paths enter as they are
    assert fingerprint(cfg, kind="directory", later=missing) == fingerprint(cfg, kind="directory", later=missing)
    assert fingerprint(cfg, kind="directory") != fingerprint(cfg, kind="tar")


@pytest.mark.s3
def test_fingerprint_sees_an_object_rewritten_by_another_process(s3_bucket):
    """s3fs caches listings per process; an object rewritten elsewhere must still change the stamp."""
    import boto3

    key = "emb/manifest.parquet"
    bucket = s3_bucket[len("s3://"):]
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    client.put_object(Bucket=bucket, Key=key, Body=b"one")
    cfg = DedupConfig()
    fingerprint(cfg, embeddings=f"{s3_bucket}/emb")  # lists the prefix, filling s3fs's listing cache
    before = fingerprint(cfg, manifest=f"{s3_bucket}/{key}")
    client.put_object(Bucket=bucket, Key=key, Body=b"one more")  # not through this process's s3fs
    assert fingerprint(cfg, manifest=f"{s3_bucket}/{key}") != before
    assert fingerprint(cfg, manifest=f"{s3_bucket}/missing.parquet") == fingerprint(cfg, manifest=f"{s3_bucket}/missing.parquet")
