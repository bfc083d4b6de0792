"""Retraining that really retrains: what a scheduled rerun on the same work_dir recomputes, with the local
launcher (job subprocesses) and the real Slurm cluster.

One sequence per launcher: a first run; a rerun on unchanged inputs (every stage reused, no job submitted,
no new model version); new images in the source (every stage recomputed, new weights, the new images in
the curated manifest, a new parent run and model version); a config change of one stage (exactly that
stage and what follows recompute); a stage directory deleted (recomputed, never a stale hit).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from tests.pipeline.conftest import load_tiny_config

STAGES = ("ingest", "embed", "dedup", "curate", "pretrain", "highres", "distill", "eval", "report")


def _add_images(source, count: int, seed: int) -> list[str]:
    """Noise images: they look like none of the generated classes, so dedup keeps them and balanced
    sampling (target above the pool size) selects them."""
    rng = np.random.default_rng(seed)
    class_dir = next(p for p in sorted(source.iterdir()) if p.is_dir())
    paths = []
    for i in range(count):
        path = class_dir / f"zz-new-{seed}-{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _digest(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _outcomes(results) -> dict[str, str]:
    return {stage: result.outcome for stage, result in results.items()}


def _parent_runs(cfg):
    from mlflow import MlflowClient

    client = MlflowClient(cfg.mlflow_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"],
                              filter_string=f"tags.pipeline = 'dinov2' and tags.work_dir = '{cfg.work_dir}'")


def _job_ids(cfg) -> set[str]:
    """Every job ever recorded under the run directory (one per identity directory of a heavy stage)."""
    ids = set()
    for stage in STAGES:
        root = os.path.join(cfg.work_dir, stage)
        for name in os.listdir(root) if os.path.isdir(root) else []:
            state = os.path.join(root, name, "_state.json")
            if os.path.exists(state):
                job = json.load(open(state)).get("job") or {}
                if job.get("kind") in ("local", "slurm"):
                    ids.add(f"{stage}:{job['job_id']}")
    return ids


@pytest.fixture(scope="module")
def local_sequence(tmp_path_factory, image_set):
    """The four runs of the local sequence, with what each returned."""
    from flows.pipeline import dinov2_pipeline

    root = tmp_path_factory.mktemp("retrain-local")
    source = root / "source"
    shutil.copytree(image_set["train_dir"], source)
    cfg = load_tiny_config(root / "run", image_set, f"source={source}", "curate.options.target_size=1000",
                           "launcher.local_mode=subprocess", "launcher.poll_interval_s=0.5")
    runs = {"first": dinov2_pipeline(config=cfg)}
    jobs_after_first = _job_ids(cfg)
    runs["unchanged"] = dinov2_pipeline(config=cfg)
    jobs_after_unchanged = _job_ids(cfg)
    added = _add_images(source, 4, seed=1)
    runs["new_images"] = dinov2_pipeline(config=cfg)
    changed = load_tiny_config(root / "run", image_set, f"source={source}", "curate.options.target_size=1000",
                               "launcher.local_mode=subprocess", "launcher.poll_interval_s=0.5",
                               "distill.overrides=[optim.epochs=1, optim.warmup_epochs=0, "
                               "teacher.warmup_teacher_temp_epochs=0, optim.base_lr=0.002]")
    runs["distill_changed"] = dinov2_pipeline(config=changed)
    return {"cfg": cfg, "runs": runs, "added": added, "jobs": (jobs_after_first, jobs_after_unchanged)}


@pytest.mark.slow
def test_unchanged_inputs_reuse_every_stage(local_sequence):
    runs = local_sequence["runs"]
    jobs_after_first, jobs_after_unchanged = local_sequence["jobs"]
    assert set(_outcomes(runs["first"]).values()) == {"recomputed"}
    reused = _outcomes(runs["unchanged"])
    assert all(outcome == "reused" for stage, outcome in reused.items() if stage != "report"), reused
    assert jobs_after_unchanged == jobs_after_first, "a rerun on unchanged inputs submitted jobs"
    first, again = runs["first"]["report"].extra["model"], runs["unchanged"]["report"].extra["model"]
    assert first["new_version"] and not again["new_version"]
    assert again["registered_version"] == first["registered_version"]


@pytest.mark.slow
def test_new_images_retrain_everything_downstream(local_sequence):
    from dinov2_core.data.manifest import read_manifest_table

    runs = local_sequence["runs"]
    before, after = runs["unchanged"], runs["new_images"]
    outcomes = _outcomes(after)
    assert all(outcome == "recomputed" for outcome in outcomes.values()), outcomes
    assert after["ingest"].reason == "input source changed"
    assert "upstream ingest changed" in after["embed"].reason
    assert after["ingest"].metrics["num_images"] == before["ingest"].metrics["num_images"] + 4
    curated = {row["uri"] for row in read_manifest_table(after["curate"].outputs["manifest"])}
    assert set(local_sequence["added"]) <= curated
    for stage in ("pretrain", "highres", "distill"):
        old, new = before[stage].outputs["export_dir"], after[stage].outputs["export_dir"]
        assert old != new and os.path.exists(os.path.join(old, "backbone.pth")), "the previous result stays readable"
        assert _digest(os.path.join(old, "backbone.pth")) != _digest(os.path.join(new, "backbone.pth"))
        rows = [json.loads(line) for line in open(after[stage].outputs["metrics_file"])]
        assert rows[0]["iteration"] == 0, f"{stage} resumed a checkpoint of other inputs instead of training anew"
    model = after["report"].extra["model"]
    assert model["new_version"] and int(model["registered_version"]) == int(
        before["report"].extra["model"]["registered_version"]) + 1


@pytest.mark.slow
def test_a_config_change_of_one_stage_recomputes_it_and_what_follows(local_sequence):
    outcomes = _outcomes(local_sequence["runs"]["distill_changed"])
    assert outcomes == {"ingest": "reused", "embed": "reused", "dedup": "reused", "curate": "reused",
                        "pretrain": "reused", "highres": "reused", "distill": "recomputed", "eval": "recomputed",
                        "report": "recomputed"}
    assert "config changed (optim.base_lr)" in local_sequence["runs"]["distill_changed"]["distill"].reason


@pytest.mark.slow
def test_each_run_is_its_own_mlflow_parent_run_linked_to_the_previous(local_sequence):
    from mlflow import MlflowClient

    cfg = local_sequence["cfg"]
    parents = _parent_runs(cfg)
    assert len(parents) == 4
    assert [int(p.data.tags["run_number"]) for p in parents] == [1, 2, 3, 4]
    assert parents[0].data.tags.get("previous_run_id") is None
    for previous, run in zip(parents, parents[1:]):
        assert run.data.tags["previous_run_id"] == previous.info.run_id
    assert parents[2].data.tags["recomputed"].split(",") == list(STAGES)
    client = MlflowClient(cfg.mlflow_uri)
    children = client.search_runs([parents[1].info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parents[1].info.run_id}'")
    by_stage = {c.data.tags["stage"]: c for c in children}
    assert by_stage["pretrain"].data.tags["outcome"] == "reused"
    assert by_stage["pretrain"].data.tags["computed_in_run"]
    assert "final.total_loss" in by_stage["pretrain"].data.metrics  # the reused result's numbers, for comparisons
    history = {p.info.run_id for p in parents}
    from tasks.tracking import compare_runs

    _, rows = compare_runs(cfg.mlflow_uri, cfg.tracking.experiment, work_dirs=[cfg.work_dir])
    assert {row["run"] for row in rows} == {run_id[:8] for run_id in history}


@pytest.mark.slow
def test_status_says_what_was_reused_and_why(local_sequence, capsys):
    from dinov2_pipeline.cli import main

    cfg = local_sequence["cfg"]
    assert main(["status", cfg.work_dir, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["stages"]["distill"]["outcome"] == "recomputed"
    assert "optim.base_lr" in status["stages"]["distill"]["reason"]
    assert status["stages"]["pretrain"]["outcome"] == "reused"
    assert len(status["runs"]) == 4
    report = open(local_sequence["runs"]["distill_changed"]["report"].outputs["report"]).read()
    assert "| distill | recomputed | config changed (optim.base_lr)" in report
    assert "| pretrain | reused |" in report


@pytest.mark.slow
def test_deleted_stage_directory_is_recomputed(tmp_path, image_set):
    from flows.pipeline import dinov2_pipeline

    cfg = load_tiny_config(tmp_path / "run", image_set, "launcher.local_mode=inline",
                           *[f"{s}.enabled=false" for s in ("highres", "distill", "eval", "report")])
    first = dinov2_pipeline(config=cfg)
    shutil.rmtree(cfg.stage_root("curate"))
    os.remove(os.path.join(first["dedup"].outputs["manifest"]))
    again = dinov2_pipeline(config=cfg)
    assert _outcomes(again)["ingest"] == "reused" and _outcomes(again)["embed"] == "reused"
    assert again["dedup"].outcome == "recomputed" and "is missing" in again["dedup"].reason
    assert again["curate"].outcome == "recomputed"
    assert os.path.exists(again["curate"].outputs["manifest"])


@pytest.mark.slow
def test_warm_start_from_the_previous_result_is_explicit(tmp_path, image_set):
    """``pretrain.init: previous`` continues from the last finished pretraining; the default never does."""
    from flows.pipeline import dinov2_pipeline

    only_pretrain = [f"{s}.enabled=false" for s in ("ingest", "embed", "dedup", "curate", "highres", "distill",
                                                     "eval", "report")]
    cfg = load_tiny_config(tmp_path / "run", image_set, f"source={image_set['train_manifest']}",
                           "launcher.local_mode=inline", *only_pretrain)
    first = dinov2_pipeline(config=cfg)
    warm = load_tiny_config(tmp_path / "run", image_set, f"source={image_set['train_manifest']}",
                            "launcher.local_mode=inline", "pretrain.init=previous", *only_pretrain)
    second = dinov2_pipeline(config=warm)
    assert second["pretrain"].outcome == "recomputed"
    assert json.load(open(os.path.join(second["pretrain"].outputs["dir"], "_SUCCESS.json")))["config"]["init_from"] == \
        first["pretrain"].outputs["export_dir"]


def _newest_slurm_job() -> int:
    """The highest job id the cluster has seen (jobs submitted later have higher ids)."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-a", "-S", "2000-01-01", "--format=JobIDRaw"],
                         capture_output=True, text=True, check=True).stdout
    return max([int(line.split("_")[0]) for line in out.split() if line.split("_")[0].isdigit()] or [0])


