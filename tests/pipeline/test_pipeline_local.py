"""The end-to-end flow on the embedded default: local launcher, Prefect's ephemeral API, MLflow on
SQLite, local files, generated images. Then a rerun that reuses every stage from its completion record
(there is no Prefect result store to lose), and the ``status`` and ``compare`` commands."""

from __future__ import annotations

import json
import os

import pytest

from tests.pipeline.conftest import load_tiny_config, read_json, result_dir

STAGES = ("ingest", "embed", "dedup", "curate", "pretrain", "highres", "distill", "eval", "report")
RECORDED = STAGES[:-1]  # the report runs every time (it writes into the current run's MLflow parent)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, image_set):
    from flows.pipeline import dinov2_pipeline

    work_dir = tmp_path_factory.mktemp("e2e") / "run"
    # inline: the stage jobs run in this process (the subprocess and Slurm paths have their own tests)
    cfg = load_tiny_config(work_dir, image_set, "launcher.local_mode=inline")
    results = dinov2_pipeline(config=cfg)
    return cfg, results


@pytest.mark.slow
def test_every_stage_writes_its_outputs(finished_run):
    from dinov2_core.data.manifest import read_manifest_table
    from tasks.record import current_dir

    cfg, results = finished_run
    assert list(results) == list(STAGES)
    assert all(results[s].stage == s and results[s].outcome == "recomputed" for s in STAGES)
    for stage in RECORDED:
        record = read_json(result_dir(cfg, results[stage]), "_SUCCESS.json")
        assert record["stage"] == stage and record["identity"] == results[stage].identity and record["code_version"]
        assert record["result"]["outputs"] == results[stage].outputs
        assert current_dir(cfg.stage_root(stage)) == result_dir(cfg, results[stage])
    ingested = read_manifest_table(results["ingest"].outputs["manifest"])
    assert len(ingested) == 48 and results["ingest"].metrics["num_images"] == 48
    assert any(name.endswith(".npy") for name in os.listdir(results["embed"].outputs["embeddings"]))
    kept = read_manifest_table(results["dedup"].outputs["manifest"])
    assert 0 < len(kept) <= 48
    curated = read_manifest_table(results["curate"].outputs["manifest"])
    assert 0 < len(curated) <= len(kept)
    for stage in ("pretrain", "highres", "distill"):
        out = results[stage].outputs
        assert out["dir"] == result_dir(cfg, results[stage])
        assert {"backbone.pth", "heads.pth", "model.json"} <= set(os.listdir(out["export_dir"]))
        rows = [json.loads(line) for line in open(out["metrics_file"])]
        assert rows[-1]["iteration"] == 4 and all(r["total_loss"] == r["total_loss"] for r in rows)
        assert os.path.exists(os.path.join(out["dir"], "loss_curve.png"))
        train_cfg = read_json(result_dir(cfg, results[stage]), "_SUCCESS.json")["config"]
        assert train_cfg["train"]["dataset"] == results["curate"].outputs["manifest"]
    assert read_json(result_dir(cfg, results["highres"]), "_SUCCESS.json")["config"]["init_from"] == \
        results["pretrain"].outputs["export_dir"]
    metrics = results["eval"].metrics["distill"]
    assert 0.0 <= metrics["knn.top1.k5"] <= 1.0 and "baseline_random.knn.top1.k5" in metrics
    assert "baseline_pixels.knn.top1.k5" in metrics
    assert results["eval"].outputs["distill"]["pca_maps"]
    report = open(results["report"].outputs["report"]).read()
    assert "| distill |" in report and "| random init |" in report and "| raw pixels |" in report


