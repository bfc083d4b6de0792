"""The pipeline on the real local Slurm cluster: heavy stages as sbatch jobs through submitit, data on
the local S3 server; job failure reporting, re-attaching, cancelling and time-limit requeue."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests.pipeline.conftest import load_tiny_config


def _slurm_state(job_id: str, wait_for: str | None = None, timeout_s: float = 60) -> str:
    """The job's accounting state (optionally waiting for ``wait_for``: sacct lags behind the job)."""
    deadline = time.time() + timeout_s
    while True:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "--format=State"], capture_output=True,
                             text=True, check=True).stdout.split()
        state = out[0] if out else "UNKNOWN"
        if wait_for is None or state.startswith(wait_for) or time.time() > deadline:
            return state
        time.sleep(1)


@pytest.fixture
def images_on_s3(image_set, s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    fs.put(image_set["train_dir"], f"{s3_bucket}/images", recursive=True)
    return f"{s3_bucket}/images"


@pytest.mark.slow
def test_pipeline_on_slurm_with_data_on_s3_and_time_limit_requeue(tmp_path, image_set, images_on_s3, slurm_cluster,
                                                                   s3_bucket):
    """Images and curated data on S3, embed and pretrain as Slurm jobs. Pretraining gets a 1-minute time
    limit for more work than that: Slurm signals it, submitit requeues it, it resumes from its checkpoint."""
    from mlflow import MlflowClient

    from dinov2_core.data.manifest import read_manifest_table
    from flows.pipeline import dinov2_pipeline

    cfg = load_tiny_config(
        tmp_path / "run", image_set,
        f"source={images_on_s3}", f"data_dir={s3_bucket}/curated",
        "highres.enabled=false", "distill.enabled=false", "eval.enabled=false", "report.enabled=false",
        "pretrain.overrides=[optim.epochs=40, checkpoint.period=4, train.batch_size_per_gpu=16]",
        "launcher.kind=slurm", f"launcher.partition={slurm_cluster.partition}", "launcher.timeout_min=10",
        "launcher.poll_interval_s=2",
        "launcher.stages={pretrain: {gpus_per_node: 1, timeout_min: 1, signal_delay_s: 15, max_num_timeout: 8}}",
    )
    results = dinov2_pipeline(config=cfg)

    manifest = results["curate"]["outputs"]["manifest"]
    assert manifest.startswith(f"{s3_bucket}/curated/") and read_manifest_table(manifest)
    assert read_manifest_table(results["ingest"]["outputs"]["manifest"])[0]["uri"].startswith(images_on_s3)
    client = MlflowClient(cfg.mlflow_uri)
    for stage in ("embed", "pretrain"):
        state = json.load(open(os.path.join(cfg.stage_dir(stage), "_state.json")))
        assert state["job"]["kind"] == "slurm" and _slurm_state(state["job"]["job_id"], "COMPLETED") == "COMPLETED"
        assert client.get_run(state["mlflow_run_id"]).data.tags["slurm_job_id"] == state["job"]["job_id"]
    stage_dir = cfg.stage_dir("pretrain")
    config = json.load(open(os.path.join(stage_dir, "_SUCCESS.json")))["config"]
    assert config["train"]["dataset"] == manifest
    assert os.path.exists(os.path.join(results["pretrain"]["outputs"]["export_dir"], "backbone.pth"))

    rows = [json.loads(line) for line in open(os.path.join(stage_dir, "metrics.jsonl"))]
    assert [r["iteration"] for r in rows] == list(range(161))
    job_id = json.load(open(os.path.join(stage_dir, "_state.json")))["job"]["job_id"]
    out = open(os.path.join(stage_dir, "jobs", f"{job_id}_0_log.out")).read()
    err = open(os.path.join(stage_dir, "jobs", f"{job_id}_0_log.err")).read()
    assert out.count("Starting with JobEnvironment") >= 2, "the job must have been requeued"
    assert "resumed from" in err, "the requeued job must continue from its checkpoint"
    steps = [m.step for m in client.get_metric_history(state["mlflow_run_id"], "total_loss")]
    assert steps == list(range(161)), "each iteration is forwarded to MLflow once, across requeues"


def _launcher(slurm_cluster, **resources):
    from tasks.config import LauncherConfig, Resources
    from tasks.launch import SlurmLauncher

    launcher = SlurmLauncher(LauncherConfig(kind="slurm", partition=slurm_cluster.partition))
    base = {"partition": slurm_cluster.partition, "nodes": 1, "tasks_per_node": 1, "cpus_per_task": 1,
            "timeout_min": 5, "max_num_timeout": 0, "signal_delay_s": 30}
    return launcher, Resources(**{**base, **resources})


def test_failed_job_reports_its_log_tail(tmp_path, slurm_cluster):
    from tasks.launch import StageJob, StageJobFailed, wait

    launcher, resources = _launcher(slurm_cluster)
    job = StageJob("tasks.no_such_stage:execute", {})
    handle = launcher.submit(job, str(tmp_path), "fails", resources)
    with pytest.raises(StageJobFailed) as err:
        wait(handle, 0.5)
    message = str(err.value)
    assert f"slurm job {handle.job_id} failed" in message
    assert "No module named 'tasks.no_such_stage'" in message and "_log.err" in message


def test_reattach_then_cancel_active_jobs(tmp_path, slurm_cluster):
    from tasks.launch import StageJob
    from tasks.runner import cancel_active_jobs
    from tasks.stage import write_state

    stage_dir = tmp_path / "run" / "pretrain"
    launcher, resources = _launcher(slurm_cluster)
    handle = launcher.submit(StageJob("subprocess:call", {"args": ["sleep", "120"]}), str(stage_dir), "sleeper", resources)
    write_state(str(stage_dir), status="running")
    again = launcher.attach(str(stage_dir))  # a resumed flow finds the same job instead of submitting another
    assert again is not None and again.job_id == handle.job_id
    assert cancel_active_jobs(str(tmp_path / "run")) == [f"pretrain:{handle.job_id}"]
    assert _slurm_state(handle.job_id, "CANCELLED").startswith("CANCELLED")
    assert launcher.attach(str(stage_dir)) is None  # a cancelled job is resubmitted, not re-attached
