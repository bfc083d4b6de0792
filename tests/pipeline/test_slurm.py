"""The pipeline on the real local Slurm cluster: heavy stages as sbatch jobs through submitit, data on
the local S3 server; job failure reporting, re-attaching, cancelling and time-limit requeue."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests.pipeline.conftest import load_tiny_config, read_json, result_dir


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
def test_pipeline_on_slurm_with_data_on_s3(tmp_path, image_set, images_on_s3, slurm_cluster, s3_bucket):
    """Images and curated data on S3; embed and pretrain run as Slurm jobs."""
    from mlflow import MlflowClient

    from dinov2_core.data.manifest import read_manifest_table
    from flows.pipeline import dinov2_pipeline

    cfg = load_tiny_config(
        tmp_path / "run", image_set,
        f"source={images_on_s3}", f"data_dir={s3_bucket}/curated",
        "highres.enabled=false", "distill.enabled=false", "eval.enabled=false", "report.enabled=false",
        "launcher.kind=slurm", f"launcher.partition={slurm_cluster.partition}", "launcher.timeout_min=10",
        "launcher.poll_interval_s=1", "launcher.stages={pretrain: {gpus_per_node: 1}}",
    )
    results = dinov2_pipeline(config=cfg)

    manifest = results["curate"].outputs["manifest"]
    curate_dir = f"{s3_bucket}/curated/curate/{results['curate'].identity[:16]}/"
    assert manifest.startswith(curate_dir) and read_manifest_table(manifest)
    assert read_manifest_table(results["ingest"].outputs["manifest"])[0]["uri"].startswith(images_on_s3)
    client = MlflowClient(cfg.mlflow_uri)
    for stage in ("embed", "pretrain"):
        state = read_json(result_dir(cfg, results[stage]), "_state.json")
        assert state["job"]["kind"] == "slurm" and _slurm_state(state["job"]["job_id"], "COMPLETED") == "COMPLETED"
        assert client.get_run(state["mlflow_run_id"]).data.tags["slurm_job_id"] == state["job"]["job_id"]
    config = read_json(result_dir(cfg, results["pretrain"]), "_SUCCESS.json")["config"]
    assert config["train"]["dataset"] == manifest
    assert os.path.exists(os.path.join(results["pretrain"].outputs["export_dir"], "backbone.pth"))


def _epochs_for(seconds: float, image_set, tmp_path) -> int:
    """Trainer epochs (4 iterations each) that take about ``seconds`` on this machine as loaded as it is
    now: the work must outlast a 1-minute Slurm time limit whether the machine is idle or busy."""
    import statistics

    from dinov2_core.train import load_train_config, run_training

    recipe = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "train", "tiny_pretrain.yaml")
    cfg = load_train_config(recipe, [f"train.dataset={image_set['train_manifest']}", "optim.epochs=2"])
    run_training(cfg, tmp_path / "calibration")
    rows = [json.loads(line) for line in open(tmp_path / "calibration" / "metrics.jsonl")]
    per_iteration = statistics.median(r["step_time_s"] for r in rows[2:])  # compute only: the job is slower
    return max(10, int(seconds / per_iteration / 4) + 1)


@pytest.mark.slow
def test_time_limit_requeues_training_and_it_completes(tmp_path, image_set, slurm_cluster):
    """timeout_min=1 for more work than that: Slurm signals the job, submitit requeues it (StageJob.checkpoint)
    and the trainer resumes from its last checkpoint until it completes."""
    from mlflow import MlflowClient

    from flows.pipeline import dinov2_pipeline

    # Slurm's time-limit signal arrives anywhere from ~25 s to ~50 s into a 1-minute job
    epochs = _epochs_for(60.0, image_set, tmp_path)
    last = epochs * 4
    cfg = load_tiny_config(
        tmp_path / "run", image_set,
        *[f"{s}.enabled=false" for s in ("ingest", "embed", "dedup", "curate", "highres", "distill", "eval", "report")],
        f"source={image_set['train_manifest']}",
        f"pretrain.overrides=[optim.epochs={epochs}, checkpoint.period=4]",
        "launcher.kind=slurm", f"launcher.partition={slurm_cluster.partition}", "launcher.timeout_min=1",
        "launcher.signal_delay_s=10", "launcher.max_num_timeout=15", "launcher.poll_interval_s=2",
    )
    results = dinov2_pipeline(config=cfg)
    stage_dir = result_dir(cfg, results["pretrain"])
    rows = [json.loads(line) for line in open(os.path.join(stage_dir, "metrics.jsonl"))]
    assert [r["iteration"] for r in rows] == list(range(last + 1))
    state = read_json(stage_dir, "_state.json")
    job_id = state["job"]["job_id"]
    out = open(os.path.join(stage_dir, "jobs", f"{job_id}_0_log.out")).read()
    err = open(os.path.join(stage_dir, "jobs", f"{job_id}_0_log.err")).read()
    assert out.count("Starting with JobEnvironment") >= 2, "the job must have been requeued"
    assert "resumed from" in err, "the requeued job must continue from its checkpoint"
    # (no sacct check: a time-limit signal that lands after the result is written marks the job FAILED)
    assert os.path.exists(os.path.join(results["pretrain"].outputs["export_dir"], "backbone.pth"))
    steps = [m.step for m in MlflowClient(cfg.mlflow_uri).get_metric_history(state["mlflow_run_id"], "total_loss")]
    assert steps == list(range(last + 1)), "each iteration is forwarded to MLflow once, across requeues"


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
    """A resumed flow re-attaches to the job of the same identity only; the crash/cancel hook stops it."""
    from tasks.launch import StageJob
    from tasks.record import write_state
    from tasks.runner import cancel_active_jobs

    stage_root = tmp_path / "run" / "pretrain"
    stage_dir, other_identity = stage_root / ("a" * 16), stage_root / ("b" * 16)
    launcher, resources = _launcher(slurm_cluster)
    handle = launcher.submit(StageJob("subprocess:call", {"args": ["sleep", "120"]}), str(stage_dir), "sleeper", resources)
    write_state(str(stage_dir), status="running")
    again = launcher.attach(str(stage_dir))  # a resumed flow finds the same job instead of submitting another
    assert again is not None and again.job_id == handle.job_id
    assert launcher.attach(str(other_identity)) is None  # never a job submitted for other inputs
    assert cancel_active_jobs(str(tmp_path / "run")) == [f"pretrain:{handle.job_id}"]
    assert _slurm_state(handle.job_id, "CANCELLED").startswith("CANCELLED")
    assert launcher.attach(str(stage_dir)) is None  # a cancelled job is resubmitted, not re-attached
