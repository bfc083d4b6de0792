"""Names that come from data reach MLflow safely: an image mode such as ``I;16`` counted by ingest
becomes a param, metric and tag key that MLflow accepts (the report stage used to fail on it)."""

from __future__ import annotations


def test_keys_from_data_are_sanitised(tmp_path):
    from tasks.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "keys")
    run_id = tracker.start_run("ingest", params={"modes": {"I;16": 3, "RGB": 10}},
                               tags={"mode;odd": "I;16"})
    tracker.log_metrics(run_id, {"modes": {"I;16": 3}})
    tracker.end(run_id)
    run = tracker.client.get_run(run_id)
    assert run.data.params["modes.I_16"] == "3"
    assert run.data.metrics["modes.I_16"] == 3
    assert run.data.tags["mode_odd"] == "I;16"
    assert tracker.client.get_experiment(tracker.experiment_id).tags["mlflow.experimentKind"] == \
        "custom_model_development"
