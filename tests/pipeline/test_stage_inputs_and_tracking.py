"""MLflow artifacts of an embedded SQLite store stay next to the database, never in ./mlruns."""

from __future__ import annotations

import os

from tasks.tracking import Tracker, default_artifact_location


def test_sqlite_store_keeps_artifacts_next_to_the_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/track/mlflow.db"
    os.makedirs(tmp_path / "track")
    tracker = Tracker(uri, "location-test")
    run_id = tracker.start_run("child", {"a": 1}, {})
    artifact = tmp_path / "note.txt"
    artifact.write_text("hello")
    tracker.client.log_artifact(run_id, str(artifact))
    location = tracker.client.get_experiment(tracker.experiment_id).artifact_location
    assert location == (tmp_path / "track" / "mlartifacts").as_uri()
    assert any((tmp_path / "track" / "mlartifacts").rglob("note.txt"))
    assert not (tmp_path / "mlruns").exists()
    assert default_artifact_location("http://127.0.0.1:5000") is None
