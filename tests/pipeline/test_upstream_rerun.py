"""A scheduled re-run after new images arrived in the source folder: the source's content is part of
ingest's identity, so ingest writes a new manifest in a new identity directory, and the new image must
travel through embed and dedup into the curated manifest (no stage may hand back the previous run's
result); the previous run's curated manifest stays readable where it was."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from tests.pipeline.conftest import load_tiny_config

AFTER_CURATE = ("pretrain", "highres", "distill", "eval", "report")
CURATION = ("ingest", "embed", "dedup", "curate")


@pytest.mark.slow
def test_new_source_image_reaches_the_curated_manifest(tmp_path, image_set):
    from dinov2_core.data.manifest import read_manifest_table
    from flows.pipeline import dinov2_pipeline

    source = tmp_path / "source"
    shutil.copytree(image_set["train_dir"], source)  # the session's image set stays untouched
    cfg = load_tiny_config(tmp_path / "run", image_set, f"source={source}", "launcher.local_mode=inline",
                           "curate.options.target_size=1000", *[f"{s}.enabled=false" for s in AFTER_CURATE])
    first = dinov2_pipeline(config=cfg)
    curated_before = read_manifest_table(first["curate"].outputs["manifest"])

    # noise looks like none of the generated images, so dedup keeps it and balanced sampling (target above
    # the pool size) selects it
    noise = np.random.default_rng(7).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    new_image = next(p for p in source.iterdir() if p.is_dir()) / "zz-new.png"
    Image.fromarray(noise).save(new_image)
    second = dinov2_pipeline(config=cfg)

    assert {s: second[s].outcome for s in CURATION} == {s: "recomputed" for s in CURATION}
    assert second["ingest"].reason == "input source changed"
    assert second["embed"].reason == "upstream ingest changed"
    assert second["ingest"].outputs["manifest"] != first["ingest"].outputs["manifest"]
    assert second["ingest"].metrics["num_images"] == first["ingest"].metrics["num_images"] + 1
    curated_after = read_manifest_table(second["curate"].outputs["manifest"])
    assert len(curated_after) == len(curated_before) + 1
    assert str(new_image) in {row["uri"] for row in curated_after}
    assert read_manifest_table(first["curate"].outputs["manifest"]) == curated_before