@pytest.mark.slow
def test_slurm_rerun_reuses_or_retrains_and_cancels_outdated_jobs(tmp_path, image_set, slurm_cluster):
    """On the real Slurm cluster: unchanged inputs submit nothing; new images submit new jobs whose
    results differ; a job still running for an outdated identity is cancelled, never adopted."""
    from flows.pipeline import dinov2_pipeline
    from tasks.config import LauncherConfig, Resources
    from tasks.launch import SlurmLauncher, StageJob
    from tasks.record import write_state

    source = tmp_path / "source"
    shutil.copytree(image_set["train_dir"], source)
    cfg = load_tiny_config(
        tmp_path / "run", image_set, f"source={source}", "curate.options.target_size=1000",
        *[f"{s}.enabled=false" for s in ("highres", "distill", "eval", "report")],
        "launcher.kind=slurm", f"launcher.partition={slurm_cluster.partition}", "launcher.timeout_min=10",
        "launcher.poll_interval_s=1",
    )
    first = dinov2_pipeline(config=cfg)
    newest = _newest_slurm_job()
    again = dinov2_pipeline(config=cfg)
    assert set(_outcomes(again).values()) == {"reused"}
    assert _newest_slurm_job() == newest, "a rerun on unchanged inputs submitted Slurm jobs"

    # a job left running for an identity that is about to become outdated
    stale_dir = os.path.join(cfg.stage_root("pretrain"), "0" * 16)
    launcher = SlurmLauncher(LauncherConfig(kind="slurm", partition=slurm_cluster.partition))
    sleeper = launcher.submit(StageJob("subprocess:call", {"args": ["sleep", "300"]}), stale_dir, "stale",
                              Resources(partition=slurm_cluster.partition, nodes=1, tasks_per_node=1,
                                        cpus_per_task=1, timeout_min=5, max_num_timeout=0, signal_delay_s=30))
    write_state(stale_dir, status="running")
    _add_images(source, 4, seed=2)
    retrained = dinov2_pipeline(config=cfg)
    assert set(_outcomes(retrained).values()) == {"recomputed"}
    for stage in ("embed", "pretrain"):
        old = json.load(open(os.path.join(first[stage].outputs["dir"] if stage == "pretrain"
                                          else os.path.dirname(first[stage].outputs["dir"]), "_state.json")))
        new_dir = retrained[stage].outputs["dir"] if stage == "pretrain" else os.path.dirname(retrained[stage].outputs["dir"])
        new = json.load(open(os.path.join(new_dir, "_state.json")))
        assert new["job"]["kind"] == "slurm" and new["job"]["job_id"] != old["job"]["job_id"]
    old_weights = os.path.join(first["pretrain"].outputs["export_dir"], "backbone.pth")
    assert _digest(old_weights) != _digest(os.path.join(retrained["pretrain"].outputs["export_dir"], "backbone.pth"))
    deadline = time.time() + 60
    while not sleeper.done() and time.time() < deadline:
        time.sleep(1)
    assert sleeper.state().startswith("CANCELLED"), sleeper.state()
    assert json.load(open(os.path.join(stale_dir, "_state.json")))["status"] == "cancelled"
