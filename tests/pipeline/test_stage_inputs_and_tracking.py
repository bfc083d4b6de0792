"""Stage inputs and MLflow storage: source listings feed the ingest identity; SQLite artifacts stay next to the DB."""

from __future__ import annotations

import os

from tasks.tracking import Tracker, default_artifact_location
from tests.pipeline.conftest import DEMO_CONFIG


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


def test_ingest_identity_follows_the_source_contents(tmp_path):
    """A scheduled run over the same source URI re-ingests when images were added, into a new directory."""
    from PIL import Image

    from tasks import wiring

    source = tmp_path / "images"
    source.mkdir()
    Image.new("RGB", (8, 8), "red").save(source / "a.png")
    cfg = wiring.load_pipeline_config(DEMO_CONFIG, [f"work_dir={tmp_path}/run", f"source={source}", f"eval.val_manifest={source}"])
    before = wiring.build(cfg, "ingest")
    assert wiring.build(cfg, "ingest").identity == before.identity
    Image.new("RGB", (8, 8), "blue").save(source / "b.png")
    after = wiring.build(cfg, "ingest")
    assert after.identity != before.identity and after.output_uri != before.output_uri
    assert [name for name, part in after.parts().items() if before.parts()[name] != part] == ["input:source"]
