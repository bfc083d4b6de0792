"""Shared fixtures for training tests: a small generated dataset and one finished tiny pretraining run."""

from __future__ import annotations

import pytest

TINY = "configs/train/tiny_pretrain.yaml"


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    from dinov2_core.data.synthetic import make_classification_dataset

    return make_classification_dataset(tmp_path_factory.mktemp("tiny_data"), num_classes=4, images_per_class=8,
                                       image_size=32, seed=0)


@pytest.fixture(scope="session")
def pretrain_run(tmp_path_factory, tiny_dataset):
    """A finished tiny pretraining run (12 iterations): output dir and summary."""
    from dinov2_core.train import load_train_config, run_training

    output = tmp_path_factory.mktemp("pretrain")
    cfg = load_train_config(TINY, [f"train.dataset={tiny_dataset.manifest_uri}"])
    summary = run_training(cfg, output)
    return output, summary
