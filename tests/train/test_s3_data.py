"""Training reads an s3:// manifest (moto server on 127.0.0.1) through forkserver DataLoader workers."""

from __future__ import annotations

import pytest

from dinov2_core.train import load_train_config, run_training
from dinov2_core.train.metrics import read_metrics


@pytest.mark.s3
@pytest.mark.slow
def test_train_from_s3_with_workers(tiny_dataset, s3_bucket, tmp_path):
    from dinov2_core.utils.uri import filesystem_for

    fs, path = filesystem_for(f"{s3_bucket}/data")
    fs.put(str(tiny_dataset.root) + "/", path, recursive=True)
    manifest = f"{s3_bucket}/data/manifest.parquet"
    cfg = load_train_config("configs/train/tiny_pretrain.yaml",
                            [f"train.dataset={manifest}", "train.num_workers=1", "optim.epochs=1",
                             "train.official_epoch_length=2"])
    summary = run_training(cfg, tmp_path / "out")
    assert summary["iteration"] == 2 and summary["skipped_images"] == 0
    assert len(read_metrics(tmp_path / "out")) == 3
