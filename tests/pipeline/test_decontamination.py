"""Evaluation data is never trained on: training-source images that are copies of eval test images are
dropped by dedup (the pipeline embeds the test set with the pool's embedding config), listed in the
decontamination list next to the eval manifest, and a changed eval set changes dedup's identity."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from tests.pipeline.conftest import load_tiny_config

AFTER_CURATE = ("pretrain", "highres", "distill", "eval", "report")


def _eval_manifest(path, rows: list[dict]) -> str:
    """A labelled eval manifest of its own, so the decontamination list written next to it stays in tmp_path."""
    from dinov2_core.data.manifest import write_manifest

    path.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(rows, str(path))
    return str(path)


@pytest.mark.slow
def test_copies_of_eval_images_never_reach_the_curated_manifest(tmp_path, image_set):
    from dinov2_core.data.manifest import read_manifest_table
    from flows.pipeline import dinov2_pipeline

    test_rows = read_manifest_table(image_set["test_manifest"])
    eval_manifest = _eval_manifest(tmp_path / "eval" / "test.parquet", test_rows)
    source = tmp_path / "source"
    shutil.copytree(image_set["train_dir"], source)
    class_dir = next(p for p in sorted(source.iterdir()) if p.is_dir())
    planted = {}  # training-source copy -> the eval image it copies
    for i in (0, 5):  # exact copies (byte-identical files)
        copy = class_dir / f"leak-exact-{i}.png"
        shutil.copyfile(test_rows[i]["uri"], copy)
        planted[str(copy)] = test_rows[i]["uri"]
    near = class_dir / "leak-near-9.jpg"  # a near copy: JPEG re-encode, different bytes
    Image.open(test_rows[9]["uri"]).convert("RGB").save(near, quality=85)
    planted[str(near)] = test_rows[9]["uri"]

    # eval disabled: the test set is still named as evaluation data, so the pool is decontaminated against it
    cfg = load_tiny_config(tmp_path / "run", image_set, f"source={source}", f"eval.val_manifest={eval_manifest}",
                           "launcher.local_mode=inline", "curate.options.target_size=1000",
                           *[f"{s}.enabled=false" for s in AFTER_CURATE])
    results = dinov2_pipeline(config=cfg)

    assert results["embed"].metrics["eval_num_embedded"] == len(test_rows)
    dedup = results["dedup"]
    listed = dedup.outputs["decontamination_list"]
    assert listed == str(tmp_path / "eval" / f"test.decontamination-{cfg.name}.parquet")
    decontaminated = read_manifest_table(listed)
    assert set(planted) <= {row["uri"] for row in decontaminated}
    eval_rows = read_manifest_table(results["embed"].outputs["eval_manifest"])
    matched = {row["uri"]: eval_rows[row["eval_row_id"]]["uri"] for row in decontaminated}
    assert all(matched[copy] == original for copy, original in planted.items())
    assert dedup.metrics["removed_by_reason"]["eval_contamination"] == len(decontaminated)
    # the dedup stage dir keeps its own copy; the curated manifest and the default kNN train set are clean
    assert read_manifest_table(dedup.outputs["decontamination"]) == decontaminated
    for manifest in (dedup.outputs["manifest"], results["curate"].outputs["manifest"]):
        assert not set(planted) & {row["uri"] for row in read_manifest_table(manifest)}


def test_a_changed_eval_set_changes_the_dedup_identity(tmp_path, image_set):
    """Same URI with different images (embed's eval listing), or another URI: dedup must not be reused."""
    import dataclasses

    from dinov2_core.data.manifest import read_manifest_table
    from tasks import wiring

    rows = read_manifest_table(image_set["test_manifest"])
    eval_manifest = _eval_manifest(tmp_path / "eval" / "test.parquet", rows)
    cfg = load_tiny_config(tmp_path / "run", image_set, f"eval.val_manifest={eval_manifest}")

    def dedup_identity(cfg) -> str:
        """dedup's identity given an ingest result and the embed result the current eval set produces."""
        upstream = {"ingest": wiring.placeholder_result(cfg, "ingest")}
        embed = wiring.build(cfg, "embed", upstream)
        upstream["embed"] = dataclasses.replace(wiring.placeholder_result(cfg, "embed"), identity=embed.identity)
        return wiring.build(cfg, "dedup", upstream).identity

    before = dedup_identity(cfg)
    assert dedup_identity(cfg) == before
    _eval_manifest(tmp_path / "eval" / "test.parquet", rows[:-1])  # one image fewer, same URI
    rewritten = dedup_identity(cfg)
    assert rewritten != before
    other = load_tiny_config(tmp_path / "run", image_set, f"eval.val_manifest={image_set['test_manifest']}")
    assert dedup_identity(other) not in (before, rewritten)


def test_a_missing_eval_set_is_named_before_anything_runs(tmp_path, image_set):
    from dinov2_core.utils.config import ConfigError

    with pytest.raises(ConfigError, match="eval.val_manifest: '/nonexistent/test.parquet' does not exist"):
        load_tiny_config(tmp_path / "run", image_set, "eval.val_manifest=/nonexistent/test.parquet")
    assert not (tmp_path / "run").exists()
