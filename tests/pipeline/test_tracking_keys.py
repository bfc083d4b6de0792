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


def test_artifacts_of_each_backbone_keep_their_folder(tmp_path):
    """Two evaluated backbones write files of the same names; in the eval run they must not overwrite each other."""
    from tasks.runner import _artifact_folder
    from tasks.tracking import Tracker

    out = tmp_path / "eval"
    paths = []
    for backbone in ("pretrain", "distill"):
        (out / backbone).mkdir(parents=True)
        for name in ("metrics.json", "pca_maps.png"):
            (out / backbone / name).write_text(backbone)
            paths.append(str(out / backbone / name))
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "folders")
    run_id = tracker.start_run("eval", params={}, tags={})
    for path in paths:
        tracker.log_artifact(run_id, path, _artifact_folder(path, str(out)))
    listed = {f.path for folder in ("pretrain", "distill") for f in tracker.client.list_artifacts(run_id, folder)}
    assert listed == {f"{b}/{n}" for b in ("pretrain", "distill") for n in ("metrics.json", "pca_maps.png")}
