"""Smoke test of the MLflow tracking server: a run with params, stepped metrics and an artifact, read back."""

from __future__ import annotations

import uuid

from mlflow.tracking import MlflowClient


def test_run_is_logged_to_the_server(mlflow_server_uri, tmp_path):
    client = MlflowClient(tracking_uri=mlflow_server_uri)
    experiment_id = client.create_experiment(f"infra-smoke-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment_id, run_name="smoke")
    run_id = run.info.run_id
    client.log_param(run_id, "arch", "vit_test")
    for step, loss in enumerate([3.0, 2.0, 1.5]):
        client.log_metric(run_id, "loss", loss, step=step)
    note = tmp_path / "note.txt"
    note.write_text("hello from the smoke test\n")
    # The server proxies artifacts (mlflow-artifacts:/...), so this goes over HTTP too.
    client.log_artifact(run_id, str(note))
    client.set_terminated(run_id)

    [found] = client.search_runs([experiment_id], filter_string="params.arch = 'vit_test'")
    assert found.info.run_id == run_id
    assert found.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [3.0, 2.0, 1.5]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    downloaded = client.download_artifacts(run_id, "note.txt", str(tmp_path / "download"))
    assert open(downloaded).read() == "hello from the smoke test\n"
