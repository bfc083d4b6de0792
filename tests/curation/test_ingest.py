"""Ingest on a real dask cluster: ImageFolder, file lists, tar shards and S3, with corrupt files."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from dinov2_core.data.image_io import load_image

from curation.config import EmbedConfig, IngestConfig
from curation.embed import load_embeddings, run_embed
from curation.ingest import run_ingest
from curation.stage_io import read_parquet
from tests.curation.conftest import TEST_CLUSTER, distinct_image, jpeg_bytes, write_corrupt_files

CFG = IngestConfig(max_pixels=100_000, cluster=TEST_CLUSTER)


def test_imagefolder_with_corrupt_files(image_folder, tmp_path):
    root, expected = image_folder
    result = run_ingest(CFG, root, str(tmp_path / "out"))
    assert result["source_kind"] == "imagefolder"
    rows = read_parquet(result["manifest"]).to_pylist()
    rejects = {os.path.basename(r["uri"]): r["reason"] for r in read_parquet(result["rejects"]).to_pylist()}
    for name, outcome in expected.items():
        if outcome == "ok":
            assert name not in rejects
        else:
            assert rejects[name] == outcome, name
    kept = {os.path.basename(r["uri"]) for r in rows}
    assert {"cmyk.jpg", "gray16.png", "rgba.png"} <= kept
    assert result["num_images"] == 12 + 3 and len(rows) == 15
    assert result["rejected_by_reason"] == {"truncated": 1, "empty": 1, "not_an_image": 1, "too_large": 1}
    converted = result["converted_by_mode"]
    assert converted.pop("CMYK") == 1 and converted.pop("RGBA") == 1
    assert list(converted.values()) == [1] and next(iter(converted)).startswith("I")  # the 16-bit PNG
    assert [r["row_id"] for r in rows] == list(range(15))
    labels = {r["label"] for r in rows}
    assert labels == {"cats", "dogs", "bad"}
    cat = next(r for r in rows if r["label"] == "cats")
    assert cat["width"] == 48 and cat["height"] == 48 and len(cat["sha256"]) == 64 and cat["size_bytes"] > 0


def test_rerun_reuses_finished_output_and_recomputes_a_changed_config(image_folder, tmp_path):
    root, _ = image_folder
    out = str(tmp_path / "out")
    first = run_ingest(CFG, root, out)
    stamp = os.stat(first["manifest"]).st_mtime_ns
    assert run_ingest(CFG, root, out) == first
    assert os.stat(first["manifest"]).st_mtime_ns == stamp
    changed = run_ingest(IngestConfig(max_pixels=10**8, cluster=TEST_CLUSTER), root, out)
    assert changed["num_images"] == first["num_images"] + 1  # huge.png now accepted


def test_rerun_notices_images_added_under_the_same_source(image_folder, tmp_path):
    root, _ = image_folder
    out = str(tmp_path / "out")
    first = run_ingest(CFG, root, out)
    class_dir = next(entry.path for entry in os.scandir(root) if entry.is_dir())
    distinct_image(999).save(os.path.join(class_dir, "new.png"))
    again = run_ingest(CFG, root, out)
    assert again["num_images"] == first["num_images"] + 1


def test_file_list_and_tar_shards(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(4):
        distinct_image(i).save(images / f"{i}.png")
    (tmp_path / "list.txt").write_text("".join(f"imgs/{i}.png\n" for i in range(4)) + "imgs/missing.png\n")
    result = run_ingest(CFG, str(tmp_path / "list.txt"), str(tmp_path / "out_list"))
    assert result["source_kind"] == "filelist" and result["num_images"] == 4
    assert result["rejected_by_reason"] == {"unreadable": 1}

    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in range(2):
        with tarfile.open(shards / f"{shard:03d}.tar", "w") as tar:
            for i in range(3):
                data = jpeg_bytes(distinct_image(10 * shard + i)) if i < 2 else b"garbage"
                info = tarfile.TarInfo(f"sample{i}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    result = run_ingest(CFG, str(shards), str(tmp_path / "out_tar"))
    assert result["source_kind"] == "tar" and result["num_images"] == 4
    assert result["rejected_by_reason"] == {"not_an_image": 2}
    uri = read_parquet(result["manifest"]).column("uri")[0].as_py()
    assert uri.startswith("tar://sample0.jpg::file://")
    assert load_image(uri).size == (48, 48)


@pytest.mark.s3
def test_s3_prefix_source_and_output(s3_bucket, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    for name in ("a", "b"):
        for i in range(3):
            fs.pipe(f"{s3_bucket[5:]}/raw/{name}/{i}.jpg", jpeg_bytes(distinct_image(i + (10 if name == "b" else 0))))
    fs.pipe(f"{s3_bucket[5:]}/raw/b/broken.jpg", b"")
    result = run_ingest(CFG, f"{s3_bucket}/raw", f"{s3_bucket}/out")
    assert result["num_images"] == 6 and result["rejected_by_reason"] == {"empty": 1}
    rows = read_parquet(result["manifest"]).to_pylist()
    assert rows[0]["uri"].startswith(f"{s3_bucket}/raw/a/") and rows[0]["label"] == "a"
    assert load_image(rows[0]["uri"]).size == (48, 48)
    assert run_ingest(CFG, f"{s3_bucket}/raw", f"{s3_bucket}/out") == result
    # the next stage reads and writes S3 too: shards and markers land under the prefix
    embed = run_embed(EmbedConfig(shard_size=4, cluster=TEST_CLUSTER), result["manifest"], f"{s3_bucket}/emb")
    ids, vectors, views = load_embeddings(embed["embeddings"], with_views=True)
    assert ids.tolist() == list(range(6)) and vectors.shape == (6, 432) and views.shape[:2] == (6, 11)
    assert fs.exists(f"{s3_bucket[5:]}/emb/shard-00001._SUCCESS")
