"""Deployments on a real Prefect server: ``prefect deploy`` registers the pipeline with its weekly
schedule, and a run triggered on the server is executed by a ``process`` worker to completion."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest

from tests.pipeline.conftest import stop_worker, REPO_ROOT, tiny_overrides


@pytest.mark.slow
def test_deployment_run_completes_and_schedule_is_registered(tmp_path, image_set, prefect_server_url):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.deploy import deploy
    from tasks.pipeline_run import read_run_file
    from tasks.record import current_record

    pool = f"test-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, PREFECT_API_URL=prefect_server_url, OMP_NUM_THREADS="1")
    deploy(["pipeline"], pool=pool, env=env)
    overrides = tiny_overrides(
        tmp_path / "run", image_set,
        *[f"{s}.enabled=false" for s in ("ingest", "embed", "dedup", "curate", "highres", "distill", "eval", "report")],
        f"source={image_set['train_manifest']}", "launcher.local_mode=inline",
    )
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool], cwd=REPO_ROOT,
                              env=env, stdout=open(tmp_path / "worker.log", "wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        with temporary_settings({PREFECT_API_URL: prefect_server_url}):
            with get_client(sync_client=True) as client:
                deployment = client.read_deployment_by_name("dinov2-pipeline/pipeline")
                assert deployment.work_pool_name == pool
                assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * 0"]
                assert all(s.active for s in deployment.schedules)
            run = run_deployment(
                "dinov2-pipeline/pipeline", timeout=0,
                parameters={"config_path": "configs/pipeline/demo.yaml", "overrides": overrides},
            )
            deadline = time.time() + 240
            with get_client(sync_client=True) as client:
                while time.time() < deadline:
                    state = client.read_flow_run(run.id).state
                    if state.is_final():
                        break
                    time.sleep(2)
        assert state.is_completed(), f"{state}\n{open(tmp_path / 'worker.log').read()[-4000:]}"
        record = current_record(str(tmp_path / "run" / "pretrain"))
        assert record is not None and os.path.exists(os.path.join(record["result"]["outputs"]["export_dir"], "backbone.pth"))
        runs = read_run_file(str(tmp_path / "run"))["runs"]
        assert [r["prefect_flow_run_id"] for r in runs] == [str(run.id)] and runs[0]["status"] == "completed"
    finally:
        stop_worker(worker)