@pytest.mark.slow
def test_mlflow_parent_and_child_runs(finished_run):
    from mlflow import MlflowClient

    cfg, results = finished_run
    client = MlflowClient(cfg.mlflow_uri)
    record = read_json(cfg.work_dir, "_run.json")
    parent = client.get_run(record["runs"][0]["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["config_hash"]
    assert parent.data.tags["work_dir"] == cfg.work_dir and parent.data.tags["recomputed"] == ",".join(STAGES)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["stage"] for c in children) == sorted(STAGES)
    by_stage = {c.data.tags["stage"]: c for c in children}
    assert all(by_stage[s].data.tags["identity"] == results[s].identity for s in STAGES)
    pretrain = by_stage["pretrain"]
    assert pretrain.data.tags["outcome"] == "recomputed"
    assert pretrain.data.tags["inline_job_id"] and pretrain.data.tags["prefect_flow_run_id"]
    assert pretrain.data.params["config.student.arch"] == "vit_test"
    history = client.get_metric_history(pretrain.info.run_id, "total_loss")
    assert [m.step for m in history] == [0, 1, 2, 3, 4]
    assert "num_images" in by_stage["ingest"].data.metrics
    assert by_stage["eval"].data.metrics["distill.knn.top1.k5"] == results["eval"].metrics["distill"]["knn.top1.k5"]
    assert "distill.knn.top1.k5" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(pretrain.info.run_id)}
    assert "loss_curve.png" in artifacts and "config.yaml" in artifacts
    model = results["report"].extra["model"]
    version = client.get_model_version(model["registered_name"], model["registered_version"])
    assert float(version.tags["knn.top1.k5"]) == results["eval"].metrics["distill"]["knn.top1.k5"]


@pytest.mark.slow
def test_rerun_reuses_every_stage_from_its_record(finished_run):
    from mlflow import MlflowClient

    from flows.pipeline import dinov2_pipeline

    cfg, results = finished_run
    stamps = {s: os.path.getmtime(os.path.join(result_dir(cfg, results[s]), "_SUCCESS.json")) for s in RECORDED}
    started = {s: read_json(result_dir(cfg, results[s]), "_state.json")["started_at"] for s in RECORDED}
    # reuse is decided by the completion records alone: no Prefect result store exists to be lost
    assert not os.path.exists(os.path.join(cfg.work_dir, ".prefect-results"))
    again = dinov2_pipeline(config=cfg)
    assert {s: r.outcome for s, r in again.items()} == {**{s: "reused" for s in RECORDED}, "report": "recomputed"}
    assert all(again[s].identity == results[s].identity and again[s].outputs == results[s].outputs for s in RECORDED)
    assert {s: os.path.getmtime(os.path.join(result_dir(cfg, results[s]), "_SUCCESS.json")) for s in RECORDED} == stamps
    assert again["eval"].metrics == results["eval"].metrics
    assert {s: read_json(result_dir(cfg, results[s]), "_state.json")["started_at"] for s in RECORDED} == started
    # the rerun is its own MLflow parent run, linked to the first; its children point at the computing runs
    runs = read_json(cfg.work_dir, "_run.json")["runs"]
    assert [r["run_number"] for r in runs] == [1, 2] and runs[-1]["status"] == "completed"
    client = MlflowClient(cfg.mlflow_uri)
    parent = client.get_run(runs[-1]["mlflow_parent_run_id"])
    assert parent.data.tags["previous_run_id"] == runs[0]["mlflow_parent_run_id"]
    assert parent.data.tags["reused"] == ",".join(RECORDED) and parent.data.tags["recomputed"] == "report"
    pretrain = client.get_run(again["pretrain"].mlflow_run_id)
    assert pretrain.data.tags["outcome"] == "reused"
    assert pretrain.data.tags["computed_in_run"] == results["pretrain"].mlflow_run_id
    assert again["report"].extra["model"]["new_version"] is False  # same weights, no new model version


@pytest.mark.slow
def test_status_and_compare_commands(finished_run, capsys):
    from dinov2_pipeline.cli import main
    from tasks.tracking import compare_runs

    cfg, results = finished_run
    assert main(["status", cfg.work_dir, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert {s: info["status"] for s, info in status["stages"].items()} == {s: "done" for s in STAGES}
    assert all(info["outcome"] in ("reused", "recomputed") and info["reason"] for info in status["stages"].values())
    assert {s: info["identity"] for s, info in status["stages"].items()} == {s: results[s].identity[:16] for s in STAGES}
    assert status["run"]["status"] == "completed"
    assert main(["status", cfg.work_dir]) == 0
    printed = capsys.readouterr().out
    assert all(stage in printed for stage in STAGES) and "done" in printed
    columns, rows = compare_runs(cfg.mlflow_uri, cfg.tracking.experiment, [], 10)
    assert rows and "distill.knn.top1.k5" in columns and "recomputed" in columns
    assert float(rows[0]["distill.knn.top1.k5"]) == pytest.approx(results["eval"].metrics["distill"]["knn.top1.k5"], abs=1e-3)
    assert not any("baseline" in c for c in columns)
    assert main(["compare", cfg.work_dir]) == 0
    printed = capsys.readouterr().out
    assert "distill.knn.top1.k5" in printed and rows[0]["run"] in printed
