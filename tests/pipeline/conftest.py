"""Fixtures of the pipeline tests: a generated labelled image set and tiny pipeline configs.

Tiny everywhere: vit_test at 32 px, one "epoch" of 4 iterations per training phase, kNN only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO_ROOT / "configs" / "pipeline" / "demo.yaml"
TINY_RECIPES = REPO_ROOT / "configs" / "train"


@pytest.fixture(scope="session")
def image_set(tmp_path_factory) -> dict[str, str]:
    """4 classes × 12 training images and × 4 test images, 32 px, with labelled manifests."""
    from dinov2_core.data.synthetic import make_classification_splits

    root = tmp_path_factory.mktemp("images")
    splits = make_classification_splits(root, num_classes=4, train_per_class=12, test_per_class=4, image_size=32)
    return {"train_dir": splits["train"].root, "train_manifest": splits["train"].manifest_uri,
            "test_manifest": splits["test"].manifest_uri}


def tiny_overrides(work_dir: str | os.PathLike, image_set: dict[str, str], *extra: str, epochs: int = 1) -> list[str]:
    """Overrides of ``configs/pipeline/demo.yaml`` that make every stage as small as it gets.

    The training recipes are the ``tiny_*`` ones (an "epoch" is 4 iterations), named here rather than
    inherited, so the demo can grow into a showcase without slowing these tests down."""
    train = [f"optim.epochs={epochs}", "optim.warmup_epochs=0", "teacher.warmup_teacher_temp_epochs=0"]
    return [
        f"work_dir={work_dir}",
        f"source={image_set['train_dir']}",
        f"eval.train_manifest={image_set['train_manifest']}",
        f"eval.val_manifest={image_set['test_manifest']}",
        *[f"{stage}.config={TINY_RECIPES / f'tiny_{stage}.yaml'}" for stage in ("pretrain", "highres", "distill")],
        f"pretrain.overrides={train}",
        f"highres.overrides={train}",
        f"distill.overrides={train}",
        "eval.backbones=[distill]",
        "eval.options.evals=[knn, pca]",
        "eval.options.knn.ks=[5]",
        "eval.options.pca.num_images=1",
        "curate.options.target_size=32",
        "curate.options.levels=[{n_clusters: 6, n_resampling_steps: 1}, {n_clusters: 3, n_resampling_steps: 1}]",
        "tracking.system_metrics=false",
        *extra,
    ]


def load_tiny_config(work_dir, image_set, *extra: str, epochs: int = 1):
    from tasks.wiring import load_pipeline_config

    return load_pipeline_config(DEMO_CONFIG, tiny_overrides(work_dir, image_set, *extra, epochs=epochs))


def result_dir(cfg, result) -> str:
    """The identity directory of a stage result (its ``_SUCCESS.json``, ``_state.json``, job logs and, for
    training stages, checkpoints and ``metrics.jsonl``): ``<work_dir>/<stage>/<identity[:16]>``."""
    from tasks.record import IDENTITY_DIR_CHARS

    return os.path.join(cfg.stage_root(result.stage), result.identity[:IDENTITY_DIR_CHARS])


def read_json(*path: str | os.PathLike) -> dict:
    with open(os.path.join(*path), encoding="utf-8") as handle:
        return json.load(handle)


def stop_worker(worker) -> None:
    """Stop a Prefect worker started with ``start_new_session=True`` (it may need a second SIGTERM)."""
    import signal
    import subprocess

    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
        if worker.poll() is not None:
            return
        os.killpg(worker.pid, sig)
        try:
            worker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
