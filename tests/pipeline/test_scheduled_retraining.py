"""Scheduled retraining as users deploy it: ``dinov2-pipeline deploy --config FILE --cron EXPR key=value``
registers the pipeline with those parameters and that schedule on a real Prefect server; two runs of the
deployment on a real ``process`` worker, new images arriving in between, are two MLflow parent runs of one
work_dir, the second recomputing what the new images call for, and ``compare`` lists both."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
from PIL import Image

from tests.pipeline.conftest import stop_worker, DEMO_CONFIG, REPO_ROOT, tiny_overrides


def _wait(client, run_id, seconds: float = 300):
    deadline = time.time() + seconds
    while time.time() < deadline:
        state = client.read_flow_run(run_id).state
        if state.is_final():
            return state
        time.sleep(2)
    return state


@pytest.mark.slow
def test_deployed_schedule_and_two_runs_after_new_data(tmp_path, image_set, prefect_server_url, capsys):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from dinov2_pipeline.cli import main
    from tasks.tracking import compare_runs
    from tasks.wiring import load_pipeline_config

    source = tmp_path / "source"
    shutil.copytree(image_set["train_dir"], source)
    overrides = tiny_overrides(
        tmp_path / "run", image_set, f"source={source}",
        *[f"{s}.enabled=false" for s in ("embed", "dedup", "curate", "highres", "distill", "eval", "report")],
        "launcher.local_mode=inline",
    )
    pool = f"test-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, PREFECT_API_URL=prefect_server_url, OMP_NUM_THREADS="1")
    os.environ["PREFECT_API_URL"] = prefect_server_url
    try:
        assert main(["deploy", "--config", str(DEMO_CONFIG), "--cron", "30 2 * * 1", "--name", "pipeline",
                     "--pool", pool, *overrides]) == 0, capsys.readouterr().err
    finally:
        os.environ.pop("PREFECT_API_URL")
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool], cwd=REPO_ROOT,
                              env=env, stdout=open(tmp_path / "worker.log", "wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        with temporary_settings({PREFECT_API_URL: prefect_server_url}), get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("dinov2-pipeline/pipeline")
            assert [s.schedule.cron for s in deployment.schedules] == ["30 2 * * 1"]
            assert deployment.parameters == {"config_path": str(DEMO_CONFIG), "overrides": overrides}
            first = run_deployment("dinov2-pipeline/pipeline", timeout=0)  # the deployed parameters, as the schedule runs it
            assert _wait(client, first.id).is_completed(), (tmp_path / "worker.log").read_text()[-4000:]
            noise = np.random.default_rng(3).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
            Image.fromarray(noise).save(next(p for p in source.iterdir() if p.is_dir()) / "zz-new.png")
            second = run_deployment("dinov2-pipeline/pipeline", timeout=0)
            assert _wait(client, second.id).is_completed(), (tmp_path / "worker.log").read_text()[-4000:]
    finally:
        stop_worker(worker)

    cfg = load_pipeline_config(DEMO_CONFIG, overrides)
    columns, rows = compare_runs(cfg.mlflow_uri, cfg.tracking.experiment, work_dirs=[cfg.work_dir])
    assert len(rows) == 2, rows
    newest, oldest = rows
    assert oldest["recomputed"] == "ingest,pretrain" and newest["recomputed"] == "ingest,pretrain"
    assert main(["compare", cfg.work_dir]) == 0
    printed = capsys.readouterr().out
    assert newest["run"] in printed and oldest["run"] in printed
