"""A Slurm stage with several tasks (what the shipped cluster configs use: 8 per node): pretraining at
``tasks_per_node: 2`` completes in one flow run, reports one result (rank 0's), equals a one-task run
of the same global batch within tolerance, and ``status`` names one job of two tasks. A failing task
fails the stage with its own log tail and root cause."""

from __future__ import annotations

import json
import os

import pytest

from tests.pipeline.conftest import REPO_ROOT, load_tiny_config
from tests.train.test_distributed import COMPARABLE

ONLY_PRETRAIN = [f"{s}.enabled=false" for s in ("ingest", "embed", "dedup", "curate", "highres", "distill", "eval",
                                                 "report")]


def _losses(result) -> list[float]:
    return [json.loads(line)["total_loss"] for line in open(result.outputs["metrics_file"])]


@pytest.mark.slow
def test_two_task_pretraining_on_slurm_is_one_result(tmp_path, image_set, slurm_cluster, capsys):
    from dinov2_pipeline.cli import main
    from flows.pipeline import dinov2_pipeline

    # KoLeo, iBOT masks and drop path are per rank by design; without them 2 ranks x 4 images = 1 rank x 8
    common = [f"source={image_set['train_manifest']}", *ONLY_PRETRAIN,
              f"pretrain.config={REPO_ROOT / 'configs' / 'train' / 'tiny_pretrain.yaml'}"]
    recipe = ", ".join(COMPARABLE)
    single = load_tiny_config(tmp_path / "single", image_set, *common, "launcher.local_mode=inline",
                              f"pretrain.overrides=[{recipe}, train.batch_size_per_gpu=8]")
    reference = dinov2_pipeline(config=single)["pretrain"]

    cfg = load_tiny_config(tmp_path / "two", image_set, *common, f"pretrain.overrides=[{recipe}, train.batch_size_per_gpu=4]",
                           "launcher.kind=slurm",
                           f"launcher.partition={slurm_cluster.partition}", "launcher.tasks_per_node=2",
                           "launcher.timeout_min=10", "launcher.poll_interval_s=1")
    result = dinov2_pipeline(config=cfg)["pretrain"]

    assert result.outcome == "recomputed" and os.path.exists(os.path.join(result.outputs["export_dir"], "backbone.pth"))
    assert result.metrics["final.iteration"] == reference.metrics["final.iteration"]
    assert len(_losses(result)) == len(_losses(reference)) == 7
    assert _losses(result) == pytest.approx(_losses(reference), rel=1e-5, abs=1e-5)
    state = json.load(open(os.path.join(result.outputs["dir"], "_state.json")))
    assert state["job"]["kind"] == "slurm" and state["job"]["num_tasks"] == 2
    assert main(["status", cfg.work_dir, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["stages"]["pretrain"]["job"] == f"slurm {state['job']['job_id']} (2 tasks)"
    assert status["stages"]["pretrain"]["status"] == "done"


def test_a_failing_task_fails_the_stage_with_its_own_log(tmp_path, slurm_cluster):
    """Rank 1 raises; rank 0 would have succeeded. The error names rank 1's exception, not a wrapper."""
    from tasks.config import LauncherConfig, Resources
    from tasks.launch import SlurmLauncher, StageJob, StageJobFailed, wait

    launcher = SlurmLauncher(LauncherConfig(kind="slurm", partition=slurm_cluster.partition))
    resources = Resources(partition=slurm_cluster.partition, nodes=1, tasks_per_node=2, cpus_per_task=1,
                          timeout_min=5, max_num_timeout=0, signal_delay_s=30)
    job = StageJob("tests.pipeline.rank_jobs:fail_on_rank_one", {})
    handle = launcher.submit(job, str(tmp_path), "rank-failure", resources)
    with pytest.raises(StageJobFailed) as err:
        wait(handle, 0.5)
    assert err.value.root_cause == "FileNotFoundError: rank 1 could not find its shard"
    assert "2 task(s)" in str(err.value) and "_1_log.err" in str(err.value)
    again = launcher.attach(str(tmp_path))  # re-attached with the task count it was submitted with
    assert again is None or again.num_tasks == 2
