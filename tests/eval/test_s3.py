"""Evaluation data read from S3 (moto on 127.0.0.1): an ImageFolder tree and a manifest."""

from __future__ import annotations

import pytest

from dinov2_core.data.manifest import write_manifest
from dinov2_core.eval import EvalConfig, run_evaluation
from dinov2_core.eval.datasets import load_labelled_images
from dinov2_core.utils.config import from_dict
from dinov2_core.utils.uri import filesystem_for
from tests.eval.conftest import OneHotOracle


@pytest.mark.s3
def test_imagefolder_and_manifest_on_s3(colour_data, s3_bucket, tmp_path):
    fs, _ = filesystem_for(s3_bucket)
    fs.put(colour_data["train"], f"{s3_bucket}/train", recursive=True)
    fs.put(colour_data["test"], f"{s3_bucket}/test", recursive=True)
    test = load_labelled_images(f"{s3_bucket}/test")
    assert len(test) == 15 and all(u.startswith(f"{s3_bucket}/test/") for u in test.uris)
    rows = [{"uri": u.rsplit("/test/", 1)[1], "label": l} for u, l in zip(test.uris, test.labels)]
    rows.append({"uri": "red/missing.png", "label": "red"})  # listed but absent: skipped, counted
    write_manifest(rows, f"{s3_bucket}/test/manifest.jsonl")
    cfg = from_dict(EvalConfig, {
        "train": f"{s3_bucket}/train", "test": f"{s3_bucket}/test/manifest.jsonl", "evals": ["knn"],
        "image": {"resize_size": 16, "crop_size": 16}, "knn": {"ks": [5]},
    })
    metrics = run_evaluation(cfg, tmp_path, model=OneHotOracle())["metrics"]
    assert metrics["knn.top1.k5"] == 1.0
    assert metrics["data.test.images"] == 15 and metrics["data.test.skipped"] == 1
