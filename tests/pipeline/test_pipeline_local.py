"""The end-to-end flow on the embedded default: local launcher (submitit subprocesses), Prefect's
ephemeral API, MLflow on SQLite, local files, generated images. Then a resume that recomputes
nothing, also after the Prefect result store is lost."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.pipeline.conftest import load_tiny_config

STAGES = ("ingest", "embed", "dedup", "curate", "pretrain", "highres", "distill", "eval", "report")


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

    cfg, results = finished_run
    assert list(results) == list(STAGES)
    for stage in STAGES:
        success = json.load(open(os.path.join(cfg.stage_dir(stage), "_SUCCESS.json")))
        assert success["stage"] == stage and success["code_version"] and success["input_hash"]
    ingested = read_manifest_table(results["ingest"]["outputs"]["manifest"])
    assert len(ingested) == 48 and results["ingest"]["metrics"]["num_images"] == 48
    assert any(name.endswith(".npy") for name in os.listdir(results["embed"]["outputs"]["embeddings"]))
    kept = read_manifest_table(results["dedup"]["outputs"]["manifest"])
    assert 0 < len(kept) <= 48
    curated = read_manifest_table(results["curate"]["outputs"]["manifest"])
    assert 0 < len(curated) <= len(kept)
    for stage in ("pretrain", "highres", "distill"):
        out = results[stage]["outputs"]
        assert {"backbone.pth", "heads.pth", "model.json"} <= set(os.listdir(out["export_dir"]))
        rows = [json.loads(line) for line in open(out["metrics_file"])]
        assert rows[-1]["iteration"] == 4 and all(r["total_loss"] == r["total_loss"] for r in rows)
        assert os.path.exists(os.path.join(out["dir"], "loss_curve.png"))
        train_cfg = json.load(open(os.path.join(cfg.stage_dir(stage), "_SUCCESS.json")))["config"]
        assert train_cfg["train"]["dataset"] == results["curate"]["outputs"]["manifest"]
    assert json.load(open(os.path.join(cfg.stage_dir("highres"), "_SUCCESS.json")))["config"]["init_from"] == \
        results["pretrain"]["outputs"]["export_dir"]
    metrics = results["eval"]["metrics"]["distill"]
    assert 0.0 <= metrics["knn.top1.k5"] <= 1.0 and "baseline_random.knn.top1.k5" in metrics
    assert "baseline_pixels.knn.top1.k5" in metrics
    assert results["eval"]["outputs"]["distill"]["pca_maps"]
    report = open(results["report"]["outputs"]["report"]).read()
    assert "| distill |" in report and "| random init |" in report and "| raw pixels |" in report


@pytest.mark.slow
def test_mlflow_parent_and_child_runs(finished_run):
    from mlflow import MlflowClient

    cfg, results = finished_run
    client = MlflowClient(cfg.mlflow_uri)
    record = json.load(open(os.path.join(cfg.work_dir, "_run.json")))
    parent = client.get_run(record["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["config_hash"]
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["stage"] for c in children) == sorted(STAGES)
    by_stage = {c.data.tags["stage"]: c for c in children}
    pretrain = by_stage["pretrain"]
    assert pretrain.data.tags["inline_job_id"] and pretrain.data.tags["prefect_flow_run_id"]
    assert pretrain.data.params["config.student.arch"] == "vit_test"
    history = client.get_metric_history(pretrain.info.run_id, "total_loss")
    assert [m.step for m in history] == [0, 1, 2, 3, 4]
    assert "num_images" in by_stage["ingest"].data.metrics
    assert by_stage["eval"].data.metrics["distill.knn.top1.k5"] == results["eval"]["metrics"]["distill"]["knn.top1.k5"]
    assert "distill.knn.top1.k5" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(pretrain.info.run_id)}
    assert "loss_curve.png" in artifacts and "config.yaml" in artifacts
    model = results["report"]["model"]
    version = client.get_model_version(model["registered_name"], model["registered_version"])
    assert float(version.tags["knn.top1.k5"]) == results["eval"]["metrics"]["distill"]["knn.top1.k5"]


@pytest.mark.slow
def test_resume_recomputes_nothing_even_without_prefect_results(finished_run):
    from flows.pipeline import dinov2_pipeline

    cfg, results = finished_run
    stamps = {s: os.path.getmtime(os.path.join(cfg.stage_dir(s), "_SUCCESS.json")) for s in STAGES}
    started = {s: json.load(open(os.path.join(cfg.stage_dir(s), "_state.json")))["started_at"] for s in STAGES}
    shutil.rmtree(os.path.join(cfg.work_dir, ".prefect-results"))  # as if the Prefect DB/storage were lost
    again = dinov2_pipeline(config=cfg)
    assert {s: os.path.getmtime(os.path.join(cfg.stage_dir(s), "_SUCCESS.json")) for s in STAGES} == stamps
    assert again["eval"]["metrics"] == results["eval"]["metrics"]
    assert {s: json.load(open(os.path.join(cfg.stage_dir(s), "_state.json")))["started_at"] for s in STAGES} == started


@pytest.mark.slow
def test_status_and_compare_commands(finished_run, capsys):
    from dinov2_pipeline.cli import main
    from dinov2_pipeline.commands.pipeline import compare_runs

    cfg, results = finished_run
    assert main(["status", cfg.work_dir, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert {s: info["status"] for s, info in status["stages"].items()} == {s: "done" for s in STAGES}
    assert status["run"]["status"] == "completed"
    columns, rows = compare_runs(cfg.mlflow_uri, cfg.tracking.experiment, [], 10)
    assert rows and "distill.knn.top1.k5" in columns
    assert float(rows[0]["distill.knn.top1.k5"]) == pytest.approx(results["eval"]["metrics"]["distill"]["knn.top1.k5"], abs=1e-3)
    assert not any("baseline" in c for c in columns)
    assert main(["compare", cfg.work_dir]) == 0
    printed = capsys.readouterr().out
    assert "distill.knn.top1.k5" in printed and rows[0]["run"] in printed
