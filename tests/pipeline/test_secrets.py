"""Secrets written in a config reach nothing the project writes or prints: a real ``dinov2-pipeline run``
with three planted secrets (a credential in ``launcher.setup``, a password in the MLflow tracking URI of
the real MLflow server, a secret-named launcher key), then every output grepped: the run directory, the
Prefect database, the MLflow server's params, tags and artifacts, and the console."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.pipeline.conftest import DEMO_CONFIG, REPO_ROOT

SECRETS = ("PlantedSetupSecret111", "PlantedUrlPass222", "PlantedTokenValue333")


def _files_containing(root: Path, needles: tuple[str, ...]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path}: {needle}" for needle in needles if needle.encode() in data]
    return hits


@pytest.mark.slow
def test_planted_secrets_appear_in_no_output(tmp_path, image_set, mlflow_server_uri):
    from mlflow import MlflowClient

    host = mlflow_server_uri.split("://", 1)[1]
    config = {
        "defaults": [str(DEMO_CONFIG)],
        "name": "secrets",
        "work_dir": str(tmp_path / "run"),
        "source": image_set["train_dir"],
        **{stage: {"enabled": False} for stage in ("embed", "dedup", "curate", "highres", "distill", "eval")},
        "pretrain": {"config": str(REPO_ROOT / "configs" / "train" / "tiny_pretrain.yaml"),
                     "overrides": ["optim.epochs=1", "optim.warmup_epochs=0", "teacher.warmup_teacher_temp_epochs=0"]},
        "launcher": {"local_mode": "inline", "setup": [f"export AWS_SECRET_ACCESS_KEY={SECRETS[0]}"],
                     "additional": {"api_token": SECRETS[2]}},
        "tracking": {"uri": f"http://planted:{SECRETS[1]}@{host}", "experiment": "secrets-test",
                     "system_metrics": False, "registered_model_name": "secrets-test-backbone"},
    }
    config_path = tmp_path / "pipeline-with-secrets.yaml"
    config_path.write_text(yaml.safe_dump(config))
    prefect_home = tmp_path / "prefect"
    run = subprocess.run([sys.executable, "-m", "dinov2_pipeline", "run", str(config_path)], cwd=REPO_ROOT,
                         env=dict(os.environ, PREFECT_HOME=str(prefect_home), OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    console = run.stdout + run.stderr
    assert not [s for s in SECRETS if s in console], console[-3000:]
    assert not _files_containing(tmp_path / "run", SECRETS)
    assert not _files_containing(prefect_home, SECRETS)

    client = MlflowClient(mlflow_server_uri)
    experiment = client.get_experiment_by_name("secrets-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) >= 3  # the parent and a child per stage
    for mlflow_run in runs:
        values = " ".join([*map(str, mlflow_run.data.params.values()), *map(str, mlflow_run.data.tags.values())])
        assert not [s for s in SECRETS if s in values], mlflow_run.info.run_name
        downloaded = Path(client.download_artifacts(mlflow_run.info.run_id, "", str(tmp_path / mlflow_run.info.run_id)))
        assert not _files_containing(downloaded, SECRETS)
    parent = next(r for r in runs if r.data.tags.get("pipeline") == "dinov2")
    assert parent.data.params["launcher.setup"] == '["export AWS_SECRET_ACCESS_KEY=***"]'
